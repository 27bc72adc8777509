# NixOS module: declared microvm.nix VMs, each run by agentvm-supervise under a system unit
# `agentvm-<name>.service` (Type=notify, KillMode=mixed, a stop timeout above the graceful stop).
#
#   services.agentvm.vms.emacsvm = {
#     microvm = self.nixosConfigurations.emacsvm.config.microvm;   # or: runner = <a runner package>;
#     user = "michael";
#     workDir = "/home/michael/microvm/emacs";
#     environmentFile = "/run/secrets/emacsvm.env";   # ANTHROPIC_API_KEY=..., DIRENV_ALLOW=1, ...
#     autostart = true;
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
    };
  };

  resolved = name: vm:
    let
      runner = if vm.runner != null then vm.runner
        else if vm.microvm != null then vm.microvm.declaredRunner
        else throw "services.agentvm.vms.${name}: set `microvm` (the VM's config.microvm) or `runner`";
    in
    vm // {
      inherit runner;
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
  };

  config = lib.mkIf (cfg.vms != { }) {
    systemd.services = lib.mapAttrs' unit cfg.vms;
  };
}
