"""microvm.nix runners: the rewrite (by inspection) and real launches through runner scripts."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from supervisor import config, guest, kvm, microvm_runner, plan, qemu
from supervisor.config import Hypervisor
from supervisor.errors import ExitCode, SupervisorError
from tests.runner_fixtures import (
    FAKE_CLOUD_HYPERVISOR,
    HOST,
    RunnerFixture,
    cloud_hypervisor_command,
    qemu_command,
)
from tests.support import TEST_CACHE, Launch, instance_processes, leftovers, wait_until_gone

NO_KVM = kvm.KvmAssessment(False, "the test says KVM is unusable", "use a KVM host")
KVM = kvm.KvmAssessment(True, "the test says KVM is usable")


def _values(line: str) -> list[str | None]:
    return [word.value for word in microvm_runner.split_words(line)]


# ---- shell words -------------------------------------------------------------------------------


def test_split_words_keeps_raw_text_and_values() -> None:
    line = """exec -a "microvm@vm" /bin/q 'a b' c\\ d "x\\"y" ${runtime_args:-} "$HOME" '$lit' # c"""
    words = microvm_runner.split_words(line)
    assert [w.raw for w in words] == [
        "exec", "-a", '"microvm@vm"', "/bin/q", "'a b'", "c\\ d", '"x\\"y"', "${runtime_args:-}", '"$HOME"',
        "'$lit'",
    ]  # fmt: skip
    assert [w.value for w in words] == [
        "exec", "-a", "microvm@vm", "/bin/q", "a b", "c d", 'x"y', None, None, "$lit",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "line", ["exec q; rm -rf /", "exec q && x", "exec q > f", "exec 'open", 'exec "open']
)
def test_split_words_refuses_shell_syntax_it_does_not_expect(line: str) -> None:
    with pytest.raises(ValueError):
        microvm_runner.split_words(line)


# ---- the QEMU rewrite, by inspection ---------------------------------------------------------------


