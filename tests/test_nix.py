"""nix/: every .nix file parses, and the config-producing functions evaluate to what the supervisor
accepts (Debian's nix-bin, offline: a dummy store, nothing fetched, nothing written to /nix)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor import config
from supervisor.config import Agent, Hypervisor
from tests.support import REPO

NIX_FILES = sorted([REPO / "flake.nix", *(REPO / "nix").glob("*.nix")])
# No daemon, no build users, a store that holds nothing: evaluation only.
NIX_ENV = {"NIX_CONFIG": "build-users-group =\nstore = dummy://\nexperimental-features =", "LANG": "C.UTF-8"}


def _nix_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path), **NIX_ENV}


def nix_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


def nix_value(value: Any) -> str:
    """A Python value as a Nix expression (strings, numbers, bools, lists, dicts)."""
    if isinstance(value, str):
        return nix_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[ " + " ".join(f"({nix_value(item)})" for item in value) + " ]"
    if isinstance(value, dict):
        return "{ " + " ".join(f"{nix_string(k)} = {nix_value(v)};" for k, v in value.items()) + " }"
    raise TypeError(value)


def nix_eval(expression: str, tmp_path: Path) -> Any:
    result = subprocess.run(
        ["nix-instantiate", "--readonly-mode", "--eval", "--strict", "--json", "-E", expression],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_nix_env(tmp_path),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def nix_error(expression: str, tmp_path: Path) -> str:
    result = subprocess.run(
        ["nix-instantiate", "--readonly-mode", "--eval", "--strict", "-E", expression],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_nix_env(tmp_path),
        check=False,
    )
    assert result.returncode != 0, result.stdout
    return result.stderr


LIB = "(import ./nix/lib.nix)"


def test_every_nix_file_parses(tmp_path: Path) -> None:
    had_nix = Path("/nix").exists()
    assert {p.name for p in NIX_FILES} >= {
        "flake.nix",
        "lib.nix",
        "package.nix",
        "launcher.nix",
        "module.nix",
    }
    for path in NIX_FILES:
        result = subprocess.run(
            ["nix-instantiate", "--parse", str(path)],
            capture_output=True,
            text=True,
            env=_nix_env(tmp_path),
            check=False,
        )
        assert result.returncode == 0, f"{path}: {result.stderr}"
    broken = tmp_path / "broken.nix"
    broken.write_text("{ a = 1; b = ; }\n")
    parsed = subprocess.run(
        ["nix-instantiate", "--parse", str(broken)], capture_output=True, env=_nix_env(tmp_path), check=False
    )
    assert parsed.returncode != 0  # the check does catch a broken file
    nix_eval(f"{LIB}.stopTimeoutSec {{ }}", tmp_path)
    assert Path("/nix").exists() == had_nix  # offline evaluation creates no store on the machine


@pytest.mark.parametrize(
    "value",
    ["plain", 'with "quotes" and \\backslashes\\', "new\nline\ttab", "ünïcödé ✓", "", "$HOME ${x}"],
)
def test_toml_strings_round_trip(tmp_path: Path, value: str) -> None:
    text = nix_eval(f"{LIB}.toTOML {{ name = {nix_string(value)}; }}", tmp_path)
    assert msgspec.toml.decode(text.encode()) == {"name": value}


def test_launcher_config_is_accepted_by_the_supervisor(tmp_path: Path) -> None:
    expression = f"""
      let l = {LIB}; in l.toTOML (l.launcherConfig {{
        runnerScript = "/nix/store/aaaa-microvm-qemu-claude-vm/bin/microvm-run";
        hypervisor = "qemu";
        agent = "gemini";
        virtiofsd = "/nix/store/bbbb-virtiofsd/bin/virtiofsd";
        memoryMiB = 8192;
        vcpus = 4;
        forwards = [ "8080:80" "2222:22" ];
        timeouts = {{ graceful-stop = 2.5; quit = 5; }};
        shares = l.sharesFromMicrovm [
          {{ tag = "ro-store"; source = "/nix/store"; proto = "9p"; mountPoint = "/nix/.ro-store"; }}
          {{ tag = "work"; source = "/tmp/claude-vm-work"; proto = "virtiofs"; mountPoint = "/work"; }}
          {{ tag = "agent-home"; source = "/tmp/claude-vm-home"; proto = "virtiofs";
             mountPoint = "/home/agent"; }}
          {{ tag = "ssh-keys"; source = "/home/m/microvm/keys"; proto = "virtiofs";
             mountPoint = "/etc/ssh/host-keys"; readOnly = true; }}
        ];
      }})
    """
    text = nix_eval(expression, tmp_path)
    path = tmp_path / "generated.toml"
    path.write_text(text)
    loaded = config.load(path)
    assert loaded.agent is Agent.GEMINI
    assert loaded.runner == config.Runner(
        script="/nix/store/aaaa-microvm-qemu-claude-vm/bin/microvm-run", hypervisor=Hypervisor.QEMU
    )
    assert loaded.virtiofsd.binary == "/nix/store/bbbb-virtiofsd/bin/virtiofsd"
    assert (loaded.qemu.memory_mib, loaded.qemu.vcpus) == (8192, 4)
    assert loaded.forwards == ["8080:80", "2222:22"]
    assert (loaded.timeouts.graceful_stop, loaded.timeouts.quit) == (2.5, 5.0)
    # only the share outside the launcher's layout; 9p is QEMU's own business
    assert loaded.shares == [
        config.Share(
            tag="ssh-keys", source="/home/m/microvm/keys", guest_path="/etc/ssh/host-keys", read_only=True
        )
    ]
    # what the launcher leaves to WORK_DIR / AGENT_HOME / the defaults is not in the file
    assert (loaded.work_dir, loaded.agent_home, loaded.name, loaded.runtime_dir) == (None, None, None, None)

    minimal = nix_eval(
        f'{LIB}.toTOML ({LIB}.launcherConfig {{ runnerScript = "/r/bin/microvm-run"; }})', tmp_path
    )
    assert minimal == 'agent = "claude"\n\n[runner]\nhypervisor = "auto"\nscript = "/r/bin/microvm-run"\n'
    assert "agent must be one of claude, codex, gemini, not 'copilot'" in nix_error(
        f'{LIB}.launcherConfig {{ runnerScript = "/r"; agent = "copilot"; }}', tmp_path
    )


STUB_PKGS = """{
  writeText = name: text: { outPath = "CONFIG<<" + text + ">>"; };
  writeShellScriptBin = name: text: { inherit name text; };
  virtiofsd = "/nix/store/vvvv-virtiofsd";
  openssh = "/nix/store/oooo-openssh";
}"""


def test_mk_runner_script_execs_the_supervisor_with_a_config_it_loads(tmp_path: Path) -> None:
    expression = f"""
      import ./nix/launcher.nix {{ }} {{
        pkgs = {STUB_PKGS};
        runner = {{ outPath = "/nix/store/rrrr-microvm-qemu-claude-vm"; passthru.hypervisor = "qemu"; }};
        agentName = "codex";
        dataDirName = "codex-microvm";
        apiKeyVars = [ "OPENAI_API_KEY" ];
        package = "/nix/store/pppp-agentvm-supervise";
      }}
    """
    script = nix_eval(expression, tmp_path)
    assert script["name"] == "microvm-run"
    match = re.fullmatch(
        r'exec /nix/store/pppp-agentvm-supervise/bin/agentvm-supervise run --config CONFIG<<(.*)>> "\$@"\n',
        script["text"],
        re.DOTALL,
    )
    assert match, script["text"]
    path = tmp_path / "c.toml"
    path.write_text(match.group(1))
    loaded = config.load(path)
    assert loaded.agent is Agent.CODEX
    assert loaded.runner == config.Runner(
        script="/nix/store/rrrr-microvm-qemu-claude-vm/bin/microvm-run", hypervisor=Hypervisor.QEMU
    )
    assert loaded.virtiofsd.binary == "/nix/store/vvvv-virtiofsd/bin/virtiofsd"

    base = f'pkgs = {STUB_PKGS}; runner = "/nix/store/r"; package = "/p";'
    assert "dataDirName 'my-dir' is not 'claude-microvm'" in nix_error(
        f'(import ./nix/launcher.nix {{ }} {{ {base} dataDirName = "my-dir"; }}).text', tmp_path
    )
    assert "the gemini flavor hands GEMINI_API_KEY to the guest" in nix_error(
        f'(import ./nix/launcher.nix {{ }} {{ {base} agentName = "gemini"; apiKeyVars = [ "X" ]; }}).text',
        tmp_path,
    )


def test_stop_timeout_is_above_the_supervisors_whole_stop_path(tmp_path: Path) -> None:
    timeouts = config.Timeouts()
    default = nix_eval(f"{LIB}.stopTimeoutSec {{ }}", tmp_path)
    assert default > timeouts.graceful_stop + timeouts.quit + 2 * timeouts.kill_grace
    assert nix_eval(f"{LIB}.stopTimeoutSec {{ graceful-stop = 30.5; }}", tmp_path) == 31 + 3 + 4 + 10
    assert nix_eval(f"{LIB}.defaultTimeouts", tmp_path) == {
        "graceful-stop": timeouts.graceful_stop,
        "quit": timeouts.quit,
        "kill-grace": timeouts.kill_grace,
    }


# A stand-in for the few nixpkgs lib functions module.nix uses, so the module itself evaluates offline.
STUB_LIB = """{
  mkOption = o: o;
  mkDefault = v: v;
  mkIf = cond: content: { _if = cond; inherit content; };
  mkMerge = parts: { _merge = parts; };
  optional = c: x: if c then [ x ] else [ ];
  optionalString = c: s: if c then s else "";
  concatStringsSep = builtins.concatStringsSep;
  mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
  nameValuePair = name: value: { inherit name value; };
  mapAttrs' = f: attrs: builtins.listToAttrs (map (n: f n attrs.${n}) (builtins.attrNames attrs));
  types = rec {
    nullOr = t: t; enum = v: v; listOf = t: t; attrsOf = t: t; submodule = m: m;
    raw = "raw"; package = "package"; str = "str"; bool = "bool"; number = "number"; int = "int";
    ints.positive = "int";
  };
}"""


NO_NETWORK = '{ bridge = null; hostAddress = "192.168.83.1"; prefixLength = 24; externalInterface = null; }'


def _module_config(tmp_path: Path, vm: str, network: str = NO_NETWORK) -> list[Any]:
    """The module's config: its mkMerge parts, each an mkIf {_if, content}."""
    expression = f"""
      let
        m = import ./nix/module.nix {{
          lib = {STUB_LIB};
          pkgs = {STUB_PKGS};
          config.services.agentvm = {{
            package = "{REPO / ".venv"}"; stateDir = "/var/lib/agentvm"; network = {network};
            vms.emacsvm = {vm};
          }};
        }};
      in m.config._merge
    """
    return list(nix_eval(expression, tmp_path))


