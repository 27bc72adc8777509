"""Bad input: one clear paragraph naming the thing and the remedy, a non-zero named exit code,
nothing started and nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor import guest
from tests.support import instance_processes, leftovers, run_supervisor


def _check(
    result_args: list[str],
    *,
    code: int,
    must_say: list[str],
    runtime: Path,
    name: str,
    cwd: Path | None = None,
) -> str:
    result = run_supervisor(["run", "--name", name, "--runtime-dir", str(runtime), *result_args], cwd=cwd)
    message = result.stderr.strip()
    assert result.returncode == code, message
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one paragraph, got: {message}"
    assert lines[0].startswith("agentvm-supervise: ")
    for needle in must_say:
        assert needle in message, message
    assert "Traceback" not in message
    assert instance_processes(name) == []
    assert not any(p.name.startswith(name) for p in runtime.glob("*")) if runtime.exists() else True
    assert leftovers(runtime) == []
    return message


def test_missing_share_dir(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-project"
    _check(
        ["--work-dir", str(missing), "--agent-home", str(tmp_path / "h")],
        code=66,
        must_say=[str(missing), "--work-dir"],
        runtime=tmp_path / "rt",
        name="bad-missing",
    )
    assert not (tmp_path / "h").exists()  # nothing created for a launch that cannot happen


def test_missing_custom_share_source(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[shares]]\ntag = "data"\nsource = "{tmp_path / "gone"}"\n')
    _check(
        ["--config", str(config)],
        code=66,
        must_say=["share 'data'", str(tmp_path / "gone"), "shares[0].source"],
        runtime=tmp_path / "rt",
        name="bad-source",
    )


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[qemu]\nmemory = 512\n")
    _check(
        ["--config", str(config)],
        code=64,
        must_say=["unknown field `memory`", "$.qemu", str(config), "docs/config.md"],
        runtime=tmp_path / "rt",
        name="bad-key",
    )


def test_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[qemu]\nmemory-mib = "lots"\n')
    _check(
        ["--config", str(config)],
        code=64,
        must_say=["Expected `int`, got `str`", "$.qemu.memory-mib"],
        runtime=tmp_path / "rt",
        name="bad-type",
    )


def test_wrong_enum_value_lists_the_valid_ones(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[qemu]\naccel = "fast"\n')
    _check(
        ["--config", str(config)],
        code=64,
        must_say=["$.qemu.accel", "'fast'", "auto, kvm, tcg"],
        runtime=tmp_path / "rt",
        name="bad-enum",
    )


def test_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[qemu\n")
    _check(["--config", str(config)], code=64, must_say=["not valid TOML", str(config)],
           runtime=tmp_path / "rt", name="bad-toml")  # fmt: skip


def test_missing_config_file(tmp_path: Path) -> None:
    _check(["--config", str(tmp_path / "nope.toml")], code=66, must_say=["nope.toml", "does not exist"],
           runtime=tmp_path / "rt", name="bad-nofile")  # fmt: skip


def test_missing_virtiofsd_binary(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    _check(
        ["--work-dir", str(tmp_path / "w"), "--agent-home", str(tmp_path / "h"),
         "--virtiofsd", str(tmp_path / "bin" / "virtiofsd")],
        code=69,
        must_say=["virtiofsd", str(tmp_path / "bin" / "virtiofsd"), "does not exist", "--virtiofsd"],
        runtime=tmp_path / "rt",
        name="bad-vfs",
    )  # fmt: skip


def test_missing_qemu_binary(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    _check(
        [
            "--work-dir",
            str(tmp_path / "w"),
            "--agent-home",
            str(tmp_path / "h"),
            "--qemu",
            "qemu-system-nope",
        ],
        code=69,
        must_say=["qemu-system-nope", "not found on PATH", "apt-get install qemu-system-x86"],
        runtime=tmp_path / "rt",
        name="bad-qemu",
    )


def test_socket_path_over_sun_path_limit(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    deep = tmp_path / ("r" * 60) / ("t" * 40)
    message = _check(
        ["--work-dir", str(tmp_path / "w"), "--agent-home", str(tmp_path / "h")],
        code=64,
        must_say=["107-byte limit", "sun_path", "--runtime-dir"],
        runtime=deep,
        name="bad-sun",
    )
    assert str(deep) in message
    assert not deep.exists()  # the check ran before anything was created


def test_unknown_flag_and_stray_argument(tmp_path: Path) -> None:
    result = run_supervisor(["run", "--bogus"])
    assert result.returncode == 64
    assert "unrecognized arguments: --bogus" in result.stderr and "--help" in result.stderr
    result = run_supervisor(["run", "make", "test"])
    assert result.returncode == 64
    assert "after --" in result.stderr


def test_unwritable_runtime_dir_as_unprivileged_user(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o755)  # root's: the test user cannot create its instance dir in it
    work = shared_tmp / "w"
    work.mkdir()
    os.chown(work, *_ids(test_user))
    result = run_supervisor(
        ["run", "--name", "bad-rt", "--runtime-dir", str(locked / "base"), "--work-dir", str(work),
         "--agent-home", str(work / "h")],
        user=test_user,
        cwd=shared_tmp,
    )  # fmt: skip
    assert result.returncode == 73, result.stderr
    assert str(locked / "base") in result.stderr and "--runtime-dir" in result.stderr
    assert instance_processes("bad-rt") == []


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@pytest.mark.parametrize("value", ["0", "-1", "huge"])
def test_bad_memory_flag(tmp_path: Path, value: str) -> None:
    result = run_supervisor(["run", "--runtime-dir", str(tmp_path / "rt"), "--mem", value])
    assert result.returncode == 64
    assert ("--mem" in result.stderr) or ("$.qemu.memory-mib" in result.stderr), result.stderr


@pytest.mark.parametrize("mode", ["fd", "path"])
def test_virtiofsd_dying_at_start_is_named_with_its_output(
    guest_assets: guest.GuestAssets, tmp_path: Path, mode: str
) -> None:
    """Regression: a virtiofsd dying before QEMU started used to be blamed on QEMU."""
    fake = tmp_path / "virtiofsd"
    # It passes the preflight (answers --version and --help like the real one), then dies at start.
    fake.write_text(
        f'#!/bin/sh\ncase "$1" in --version|--help) exec {guest_assets.virtiofsd} "$1";; esac\n'
        "echo 'error: cannot open shared dir: Permission denied' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    (tmp_path / "w").mkdir()
    runtime = tmp_path / "rt"
    result = run_supervisor(
        ["run", "--name", "vfs-dies", "--runtime-dir", str(runtime), "--work-dir", str(tmp_path / "w"),
         "--agent-home", str(tmp_path / "h"), "--virtiofsd", str(fake), "--socket-mode", mode, "--", "true"]
    )  # fmt: skip
    assert result.returncode == 75, result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith("agentvm-supervise: virtiofsd for share '")
    assert "exited (status 1)" in final and "cannot open shared dir: Permission denied" in final
    assert instance_processes("vfs-dies") == []
    assert leftovers(runtime) == []


def test_qemu_failing_at_start_is_reported_with_its_words(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[qemu]\nextra-args = ["-no-such-option"]\n')
    (tmp_path / "w").mkdir()
    runtime = tmp_path / "rt"
    result = run_supervisor(
        ["run", "--name", "qemu-fails", "--config", str(config), "--runtime-dir", str(runtime),
         "--work-dir", str(tmp_path / "w"), "--agent-home", str(tmp_path / "h"), "--", "true"]
    )  # fmt: skip
    assert result.returncode == 76, result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert "QEMU" in final and "status 1" in final and "-no-such-option: invalid option" in final
    assert instance_processes("qemu-fails") == []
    assert leftovers(runtime) == []


def test_share_created_under_missing_parents_gets_the_nearest_existing_owner(tmp_path: Path) -> None:
    """Regression (found by the config fuzzer): `create = true` for a share two levels below an
    existing dir was an internal error while looking up the owner of its missing parent."""
    from supervisor import checks
    from supervisor import config as config_module
    from supervisor import plan as plan_module

    cfg = config_module.load(
        None,
        {
            "runtime-dir": str(tmp_path / "rt"),
            "shares": [{"tag": "data", "source": str(tmp_path / "a" / "b"), "create": True}],
            "qemu": {"accel": "tcg"},
        },
    )
    checked = plan_module.build_plan(
        cfg,
        env={"AGENTVM_SUPERVISE_CACHE": "/nonexistent"},
        cwd=tmp_path,
        command=None,
        preflight=checks.Preflight(strict=False),
    )
    [share] = checked.shares
    assert share.source == tmp_path / "a" / "b" and not share.source.exists()  # planning creates nothing
    assert share.ids.host_uid == tmp_path.stat().st_uid  # as root: the owner of the nearest existing dir
