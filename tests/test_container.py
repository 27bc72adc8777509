"""The image from ./Containerfile, built and run for real with Podman: the run contract of README
"In a container" (exit status passthrough, stop -> graceful stop and 143, READY after QMP answers,
JSON logs on stderr and the console on stdout, a TTY with resize and the escape key) under the
security settings of deploy/kubernetes/agent-job.yaml, and the Job's pod played by `podman kube play`.

Where the engine cannot run containers, those tests skip with the engine's own message, and
`test_image_rootfs_as_pid1_under_unshare` still runs the image's entrypoint from its exported root
file system as PID 1 of a new PID namespace (the way an engine would, minus the engine).

The image build (cold, on a fresh machine: ~4 min; with Podman's layer cache: seconds) is in the
module fixture; test durations are in pytest's --durations output, not asserted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import fake_anthropic
from tests.container_support import Launched
from tests.podman_support import IMAGE, Podman, build_image, cannot_run_containers, have_podman
from tests.support import INSTANCE_ENV, REPO, processes_with_env

pytestmark = [pytest.mark.vm, pytest.mark.container]

JOB = REPO / "deploy" / "kubernetes" / "agent-job.yaml"
KEY = "sk-ant-TEST-container"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if not have_podman():
        pytest.fail("podman or mmdebstrap is missing: ./install.sh --test installs them")
    engine = Podman.configure(tmp_path_factory.mktemp("engine"))
    seconds = build_image(engine)
    print(f"\nimage {IMAGE} built in {seconds:.0f} s")  # shown with -s, for CI budgets
    return engine


@pytest.fixture(scope="module")
def runs(podman: Podman) -> Podman:
    reason = cannot_run_containers(podman)
    if reason is not None:
        pytest.skip(f"the container engine cannot run containers on this host: {reason}")
    return podman


def _agent_container() -> dict[str, Any]:
    [job] = yaml.safe_load_all(JOB.read_text())
    [container] = job["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def job_security_flags(key_dir: Path) -> list[str]:
    """`podman run` flags for what agent-job.yaml's pod gets: the same capabilities, a read-only
    root with its emptyDirs as tmpfs, no privilege escalation, the API key as a file."""
    container = _agent_container()
    context = container["securityContext"]
    assert context["privileged"] is False and context["readOnlyRootFilesystem"] is True
    caps = context["capabilities"]
    flags = ["--cap-drop", ",".join(caps["drop"]), "--cap-add", ",".join(caps["add"])]
    flags += ["--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges"]
    flags += ["--tmpfs", "/run", "--tmpfs", "/agent-home"]
    [key_env] = [e for e in container["env"] if e["name"] == "ANTHROPIC_API_KEY_FILE"]
    key_path = Path(key_env["value"])
    (key_dir / key_path.name).write_text(KEY + "\n")
    flags += ["-v", f"{key_dir}:{key_path.parent}:ro", "--env", f"ANTHROPIC_API_KEY_FILE={key_path}"]
    return flags


def _name() -> str:
    return f"agentvm-test-{uuid.uuid4().hex[:8]}"


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _host_processes_of(instance_prefix: str) -> list[tuple[int, str]]:
    """Host processes of an instance (the supervisor sets AGENTVM_INSTANCE in each child)."""
    return processes_with_env(f"{INSTANCE_ENV}={instance_prefix}".encode())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, 1234, 1234)  # the project dir's owner, as the container sees it
    return work


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    return directory


def test_container_passes_the_guest_commands_status_through(runs: Podman, work: Path, key_dir: Path) -> None:
    """`podman run IMAGE -- CMD` under the Job's security settings: the status is the command's,
    stdout is the console and nothing else, stderr is JSON lines, files are the owner's, the key
    file reached the guest's .microvm-env."""
    name = _name()
    script = (
        "echo from-the-guest > /work/f; cat /work/f; "
        '. /home/agent/.microvm-env; printf %s "$ANTHROPIC_API_KEY" > /work/key; exit 7'
    )
    try:
        result = runs.run(
            ["run", "--rm", "--name", name, "--network", "none", "--device", "/dev/kvm",
             *job_security_flags(key_dir), "-v", f"{work}:/work", IMAGE, "--", "sh", "-c", script],
            check=False, timeout=180,
        )  # fmt: skip
    finally:
        runs.remove(name)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "from-the-guest\r\n"
    assert all(line.startswith("{") for line in result.stderr.splitlines()), result.stderr
    assert (work / "key").read_text() == KEY
    assert KEY not in result.stderr
    info = (work / "f").stat()
    assert (info.st_uid, info.st_gid) == (1234, 1234)  # the guest's uid 1000 became /work's owner