def _module_unit(tmp_path: Path, vm: str) -> dict[str, Any]:
    return dict(_module_config(tmp_path, vm)[0]["content"]["systemd"]["services"])


VM = """{
  microvm = {
    declaredRunner = "/nix/store/rrrr-microvm-cloud-hypervisor-emacsvm";
    hypervisor = "cloud-hypervisor";
    shares = [
      { tag = "ro-store"; source = "/nix/store"; proto = "virtiofs"; mountPoint = "/nix/.ro-store";
        readOnly = true; }
      { tag = "work"; source = "/home/m/microvm/emacs"; proto = "virtiofs"; mountPoint = "/work"; }
    ];
  };
  runner = null;
  agent = "claude";
  user = "michael";
  group = null;
  workDir = "/home/m/microvm/emacs";
  agentHome = null;
  memoryMiB = null;
  vcpus = 8;
  forwards = [ ];
  timeouts = { graceful-stop = 20; };
  environmentFile = "/run/secrets/emacsvm.env";
  autostart = true;
  network = "user";
  ipAddress = null;
  sshHostKey = false;
}"""


def test_nixos_module_declares_a_notify_unit_per_vm_that_systemd_verifies(tmp_path: Path) -> None:
    services = _module_unit(tmp_path, VM)
    unit = services["agentvm-emacsvm"]
    assert unit["wantedBy"] == ["multi-user.target"]
    service = unit["serviceConfig"]
    assert (
        service["Type"] == "notify" and service["KillMode"] == "mixed" and service["NotifyAccess"] == "main"
    )
    assert service["TimeoutStopSec"] == 20 + 3 + 4 + 10
    assert (service["User"], service["SupplementaryGroups"]) == ("michael", "kvm")
    assert service["RuntimeDirectory"] == "agentvm/emacsvm"
    assert service["EnvironmentFile"] == "/run/secrets/emacsvm.env"
    # sandboxed as systemd/agentvm@.service is (issue 11); the VM's dirs stay writable
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] is True
    assert service["DeviceAllow"] == ["/dev/kvm rw", "/dev/ptmx rw", "char-pts rw"]
    assert service["ReadWritePaths"] == ["/home/m/microvm/emacs"]
    assert "RestrictNamespaces" not in service and "MemoryDenyWriteExecute" not in service
    exec_start = rf"{REPO}/\.venv/bin/agentvm-supervise run --config CONFIG<<(.*)>>"
    match = re.fullmatch(exec_start, service["ExecStart"], re.DOTALL)
    assert match
    path = tmp_path / "vm.toml"
    path.write_text(match.group(1))
    loaded = config.load(path)
    assert loaded.name == "emacsvm" and loaded.runtime_dir == "/run/agentvm/emacsvm"
    assert loaded.work_dir == "/home/m/microvm/emacs"
    assert loaded.runner == config.Runner(
        script="/nix/store/rrrr-microvm-cloud-hypervisor-emacsvm/bin/microvm-run",
        hypervisor=Hypervisor.CLOUD_HYPERVISOR,
    )
    assert loaded.shares == [
        config.Share(tag="ro-store", source="/nix/store", guest_path="/nix/.ro-store", read_only=True)
    ]
    assert loaded.qemu.vcpus == 8 and loaded.timeouts.graceful_stop == 20

    # the unit as NixOS would write it passes systemd's own check
    sections = {
        "Unit": {"Description": "agentvm-supervise VM emacsvm"},
        # the real ExecStart names a store path; here the config path need not exist, the program must
        "Service": {**service, "ExecStart": f"{REPO}/.venv/bin/agentvm-supervise run --config /etc/x.toml"},
        "Install": {"WantedBy": ["multi-user.target"]},
    }
    text = nix_eval(f"{LIB}.unitText {nix_value(sections)}", tmp_path)
    unit_file = tmp_path / "agentvm-emacsvm.service"
    unit_file.write_text(text)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    assert "set `microvm` (the VM's config.microvm) or `runner`" in nix_error(
        f"""(builtins.elemAt (import ./nix/module.nix {{ lib = {STUB_LIB}; pkgs = {STUB_PKGS};
             config.services.agentvm = {{ package = "/p"; stateDir = "/s"; network.bridge = null;
               vms.x = {VM} // {{ microvm = null; }}; }}; }}).config._merge 0)
           .content.systemd.services.agentvm-x.serviceConfig.ExecStart""",
        tmp_path,
    )


