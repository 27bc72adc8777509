"""`doctor` on this machine and in deliberately broken environments: each breakage is reported by
exactly one failing check, with its remedy, and `run` stops with that check's words."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor import doctor, guest
from tests.support import (
    REPO,
    SubIds,
    as_user,
    base_env,
    instance_processes,
    leftovers,
    run_supervisor,
    supervisor_argv,
    user_ids,
    wait_until_gone,
)
from tests.test_kvm_watch import mknod

CHECKS = [
    "kvm-device", "kvm-access", "kvm-usable", "accelerator", "namespaces", "pidfd", "id-maps", "guest",
    "virtiofsd", "qemu", "qemu-sandbox", "egress", "memfd", "runtime-dir", "socket-paths",
]  # fmt: skip
DENY_UNSHARE = [str(REPO / ".venv" / "bin" / "python"), "-m", "tests.deny_unshare"]


def _without_unshare(args: list[str], *, user: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The supervisor under a seccomp filter that refuses unshare, as a container's default profile does."""
    return subprocess.run(
        as_user(user, [*DENY_UNSHARE, *supervisor_argv(), *args]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=base_env(),
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _doctor(
    args: list[str], *, user: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, dict[str, Any]]:
    result = run_supervisor(["doctor", "--json", *args], user=user, env=env, cwd=cwd)
    assert result.stderr == "", result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, report


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def _only_failure(report: dict[str, Any]) -> dict[str, Any]:
    failed: list[dict[str, Any]] = [check for check in report["checks"] if check["status"] == "fail"]
    assert len(failed) == 1, [(check["name"], check["summary"]) for check in failed]
    assert failed[0]["remedy"], failed[0]
    assert report["can_start"] is False and report["accel"] is None
    return failed[0]


def _dirs(base: Path, user: str | None = None) -> list[str]:
    (base / "work").mkdir(exist_ok=True)
    if user is not None:
        os.chown(base, *user_ids(user))
        os.chown(base / "work", *user_ids(user))
    return [
        "--work-dir",
        str(base / "work"),
        "--agent-home",
        str(base / "home"),
        "--runtime-dir",
        str(base / "rt"),
    ]


def test_doctor_on_this_machine(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    code, report = _doctor(_dirs(tmp_path))
    assert code == 0, report
    assert [check["name"] for check in report["checks"]] == CHECKS
    assert report["can_start"] is True and report["accel"] == "tcg"
    checks = _by_name(report)
    assert not [name for name, check in checks.items() if check["status"] == "fail"]
    # The reason auto picks TCG here: PVM-based KVM, which only boots PVM-built guest kernels.
    assert checks["kvm-usable"]["status"] == "warn" and "kvm_pvm is loaded" in checks["kvm-usable"]["summary"]
    assert checks["accelerator"]["facts"] == {"accel": "tcg", "requested": "auto"}
    assert checks["virtiofsd"]["facts"]["version"] == "1.13.2"
    assert {"--fd", "--translate-uid", "--uid-map"} <= set(checks["virtiofsd"]["facts"]["flags"])
    assert checks["qemu"]["status"] == "ok" and "vhost-user-fs-pci" in checks["qemu"]["summary"]
    assert checks["namespaces"]["status"] == "ok"
    assert checks["qemu-sandbox"]["status"] == "ok" and "spawn=deny" in checks["qemu-sandbox"]["summary"]
    # The report is the msgspec schema, and the doctor created nothing.
    assert msgspec.json.decode(json.dumps(report), type=doctor.Report).exit_code == 0
    assert not (tmp_path / "rt").exists() and not (tmp_path / "home").exists()


def test_a_qemu_without_seccomp_fails_the_sandbox_check_unless_it_is_turned_off(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """Issue 11: QEMU runs under -sandbox; a QEMU that cannot is refused with the remedy."""
    qemu = tmp_path / "qemu-no-seccomp"
    qemu.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = -sandbox ] && { echo "qemu: -sandbox is not supported by this QEMU build" >&2; exit 1; }; done\n'
        'exec qemu-system-x86_64 "$@"\n'
    )
    qemu.chmod(0o755)
    code, report = _doctor([*_dirs(tmp_path), "--qemu", str(qemu)])
    assert code == 69
    failed = _only_failure(report)
    assert failed["name"] == "qemu-sandbox" and "not supported by this QEMU build" in failed["summary"]
    assert "sandbox = false" in failed["remedy"]
    config = tmp_path / "c.toml"
    config.write_text("[qemu]\nsandbox = false\n")
    code, report = _doctor([*_dirs(tmp_path), "--qemu", str(qemu), "--config", str(config)])
    assert code == 0, report
    assert _by_name(report)["qemu-sandbox"]["status"] == "skip"


def test_doctor_prints_a_table_without_json(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    result = run_supervisor(["doctor", *_dirs(tmp_path)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "FINDING"]
    assert [line.split()[0] for line in lines[1:-1] if not line.startswith(" ")] == CHECKS
    assert lines[-1].startswith("A VM can start here (accelerator: tcg")
    assert any(line.strip().startswith("remedy: use accel") for line in lines)


def test_no_virtiofsd_on_path(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to("/usr/bin/qemu-system-x86_64")
    code, report = _doctor([*_dirs(tmp_path), "--virtiofsd", "virtiofsd"], env={"PATH": str(bin_dir)})
    assert code == 69
    failed = _only_failure(report)
    assert failed["name"] == "virtiofsd"
    assert failed["summary"] == "the virtiofsd binary 'virtiofsd' was not found on PATH"
    assert "install virtiofsd >= 1.10" in failed["remedy"] and "--virtiofsd" in failed["remedy"]


def test_too_old_virtiofsd_and_run_stops_with_the_same_words(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fake = tmp_path / "virtiofsd"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --version) echo 'virtiofsd 1.5.0';;\n"
        "  --help) printf '  --shared-dir <DIR>\\n  --socket-path <PATH>\\n  --sandbox <S>\\n  --cache <C>\\n"
        "  --xattr\\n  --xattrmap <M>\\n';;\n"
        '  *) echo started >> "$0.ran";;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    code, report = _doctor([*_dirs(tmp_path), "--virtiofsd", str(fake)])
    assert code == 69
    failed = _only_failure(report)
    assert failed["name"] == "virtiofsd" and failed["facts"]["version"] == "1.5.0"
    assert failed["summary"].startswith(
        f"virtiofsd 1.5.0 at {fake} lacks flags this configuration uses: --fd ("
    )
    assert "--translate-uid (for share 'work'" in failed["summary"] and "--xattr" not in failed["summary"]
    result = run_supervisor(
        ["run", "--name", "old-vfs", *_dirs(tmp_path), "--virtiofsd", str(fake), "--", "true"]
    )
    assert result.returncode == 69
    assert result.stderr.strip() == f"agentvm-supervise: {failed['summary']}: {failed['remedy']}"
    assert not Path(f"{fake}.ran").exists() and instance_processes("old-vfs") == []
    assert leftovers(tmp_path / "rt") == []


def test_unwritable_runtime_dir(guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o755)  # root's: the test user cannot create anything in it
    args = [*_dirs(shared_tmp, test_user)[:4], "--runtime-dir", str(locked / "base")]
    code, report = _doctor(args, user=test_user, cwd=shared_tmp)
    assert code == 73
    failed = _only_failure(report)
    assert failed["name"] == "runtime-dir"
    assert failed["summary"] == (
        f"the runtime dir {locked / 'base'} does not exist and cannot be created: {locked} is not writable "
        "for this user"
    )
    assert "--runtime-dir" in failed["remedy"]
    # A runtime dir that exists but has lost its write bit fails the same check.
    (locked / "base").mkdir(mode=0o500)
    os.chown(locked / "base", *user_ids(test_user))
    code, report = _doctor(args, user=test_user, cwd=shared_tmp)
    assert code == 73 and _only_failure(report)["summary"].endswith("so no instance dir can be made in it")


def test_socket_path_of_120_bytes(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    # BASE/agentvm-XXXXXXXX/cri-storage.sock is the longest: len(BASE) + 34 bytes.
    base = tmp_path / ("r" * (120 - 34 - len(os.fsencode(tmp_path)) - 1))
    assert len(os.fsencode(base)) + 34 == 120
    code, report = _doctor([*_dirs(tmp_path)[:4], "--runtime-dir", str(base), "--name", "agentvm"])
    assert code == 64
    failed = _only_failure(report)
    assert failed["name"] == "socket-paths" and failed["facts"]["bytes"] == 120
    assert failed["summary"].startswith(f"the socket path for share 'cri-storage', {base}/agentvm-")
    assert "is 120 bytes, over the 107-byte limit" in failed["summary"]
    assert re.search(r"\(\d more socket paths are too long too\)$", failed["summary"])  # qmp, console, ...
    assert "shorter runtime dir" in failed["remedy"]


def test_kvm_node_without_permission_as_an_unprivileged_user(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    (shared_tmp / "dev").mkdir()
    node = shared_tmp / "dev" / "kvm"
    mknod(node, 0o600)
    args = [*_dirs(shared_tmp, test_user), "--kvm-device", str(node)]
    code, report = _doctor([*args, "--accel", "kvm"], user=test_user, cwd=shared_tmp)
    assert code == 69
    failed = _only_failure(report)
    assert failed["name"] == "kvm-access"
    assert (
        "is not readable and writable by this user" in failed["summary"] and "mode 0600" in failed["summary"]
    )
    assert f"chmod 0660 {node}" in failed["remedy"] and "--accel tcg" in failed["remedy"]
    checks = _by_name(report)
    assert checks["kvm-usable"]["status"] == checks["accelerator"]["status"] == "skip"

    # With accel auto the same node only costs KVM: a warning, TCG, and a VM can start.
    code, report = _doctor(args, user=test_user, cwd=shared_tmp)
    assert code == 0 and report["accel"] == "tcg"
    assert _by_name(report)["kvm-access"]["status"] == "warn"

    # In a container the node's group often has no name: the remedy says which gid to add.
    os.chown(node, 0, 4242)
    node.chmod(0o660)
    code, report = _doctor([*args, "--accel", "kvm"], user=test_user, cwd=shared_tmp)
    assert code == 69
    assert "--group-add 4242" in _only_failure(report)["remedy"]


def test_namespaces_refused_by_seccomp_and_the_fallback(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    args = _dirs(shared_tmp, test_user)
    result = _without_unshare(["doctor", "--json", *args], user=test_user, cwd=shared_tmp)
    assert result.returncode == 69, result.stderr
    failed = _only_failure(json.loads(result.stdout))
    assert failed["name"] == "namespaces"
    assert failed["summary"] == (
        "virtiofsd's sandbox cannot create user, mount, pid and net namespaces here: unshare fails "
        "(EPERM: Operation not permitted)"
    )
    assert "seccomp profile" in failed["remedy"] and "--sandbox-fallback" in failed["remedy"]

    result = _without_unshare(
        ["doctor", "--json", *args, "--sandbox-fallback"], user=test_user, cwd=shared_tmp
    )
    assert result.returncode == 0, result.stdout
    namespaces = _by_name(json.loads(result.stdout))["namespaces"]
    assert namespaces["status"] == "warn" and "FALLING BACK" in namespaces["summary"]
    assert "--sandbox=none" in namespaces["summary"]

    # run stops with the doctor's words, before anything starts.
    result = _without_unshare(
        ["run", "--name", "no-userns", *args, "--", "true"], user=test_user, cwd=shared_tmp
    )
    assert result.returncode == 69
    assert result.stderr.strip() == f"agentvm-supervise: {failed['summary']}: {failed['remedy']}"
    assert instance_processes("no-userns") == []


@pytest.mark.vm
def test_run_with_the_sandbox_fallback_boots_and_keeps_file_ownership(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    uid, gid = user_ids(test_user)
    args = _dirs(shared_tmp, test_user)
    result = _without_unshare(["run", "--name", "fallback", *args, "--sandbox-fallback", "--",
         "sh", "-c", "echo hi > /work/f; stat -c %u:%g /work/f > /work/guest-view; exit 3"], user=test_user, cwd=shared_tmp)  # fmt: skip
    assert result.returncode == 3, result.stderr
    info = (shared_tmp / "work" / "f").stat()
    assert (info.st_uid, info.st_gid) == (uid, gid)  # the host sees the user's files
    assert (shared_tmp / "work" / "guest-view").read_text() == "1000:1000\n"  # the guest its agent's
    warnings = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if '"FALLING BACK' in line or "FALLING BACK" in line
    ]
    assert warnings and warnings[0]["level"] == "warning" and warnings[0]["check"] == "namespaces"
    started = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if '"started"' in line and "virtiofsd[" in line
    ]
    assert started and all("--sandbox=none" in str(event["argv"]) for event in started)
    assert all("--translate-uid=map:1000:" in str(event["argv"]) for event in started)
    assert wait_until_gone("fallback") == []


WIDE_BASE, WIDE_COUNT = 165536, 65536


def _wide_map_doctor(shared_tmp: Path, test_user: str, base: int) -> dict[str, Any]:
    config = shared_tmp / "c.toml"
    config.write_text(
        f'[virtiofsd]\nextra-args = ["--uid-map=:1:{base}:{WIDE_COUNT}:", "--gid-map=:1:{base}:{WIDE_COUNT}:"]\n'
    )
    # A PATH with what doctor runs and no newuidmap (Debian: the uidmap package), whether this
    # machine has uidmap installed or not.
    bin_dir = shared_tmp / "bin"
    bin_dir.mkdir()
    for tool in ("runuser", "env", "qemu-system-x86_64"):
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir)}
    code, report = _doctor(
        ["--config", str(config), *_dirs(shared_tmp, test_user)], user=test_user, cwd=shared_tmp, env=env
    )
    assert code == 69
    failed = _only_failure(report)
    assert failed["name"] == "id-maps"
    assert "newuidmap is not installed (apt-get install uidmap)" in failed["summary"]
    return failed


def test_a_wide_id_map_needs_newuidmap(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path, subids: SubIds
) -> None:
    # Regression (issue 17): this test relied on a /etc/subuid range an earlier run had left; on a
    # new machine the test user had none. It now gives the user the range itself.
    subids.give(test_user, WIDE_BASE, WIDE_COUNT)
    failed = _wide_map_doctor(shared_tmp, test_user, WIDE_BASE)
    assert "/etc/subuid" not in failed["summary"]  # the range given above covers the map


def test_a_wide_id_map_outside_the_users_subid_ranges_names_etc_subuid(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path, subids: SubIds
) -> None:
    base = 3_000_000_000  # far above what useradd hands out (SUB_UID_MIN 100000, 65536 a user)
    assert not subids.covers(test_user, base, WIDE_COUNT), "a range of the test user covers the probe map"
    failed = _wide_map_doctor(shared_tmp, test_user, base)
    assert f"/etc/subuid gives {test_user} no range covering {base}.." in failed["summary"]
    assert f"/etc/subgid gives {test_user} no range covering {base}.." in failed["summary"]


def test_a_bad_configuration_is_the_one_failure(tmp_path: Path) -> None:
    code, report = _doctor(["--work-dir", str(tmp_path / "missing"), "--runtime-dir", str(tmp_path / "rt")])
    assert code == 66
    failed = _only_failure(report)
    assert failed["name"] == "config" and str(tmp_path / "missing") in failed["summary"]
    assert [check["name"] for check in report["checks"]] == ["config"]


def test_a_device_node_check_reports_the_node_type(tmp_path: Path) -> None:
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)
    code, report = _doctor(["--work-dir", str(tmp_path), "--kvm-device", "/dev/null", "--accel", "kvm"])
    failed = _only_failure(report)
    assert (code, failed["name"]) == (69, "kvm-device")
    assert "/dev/null is not the KVM device (char 1:3" in failed["summary"]


@pytest.mark.vm
def test_run_as_root_with_the_sandbox_fallback_uses_chroot(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    result = subprocess.run(
        [*DENY_UNSHARE, *supervisor_argv(), "run", "--name", "fallback-root", *_dirs(tmp_path), "--sandbox-fallback",
         "--", "sh", "-c", "echo hi > /work/f; exit 4"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=base_env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    assert (tmp_path / "work" / "f").read_text() == "hi\n"
    started = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if '"started"' in line and "virtiofsd[" in line
    ]
    assert len(started) == 3 and all("--sandbox=chroot" in str(event["argv"]) for event in started)
    assert wait_until_gone("fallback-root") == [] and leftovers(tmp_path / "rt") == []