def test_the_image_has_its_agent_guest_and_names_a_flavor_it_lacks(
    runs: Podman, work: Path, key_dir: Path
) -> None:
    """The Containerfile builds the claude guest into the image (AGENTS): `guest list` shows it
    current. A flavor the image lacks ends the container at once, under the Job's read-only root
    and with no network, with the build argument that adds it (not a build at start)."""
    listed = runs.run(
        ["run", "--rm", "--network", "none", "--entrypoint", "agentvm-supervise", IMAGE, "guest", "list"]
    )
    assert "claude: @anthropic-ai/claude-code" in listed.stdout, listed.stdout
    assert "older build scripts" not in listed.stdout and "gemini" not in listed.stdout
    name = _name()
    try:
        missing = runs.run(
            ["run", "--rm", "--name", name, "--network", "none", *job_security_flags(key_dir),
             "-v", f"{work}:/work", IMAGE, "--agent", "gemini", "--", "true"],
            check=False, timeout=120,
        )  # fmt: skip
    finally:
        runs.remove(name)
    assert missing.returncode == 69, missing.stderr
    said = " ".join(missing.stderr.split())  # the preflight's paragraph
    assert "the gemini agent guest is not built in /opt/agentvm-cache, which is read-only" in said
    assert '--build-arg AGENTS="claude gemini"' in said, said


def test_the_jobs_agent_completes_a_turn_through_the_allowlist(
    runs: Podman, work: Path, key_dir: Path
) -> None:
    """The Job's command line end to end in the image: the claude guest built into it, the API key
    from the Secret's file, the egress allow-list with the API's address added by `--allow` (the
    way a Job adds a host), and the agent's Write landing in /work as /work's owner. Host
    networking only so that the container reaches the fake API on the host's 127.0.0.2 (which the
    proxy refuses unless that exact address is allowed)."""
    script = fake_anthropic.Script(
        tool="Write",
        tool_input={"file_path": "/work/hello.txt", "content": "from the Job\n"},
        final_text="I wrote /work/hello.txt.",
    )
    args = _agent_container()["args"]
    supervisor_args = args[: args.index("--")]
    assert {"--agent", "claude", "--network", "allowlist"} <= set(supervisor_args)
    name = _name()
    with fake_anthropic.serve(script, host="127.0.0.2") as port:
        command = fake_anthropic.claude_write_turn(f"http://127.0.0.2:{port}")
        try:
            result = runs.run(
                ["run", "--rm", "--name", name, "--network", "host", "--device", "/dev/kvm",
                 *job_security_flags(key_dir), "-v", f"{work}:/work", IMAGE,
                 *supervisor_args, "--allow", f"127.0.0.2:{port}", "--", *command],
                check=False, timeout=900,
            )  # fmt: skip
        finally:
            runs.remove(name)
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    assert "I wrote /work/hello.txt." in result.stdout
    # the build's CA bundle (a 0400 build secret) is readable by the agent's node in the guest
    assert "Ignoring extra certs" not in result.stdout, result.stdout
    hello = work / "hello.txt"
    assert hello.read_text() == "from the Job\n"
    assert (hello.stat().st_uid, hello.stat().st_gid) == (1234, 1234)
    assert script.tool_results, "the CLI never sent the Write tool's result back"
    assert {request["api_key"] for request in script.requests} == {KEY}  # from the file, nowhere else
    assert "cannot be written" not in result.stderr  # the egress log goes to /run, not the read-only root
    passed = [
        e for e in _events(result.stderr) if e.get("event") == "egress" and e.get("verdict") == "allowed"
    ]
    assert passed and {e.get("host") for e in passed} == {"127.0.0.2"}, result.stderr[-3000:]