def _runner_plan(
    tmp_path: Path,
    script: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    assessment: kvm.KvmAssessment = NO_KVM,
    env: Mapping[str, str] | None = None,
) -> plan.Plan:
    work = tmp_path / "proj"
    work.mkdir(exist_ok=True)
    merged = {"runner": {"script": str(script)}, "work-dir": str(work), "runtime-dir": "/tmp/avr-plan-only"}
    merged.update(overrides or {})
    return plan.build_plan(
        config.load(None, merged),
        env={"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE), "HOME": str(tmp_path / "home"), **(env or {})},
        cwd=tmp_path,
        command=None,
        kvm_assessment=assessment,
    )


def _exec_words(rendered: str) -> list[str | None]:
    [line] = [line for line in rendered.split("\n") if line.startswith("exec ")]
    return _values(line)


def _arg(words: list[str | None], option: str) -> list[str | None]:
    return [words[i + 1] for i, word in enumerate(words) if word == option]


def test_qemu_runner_is_rewritten_into_the_runtime_dir_and_switched_to_tcg(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fixture = RunnerFixture(tmp_path / "runner")
    original = qemu_command(guest_assets, guest_command=["true"])
    fixture.write(original)
    checked = _runner_plan(tmp_path, fixture.directory)  # the package dir works as well as bin/microvm-run
    assert checked.runner is not None and checked.runner.hypervisor is Hypervisor.QEMU
    rendered = checked.runner.render(checked.instance_dir, 42)
    words = _exec_words(rendered)
    inst, rt = checked.instance, checked.instance_dir
    assert words[:4] == ["exec", "-a", f"microvm@{inst}", "/usr/bin/qemu-system-x86_64"]
    assert _arg(words, "-name") == [inst]
    assert _arg(words, "-M") == [
        "microvm,accel=tcg,acpi=on,mem-merge=on,pcie=on,pic=off,pit=off,rtc=on,usb=off"
    ]
    assert "-enable-kvm" not in words
    assert _arg(words, "-cpu") == ["max"]
    assert _arg(words, "-qmp") == [f"unix:{rt}/qmp.sock,server,nowait"]
    assert [v for v in _arg(words, "-chardev") if v and v.startswith("socket,id=fs")] == [
        f"socket,id=fs0,path={rt}/work.sock",
        f"socket,id=fs1,path={rt}/agent-home.sock",
        f"socket,id=fs2,path={rt}/cri-storage.sock",
    ]
    assert words[-5:] == [
        "-chardev", "socket,id=agentvm-qmp,fd=42", "-mon", "chardev=agentvm-qmp,mode=control", None,
    ]  # fmt: skip
    assert rendered.split("\n")[-2].endswith(" ${runtime_args:-}")  # still expanded by the shell
    [append] = _arg(words, "-append")
    tsc = qemu.host_tsc_khz()
    assert append is not None and (tsc is None or append.endswith(f" tsc_early_khz={tsc}"))
    # every other word is exactly what microvm.nix wrote
    changed = {"-name", "-M", "-cpu", "-qmp", "-append", "-enable-kvm"}
    kept = [w for i, w in enumerate(original) if w not in changed and original[i - 1] not in changed]
    kept = [w for w in kept if not w.startswith("socket,id=fs") and w != original[0]]
    assert all(w in words for w in kept)
    # shares come from the launcher's layout, not the runner's /tmp/claude-vm-* placeholders
    assert [(s.tag, s.source) for s in checked.shares] == [
        ("work", tmp_path / "proj"),
        ("agent-home", checked.agent_home),
        ("cri-storage", (checked.agent_home or Path()) / "cri-storage"),
    ]
    assert checked.env_file is not None


def test_qemu_runner_under_kvm_keeps_its_accelerator_and_takes_overrides(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=None, mem=4096, vcpus=4))
    overrides = {"qemu": {"memory-mib": 1024, "vcpus": 2, "cmdline": "loglevel=7"}, "forwards": ["8080:80"]}
    checked = _runner_plan(tmp_path, fixture.script, overrides, assessment=KVM)
    assert checked.runner is not None
    words = _exec_words(checked.runner.render(checked.instance_dir, 7))
    assert "-enable-kvm" in words
    assert _arg(words, "-cpu") == ["host,+x2apic,-sgx"]
    assert (
        _arg(words, "-M")[0]
        == "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=on,pic=off,pit=off,rtc=on,usb=off"
    )
    assert _arg(words, "-m") == ["1024M"]
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in _arg(words, "-object")
    assert _arg(words, "-smp") == ["2"]
    assert _arg(words, "-netdev") == ["user,id=usernet,hostfwd=tcp:127.0.0.1:8080-:80"]
    [append] = _arg(words, "-append")
    assert append is not None and append.endswith(" loglevel=7") and "tsc_early_khz" not in append


def test_declared_and_configured_shares(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    store, keys, mine = tmp_path / "store", tmp_path / "keys", tmp_path / "my-home"
    for path in (store, keys, mine):
        path.mkdir()
    shares = (
        ("work", "/tmp/x-work"),
        ("agent-home", "/tmp/x-home"),
        ("ro-store", str(store)),
        ("keys", str(keys)),
    )
    fixture = RunnerFixture(tmp_path / "runner", shares=shares)
    fixture.write(qemu_command(guest_assets, guest_command=None, shares=shares))
    overrides = {"shares": [{"tag": "agent-home", "source": str(mine)}, {"tag": "keys", "source": str(keys),
                                                                         "read-only": True}]}  # fmt: skip
    checked = _runner_plan(tmp_path, fixture.script, overrides)
    assert [(s.tag, s.source, s.read_only) for s in checked.shares] == [
        ("work", tmp_path / "proj", False),  # the launcher's layout
        ("agent-home", mine, False),  # [[shares]] wins
        ("ro-store", store, False),  # what the runner declares
        ("keys", keys, True),
    ]
    assert checked.env_file is None  # the agent home is not the launcher's: no .microvm-env in it

    with pytest.raises(SupervisorError, match=r"share 'nope' that the runner .* does not use"):
        _runner_plan(tmp_path, fixture.script, {"shares": [{"tag": "nope", "source": str(keys)}]})
    (fixture.directory / "share").rename(tmp_path / "gone")
    with pytest.raises(SupervisorError, match="virtiofs share 'ro-store' whose source directory is unknown"):
        _runner_plan(tmp_path, fixture.script)


def test_runner_errors_name_the_runner_and_the_remedy(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=None, user_net=False))
    with pytest.raises(SupervisorError, match=r"no user-mode network .* which --forward needs"):
        _runner_plan(tmp_path, fixture.script, {"forwards": ["8080:80"]})
    with pytest.raises(SupervisorError, match="needs the built-in guest"):
        plan.build_plan(
            config.load(None, {"runner": {"script": str(fixture.script)}, "runtime-dir": "/tmp/avr-x"}),
            env={},
            cwd=tmp_path,
            command=["true"],
            kvm_assessment=NO_KVM,
        )
    with pytest.raises(SupervisorError, match=r"runner.cwd .* is not an existing directory"):
        _runner_plan(tmp_path, fixture.script, {"runner": {"script": str(fixture.script), "cwd": "nope"}})
    with pytest.raises(SupervisorError) as missing:
        _runner_plan(tmp_path, tmp_path / "nowhere" / "bin" / "microvm-run")
    assert missing.value.exit_code is ExitCode.NO_INPUT
    text = fixture.script.read_text()
    fixture.script.write_text(text.replace("exec -a", "echo -a"))
    with pytest.raises(SupervisorError, match="has 0 exec lines"):
        _runner_plan(tmp_path, fixture.script)
    fixture.script.write_text(text.replace("exec -a", "exec -a x ; exec -a"))
    with pytest.raises(SupervisorError, match="shell operator"):
        _runner_plan(tmp_path, fixture.script)
    fixture.script.write_text(text.replace("-qmp unix:", "-qmp tcp:1 -qmp unix:"))
    with pytest.raises(SupervisorError, match="more than one -qmp"):
        _runner_plan(tmp_path, fixture.script)
    fixture.script.write_text(
        text.replace("/usr/bin/qemu-system-x86_64", "/nix/store/x-firecracker/bin/firecracker")
    )
    (fixture.directory / "share" / "microvm" / "hypervisor").write_text("firecracker\n")
    with pytest.raises(SupervisorError, match="runs 'firecracker'; agentvm-supervise runs qemu and cloud"):
        _runner_plan(tmp_path, fixture.script)


# ---- cloud-hypervisor, by inspection ---------------------------------------------------------------


def _ch_fixture(tmp_path: Path) -> RunnerFixture:
    fake = tmp_path / "runner" / "fake" / "cloud-hypervisor"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_CLOUD_HYPERVISOR)
    fake.chmod(0o755)
    fixture = RunnerFixture(tmp_path / "runner", hypervisor="cloud-hypervisor")
    fixture.pre_start = [
        "",
        "# workaround cloud-hypervisor sometimes",
        "# stumbling over a preexisting socket",
        f"rm -f '{HOST}.sock'",
    ]
    fixture.write(cloud_hypervisor_command(fake))
    return fixture


