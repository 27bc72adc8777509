# NixOS module for guests run by agentvm-supervise (e.g. a microvm.nix guest): the guest console
# (hvc0) follows the size of the terminal the VM's console is attached to.
#
# agentvm-supervise gives QEMU a virtio-serial port named org.agentvm.resize
# (`-chardev socket,id=resize,fd=N -device virtserialport,chardev=resize,name=org.agentvm.resize`)
# and writes "ROWS COLS" lines to it; udev links the port to /dev/virtio-ports/org.agentvm.resize.
# This module starts ./agentvm-console-resize.sh once that link exists; the script applies each
# size to the console with stty, which sends SIGWINCH to the program in the foreground.
#
#   imports = [ ./nix/guest-resize.nix ];   # on by default; agentvm.consoleResize.enable = false;
{ config, lib, pkgs, ... }:
let
  cfg = config.agentvm.consoleResize;
  port = "/dev/virtio-ports/org.agentvm.resize";
  helper = pkgs.writeShellApplication {
    name = "agentvm-console-resize";
    runtimeInputs = [ pkgs.coreutils ];
    text = builtins.readFile ./agentvm-console-resize.sh;
  };
in
{
  options.agentvm.consoleResize = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Apply the host terminal's size, sent by agentvm-supervise, to the guest console.";
    };
    console = lib.mkOption {
      type = lib.types.str;
      default = "hvc0";
      description = "The console device (under /dev) that gets the size.";
    };
  };

  config = lib.mkIf cfg.enable {
    # Started when the port appears (it may come up after multi-user.target is reached).
    systemd.paths.agentvm-console-resize = {
      description = "Wait for the agentvm-supervise resize port";
      wantedBy = [ "multi-user.target" ];
      pathConfig.PathExists = port;
    };
    systemd.services.agentvm-console-resize = {
      description = "Apply the host terminal's size to /dev/${cfg.console}";
      serviceConfig = {
        ExecStart = "${helper}/bin/agentvm-console-resize ${port} /dev/${cfg.console}";
        Restart = "always";
        RestartSec = 1;
      };
    };
  };
}