def test_container_is_ready_after_qmp_and_stop_takes_the_graceful_path(
    runs: Podman, work: Path, tmp_path: Path
) -> None:
    """--sdnotify=container: READY=1 reaches the engine's NOTIFY_SOCKET once QEMU answers on QMP;
    `podman stop` (SIGTERM) powers the guest off, the container exits 143, no process is left."""
    name = _name()
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    try:
        started = subprocess.Popen(
            ["podman", "run", "-d", "--sdnotify=container", "--name", name, "--network", "none",
             "--device", "/dev/kvm", "--stop-timeout", "15", "-v", f"{work}:/work", IMAGE,
             "--name", "ctr", "--", "sh", "-c", "echo GUEST-READY; sleep 600"],
            env=runs.env({"NOTIFY_SOCKET": str(notify_path)}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        messages: list[bytes] = []
        while not any(b"READY=1" in m for m in messages):
            messages.append(notify.recv(4096))
        # At READY the VM is up: the supervisor logged the QMP handshake's outcome ("ready") and
        # QEMU runs on the host, carrying the instance name.
        _, run_stderr = started.communicate(timeout=60)
        assert started.returncode == 0, run_stderr
        logs = runs.run(["logs", name]).stderr
        events = [event["event"] for event in _events(logs)]
        assert "vm started" in events and "ready" in events, logs
        assert [cmd for _, cmd in _host_processes_of("ctr-") if "qemu-system" in cmd]
        deadline = time.monotonic() + 120
        while "GUEST-READY" not in runs.run(["logs", name]).stdout:  # the console is the stdout
            assert time.monotonic() < deadline, runs.run(["logs", name])
            time.sleep(0.5)
        runs.run(["stop", "--time", "15", name], timeout=60)
        status = runs.run(["wait", name], timeout=60).stdout.strip()
        logs = runs.run(["logs", name]).stderr
        assert status == "143", logs
        events = [event["event"] for event in _events(logs)]
        assert "stopping on signal" in events
        assert "asked the guest to power off" in events
    finally:
        notify.close()
        runs.remove(name)
    assert _host_processes_of("ctr-") == []


def _holds_sigterm(pid: int) -> bool:
    """PID blocks SIGTERM (supervisor/entry.py, while it imports) or has its handler: a SIGTERM to
    it as PID 1 is kept, not dropped as one without a handler is."""
    bit = 1 << (signal.SIGTERM - 1)
    try:
        fields = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":\t" in line
        )
    except OSError:
        return False
    return bool((int(fields.get("SigBlk", "0"), 16) | int(fields.get("SigCgt", "0"), 16)) & bit)


def test_container_stopped_right_after_start_exits_143(runs: Podman, work: Path) -> None:
    """Regression: a stop during Python's imports was dropped (PID 1, no handler yet) and the
    engine SIGKILLed after its stop timeout: 137 after 15 s instead of 143 at once. The stop is
    sent as soon as the supervisor's first line has run (entry.py blocks the stop signals); the
    interpreter's own start before it (tens of ms) is a window no Python PID 1 can close: README,
    "Container hosts", says to add --init there."""
    name = _name()
    try:
        runs.run(["run", "-d", "--name", name, "--network", "none", "-v", f"{work}:/work", IMAGE,
                  "--", "sh", "-c", "sleep 600"])  # fmt: skip
        pid = int(runs.run(["inspect", "--format", "{{.State.Pid}}", name]).stdout.strip())
        deadline = time.monotonic() + 30
        while not _holds_sigterm(pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        runs.run(["stop", "--time", "15", name], timeout=60)
        status = runs.run(["wait", name], timeout=60).stdout.strip()
        assert status == "143", runs.run(["logs", name]).stderr
    finally:
        runs.remove(name)


def _read_until(master: int, needle: bytes, seen: bytearray, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"{needle!r} not seen in {timeout} s; output {bytes(seen)!r}"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            chunk = b""
        assert chunk, f"EOF before {needle!r}; output {bytes(seen)!r}"
        seen += chunk


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, bytes([rows, 0, cols, 0, 0, 0, 0, 0]))


def _controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    _set_size(slave, 33, 111)
    yield master, slave
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_container_with_a_tty_resizes_and_stops_on_the_escape_key(
    runs: Podman, work: Path, terminal: tuple[int, int]
) -> None:
    """`podman run -it`: the guest sees the terminal's size and each resize; Ctrl-] . stops it (130)."""
    master, slave = terminal
    name = _name()
    loop = 'while :; do echo "size=$(stty size)"; read x || exit 9; done'
    proc = subprocess.Popen(
        ["podman", "run", "-it", "--rm", "--name", name, "--network", "none", "--device", "/dev/kvm",
         "-v", f"{work}:/work", IMAGE, "--", "sh", "-c", loop],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=_controlling_terminal,  # noqa: PLW1509 - a test; podman needs its tty for SIGWINCH
        env=runs.env(),
    )  # fmt: skip
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"size=33 111", seen)
        _set_size(master, 40, 120)
        deadline = time.monotonic() + 30
        while b"size=40 120" not in seen:  # the resize travels podman -> supervisor -> guest
            assert time.monotonic() < deadline, bytes(seen)
            os.write(master, b"\r")  # one more `stty size`
            while select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        os.write(master, b"\x1d.")  # the escape key, then "stop the VM"
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        runs.remove(name)


def _pod_from_job(key_dir: Path, claim: str) -> dict[str, Any]:
    """The Job's pod template as a Pod, for `podman kube play` (which does not run Jobs)."""
    [job] = yaml.safe_load_all(JOB.read_text())
    spec = job["spec"]["template"]["spec"]
    name = f"agentvm-job-{uuid.uuid4().hex[:6]}"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    [container] = spec["containers"]
    container["image"] = IMAGE
    args = container["args"]
    supervisor_args = args[: args.index("--")]
    # The Job's own supervisor arguments (--network allowlist --agent claude) with a command that
    # leaves evidence: the agent guest built into the image boots in a pod with no network at all
    # (kube play --network none) and a read-only root, so nothing was built or downloaded at start.
    script = (
        '. /home/agent/.microvm-env; printf %s "$ANTHROPIC_API_KEY" > /work/key; '
        "claude --version > /work/version; exit 3"
    )
    container["args"] = [*supervisor_args, "--", "sh", "-c", script]
    for volume in spec["volumes"]:
        if "secret" in volume:
            # Podman 4.3 (Debian 12) panics on a secret volume in kube play (a nil SecretsManager
            # in VolumeFromSecret): the same file from a host dir instead. The Secret itself is
            # checked in tests/test_kubernetes.py.
            [item] = volume.pop("secret")["items"]
            (key_dir / item["path"]).write_text(KEY + "\n")
            volume["hostPath"] = {"path": str(key_dir), "type": "Directory"}
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = claim
    return pod


def test_kube_play_runs_the_jobs_pod_to_the_agents_status(
    runs: Podman, tmp_path: Path, key_dir: Path
) -> None:
    """agent-job.yaml's pod (security context, read-only root, emptyDirs, the key as a file, the work
    volume from a claim) under `podman kube play`: the container ends with the command's status,
    which is what the Job reports; the Job's `--agent claude` boots the claude guest in the image."""
    claim = f"agentvm-work-{uuid.uuid4().hex[:6]}"
    pod = _pod_from_job(key_dir, claim)
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    container = f"{pod['metadata']['name']}-agent"
    try:
        runs.run(["kube", "play", "--network", "none", str(manifest)], timeout=180)
        status = runs.run(["wait", container], timeout=240).stdout.strip()
        assert status == "3", runs.run(["logs", container]).stderr
        mountpoint = runs.run(["volume", "inspect", claim, "--format", "{{.Mountpoint}}"]).stdout.strip()
        assert (Path(mountpoint) / "key").read_text() == KEY
        assert "(Claude Code)" in (Path(mountpoint) / "version").read_text()
        host_config = json.loads(runs.run(["inspect", container]).stdout)[0]["HostConfig"]
        assert host_config["ReadonlyRootfs"] is True
        assert host_config["Privileged"] is False
        assert {"CAP_NET_RAW", "CAP_KILL"} <= set(host_config["CapDrop"])  # drop ALL took them
    finally:
        runs.run(["kube", "down", str(manifest)], check=False, timeout=120)
        runs.run(["volume", "rm", "--force", claim], check=False)


def test_image_rootfs_as_pid1_under_unshare(podman: Podman, tmp_path: Path, work: Path) -> None:
    """No engine needed: the image's root file system, exported, with its entrypoint as PID 1 of a
    new PID namespace (chroot; /dev, /proc, /run, /work as an engine would mount them)."""
    name = _name()
    root = tmp_path / "rootfs"
    root.mkdir()
    try:
        podman.run(["create", "--name", name, IMAGE])
        unpacked = subprocess.run(
            ["sh", "-c", f"podman export {name} | tar -x -C {root}"], env=podman.env(), capture_output=True,
            text=True, timeout=300, check=False,
        )  # fmt: skip
        assert unpacked.returncode == 0, unpacked.stderr
        entrypoint = json.loads(
            podman.run(["image", "inspect", IMAGE, "--format", "{{json .Config.Entrypoint}}"]).stdout
        )
        image_env = json.loads(
            podman.run(["image", "inspect", IMAGE, "--format", "{{json .Config.Env}}"]).stdout
        )
    finally:
        podman.remove(name)
    for mountpoint in ("agent-home", "work"):  # an engine makes the mount points of its volumes
        (root / mountpoint).mkdir(exist_ok=True)
    exited = subprocess.run(
        _in_rootfs(root, work, entrypoint, image_env, "echo from-the-rootfs; exit 7"),
        capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    stderr = exited.stderr.decode(errors="replace")
    assert exited.returncode == 7, stderr
    assert exited.stdout == b"from-the-rootfs\r\n"
    assert all(line.startswith("{") for line in stderr.splitlines()), stderr
    # SIGTERM to PID 1 (what an engine's stop sends): the graceful path, 143, nothing left.
    sup = Launched(_in_rootfs(root, work, entrypoint, image_env, "echo GUEST-READY; sleep 600"), tmp_path)
    try:
        init = sup.namespace_init()
        sup.read_until(b"GUEST-READY", timeout=120)
        assert "agentvm-supervise" in Path(f"/proc/{init}/cmdline").read_text()  # the exec chain ended in it
        os.kill(init, signal.SIGTERM)
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()
    events = [event["event"] for event in sup.events()]
    assert "stopping on signal" in events and "asked the guest to power off" in events
    assert _host_processes_of("rootfs-") == []


def _in_rootfs(root: Path, work: Path, entrypoint: list[str], image_env: list[str], script: str) -> list[str]:
    """PID 1 of a new PID and mount namespace, chrooted into `root`, exec'ing the entrypoint."""
    mounts = (
        f"mount --rbind /dev {root}/dev && mount -t tmpfs tmpfs {root}/run && "
        f"mount -t tmpfs tmpfs {root}/agent-home && mount --bind {work} {root}/work && "
        f'exec chroot {root} env -i {shlex.join(image_env)} "$@"'
    )
    return ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", f"--mount-proc={root}/proc",
            "sh", "-c", mounts, "sh", *entrypoint, "--name", "rootfs", "--", "sh", "-c", script]  # fmt: skip
