"""The guest-side resize helper for NixOS guests (nix/): the script on a real terminal, the module
parsed and evaluated by Nix (with stand-ins for nixpkgs' lib and pkgs, which are not here)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.console.terminal import get_window_size, set_window_size
from tests.support import REPO

NIX = REPO / "nix"
# --store dummy://: evaluating needs no store, and without it nix-instantiate creates /nix.
NIX_INSTANTIATE = ["nix-instantiate", "--store", "dummy://"]


def test_the_nixos_module_parses() -> None:
    result = subprocess.run(
        [*NIX_INSTANTIATE, "--parse", str(NIX / "guest-resize.nix")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_nixos_module_evaluates_to_a_path_unit_and_a_service() -> None:
    expression = f"""
    let
      lib = {{
        mkOption = option: option.default;
        mkIf = condition: value: if condition then value else {{ }};
        types = {{ bool = "bool"; str = "str"; }};
      }};
      pkgs = {{
        coreutils = "/coreutils";
        writeShellApplication = app: assert builtins.isString app.text; "/store/${{app.name}}";
      }};
      module = import {NIX / "guest-resize.nix"};
      options = (module {{ config = {{ }}; inherit lib pkgs; }}).options.agentvm.consoleResize;
      config = {{ agentvm.consoleResize = options // {{ console = "ttyS0"; }}; }};
      evaluated = (module {{ inherit config lib pkgs; }}).config;
    in {{
      exec = evaluated.systemd.services.agentvm-console-resize.serviceConfig.ExecStart;
      path = evaluated.systemd.paths.agentvm-console-resize.pathConfig.PathExists;
      enabled = options.enable;
    }}
    """
    result = subprocess.run(
        [*NIX_INSTANTIATE, "--eval", "--strict", "--json", "--expr", expression],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        '{"enabled":true,'
        '"exec":"/store/agentvm-console-resize/bin/agentvm-console-resize '
        '/dev/virtio-ports/org.agentvm.resize /dev/ttyS0",'
        '"path":"/dev/virtio-ports/org.agentvm.resize"}'
    )


@pytest.fixture
def terminal() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    set_window_size(slave, (24, 80))
    yield slave, os.ttyname(slave)
    os.close(slave)
    os.close(master)


def _wait_for_size(fd: int, size: tuple[int, int]) -> None:
    deadline = time.monotonic() + 20
    while get_window_size(fd) != size:
        assert time.monotonic() < deadline, f"the terminal is {get_window_size(fd)}, not {size}"
        time.sleep(0.02)


@pytest.mark.parametrize("shell", ["sh", "bash"])  # dash, and bash as writeShellApplication runs it
def test_the_helper_applies_each_size_and_reopens_the_port(
    terminal: tuple[int, str], tmp_path: Path, shell: str
) -> None:
    fd, name = terminal
    port = tmp_path / "port"
    os.mkfifo(port)
    helper = subprocess.Popen([*shell.split(), str(NIX / "agentvm-console-resize.sh"), str(port), name])
    try:
        with port.open("w") as host:
            host.write("40 120\n")
            host.flush()
            _wait_for_size(fd, (40, 120))
            host.write("rm -rf /\nx 5\n7\n 9 \n50 150 extra\n")  # nonsense is skipped
            host.flush()
            _wait_for_size(fd, (50, 150))
        # The host end went away and comes back. Opening may catch the helper's old read end just
        # before it closes it (EPIPE): then the host writes again, as QEMU would reconnect.
        for _ in range(50):
            try:
                with port.open("w") as host:
                    host.write("33 99\n")
                break
            except BrokenPipeError:
                time.sleep(0.05)
        _wait_for_size(fd, (33, 99))
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()
