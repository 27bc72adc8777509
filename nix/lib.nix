# Pure functions (builtins only, no nixpkgs) that produce agentvm-supervise configs and units.
# Everything here evaluates offline with `nix-instantiate --eval --strict`; tests/test_nix.py does
# exactly that with stub inputs and feeds the results to the supervisor's own config loader and to
# `systemd-analyze verify`.
let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    listToAttrs
    map
    match
    replaceStrings
    toString
    ;
  concat = concatStringsSep "";

  # The launcher's share layout: the supervisor gives these tags their sources at run time
  # (WORK_DIR, AGENT_HOME, AGENT_HOME/cri-storage); every other virtiofs share keeps its own.
  layoutTags = [ "work" "agent-home" "cri-storage" ];
  agents = {
    claude = "ANTHROPIC_API_KEY";
    gemini = "GEMINI_API_KEY";
    codex = "OPENAI_API_KEY";
  };
  defaultTimeouts = {
    graceful-stop = 10;
    quit = 3;
    kill-grace = 2;
  };

  removeNulls = attrs:
    listToAttrs (
      filter (entry: entry.value != null) (map (name: { inherit name; value = attrs.${name}; }) (attrNames attrs))
    );
  orNull = attrs: if attrs == { } then null else attrs;
  ceil = x: if isFloat x then builtins.ceil x else x;