def test_cloud_hypervisor_runner_is_rewritten(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    fixture = _ch_fixture(tmp_path)
    checked = _runner_plan(
        tmp_path, fixture.script, {"qemu": {"memory-mib": 2048, "vcpus": 2}}, assessment=KVM
    )
    assert checked.runner is not None and checked.runner.hypervisor is Hypervisor.CLOUD_HYPERVISOR
    rendered = checked.runner.render(checked.instance_dir, None)
    words = _exec_words(rendered)
    rt = checked.instance_dir
    assert words[2] == f"microvm@{checked.instance}"
    assert _arg(words, "--api-socket") == [f"{rt}/api.sock"]
    fs = words.index("--fs")
    assert words[fs + 1 : fs + 4] == [
        f"socket={rt}/work.sock,tag=work",
        f"socket={rt}/agent-home.sock,tag=agent-home",
        f"socket={rt}/cri-storage.sock,tag=cri-storage",
    ]
    assert _arg(words, "--memory") == ["mergeable=on,shared=on,size=2048M"]
    assert _arg(words, "--cpus") == ["boot=2"]
    assert _arg(words, "--platform") == [""]
    assert f"rm -f {rt}/api.sock" in rendered.split("\n")
    assert f"rm -f '{HOST}.sock'" not in rendered
    assert checked.notes == ()


def test_cloud_hypervisor_cannot_do_tcg_or_user_networking(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fixture = _ch_fixture(tmp_path)
    with pytest.raises(SupervisorError, match="cloud-hypervisor, which needs KVM") as tcg:
        _runner_plan(tmp_path, fixture.script, {"qemu": {"accel": "tcg"}})
    assert tcg.value.exit_code is ExitCode.UNAVAILABLE
    with pytest.raises(SupervisorError, match="no user-mode network for --forward"):
        _runner_plan(tmp_path, fixture.script, {"forwards": ["8080:80"]}, assessment=KVM)
    warned = _runner_plan(tmp_path, fixture.script)  # auto without KVM: run it, but say why it may fail
    assert any("cloud-hypervisor needs KVM" in note for note in warned.notes)


# ---- real launches -----------------------------------------------------------------------------------


def _assert_nothing_left(prefix: str, runtime: Path, caller: Path) -> None:
    assert wait_until_gone(prefix) == []
    assert leftovers(runtime) == []
    assert list(caller.iterdir()) == []  # the runner's relative sockets did not land in the caller's cwd


@pytest.mark.vm
def test_real_launch_through_a_microvm_nix_qemu_runner(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    caller, work = tmp_path / "caller", tmp_path / "proj"
    caller.mkdir()
    work.mkdir()
    script = (
        "grep ' virtiofs ' /proc/mounts | cut -d' ' -f1,2 > /work/mounts; id -u > /work/uid; "
        '. /home/agent/.microvm-env; echo "$ENABLE_CRI" > /work/cri; '
        "echo GUEST-READY; while [ ! -e /work/go ]; do sleep 0.1; done"
    )
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=["sh", "-c", script]))
    sup = launch(
        # --accel tcg: the switch happens on any host (here auto picks TCG anyway: PVM-based KVM)
        ["run", "--runner", str(fixture.script), "--runtime-dir", str(short_runtime), "--accel", "tcg", "-v"],
        env={"WORK_DIR": str(work), "HOME": str(tmp_path / "home"), "ENABLE_CRI": "docker"},
        cwd=caller,
    )
    sup.read_until(b"GUEST-READY", timeout=120)
    [instance_dir] = short_runtime.iterdir()
    assert re.fullmatch(r"proj-claude-vm-[0-9a-f]{8}", instance_dir.name)
    names = sorted(p.name for p in instance_dir.iterdir())
    assert {"qmp.sock", "microvm-run", "work.sock", "agent-home.sock", "cri-storage.sock"} <= set(names)
    assert stat.S_ISSOCK((instance_dir / "qmp.sock").stat().st_mode)
    [(pid, cmdline)] = [(p, c) for p, c in instance_processes("proj-claude-vm") if "accel=" in c]
    assert cmdline.startswith(f"microvm@{instance_dir.name} ")  # exec -a: the process name
    assert "accel=tcg" in cmdline and "-enable-kvm" not in cmdline
    assert Path(f"/proc/{pid}/cwd").resolve() == instance_dir
    assert list(caller.iterdir()) == []
    (work / "go").touch()
    code, _, stderr = sup.finish()
    assert code == 0, stderr
    assert (work / "mounts").read_text().split("\n")[:3] == [
        "work /work",
        "agent-home /home/agent",
        "cri-storage /var/lib/containers",
    ]
    assert (work / "uid").read_text() == "1000\n"
    assert (work / "cri").read_text() == "docker\n"
    assert (work / "mounts").stat().st_uid == os.getuid()
    _assert_nothing_left("proj-claude-vm", short_runtime, caller)


@pytest.mark.vm
def test_sigterm_stops_a_qemu_runner_through_qmp_passed_into_the_script(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    caller, work = tmp_path / "caller", tmp_path / "proj"
    caller.mkdir()
    work.mkdir()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[runner]\nscript = "{tmp_path / "runner"}"\n[timeouts]\ngraceful-stop = 2\n')
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=["sh", "-c", "echo GUEST-READY; sleep 600"]))
    sup = launch(
        ["run", "--config", str(conf), "--work-dir", str(work), "--runtime-dir", str(short_runtime),
         "--name", "rsig", "-v"],
        env={"HOME": str(tmp_path / "home")},
        cwd=caller,
    )  # fmt: skip
    sup.read_until(b"GUEST-READY", timeout=120)
    sup.signal(signal.SIGTERM)
    code, _, stderr = sup.finish()
    assert code == 128 + signal.SIGTERM, stderr
    events = [json.loads(line).get("event") for line in stderr.splitlines() if line.startswith("{")]
    assert "asked the guest to power off" in events  # system_powerdown over the private QMP channel
    assert "the guest did not power off in time; quitting QEMU" in events  # the init ignores ACPI
    _assert_nothing_left("rsig", short_runtime, caller)


