"""deploy/kubernetes/: every manifest is valid for a pinned Kubernetes version (offline, with the
schemas kubernetes-validate ships), and the agent Jobs keep the security settings README's
"On Kubernetes" promises. Each check names the field, so a template edit that drops one fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor import agentguest
from tests.support import REPO

KUBERNETES_VERSION = "1.33.0"  # pinned: a schema change upstream must not change this test's verdict
DEPLOY = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
JOBS = [path for path in MANIFESTS if path.name.startswith("agent-job")]
KVM_RESOURCE = "squat.ai/kvm"
# What virtiofsd needs to serve the guest's files (agent-job.yaml says why, one by one; each was
# measured: without any one of them the agent VM does not start).
SUPERVISOR_CAPABILITIES = {
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "MKNOD", "SETFCAP", "SETPCAP",
    "SYS_CHROOT",
}  # fmt: skip
API_KEY_VARS = ("ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY")


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def agent_pod(path: Path) -> dict[str, Any]:
    [job] = documents(path)
    assert job["kind"] == "Job"
    pod: dict[str, Any] = job["spec"]["template"]["spec"]
    return pod


def agent_container(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in pod["containers"] if c["name"] == "agent"]
    found: dict[str, Any] = container
    return found


def test_there_are_manifests_to_check() -> None:
    assert {path.name for path in MANIFESTS} >= {"kvm-device-plugin.yaml", "agent-job.yaml", "work-pvc.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_for_the_pinned_kubernetes_version(path: Path) -> None:
    for doc in documents(path):
        # strict: an unknown or misspelt field (e.g. `privilegd`) is an error, not silently dropped
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_misspelt_security_field() -> None:
    """The strict check above must be able to fail: a field the API server would drop silently."""
    [job] = documents(DEPLOY / "agent-job.yaml")
    agent_container(job["spec"]["template"]["spec"])["securityContext"]["privilegd"] = False
    with pytest.raises(kubernetes_validate.ValidationError, match="privilegd"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_the_device_plugin_offers_the_resource_the_jobs_ask_for() -> None:
    [daemonset] = documents(DEPLOY / "kvm-device-plugin.yaml")
    [container] = daemonset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    domain = args[args.index("--domain") + 1]
    device = yaml.safe_load(args[args.index("--device") + 1])
    assert f"{domain}/{device['name']}" == KVM_RESOURCE
    assert [path["path"] for group in device["groups"] for path in group["paths"]] == ["/dev/kvm"]
    assert all(group["count"] > 1 for group in device["groups"])  # many VMs per node share /dev/kvm


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_runs_once_and_reports_the_agents_status(path: Path) -> None:
    [job] = documents(path)
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # Long enough for the graceful stop (graceful-stop + quit + kill-grace = 10 s in the image).
    assert pod["terminationGracePeriodSeconds"] >= 10


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_is_unprivileged_with_only_the_capabilities_virtiofsd_needs(path: Path) -> None:
    pod = agent_pod(path)
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert not [v for v in pod["volumes"] if "hostPath" in v], "a hostPath volume reaches into the node"
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container["securityContext"]
        assert context["privileged"] is False, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    agent = agent_container(pod)
    assert set(agent["securityContext"]["capabilities"]["add"]) == SUPERVISOR_CAPABILITIES
    for init in pod.get("initContainers", []):
        assert "add" not in init["securityContext"]["capabilities"], init["name"]


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_gets_kvm_from_the_device_plugin(path: Path) -> None:
    agent = agent_container(agent_pod(path))
    assert agent["resources"]["limits"][KVM_RESOURCE] == "1"
    assert "/dev/kvm" not in str(agent.get("volumeMounts")), "KVM comes from the device plugin"


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_reads_the_api_key_from_a_secret_file_never_from_the_environment(path: Path) -> None:
    pod = agent_pod(path)
    agent = agent_container(pod)
    env = {item["name"]: item for item in agent["env"]}
    for name in API_KEY_VARS:
        assert name not in env, f"{name} as an environment variable shows in the pod spec and /proc"
    assert "envFrom" not in agent
    key_file = Path(env["ANTHROPIC_API_KEY_FILE"]["value"])
    [mount] = [m for m in agent["volumeMounts"] if key_file.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert [item["path"] for item in secret["items"]] == [key_file.name]
    assert secret["defaultMode"] & 0o077 == 0  # readable by the container's root only


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_gives_the_supervisor_every_dir_it_writes(path: Path) -> None:
    """readOnlyRootFilesystem holds only if each dir the image's config writes is a volume."""
    pod = agent_pod(path)
    agent = agent_container(pod)
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {"/work", "/agent-home", "/run"} <= set(mounts)
    assert "persistentVolumeClaim" in volumes[mounts["/work"]] or "emptyDir" in volumes[mounts["/work"]]
    assert volumes[mounts["/run"]]["emptyDir"]["medium"] == "Memory"  # sockets, state: tmpfs
    config = (REPO / "Containerfile").read_text()
    for needle in ('work-dir = "/work"', 'agent-home = "/agent-home"', 'runtime-dir = "/run/',
                   'log-dir = "/run/'):  # fmt: skip
        assert needle in config, f"the image's /etc/agentvm.toml no longer has {needle}"


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_turns_the_egress_allowlist_on(path: Path) -> None:
    args = agent_container(agent_pod(path))["args"]
    supervisor_args = args[: args.index("--")]
    assert supervisor_args[supervisor_args.index("--network") + 1] == "allowlist"


def test_fill_pod_clones_into_the_jobs_claim_without_privilege() -> None:
    [pod] = documents(DEPLOY / "fill-work.yaml")
    [job] = documents(DEPLOY / "agent-job.yaml")
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    [pvc] = documents(DEPLOY / "work-pvc.yaml")
    job_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == job_claims == {pvc["metadata"]["name"]}
    [clone] = pod["spec"]["containers"]
    assert clone["securityContext"]["privileged"] is False
    assert clone["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_clone_job_clones_into_the_work_volume() -> None:
    pod = agent_pod(DEPLOY / "agent-job-clone.yaml")
    [clone] = pod["initContainers"]
    assert clone["args"][0] == "clone"
    assert {"name": "work", "mountPath": "/work"} in clone["volumeMounts"]
    assert {"name": "work", "mountPath": "/work"} in agent_container(pod)["volumeMounts"]


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    number, unit = quantity[:-2], quantity[-2:]
    assert unit in units and number.isdigit(), f"write {quantity!r} in Mi or Gi"
    return int(number) * units[unit]


# What runs beside the guest's RAM in the pod: QEMU itself, three virtiofsd, the supervisor.
POD_OVERHEAD_MIB = 512


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_job_memory_holds_the_agent_guest_it_boots(path: Path) -> None:
    """The agent guest's RAM is QEMU's, inside the pod's memory limit: a limit below it gets the
    pod OOM-killed mid-task (the Job had 1536Mi, sized for the 512 MiB shell guest)."""
    agent = agent_container(agent_pod(path))
    assert "--agent" in agent["args"][: agent["args"].index("--")]
    resources = agent["resources"]
    guest = agentguest.DEFAULT_MEMORY_MIB
    assert _mebibytes(resources["limits"]["memory"]) >= guest + POD_OVERHEAD_MIB
    assert _mebibytes(resources["requests"]["memory"]) >= guest + POD_OVERHEAD_MIB // 2
