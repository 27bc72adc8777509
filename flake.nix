{
  description = "agentvm-supervise: run an AI coding agent in a throw-away microVM";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      agentvmLib = import ./nix/lib.nix;
    in
    {
      packages = forSystems (pkgs: rec {
        agentvm-supervise = pkgs.callPackage ./nix/package.nix { };
        default = agentvm-supervise;
      });

      overlays.default = final: _prev: {
        agentvm-supervise = final.callPackage ./nix/package.nix { };
      };

      # lib.mkRunnerScript: the drop-in for claude-microvm's mkRunnerScript; the pure config
      # functions (launcherConfig, toTOML, sharesFromMicrovm, serviceConfig) come along.
      lib = agentvmLib // {
        mkRunnerScript = args:
          import ./nix/launcher.nix { lib = agentvmLib; } ({
            package = self.packages.${args.pkgs.stdenv.hostPlatform.system}.default;
          } // args);
      };

      nixosModules.default = { pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.agentvm.package = nixpkgs.lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      checks = forSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      });
    };
}
