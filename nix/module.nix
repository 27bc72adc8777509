# NixOS module: declared microvm.nix VMs, each run by agentvm-supervise under a system unit
# `agentvm-<name>.service` (Type=notify, KillMode=mixed, a stop timeout above the graceful stop).
#
#   services.agentvm.vms.emacsvm = {
#     microvm = self.nixosConfigurations.emacsvm.config.microvm;   # or: runner = <a runner package>;
#     user = "michael";
#     workDir = "/home/michael/microvm/emacs";
#     environmentFile = "/run/secrets/emacsvm.env";   # ANTHROPIC_API_KEY=..., DIRENV_ALLOW=1, ...
#     autostart = true;
#     network = "tap";   # its microvm.interfaces of type "tap" are created on services.agentvm.network.bridge
#   };
#   services.agentvm.network = {                       # seed 003's host side: bridge, NAT, trust
#     bridge = "microbr"; hostAddress = "192.168.83.1"; prefixLength = 24; externalInterface = "eno1";
#   };
{ config, lib, pkgs, ... }:

let
  agentvm = import ./lib.nix;
  cfg = config.services.agentvm;
  inherit (lib) mkOption types;

  vmOptions = { name, ... }: {
    options = {
      microvm = mkOption {
        type = types.nullOr types.raw;
        default = null;
        description = "The VM's `config.microvm` (e.g. `nixosConfigurations.${name}.config.microvm`): its declaredRunner, shares and hypervisor are used.";
      };
      runner = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "A microvm.nix runner package, instead of `microvm`.";
      };
      agent = mkOption {
        type = types.enum (builtins.attrNames agentvm.agents);
        default = "claude";
        description = "The agent flavor: names the default agent home and the API key handed to the guest.";
      };
      user = mkOption {
        type = types.str;
        description = "The user the supervisor, virtiofsd and the hypervisor run as (needs /dev/kvm: the unit adds the kvm group).";
      };
      group = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The group they run as (default: the user's).";
      };
      workDir = mkOption {
        type = types.str;
        description = "The project dir, shared as the `work` tag (claude-microvm's /work).";
      };
      agentHome = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The agent home (`agent-home` tag); default: ~/.local/share/<agent>-microvm/<basename>-<hash>.";
      };
      memoryMiB = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Overrides microvm.mem."; };
      vcpus = mkOption { type = types.nullOr types.ints.positive; default = null; description = "Overrides microvm.vcpu."; };
      forwards = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Port forwards `[ADDR:]HOST:GUEST[/udp]` (QEMU user networking).";
      };
      timeouts = mkOption {
        type = types.attrsOf types.number;
        default = { };
        example = { graceful-stop = 30; };
        description = "The supervisor's `[timeouts]`; the unit's TimeoutStopSec follows them.";
      };
      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "An EnvironmentFile for secrets and launcher variables (ANTHROPIC_API_KEY, DIRENV_ALLOW, ENABLE_CRI).";
      };
      autostart = mkOption { type = types.bool; default = false; description = "Start the VM at boot."; };
      network = mkOption {
        type = types.enum [ "user" "tap" ];
        default = "user";
        description = "`tap`: the supervisor creates the runner's tap interfaces on `services.agentvm.network.bridge` (the unit gets CAP_NET_ADMIN) and removes them when the VM ends.";
      };
      ipAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The VM's static address on the bridge (as seed 003's `ip`): for the VM's own NixOS configuration (systemd.network) and for `known_hosts`; the supervisor does not pass it to a runner.";
      };
      sshHostKey = mkOption {
        type = types.bool;
        default = false;
        description = "Generate an ed25519 host key once, on activation, in `<stateDir>/<name>/ssh-host-keys` (share it into the VM read-only at /etc/ssh/host-keys, as seed 003 does).";
      };
    };
  };

  resolved = name: vm:
    let
      runner = if vm.runner != null then vm.runner
        else if vm.microvm != null then vm.microvm.declaredRunner
        else throw "services.agentvm.vms.${name}: set `microvm` (the VM's config.microvm) or `runner`";
    in
    if vm.network == "tap" && cfg.network.bridge == null then
      throw "services.agentvm.vms.${name}.network = \"tap\" needs services.agentvm.network.bridge (the bridge its taps join)"
    else
    vm // {
      inherit runner;
      bridge = if vm.network == "tap" then cfg.network.bridge else null;
      hypervisor = if vm.microvm != null then vm.microvm.hypervisor else runner.passthru.hypervisor or "auto";
      shares = if vm.microvm != null then vm.microvm.shares else [ ];
      virtiofsd = "${pkgs.virtiofsd}/bin/virtiofsd";
      home = config.users.users.${vm.user}.home or null;  # writable under ProtectSystem=strict
      package = cfg.package;
    };

  unit = name: vm:
    let
      full = resolved name vm;
      configFile = pkgs.writeText "agentvm-${name}.toml" (agentvm.toTOML (agentvm.vmLauncherConfig name full));
    in
    lib.nameValuePair "agentvm-${name}" {
      description = "agentvm-supervise VM ${name}";
      wantedBy = lib.optional vm.autostart "multi-user.target";
      after = [ "network.target" ];
      serviceConfig = agentvm.vmServiceConfig name full configFile;
    };
in
{
  options.services.agentvm = {
    package = mkOption {
      type = types.package;
      default = pkgs.agentvm-supervise or (pkgs.callPackage ./package.nix { });
      description = "The agentvm-supervise package.";
    };
    vms = mkOption {
      type = types.attrsOf (types.submodule vmOptions);
      default = { };
      description = "microvm.nix VMs run by agentvm-supervise, one system unit each.";
    };
    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/agentvm";
      description = "Persistent per-VM state (the SSH host keys).";
    };
    network = {
      bridge = mkOption { type = types.nullOr types.str; default = null; example = "microbr"; description = "The host bridge the VMs' taps join; null: none declared here."; };
      hostAddress = mkOption { type = types.str; default = "192.168.83.1"; description = "The bridge's address: the VMs' gateway."; };
      prefixLength = mkOption { type = types.int; default = 24; description = "The subnet's prefix length."; };
      externalInterface = mkOption { type = types.nullOr types.str; default = null; example = "eno1"; description = "NAT the bridge's subnet out of this interface; null: no NAT."; };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf (cfg.vms != { }) {
      systemd.services = lib.mapAttrs' unit cfg.vms;
      system.activationScripts.agentvm-ssh-host-keys.text = lib.concatStringsSep "\n" (lib.mapAttrsToList
        (name: vm: lib.optionalString vm.sshHostKey (agentvm.sshHostKeyScript {
          sshKeygen = "${pkgs.openssh}/bin/ssh-keygen";
          keyDir = "${cfg.stateDir}/${name}/ssh-host-keys";
          inherit (vm) user;
        }))
        cfg.vms);
    })
    # seed 003's host network: the bridge with its address, NAT out of the uplink, a trusted bridge
    (lib.mkIf (cfg.network.bridge != null) {
      networking.bridges.${cfg.network.bridge}.interfaces = [ ];
      networking.interfaces.${cfg.network.bridge}.ipv4.addresses = [
        { address = cfg.network.hostAddress; inherit (cfg.network) prefixLength; }
      ];
      networking.firewall.trustedInterfaces = [ cfg.network.bridge ];
      networking.nat = lib.mkIf (cfg.network.externalInterface != null) {
        enable = true;
        internalInterfaces = [ cfg.network.bridge ];
        inherit (cfg.network) externalInterface;
      };
    })
  ];
}