def test_nixos_module_seed_003_network_a_tap_vm_and_its_host_key(tmp_path: Path) -> None:
    """services.agentvm.network makes seed 003's bridge, NAT and trusted interface; a VM with
    network = "tap" gets its taps created on that bridge (CAP_NET_ADMIN) and a host key on activation."""
    vm = VM.replace('network = "user";', 'network = "tap";').replace(
        "sshHostKey = false;", "sshHostKey = true;"
    )
    network = (
        '{ bridge = "microbr"; hostAddress = "192.168.83.1"; prefixLength = 24; externalInterface = "eno1"; }'
    )
    units, host = _module_config(tmp_path, vm, network)
    assert host["_if"] is True
    net = host["content"]["networking"]
    assert net["bridges"] == {"microbr": {"interfaces": []}}
    assert net["interfaces"]["microbr"]["ipv4"]["addresses"] == [
        {"address": "192.168.83.1", "prefixLength": 24}
    ]
    assert net["firewall"]["trustedInterfaces"] == ["microbr"]
    assert net["nat"]["content"] == {
        "enable": True,
        "internalInterfaces": ["microbr"],
        "externalInterface": "eno1",
    }
    service = units["content"]["systemd"]["services"]["agentvm-emacsvm"]["serviceConfig"]
    assert service["AmbientCapabilities"] == "CAP_NET_ADMIN"
    match = re.search(r"CONFIG<<(.*)>>", service["ExecStart"], re.DOTALL)
    assert match
    path = tmp_path / "vm.toml"
    path.write_text(match.group(1))
    loaded = config.load(path)
    assert loaded.network == config.Network(mode=config.NetworkMode.TAP, bridge="microbr")
    script = units["content"]["system"]["activationScripts"]["agentvm-ssh-host-keys"]["text"]
    assert "ssh-keygen -q -t ed25519" in script and "/var/lib/agentvm/emacsvm/ssh-host-keys" in script
    assert "chown -R michael" in script

    assert "needs services.agentvm.network.bridge" in nix_error(
        f"""(builtins.elemAt (import ./nix/module.nix {{ lib = {STUB_LIB}; pkgs = {STUB_PKGS};
             config.services.agentvm = {{ package = "/p"; stateDir = "/s"; network.bridge = null;
               vms.x = {vm}; }}; }}).config._merge 0)
           .content.systemd.services.agentvm-x.serviceConfig.ExecStart""",
        tmp_path,
    )
