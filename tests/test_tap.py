"""Network mode "tap", for real: taps on a bridge in a network namespace each test creates.

Every supervisor runs inside that namespace (`ip netns exec`), so the taps, the bridge and all
traffic stay in it; the namespace is deleted in a finally. The built-in guests get static
addresses on the test bridge.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import config, guest, network, tap
from supervisor.children import read_start_ticks
from supervisor.errors import ExitCode, SupervisorError
from tests.runner_fixtures import RunnerFixture, qemu_command
from tests.support import base_env, instance_processes, leftovers, supervisor_argv, wait_until_gone

BRIDGE = "br0"
SUBNET = "10.77.0"


@dataclass(frozen=True)
class Netns:
    name: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, check=check, timeout=60)

    def links(self) -> dict[str, str]:
        """name -> `ip -o link` line (master and state included) of every link in the namespace."""
        out = self.run(["ip", "-o", "link", "show"]).stdout
        return {line.split(": ")[1].split("@")[0]: line for line in out.splitlines()}

    def ports(self, bridge: str = BRIDGE) -> list[str]:
        return [name for name, line in self.links().items() if f" master {bridge} " in line]

    def python(self, code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-c", code], check=check)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh namespace with lo and a bridge br0 at 10.77.0.1/24; deleted afterwards."""
    ns = Netns(f"agentvm-t-{secrets.token_hex(4)}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        ns.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        ns.run(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE])
        ns.run(["ip", "link", "set", BRIDGE, "up"])
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


def _config(
    tmp_path: Path, name: str, address: str | None, *, ssh: Sequence[str] = (), **network: str
) -> Path:
    work = tmp_path / name / "work"
    work.mkdir(parents=True, exist_ok=True)
    # the host keys in the test's dir, not the (test) user's state dir, where they would outlive it
    ssh_lines = ["[ssh]", f'host-keys = "{tmp_path / name / "keys"}"', f"authorized-keys = {list(ssh)!r}"]
    lines = [
        f'name = "{name}"',
        f'work-dir = "{work}"',
        f'agent-home = "{tmp_path / name / "home"}"',
        f'runtime-dir = "{tmp_path / "rt"}"',
        "[network]",
        'mode = "tap"',
        f'bridge = "{network.pop("bridge", BRIDGE)}"',
        *([f'address = "{address}"'] if address else []),
        *(f'{key} = "{value}"' for key, value in network.items()),
        *ssh_lines,
    ]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(ns: Netns, config: Path, command: str) -> subprocess.Popen[bytes]:
    argv = ns.argv([*supervisor_argv(), "run", "--config", str(config), "--", "sh", "-c", command])
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=base_env()
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the supervisor exited ({proc.returncode}) before {path}: {err.decode()}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def _kill(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def _nothing_left(ns: Netns, tmp_path: Path, *names: str) -> None:
    for name in names:
        assert wait_until_gone(name) == []
    assert leftovers(tmp_path / "rt", timeout=10) == []
    deadline = time.monotonic() + 10
    while set(ns.links()) != {"lo", BRIDGE} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(ns.links()) == {"lo", BRIDGE}, ns.links()  # no tap, the bridge still there
    assert f"inet {SUBNET}.1/24" in ns.run(["ip", "-o", "addr", "show", BRIDGE]).stdout


# Serve /work on port 8080 and stay up until the host drops /work/stop (busybox httpd, as agent).
SERVE = "httpd -p 8080 -h /work && touch /work/up; while [ ! -e /work/stop ]; do sleep 0.2; done"


def _fetch(ns: Netns, url: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    return ns.python(code).stdout


def _ssh(ns: Netns, tmp_path: Path, address: str, command: str, *, first: bool) -> str:
    """ssh as agent with the test's key; the first connection pins the host key, later ones demand it."""
    pinning = "accept-new" if first else "yes"
    argv = [
        "ssh", "-i", str(tmp_path / "client"), "-F", "/dev/null", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-o", f"StrictHostKeyChecking={pinning}",
        "-o", "ConnectTimeout=20", f"agent@{address}", command,
    ]  # fmt: skip
    result = ns.run(argv, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.vm
def test_two_guests_on_a_bridge_ping_and_reach_each_other_the_host_reaches_both_over_http_and_ssh(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    """And each guest's host key, pinned by the first ssh, is the same after a stop and a start."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "client")], check=True
    )
    client = (tmp_path / "client.pub").read_text().strip()
    a_cfg = _config(tmp_path, "tap-a", f"{SUBNET}.2/24", ssh=[client])
    b_cfg = _config(tmp_path, "tap-b", f"{SUBNET}.3/24", ssh=[client])
    a_work, b_work = tmp_path / "tap-a" / "work", tmp_path / "tap-b" / "work"
    (a_work / "hello").write_text("from a\n")
    (b_work / "hello").write_text("from b\n")
    # b boots beside a: it tries until a's server answers (600 x 0.2 s at most)
    fetch_a = (
        f"n=0; until wget -q -O /work/from-a http://{SUBNET}.2:8080/hello; do n=$((n+1)); "
        '[ "$n" -lt 600 ] || break; sleep 0.2; done; '
        # ICMP too, as the agent user: iputils' ping needs no raw socket (ping_group_range); by its
        # path, since the guest's busybox shell prefers its own applet, which needs root
        f"/bin/ping -c 2 -W 5 {SUBNET}.2 > /work/ping 2>&1; echo $? > /work/ping-status; "
        "echo $n > /work/fetched; "
    )
    procs = [_start(netns, a_cfg, SERVE), _start(netns, b_cfg, f"{fetch_a}{SERVE}")]
    try:
        for work, proc in zip((a_work, b_work), procs, strict=True):
            _wait_for(work / "up", proc)
        _wait_for(b_work / "fetched", procs[1])
        assert int((b_work / "fetched").read_text()) < 600
        assert (b_work / "from-a").read_text() == "from a\n"  # guest to guest, over the bridge
        ping = (b_work / "ping").read_text()
        assert (b_work / "ping-status").read_text() == "0\n", ping  # guest to guest ping
        assert "2 received" in ping, ping
        assert _fetch(netns, f"http://{SUBNET}.2:8080/hello") == "from a\n\n"  # the host to each guest
        assert _fetch(netns, f"http://{SUBNET}.3:8080/hello") == "from b\n\n"
        for address, name in ((f"{SUBNET}.2", "a"), (f"{SUBNET}.3", "b")):
            said = _ssh(netns, tmp_path, address, "cd /work && pwd && id -un && cat hello", first=True)
            assert said == f"/work\nagent\nfrom {name}\n"
        assert sorted(netns.ports()) == sorted([tap.default_name("tap-a"), tap.default_name("tap-b")])
        for work in (a_work, b_work):
            (work / "stop").touch()
        for proc in procs:
            code, err = _finish(proc)
            assert code == 0, err
    finally:
        _kill(procs)
    _nothing_left(netns, tmp_path, "tap-a", "tap-b")
    keys = tmp_path / "tap-a" / "keys"
    assert (keys / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (keys / "ssh_host_ed25519_key.pub").stat().st_mode & 0o777 == 0o644
    pinned = (tmp_path / "known_hosts").read_text()
    assert pinned.count("ssh-ed25519") == 2
    # a again: StrictHostKeyChecking=yes fails on a key that is not the pinned one
    for name in ("up", "stop"):
        (a_work / name).unlink()
    again = _start(netns, a_cfg, SERVE)
    try:
        _wait_for(a_work / "up", again)
        assert _ssh(netns, tmp_path, f"{SUBNET}.2", "cat /work/hello", first=False) == "from a\n"
        (a_work / "stop").touch()
        code, err = _finish(again)
        assert code == 0, err
    finally:
        _kill([again])
    assert (tmp_path / "known_hosts").read_text() == pinned
    _nothing_left(netns, tmp_path, "tap-a")


def _qemu_of(name: str) -> int:
    found = [pid for pid, cmd in instance_processes(name) if "qemu-system" in cmd]
    assert len(found) == 1, instance_processes(name)
    return found[0]


@pytest.mark.vm
@pytest.mark.parametrize("victim", ["supervisor", "runner"])
def test_a_killed_supervisor_or_runner_leaves_no_tap(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path, victim: str
) -> None:
    """SIGKILL of the supervisor: the watchdog removes the tap; of QEMU: the normal teardown does."""
    name = f"tk-{victim[:3]}"
    config = _config(tmp_path, name, f"{SUBNET}.5/24")
    work = tmp_path / name / "work"
    proc = _start(netns, config, SERVE)
    try:
        _wait_for(work / "up", proc)
        assert netns.ports() == [tap.default_name(name)]
        if victim == "supervisor":
            proc.kill()
            code, _ = _finish(proc)
            assert code == -signal.SIGKILL
        else:
            os.kill(_qemu_of(name), signal.SIGKILL)
            code, err = _finish(proc)
            assert code == 128 + signal.SIGKILL, err
    finally:
        _kill([proc])
    _nothing_left(netns, tmp_path, name)


@pytest.mark.vm
def test_the_next_start_removes_a_stale_tap_of_a_dead_instance(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    name = "tap-stale"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tap.Owner("tap-stale-0000", dead.pid, 1).alias()
    tap_name = tap.default_name(name)
    netns.run(["ip", "tuntap", "add", "mode", "tap", "name", tap_name])
    netns.run(["ip", "link", "set", tap_name, "alias", stale, "master", BRIDGE])
    config = _config(tmp_path, name, f"{SUBNET}.6/24")
    proc = _start(netns, config, "ip -o addr show eth0 > /work/addr")
    code, err = _finish(proc, timeout=120)
    assert code == 0, err
    assert "removed a stale tap of a dead instance" in err
    assert f"inet {SUBNET}.6/24" in (tmp_path / name / "work" / "addr").read_text()
    _nothing_left(netns, tmp_path, name)


# ---- bad input: one paragraph, a named exit code, nothing created -----------------------------


def _refused(ns: Netns, config: Path, *, prefix: Sequence[str] = ()) -> tuple[int, str]:
    argv = ns.argv([*prefix, *supervisor_argv(), "run", "--config", str(config), "--", "true"])
    result = subprocess.run(argv, capture_output=True, text=True, env=base_env(), timeout=60, check=False)
    return result.returncode, result.stderr


def _created_nothing(ns: Netns, tmp_path: Path, before: dict[str, str]) -> None:
    assert ns.links() == before
    assert leftovers(tmp_path / "rt") == []


def test_no_cap_net_admin(netns: Netns, tmp_path: Path) -> None:
    before = netns.links()
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--"]
    code, err = _refused(netns, _config(tmp_path, "tap-nocap", f"{SUBNET}.2/24"), prefix=drop)
    assert code == ExitCode.UNAVAILABLE, err
    assert "needs CAP_NET_ADMIN" in err and "run agentvm-supervise as root" in err
    _created_nothing(netns, tmp_path, before)


def test_a_bridge_that_does_not_exist(netns: Netns, tmp_path: Path) -> None:
    before = netns.links()
    code, err = _refused(netns, _config(tmp_path, "tap-nobr", f"{SUBNET}.2/24", bridge="microbr"))
    assert code == ExitCode.UNAVAILABLE, err
    assert "the bridge 'microbr' (network.bridge) does not exist" in err and "ip link add microbr" in err
    _created_nothing(netns, tmp_path, before)


def test_an_address_outside_the_bridge_subnet(netns: Netns, tmp_path: Path) -> None:
    before = netns.links()
    code, err = _refused(netns, _config(tmp_path, "tap-subnet", "192.168.83.2/24"))
    assert code == ExitCode.USAGE, err
    assert f"outside the subnet of bridge '{BRIDGE}' ({SUBNET}.0/24)" in err
    _created_nothing(netns, tmp_path, before)


def test_a_tap_name_in_use_by_a_running_vm_or_by_something_else(netns: Netns, tmp_path: Path) -> None:
    # a running VM: a tap marked with a live supervisor (this test process stands in for it)
    ours = tap.Owner("tap-other-1234", os.getpid(), read_start_ticks(os.getpid())).alias()
    netns.run(["ip", "tuntap", "add", "mode", "tap", "name", "mvbusy"])
    netns.run(["ip", "link", "set", "mvbusy", "alias", ours])
    netns.run(["ip", "link", "add", "mvother", "type", "bridge"])
    before = netns.links()
    code, err = _refused(netns, _config(tmp_path, "tap-busy", f"{SUBNET}.2/24", tap="mvbusy"))
    assert code == ExitCode.USAGE, err
    assert "in use by the running VM tap-other-1234" in err and "agentvm-supervise stop" in err
    code, err = _refused(netns, _config(tmp_path, "tap-busy", f"{SUBNET}.2/24", tap="mvother"))
    assert code == ExitCode.USAGE, err
    assert "an interface agentvm-supervise did not create (bridge)" in err
    _created_nothing(netns, tmp_path, before)


def test_a_tap_name_over_15_characters(netns: Netns, tmp_path: Path) -> None:
    before = netns.links()
    code, err = _refused(netns, _config(tmp_path, "tap-long", f"{SUBNET}.2/24", tap="x" * 16))
    assert code == ExitCode.USAGE, err
    assert "at most 15" in err
    _created_nothing(netns, tmp_path, before)


def test_tap_fields_without_mode_tap_are_refused() -> None:
    for field in ({"bridge": "br0"}, {"address": "10.0.0.2/24"}, {"bridge_create": True}):
        with pytest.raises(SupervisorError, match=r'is for network mode "tap" and the mode is not'):
            network.plan_network([], builtin_guest=True, config=config.Network(**field))


def test_the_default_tap_name_is_seed_003s() -> None:
    """seed 003 names a VM's tap "mv" + the first 11 hex digits of sha256(VM name)."""
    assert tap.default_name("claude-home") == "mv" + hashlib.sha256(b"claude-home").hexdigest()[:11]
    assert len(tap.default_name("x" * 40)) == 13  # within the 15 characters Linux allows


# ---- microvm.nix runners with tap interfaces ---------------------------------------------------


def _tap_runner(assets: guest.GuestAssets, tmp_path: Path, netdev: str, command: str = "true") -> Path:
    """A microvm.nix QEMU runner with one interface of type "tap" (as lib/runners/qemu.nix writes it)."""
    fixture = RunnerFixture(tmp_path / "runner")
    argv = qemu_command(assets, guest_command=["sh", "-c", command], user_net=False)
    argv += ["-netdev", netdev, "-device", "virtio-net-device,netdev=vm-net,mac=02:00:00:01:aa:bb"]
    return fixture.write(argv)


def _runner_config(tmp_path: Path, script: Path, *, cmdline: str = "", **network: str) -> Path:
    work = tmp_path / "proj"
    work.mkdir(exist_ok=True)
    lines = [
        'name = "tap-runner"',  # not the default: other tests' runners are called proj-claude-vm
        f'work-dir = "{work}"',
        f'agent-home = "{tmp_path / "home"}"',
        f'runtime-dir = "{tmp_path / "rt"}"',
        "[runner]",
        f'script = "{script}"',
        "[qemu]",
        f'cmdline = "{cmdline}"',
        "[network]",
        *(f'{key} = "{value}"' for key, value in network.items()),
    ]
    path = tmp_path / "runner.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.vm
def test_a_microvm_nix_runner_gets_its_tap_created_on_the_bridge(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    # the runner's NixOS config would set the address; the built-in guest's kernel takes it here
    net = f"agentvm.net={SUBNET}.7/24,{SUBNET}.1,{SUBNET}.1"
    script = _tap_runner(
        guest_assets,
        tmp_path,
        "tap,id=vm-net,ifname=mvrunner,script=no,downscript=no",
        "echo from-runner > /work/hello; " + SERVE,
    )
    config = _runner_config(tmp_path, script, cmdline=net, mode="tap", bridge=BRIDGE)
    argv = netns.argv([*supervisor_argv(), "run", "--config", str(config), "--accel", "tcg"])
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=base_env()
    )
    work = tmp_path / "proj"
    try:
        _wait_for(work / "up", proc)
        assert netns.ports() == ["mvrunner"]
        assert _fetch(netns, f"http://{SUBNET}.7:8080/hello") == "from-runner\n\n"
        (work / "stop").touch()
        code, err = _finish(proc)
        assert code == 0, err
    finally:
        _kill([proc])
    _nothing_left(netns, tmp_path, "tap-runner")


def test_runner_nics_that_are_not_taps_by_name_are_refused(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    cases = {
        "tap,id=vm-net,fd=3": "a tap passed as an fd (macvtap)",
        "bridge,id=vm-net,br=br0": "needs QEMU's bridge helper",
        "tap,id=vm-net,ifname=x,helper=/usr/lib/qemu/qemu-bridge-helper": "needs QEMU's bridge helper",
    }
    before = netns.links()
    for netdev, said in cases.items():
        script = _tap_runner(guest_assets, tmp_path, netdev)
        code, err = _refused_runner(netns, _runner_config(tmp_path, script, mode="tap", bridge=BRIDGE))
        assert code == ExitCode.USAGE, err
        assert said in err and 'microvm.interfaces type "tap"' in err
    # mode "user" (the default): a runner's tap must exist already, as NixOS's host units make it
    script = _tap_runner(guest_assets, tmp_path, "tap,id=vm-net,ifname=mvnothere,script=no,downscript=no")
    code, err = _refused_runner(netns, _runner_config(tmp_path, script))
    assert code == ExitCode.USAGE, err
    assert "the tap interface 'mvnothere', which does not exist" in err and 'mode = "tap"' in err
    _created_nothing(netns, tmp_path, before)


def _refused_runner(ns: Netns, config: Path) -> tuple[int, str]:
    argv = ns.argv([*supervisor_argv(), "run", "--config", str(config)])
    result = subprocess.run(argv, capture_output=True, text=True, env=base_env(), timeout=60, check=False)
    return result.returncode, result.stderr


@pytest.mark.vm
def test_bridge_create_makes_the_bridge_and_removes_it_with_its_last_vm(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    subnet = "10.78.0"
    made = {"bridge": "vmbr", "bridge-create": "true"}
    a_cfg = _config(tmp_path, "tap-ca", f"{subnet}.2/24", **made)
    b_cfg = _config(tmp_path, "tap-cb", f"{subnet}.3/24", **made)
    for cfg in (a_cfg, b_cfg):  # a TOML boolean, not the string _config writes
        cfg.write_text(cfg.read_text().replace('bridge-create = "true"', "bridge-create = true"))
    a_work, b_work = tmp_path / "tap-ca" / "work", tmp_path / "tap-cb" / "work"
    (b_work / "hello").write_text("from b\n")
    procs = [_start(netns, a_cfg, SERVE)]
    try:
        _wait_for(a_work / "up", procs[0])
        assert f"inet {subnet}.1/24" in netns.run(["ip", "-o", "addr", "show", "vmbr"]).stdout
        procs.append(_start(netns, b_cfg, SERVE))  # the bridge a made: b joins it
        _wait_for(b_work / "up", procs[1])
        assert sorted(netns.ports("vmbr")) == sorted([tap.default_name("tap-ca"), tap.default_name("tap-cb")])
        (a_work / "stop").touch()
        code, err = _finish(procs[0])
        assert code == 0, err
        assert netns.ports("vmbr") == [tap.default_name("tap-cb")]  # b still uses it: it stays
        assert _fetch(netns, f"http://{subnet}.3:8080/hello") == "from b\n\n"
        (b_work / "stop").touch()
        code, err = _finish(procs[1])
        assert code == 0, err
    finally:
        _kill(procs)
    _nothing_left(netns, tmp_path, "tap-ca", "tap-cb")  # vmbr gone with its last VM; br0 untouched


@pytest.mark.vm
def test_a_sigkilled_supervisor_s_bridge_goes_with_its_tap(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    """bridge-create and a SIGKILL: the watchdog removes the tap, then the bridge nobody uses."""
    cfg = _config(tmp_path, "tk-br", "10.79.0.2/24", bridge="vmbr2", **{"bridge-create": "true"})
    cfg.write_text(cfg.read_text().replace('bridge-create = "true"', "bridge-create = true"))
    proc = _start(netns, cfg, SERVE)
    try:
        _wait_for(tmp_path / "tk-br" / "work" / "up", proc)
        assert netns.ports("vmbr2") == [tap.default_name("tk-br")]
        proc.kill()
        code, _ = _finish(proc)
        assert code == -signal.SIGKILL
    finally:
        _kill([proc])
    _nothing_left(netns, tmp_path, "tk-br")


NFT_TABLES = (
    "import socket; from pyroute2.nftables.main import NFTables; "
    "print(sorted(t.get('NFTA_TABLE_NAME') for t in NFTables(nfgen_family=socket.AF_INET).get_tables()))"
)


@pytest.mark.vm
def test_bridge_create_with_nat_masquerades_the_guest_out_of_an_uplink(
    guest_assets: guest.GuestAssets, netns: Netns, tmp_path: Path
) -> None:
    """The uplink is a veth into a second namespace, which has no route back to the guests'
    subnet: the guest's fetch only works masqueraded, and the server sees the uplink's address."""
    outside = Netns(f"agentvm-o-{secrets.token_hex(4)}")
    subprocess.run(["ip", "netns", "add", outside.name], check=True)
    server: subprocess.Popen[bytes] | None = None
    try:
        netns.run(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "out0"])
        netns.run(["ip", "link", "set", "out0", "netns", outside.name])
        netns.run(["ip", "addr", "add", "10.80.0.1/24", "dev", "up0"])
        netns.run(["ip", "link", "set", "up0", "up"])
        outside.run(["ip", "addr", "add", "10.80.0.2/24", "dev", "out0"])
        outside.run(["ip", "link", "set", "out0", "up"])
        served = tmp_path / "served"
        served.mkdir()
        (served / "ping.txt").write_text("pong\n")
        log = tmp_path / "server.log"
        argv = [
            sys.executable,
            "-m",
            "http.server",
            "8080",
            "--bind",
            "10.80.0.2",
            "--directory",
            str(served),
        ]
        with log.open("wb") as out:
            server = subprocess.Popen(outside.argv(argv), stdout=out, stderr=out)
        cfg = _config(
            tmp_path, "tap-nat", "10.81.0.2/24", bridge="vmbr3", **{"bridge-create": "x", "nat": "x"}
        )
        cfg.write_text(cfg.read_text().replace('= "x"', "= true"))
        fetch = (
            "n=0; until wget -q -O /work/out http://10.80.0.2:8080/ping.txt; do n=$((n+1)); "
            '[ "$n" -lt 300 ] || break; sleep 0.2; done'
        )
        code, err = _finish(_start(netns, cfg, fetch), timeout=120)
        assert code == 0, err
        assert (tmp_path / "tap-nat" / "work" / "out").read_text() == "pong\n"
        assert "10.80.0.1 - - " in log.read_text()  # masqueraded to the uplink's address
        assert netns.python(NFT_TABLES).stdout == "[]\n"  # the NAT table went with the bridge
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", outside.name], check=False)
    netns.run(["ip", "link", "del", "up0"], check=False)
    _nothing_left(netns, tmp_path, "tap-nat")
