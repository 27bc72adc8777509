"""The built-in guest's agent environment (guest/agent-env.sh), run by the guest's own busybox sh.

The boot tests (test_launcher.py) show the guest command sees .microvm-env and the dev shell; these
cover the cases a boot each would be too dear for: a dev shell busybox cannot parse, none cached,
DIRENV_ALLOW off.
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from supervisor import guest

AGENT_ENV = Path(guest.__file__).parent / "guest" / "agent-env.sh"
GUEST_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


@pytest.fixture(scope="session")
def guest_sh(guest_assets: guest.GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's busybox, taken out of its initramfs (the host may have no busybox at all)."""
    where = tmp_path_factory.mktemp("initrd")
    subprocess.run(
        ["cpio", "-id", "--quiet", "bin/busybox"],
        input=gzip.decompress(guest_assets.initrd.read_bytes()),
        cwd=where,
        check=True,
    )
    return where / "bin" / "busybox"


def _run(guest_sh: Path, home: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` after agent-env.sh, as the guest runs a command: HOME set, a bare environment."""
    return subprocess.run(
        [str(guest_sh), "sh", "-c", f". {AGENT_ENV}\n{script}"],
        env={"HOME": str(home), "PATH": GUEST_PATH},
        capture_output=True,
        text=True,
        check=False,
    )


def _home(tmp_path: Path, env_file: str, devshell: str | None) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".microvm-env").write_text(env_file)
    if devshell is not None:
        (home / ".microvm-devshell").write_text(devshell)
    return home


def test_env_file_is_exported_and_the_dev_shell_path_comes_first(guest_sh: Path, tmp_path: Path) -> None:
    home = _home(
        tmp_path,
        "DIRENV_ALLOW='1'\nENABLE_CRI=''\nANTHROPIC_API_KEY='sk-a b'\\''c'\n",
        "export DEVSHELL_MARK='with space'\nexport PATH=/nix/store/x-tool/bin:$PATH\nnot_exported=1\n",
    )
    result = _run(
        guest_sh, home, 'env | grep -E "^(ANTHROPIC_API_KEY|DEVSHELL_MARK|PATH|not_exported)=" | sort'
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ANTHROPIC_API_KEY=sk-a b'c",
        "DEVSHELL_MARK=with space",
        f"PATH=/nix/store/x-tool/bin:{GUEST_PATH}",
    ]
    assert result.stderr == ""


def test_a_dev_shell_busybox_cannot_parse_is_skipped_with_a_warning(guest_sh: Path, tmp_path: Path) -> None:
    """Regression guard: `nix print-dev-env` writes bash (arrays); a failed `.` must not end the
    agent's shell or leave half a dev shell behind."""
    home = _home(tmp_path, "DIRENV_ALLOW='1'\n", "export HALF=1\ndeclare -a arr=(a b)\nexport OTHER=1\n")
    result = _run(guest_sh, home, 'echo "still here ${HALF:-unset} $DIRENV_ALLOW"')
    assert result.returncode == 0, result.stderr
    assert result.stdout == "still here unset 1\n"
    assert "loading the dev shell" in result.stderr and "runs without it" in result.stderr


def test_no_dev_shell_without_direnv_allow_and_a_missing_one_is_explained(
    guest_sh: Path, tmp_path: Path
) -> None:
    home = _home(tmp_path, "DIRENV_ALLOW='0'\n", "export DEVSHELL_MARK=1\n")
    result = _run(guest_sh, home, 'echo "${DEVSHELL_MARK:-none}"')
    assert (result.stdout, result.stderr) == ("none\n", "")

    (home / ".microvm-devshell").write_text("export PATH=/nix/store/y/bin\n")  # a PATH without ours
    (home / ".microvm-env").write_text("DIRENV_ALLOW='1'\n")
    assert _run(guest_sh, home, 'echo "$PATH"').stdout == f"/nix/store/y/bin:{GUEST_PATH}\n"

    (home / ".microvm-env").write_text("DIRENV_ALLOW='1'\n")
    (home / ".microvm-devshell").unlink()
    (home / ".microvm-devshell.err").write_text("error: boom from nix\n")
    result = _run(guest_sh, home, 'echo "${DEVSHELL_MARK:-none}"')
    assert result.stdout == "none\n"
    assert "dev shell cache" in result.stderr and "error: boom from nix" in result.stderr


def test_no_env_file_leaves_the_environment_alone(guest_sh: Path, tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    result = _run(guest_sh, home, "env | sort")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"HOME={home}",
        f"PATH={GUEST_PATH}",
        f"PWD={Path.cwd()}",
        "SHLVL=1",
    ]