in
rec {
  inherit layoutTags agents defaultTimeouts;

  # ---- TOML ------------------------------------------------------------------------------------
  # Enough TOML for the supervisor's config: strings, ints, floats, bools, lists of those, tables
  # and arrays of tables. Null values are left out.
  toTOML = attrs: renderTable "" attrs;

  tomlString = s: "\"" + replaceStrings [ "\\" "\"" "\n" "\r" "\t" ] [ "\\\\" "\\\"" "\\n" "\\r" "\\t" ] s + "\"";

  tomlKey = k: if match "[A-Za-z0-9_-]+" k != null then k else tomlString k;

  tomlValue = v:
    if isString v then tomlString v
    else if isBool v then (if v then "true" else "false")
    else if isInt v || isFloat v then toString v
    else if isList v then (if v == [ ] then "[]" else "[ " + concatStringsSep ", " (map tomlValue v) + " ]")
    else throw "toTOML: cannot write a ${builtins.typeOf v} as a TOML value";

  renderTable = prefix: attrs:
    let
      names = filter (n: attrs.${n} != null) (attrNames attrs);
      isTableList = v: isList v && v != [ ] && builtins.all isAttrs v;
      plain = filter (n: !(isAttrs attrs.${n}) && !(isTableList attrs.${n})) names;
      tables = filter (n: isAttrs attrs.${n}) names;
      tableLists = filter (n: isTableList attrs.${n}) names;
      path = n: if prefix == "" then tomlKey n else "${prefix}.${tomlKey n}";
    in
    concat (map (n: "${tomlKey n} = ${tomlValue attrs.${n}}\n") plain)
    + concat (map (n: "\n[${path n}]\n" + renderTable (path n) attrs.${n}) tables)
    + concat (map (n: concat (map (t: "\n[[${path n}]]\n" + renderTable (path n) t) attrs.${n})) tableLists);

  # ---- configs ---------------------------------------------------------------------------------

  # microvm.shares -> [[shares]] entries for the virtiofs shares outside the launcher's layout
  # (their sources are real paths; the layout's are placeholders the supervisor replaces).
  sharesFromMicrovm = shares:
    map
      (share: removeNulls {
        tag = share.tag;
        source = share.source;
        guest-path = share.mountPoint or null;
        read-only = share.readOnly or null;
      })
      (filter (share: (share.proto or "9p") == "virtiofs" && !(builtins.elem share.tag layoutTags)) shares);

  # The config of one launcher: a microvm.nix runner run by agentvm-supervise. Leaving workDir and
  # agentHome null keeps claude-microvm's behaviour: WORK_DIR / AGENT_HOME from the environment.
  launcherConfig =
    { runnerScript
    , hypervisor ? "auto"
    , agent ? "claude"
    , name ? null
    , virtiofsd ? null
    , runtimeDir ? null
    , workDir ? null
    , agentHome ? null
    , shares ? [ ]
    , memoryMiB ? null
    , vcpus ? null
    , accel ? null
    , forwards ? [ ]
    , timeouts ? { }
    , runnerCwd ? null
    , bridge ? null # the runner's taps are created on this host bridge ([network] mode = "tap")
    }:
    if !(agents ? ${agent}) then
      throw "agentvm: agent must be one of ${concatStringsSep ", " (attrNames agents)}, not '${agent}'"
    else
      removeNulls {
        inherit agent name;
        runtime-dir = runtimeDir;
        work-dir = workDir;
        agent-home = agentHome;
        forwards = if forwards == [ ] then null else forwards;
        shares = if shares == [ ] then null else shares;
        runner = removeNulls {
          script = runnerScript;
          inherit hypervisor;
          cwd = runnerCwd;
        };
        virtiofsd = if virtiofsd == null then null else { binary = virtiofsd; };
        qemu = orNull (removeNulls {
          memory-mib = memoryMiB;
          inherit vcpus accel;
        });
        timeouts = orNull timeouts;
        network = if bridge == null then null else { mode = "tap"; inherit bridge; };
      };

  # ---- systemd ---------------------------------------------------------------------------------

  # systemd must wait longer than the supervisor's whole stop path: the guest's power-off, QEMU's
  # quit, then TERM-grace-KILL of the runner and of the virtiofsd group, plus a margin.
  stopTimeoutSec = timeouts:
    let t = defaultTimeouts // timeouts;
    in ceil (t.graceful-stop + t.quit + 2 * t.kill-grace + 10);

  # Sandboxing a VM supervisor can live with (systemd/agentvm@.service has the same set and says
  # why RestrictNamespaces, MemoryDenyWriteExecute, PrivateDevices and an allow-list
  # SystemCallFilter are left out). `readWritePaths`: the VM's dirs (work dir, agent home).
  hardening = readWritePaths: {
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    ProtectSystem = "strict";
    ReadWritePaths = if readWritePaths == [ ] then null else readWritePaths;
    PrivateTmp = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
    DevicePolicy = "closed";
    DeviceAllow = [ "/dev/kvm rw" "/dev/ptmx rw" "char-pts rw" ];
    SystemCallFilter = "~@clock @cpu-emulation @debug @module @obsolete @raw-io @reboot @swap";
    SystemCallErrorNumber = "EPERM";
    KeyringMode = "private";
    PrivateMounts = true;
    LockPersonality = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    UMask = "0077";
  };

  # [Service] of a unit running one VM; the supervisor sends READY=1 when NOTIFY_SOCKET is set.
  serviceConfig =
    { execStart
    , timeouts ? { }
    , user ? null
    , group ? null
    , runtimeDirectory ? null
    , environmentFile ? null
    , readWritePaths ? [ ]
    , netAdmin ? false # the supervisor creates taps: CAP_NET_ADMIN without running as root
    }:
    removeNulls (hardening readWritePaths // {
      Type = "notify";
      NotifyAccess = "main";
      ExecStart = execStart;
      # SIGTERM to the supervisor only: it powers the guest off and stops its children itself;
      # whatever is left when TimeoutStopSec runs out gets SIGKILL.
      KillMode = "mixed";
      KillSignal = "SIGTERM";
      TimeoutStopSec = stopTimeoutSec timeouts;
      Restart = "no";
      StandardInput = "null";
      User = user;
      Group = group;
      SupplementaryGroups = if user == null then null else "kvm";
      RuntimeDirectory = runtimeDirectory;
      RuntimeDirectoryMode = if runtimeDirectory == null then null else "0700";
      EnvironmentFile = environmentFile;
      AmbientCapabilities = if netAdmin then "CAP_NET_ADMIN" else null;
    } // (if netAdmin then {
      # The taps: creating them needs the capability, and QEMU opens /dev/net/tun.
      CapabilityBoundingSet = "CAP_NET_ADMIN";
      DeviceAllow = [ "/dev/kvm rw" "/dev/ptmx rw" "char-pts rw" "/dev/net/tun rw" ];
    } else { }));

  # A unit file's text from attrsets of sections (what NixOS writes for systemd.services.*).
  unitText = sections:
    concatStringsSep "\n" (
      map
        (section:
          "[${section}]\n"
          + concat (
            map
              (key:
                let v = sections.${section}.${key};
                in concat (map (item: "${key}=${toString item}\n") (if isList v then v else [ v ])))
              (attrNames sections.${section})
          ))
        (filter (s: sections.${s} != { }) [ "Unit" "Service" "Install" ])
    );

  # ---- one declared VM (the NixOS module's per-VM logic) --------------------------------------

  vmLauncherConfig = name: vm:
    launcherConfig {
      runnerScript = "${vm.runner}/bin/microvm-run";
      hypervisor = vm.hypervisor or "auto";
      agent = vm.agent or "claude";
      inherit name;
      virtiofsd = vm.virtiofsd or null;
      runtimeDir = "/run/agentvm/${name}";
      workDir = vm.workDir;
      agentHome = vm.agentHome or null;
      shares = sharesFromMicrovm (vm.shares or [ ]);
      memoryMiB = vm.memoryMiB or null;
      vcpus = vm.vcpus or null;
      forwards = vm.forwards or [ ];
      timeouts = vm.timeouts or { };
      bridge = vm.bridge or null;
    };

  vmServiceConfig = name: vm: configFile:
    serviceConfig {
      execStart = "${vm.package}/bin/agentvm-supervise run --config ${configFile}";
      timeouts = vm.timeouts or { };
      user = vm.user;
      group = vm.group or null;
      runtimeDirectory = "agentvm/${name}";
      environmentFile = vm.environmentFile or null;
      # The agent home defaults to the user's ~/.local/share/<agent>-microvm/...
      readWritePaths = [ vm.workDir ] ++ (if (vm.agentHome or null) != null then [ vm.agentHome ]
        else if (vm.home or null) != null then [ vm.home ] else [ ]);
      netAdmin = (vm.bridge or null) != null;
    };

  # Seed 003's activation step: the VM's ed25519 host key, made once, kept across rebuilds.
  sshHostKeyScript = { sshKeygen, keyDir, user }: ''
    if [ ! -f ${keyDir}/ssh_host_ed25519_key ]; then
      mkdir -p ${keyDir}
      ${sshKeygen} -q -t ed25519 -N "" -f ${keyDir}/ssh_host_ed25519_key
      chown -R ${user} ${keyDir}
      chmod 600 ${keyDir}/ssh_host_ed25519_key
      chmod 644 ${keyDir}/ssh_host_ed25519_key.pub
    fi
  '';
}