def _ch_launch(launch: Launch, tmp_path: Path, runtime: Path, name: str) -> tuple[Any, Path]:
    caller, work = tmp_path / "caller", tmp_path / "proj"
    caller.mkdir()
    work.mkdir()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[runner]\nscript = "{tmp_path / "runner" / "bin" / "microvm-run"}"\n'
                    "[timeouts]\ngraceful-stop = 2\nquit = 2\n")  # fmt: skip
    sup = launch(
        ["run", "--config", str(conf), "--work-dir", str(work), "--runtime-dir", str(runtime), "--name", name,
         "-v"],
        env={"HOME": str(tmp_path / "home")},
        cwd=caller,
    )  # fmt: skip
    argv_file = tmp_path / "runner" / "fake" / "argv.json"
    deadline = time.monotonic() + 60
    while not (argv_file.exists() and any(runtime.glob("*/api.sock"))):
        assert time.monotonic() < deadline, sup.finish(timeout=5)
        time.sleep(0.05)
    return sup, caller


def test_cloud_hypervisor_runner_stops_through_its_api(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    """A stand-in cloud-hypervisor (a small API server) run through a microvm.nix-shaped runner."""
    _ch_fixture(tmp_path)
    sup, caller = _ch_launch(launch, tmp_path, short_runtime, "chstop")
    seen = json.loads((tmp_path / "runner" / "fake" / "argv.json").read_text())
    [instance_dir] = short_runtime.iterdir()
    # (exec -a's name does not survive a #! stand-in; the inspection test above checks it)
    assert seen["cwd"] == str(instance_dir)
    assert seen["argv"][seen["argv"].index("--api-socket") + 1] == str(instance_dir / "api.sock")
    sup.signal(signal.SIGTERM)
    code, _, stderr = sup.finish()
    assert code == 128 + signal.SIGTERM, stderr
    requests = (tmp_path / "runner" / "fake" / "requests.log").read_text().splitlines()
    assert requests == ["PUT /api/v1/vm.power-button HTTP/1.1"]
    assert '"status": 204' in stderr
    _assert_nothing_left("chstop", short_runtime, caller)


def test_cloud_hypervisor_that_ignores_the_power_button_is_shut_down_after_the_deadline(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    _ch_fixture(tmp_path)
    (tmp_path / "runner" / "fake" / "IGNORE_POWER_BUTTON").touch()
    sup, caller = _ch_launch(launch, tmp_path, short_runtime, "chdead")
    started = time.monotonic()
    sup.signal(signal.SIGTERM)
    code, _, stderr = sup.finish()
    assert code == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - started >= 2.0  # the graceful deadline was given
    requests = (tmp_path / "runner" / "fake" / "requests.log").read_text().splitlines()
    assert requests == ["PUT /api/v1/vm.power-button HTTP/1.1", "PUT /api/v1/vmm.shutdown HTTP/1.1"]
    assert "cloud-hypervisor did not exit in time" in stderr
    _assert_nothing_left("chdead", short_runtime, caller)


def test_a_runner_failing_before_its_exec_reports_its_status_and_words(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    caller = tmp_path / "caller"
    caller.mkdir()
    fixture = RunnerFixture(
        tmp_path / "runner", pre_start=['echo "preStart: var.img is not writable" >&2', "exit 3"]
    )
    fixture.write(qemu_command(guest_assets, guest_command=None))
    sup = launch(
        ["run", "--runner", str(fixture.script), "--work-dir", str(tmp_path),
         "--runtime-dir", str(short_runtime), "--name", "rfail"],
        env={"HOME": str(tmp_path / "home")},
        cwd=caller,
    )  # fmt: skip
    code, _, stderr = sup.finish()
    assert code == 3, stderr
    [failed] = [json.loads(line) for line in stderr.splitlines() if '"runner failed"' in line]
    assert failed["said"] == "preStart: var.img is not writable" and failed["status"] == "status 3"
    _assert_nothing_left("rfail", short_runtime, caller)
