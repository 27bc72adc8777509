# A launcher for a microvm.nix VM: `microvm-run`, which runs the VM's runner under
# agentvm-supervise with a generated config. The drop-in for claude-microvm's mkRunnerScript:
#
#   packages.${system}.claude = agentvm.lib.mkRunnerScript {
#     inherit pkgs runner; agentName = "claude";
#     dataDirName = "claude-microvm"; apiKeyVars = [ "ANTHROPIC_API_KEY" ];   # optional, checked
#   };
#
# WORK_DIR, AGENT_HOME, DIRENV_ALLOW, ENABLE_CRI and the API key keep their meaning; arguments of
# microvm-run go to `agentvm-supervise run` (e.g. --forward 8080:80, --mem 8192).
{ lib ? import ./lib.nix }:

{ pkgs
, runner
, agentName ? "claude"
, dataDirName ? null
, apiKeyVars ? null
, package ? pkgs.agentvm-supervise or (pkgs.callPackage ./package.nix { })
, virtiofsd ? "${pkgs.virtiofsd}/bin/virtiofsd"
, shares ? [ ]
, extraConfig ? { }
}:

let
  expectedKey = lib.agents.${agentName} or (throw
    "mkRunnerScript: agentName must be one of ${builtins.concatStringsSep ", " (builtins.attrNames lib.agents)}, not '${agentName}'");
  checked =
    if dataDirName != null && dataDirName != "${agentName}-microvm" then
      throw "mkRunnerScript: dataDirName '${dataDirName}' is not '${agentName}-microvm': agentvm-supervise derives the agent home as $XDG_DATA_HOME/<agent>-microvm/<basename>-<hash>; leave dataDirName out, or set AGENT_HOME"
    else if apiKeyVars != null && apiKeyVars != [ expectedKey ] then
      throw "mkRunnerScript: the ${agentName} flavor hands ${expectedKey} to the guest, not ${builtins.toJSON apiKeyVars}"
    else
      true;
  config = lib.launcherConfig {
    runnerScript = "${runner}/bin/microvm-run";
    hypervisor = runner.passthru.hypervisor or runner.hypervisor or "auto";
    agent = agentName;
    inherit virtiofsd;
    shares = lib.sharesFromMicrovm shares;
  } // extraConfig;
  configFile = pkgs.writeText "agentvm-${agentName}.toml" (lib.toTOML config);
in
assert checked;
pkgs.writeShellScriptBin "microvm-run" ''
  exec ${package}/bin/agentvm-supervise run --config ${configFile} "$@"
''
