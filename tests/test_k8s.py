"""The Kubernetes templates in infra/k8s/ and their renderer (no cluster: the manifests are rendered,
parsed and checked field by field; the work-pool template goes through Prefect's own validation and
placeholder filling). What each pod runs, ``prefixflow.launch.node_launch``, is tested in test_node_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prefixflow.launch.k8s_render import (
    MULTINODE_TEMPLATE,
    WORK_POOL_TEMPLATE,
    TemplateError,
    main,
    multinode_values,
    placeholders,
    render,
)
from prefixflow.services.spec import TrainSpec

REPO = Path(__file__).resolve().parent.parent
JOB_FILE = "/shared/prefixflow/runs/acme/e2e/run1/job.json"
PREFECT_BUILTINS = {"command", "env", "labels", "name"}  # filled by the worker from the flow run


def manifests(train: TrainSpec, name: str = "prefix-acme-e2e") -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(render(MULTINODE_TEMPLATE, multinode_values(train, name, "reg/pf:1", JOB_FILE))))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    return docs[0], docs[1]


def arg(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


@pytest.mark.parametrize(("train", "name"), [
    (TrainSpec(strategy="deepspeed-zero3", processes_per_machine=4, machines=2, main_port=29400), "prefix-acme-e2e"),
    (TrainSpec(strategy="ddp", processes_per_machine=8, machines=1), "solo"),
    (TrainSpec(), "one-gpu"),
])
def test_multinode_manifest(train, name):
    svc, job = manifests(train, name)
    for doc in (svc, job):
        assert doc["metadata"]["name"] == name and doc["metadata"]["namespace"] == "default"
    assert svc["apiVersion"] == "v1" and job["apiVersion"] == "batch/v1"

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == train.machines
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 86400
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "NotIn", "values": [0]}} in rules
    assert {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules

    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert pod["restartPolicy"] == "Never"
    # headless Service selecting exactly these pods; pods in its subdomain get <job>-N.<service> records
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pod["subdomain"] == svc["metadata"]["name"]

    (c,) = pod["containers"]
    assert c["image"] == "reg/pf:1" and c["command"] == ["python", "-m", "prefixflow.launch.node_launch"]
    args = c["args"]
    assert args[0] == JOB_FILE and all(isinstance(a, str) for a in args)
    port = train.main_port or 29500
    assert arg(args, "--main-address") == f"{name}-0.{svc['metadata']['name']}"  # pod 0's DNS name
    assert arg(args, "--main-port") == str(port) == str(svc["spec"]["ports"][0]["port"])
    assert arg(args, "--machine-rank") == "$(MACHINE_RANK)"
    assert arg(args, "--strategy") == train.strategy
    assert int(arg(args, "--processes-per-machine")) == train.processes_per_machine
    assert int(arg(args, "--machines")) == train.machines
    assert float(arg(args, "--hang-timeout-s")) == train.hang_timeout_s
    env = {e["name"]: e for e in c["env"]}
    assert env["MACHINE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["PREFIXFLOW_HOME"]["value"] == "/shared/prefixflow"
    assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= env.keys()
    assert all(isinstance(e.get("value", ""), str) for e in c["env"])  # Kubernetes wants strings here
    assert c["envFrom"][0]["secretRef"]["name"] == "prefixflow-env"

    assert c["resources"]["limits"]["nvidia.com/gpu"] == train.processes_per_machine
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"shared": "/shared", "dshm": "/dev/shm"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "prefixflow-shared"
    assert JOB_FILE.startswith(mounts["shared"] + "/")


def test_values_are_checked():
    zero3 = TrainSpec(strategy="deepspeed-zero3", processes_per_machine=4, machines=2)
    with pytest.raises(ValueError, match="63 characters"):
        multinode_values(zero3, "x" * 62, "img", JOB_FILE)
    with pytest.raises(ValueError, match="lowercase"):
        multinode_values(zero3, "Prefix_Job", "img", JOB_FILE)
    with pytest.raises(ValueError, match="shared volume"):
        multinode_values(zero3, "j", "img", "/tmp/job.json")
    with pytest.raises(ValueError, match="image"):
        multinode_values(zero3, "j", "my image", JOB_FILE)
    assert multinode_values(zero3, "x" * 61, "img", JOB_FILE)["MAIN_ADDRESS"] == f"{'x' * 61}-0.{'x' * 61}"


def test_unfilled_or_unknown_placeholders_raise_one_clear_error(tmp_path):
    values = multinode_values(TrainSpec(strategy="ddp", processes_per_machine=2, machines=2), "j", "img", JOB_FILE)
    partial = {k: v for k, v in values.items() if k not in ("IMAGE", "MAIN_PORT")}
    with pytest.raises(TemplateError, match=r"no value for \$\{IMAGE\}, \$\{MAIN_PORT\}$"):
        render(MULTINODE_TEMPLATE, partial)
    with pytest.raises(TemplateError, match=r"no value for \$\{IMAGE\}.*; unknown value\(s\) IMAGES"):
        render(MULTINODE_TEMPLATE, {**partial, "MAIN_PORT": 1, "IMAGES": "x"})
    t = tmp_path / "t.yaml"
    t.write_text("a: ${A}\nb: $(KUBE_VAR)\nc: ${B}-x\n")
    assert placeholders(t.read_text()) == {"A", "B"}
    assert yaml.safe_load(render(t, {"A": True, "B": 3})) == {"a": True, "b": "$(KUBE_VAR)", "c": "3-x"}
    with pytest.raises(TemplateError, match="one line"):
        render(t, {"A": "x\ny: 1", "B": 1})
    with pytest.raises(TemplateError, match="string or a number"):
        render(t, {"A": ["x"], "B": 1})


def test_cli_renders_a_spec(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "client": "acme", "task": "e2e", "data": {"source": "data.csv"},
        "train": {"strategy": "deepspeed-zero2", "processes_per_machine": 4, "machines": 3, "main_port": 29600}}))
    out = tmp_path / "job.yaml"
    assert main(["multinode", str(spec), "--image", "reg/pf:2", "--job-file", JOB_FILE, "--out", str(out)]) == 0
    svc, job = yaml.safe_load_all(out.read_text())
    assert job["metadata"]["name"] == svc["metadata"]["name"] == "prefix-acme-e2e"
    assert job["spec"]["completions"] == 3
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--main-address=prefix-acme-e2e-0.prefix-acme-e2e" in args
    assert main(["multinode", str(spec), "--image", "reg/pf:2", "--job-file", "/elsewhere/job.json"]) == 2
    assert "shared volume" in capsys.readouterr().err


# --- the Prefect work-pool template ----------------------------------------------------------------------
def test_work_pool_template_is_valid_for_prefect():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(WORK_POOL_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    props = template["variables"]["properties"]
    assert template["variables"]["type"] == "object" and all("type" in p for p in props.values())
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert used - PREFECT_BUILTINS <= props.keys(), used - props.keys()
    validate_base_job_template(template)  # what `prefect work-pool create --base-job-template` checks

    # What the worker does before adding command/env/labels: fill the variables' defaults and job variables.
    values = {k: p["default"] for k, p in props.items() if p.get("default") is not None}
    values.update(image="reg/pf:1", gpus=4, name="acme-e2e", env={"X": "1"})
    config = apply_values(template["job_configuration"], values)
    job = config["job_manifest"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["generateName"] == "acme-e2e-"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["restartPolicy"] == "Never" and "serviceAccountName" not in pod  # unset: left out
    assert c["image"] == "reg/pf:1" and "args" not in c  # the worker sets args to its flow-run command
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4  # an integer, not "4"
    assert c["envFrom"] == [{"secretRef": {"name": "prefixflow-env"}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PREFIXFLOW_HOME"] == "/shared/prefixflow" and env["HF_HOME"] == "/shared/prefixflow/hf"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"shared": "/shared", "dshm": "/dev/shm"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "prefixflow-shared"
    assert env["PREFIXFLOW_HOME"].startswith(mounts["shared"] + "/")
    assert config["env"] == {"X": "1"} and config["stream_output"] is True
    assert not find_placeholders(json.dumps(config))


# --- the prefix server ---------------------------------------------------------------------------------------
def test_serve_manifest_is_a_gpu_deployment_ready_on_health_with_keys_from_a_secret(tmp_path):
    import typer.main

    from prefixflow.cli import app
    from prefixflow.launch.k8s_render import SERVE_TEMPLATE, serve_values

    out = tmp_path / "serve.yaml"
    assert main(["serve", "--image", "reg/pf:3", "--base", "/models/smollm2", "--replicas", "3", "--gpus", "1",
                 "--rate-limit", "20", "--out", str(out)]) == 0
    svc, dep = yaml.safe_load_all(out.read_text())
    assert svc["kind"] == "Service" and dep["kind"] == "Deployment" and dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["replicas"] == 3
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "reg/pf:3" and c["command"] == ["prefixflow", "serve"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = c["ports"][0]
    assert port["name"] == "http" and svc["spec"]["ports"][0]["targetPort"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFIXFLOW_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "prefixflow-serve-keys",
                                                                       "key": "api-keys"}
    assert c["envFrom"][0]["secretRef"]["name"] == "prefixflow-env"  # MLFLOW_TRACKING_URI, S3 settings
    assert all(isinstance(e.get("value", ""), str) for e in c["env"])
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["port"] == str(port["containerPort"]) and args["host"] == "0.0.0.0"
    assert args["base"] == "/models/smollm2" and args["device"] == "cuda" and args["rate-limit"] == "20"
    # every flag is one `prefixflow serve` accepts
    serve = typer.main.get_command(app).commands["serve"]
    accepted = {o.removeprefix("--") for p in serve.params for o in p.opts}
    assert set(args) <= accepted
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["models"] == "/models" and args["base"].startswith(mounts["models"] + "/")

    cpu = yaml.safe_load_all(render(SERVE_TEMPLATE, serve_values("cpu-serve", "img", "smollm2-135m", gpus=0)))
    (cpu_c,) = list(cpu)[1]["spec"]["template"]["spec"]["containers"]
    assert "--device=cpu" in cpu_c["args"] and cpu_c["resources"]["limits"]["nvidia.com/gpu"] == 0
    with pytest.raises(ValueError, match="lowercase"):
        serve_values("Serve_1", "img", "m")
    with pytest.raises(ValueError, match="replicas"):
        serve_values("s", "img", "m", replicas=-1)
    assert main(["serve", "--image", "bad image", "--base", "m"]) == 2
