# agentvm-supervise as a Nix package: `pkgs.callPackage ./nix/package.nix { }`.
#
# The wrapper puts QEMU and virtiofsd on PATH. The built-in guest (a Debian kernel and busybox
# initramfs built with apt) is for Debian hosts; on NixOS run microvm.nix runners instead
# (`agentvm-supervise run --runner`, or lib.mkRunnerScript / the NixOS module of this flake).
{ lib
, python3Packages
, qemu
, virtiofsd
}:

let
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
in
python3Packages.buildPythonApplication {
  pname = "agentvm-supervise";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    # setup.py builds supervisor/console/_scan.c, the console filter's C scanner, with stdenv's cc. What an
    # editable install left in a checkout (_scan*.so for another Python, bytecode) stays out.
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../setup.py
      ../README.md
      (lib.fileset.fileFilter (file: !(file.hasExt "so" || file.hasExt "pyc")) ../supervisor)
    ];
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [ anyio msgspec pyudev structlog ];

  makeWrapperArgs = [ "--prefix" "PATH" ":" (lib.makeBinPath [ qemu virtiofsd ]) ];

  # The test suite boots VMs and needs a Debian guest build: it runs in the project's CI instead.
  doCheck = false;
  pythonImportsCheck = [ "supervisor.cli" "supervisor.console._scan" ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "agentvm-supervise";
    platforms = lib.platforms.linux;
  };
}
