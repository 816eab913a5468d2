"""Kubernetes manifests: training beyond one machine (and the entry point of each training pod), and the
prefix server.

``render`` fills a template from ``infra/k8s/`` whose placeholders are ``${NAME}`` (letters, digits
and underscores). Every placeholder must get a value and every value must be used, otherwise one
:class:`TemplateError` names them all. Values are inserted as plain text (``str()``; booleans as
``true``/``false``), so the template quotes where YAML needs it. Kubernetes' own ``$(VAR)`` references
are not placeholders and pass through. (``work-pool-template.json`` is not rendered here: it holds
Prefect's ``{{ var }}`` placeholders, filled by the Prefect worker.)

``multinode_values`` derives the values of ``infra/k8s/multinode-train.yaml`` from a
:class:`~tasks.spec.TrainSpec`: an Indexed Job of ``machines`` pods with ``processes_per_machine``
GPUs each, and a headless Service through which every pod reaches pod 0 at
``<job>-0.<service>:<main_port>``.

``serve_values`` fills ``infra/k8s/serve.yaml``: a Deployment of ``prefixflow serve`` replicas (one GPU each,
ready when ``/health`` is) behind a Service, keys and registry/S3 settings from Secrets.

CLI::
    python -m prefixflow.launch.k8s_render multinode SPEC.yaml --image IMG --job-file /shared/.../job.json --out FILE
    python -m prefixflow.launch.k8s_render serve --image IMG --base /models/NAME --replicas 2 --out FILE

Each pod runs ``python -m prefixflow.launch.node_launch`` (this machine's ranks; rank from
``$JOB_COMPLETION_INDEX``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from prefixflow.launch.command import INFRA
from prefixflow.services.spec import SpecError, TrainSpec, load_spec

K8S_DIR = INFRA / "k8s"
MULTINODE_TEMPLATE = K8S_DIR / "multinode-train.yaml"
WORK_POOL_TEMPLATE = K8S_DIR / "work-pool-template.json"
SERVE_TEMPLATE = K8S_DIR / "serve.yaml"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DEFAULT_MAIN_PORT = 29500
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class TemplateError(ValueError):
    """A template and its values do not match (placeholders left unfilled, values nobody uses)."""


def placeholders(text: str) -> set[str]:
    """Names of the ``${NAME}`` placeholders in ``text``."""
    return set(PLACEHOLDER.findall(text))


def _as_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise TemplateError(f"value {name} must be a string or a number, not {type(value).__name__}")
    text = str(value)
    if "\n" in text:
        raise TemplateError(f"value {name} must be one line")
    return text


def render(template_path: str | Path, values: dict[str, Any]) -> str:
    """``template_path`` with every ``${NAME}`` replaced by ``values[NAME]``."""
    text = Path(template_path).read_text()
    names = placeholders(text)
    missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
    if missing or unknown:
        problems = []
        if missing:
            problems.append("no value for " + ", ".join(f"${{{n}}}" for n in missing))
        if unknown:
            problems.append("unknown value(s) " + ", ".join(unknown) + " (not a placeholder of this template)")
        raise TemplateError(f"{template_path}: {'; '.join(problems)}")
    filled = {name: _as_text(name, value) for name, value in values.items()}
    return PLACEHOLDER.sub(lambda m: filled[m.group(1)], text)


def multinode_values(train: TrainSpec, job_name: str, image: str, job_file: str | PurePosixPath, *,
                     namespace: str = "default", shared_pvc: str = "prefixflow-shared", shared_mount: str = "/shared",
                     prefixflow_home: str | None = None, secret_name: str = "prefixflow-env", cpu: str = "8",
                     memory: str = "64Gi", shm_size: str = "16Gi", deadline_s: int = 86400,
                     image_pull_policy: str = "IfNotPresent", nccl_socket_ifname: str = "eth0") -> dict[str, Any]:
    """Values of ``multinode-train.yaml`` for ``train``: Job ``job_name`` (also the headless Service's
    name) running ``image``; ``job_file`` is the training job's path inside the pods, on the shared
    volume ``shared_pvc`` mounted at ``shared_mount``."""
    machines, per_machine = train.machines, train.processes_per_machine
    longest = f"{job_name}-{machines - 1}"  # the last pod's hostname
    if not DNS_LABEL.match(job_name) or len(longest) > 63:
        raise ValueError(f"job name {job_name!r} must be lowercase letters, digits and inner hyphens, short "
                         f"enough that the pod hostname {longest!r} has at most 63 characters")
    if not image or any(c.isspace() or c in "\"'" for c in image):
        raise ValueError(f"image {image!r} must be a non-empty image reference without spaces or quotes")
    job_path, mount = PurePosixPath(job_file), PurePosixPath(shared_mount)
    if not job_path.is_absolute() or not job_path.is_relative_to(mount):
        raise ValueError(f"job file {job_file} must be an absolute path on the shared volume (under {mount}): "
                         "every pod reads it, and its checkpoint_dir/output_dir must be shared too")
    return {
        "JOB_NAME": job_name,
        "SERVICE_NAME": job_name,
        "NAMESPACE": namespace,
        "IMAGE": image,
        "IMAGE_PULL_POLICY": image_pull_policy,
        "STRATEGY": train.strategy,
        "MACHINES": machines,
        "PROCESSES_PER_MACHINE": per_machine,
        "MAIN_ADDRESS": f"{job_name}-0.{job_name}",
        "MAIN_PORT": train.main_port or DEFAULT_MAIN_PORT,
        "HANG_TIMEOUT_S": f"{train.hang_timeout_s:g}",
        "DEADLINE_S": int(deadline_s),
        "JOB_FILE": str(job_path),
        "SHARED_PVC": shared_pvc,
        "SHARED_MOUNT": str(mount),
        "PREFIXFLOW_HOME": prefixflow_home or str(mount / "prefixflow"),
        "SECRET_NAME": secret_name,
        "CPU": cpu,
        "MEMORY": memory,
        "SHM_SIZE": shm_size,
        "NCCL_SOCKET_IFNAME": nccl_socket_ifname,
    }


def serve_values(name: str, image: str, base_model: str, *, namespace: str = "default", replicas: int = 1,
                 gpus: int = 1, port: int = 8000, max_batch: int = 64, max_queued: int = 1024, max_tokens: int = 512,
                 rate_limit: float = 0.0, bank_mb: float = 4096, refresh_s: float = 5.0,
                 keys_secret: str = "prefixflow-serve-keys", env_secret: str = "prefixflow-env",
                 model_pvc: str = "prefixflow-models", cpu: str = "4", memory: str = "32Gi",
                 startup_timeout_s: int = 900, image_pull_policy: str = "IfNotPresent") -> dict[str, Any]:
    """Values of ``serve.yaml``: Deployment and Service ``name``, ``replicas`` servers of ``base_model`` (a folder
    on the ``model_pvc`` volume mounted at /models, an embedded name, or an HF id in the pods' cache), ``gpus`` per
    replica (0: CPU). The Secret ``keys_secret`` holds the API keys under ``api-keys``; ``env_secret`` the
    registry and S3 settings."""
    if not DNS_LABEL.match(name) or len(name) > 63:
        raise ValueError(f"server name {name!r} must be lowercase letters, digits and inner hyphens (at most 63)")
    if not image or any(c.isspace() or c in "\"'" for c in image):
        raise ValueError(f"image {image!r} must be a non-empty image reference without spaces or quotes")
    if not base_model or any(c.isspace() for c in base_model):
        raise ValueError(f"base model {base_model!r} must be a folder under /models, an embedded name or an HF id")
    for label, value, low in (("replicas", replicas, 0), ("gpus", gpus, 0), ("max_batch", max_batch, 1),
                              ("max_queued", max_queued, 1), ("max_tokens", max_tokens, 1), ("port", port, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{label} must be a whole number >= {low}, got {value}")
    return {
        "NAME": name, "NAMESPACE": namespace, "IMAGE": image, "IMAGE_PULL_POLICY": image_pull_policy,
        "REPLICAS": replicas, "GPUS": gpus, "DEVICE": "cuda" if gpus else "cpu", "PORT": port,
        "BASE_MODEL": base_model, "MAX_BATCH": max_batch, "MAX_QUEUED": max_queued, "MAX_TOKENS": max_tokens,
        "RATE_LIMIT": f"{rate_limit:g}", "BANK_MB": f"{bank_mb:g}", "REFRESH_S": f"{refresh_s:g}",
        "KEYS_SECRET": keys_secret, "ENV_SECRET": env_secret, "MODEL_PVC": model_pvc, "CPU": cpu,
        "MEMORY": memory, "STARTUP_PROBES": max(1, -(-int(startup_timeout_s) // 5)),
    }


# --- CLI ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefixflow.launch.k8s_render", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("multinode", help="render infra/k8s/multinode-train.yaml for a pipeline spec")
    m.add_argument("spec", type=Path, help="pipeline spec YAML (its train section is used)")
    m.add_argument("--image", required=True)
    m.add_argument("--job-file", required=True, help="the job.json path inside the pods, on the shared volume")
    m.add_argument("--name", help="Job and Service name (default: prefix-CLIENT-TASK)")
    m.add_argument("--namespace", default="default")
    m.add_argument("--pvc", default="prefixflow-shared", help="shared ReadWriteMany volume claim")
    m.add_argument("--secret", default="prefixflow-env")
    m.add_argument("--deadline-s", type=int, default=86400, help="activeDeadlineSeconds of the Job")
    m.add_argument("--out", type=Path, help="write here instead of stdout")
    v = sub.add_parser("serve", help="render infra/k8s/serve.yaml: prefixflow serve replicas behind a Service")
    v.add_argument("--image", required=True)
    v.add_argument("--base", required=True, help="base model: /models/NAME (the model volume), embedded name or HF id")
    v.add_argument("--name", default="prefixflow-serve", help="Deployment and Service name")
    v.add_argument("--namespace", default="default")
    v.add_argument("--replicas", type=int, default=1)
    v.add_argument("--gpus", type=int, default=1, help="GPUs per replica (0: CPU only)")
    v.add_argument("--max-batch", type=int, default=64)
    v.add_argument("--rate-limit", type=float, default=0.0, help="requests per second per key (0: none)")
    v.add_argument("--keys-secret", default="prefixflow-serve-keys", help="Secret with the API keys (key api-keys)")
    v.add_argument("--env-secret", default="prefixflow-env", help="Secret with the registry and S3 settings")
    v.add_argument("--model-pvc", default="prefixflow-models", help="volume claim holding base model folders")
    v.add_argument("--out", type=Path, help="write here instead of stdout")
    return parser


def _write(text: str, out: Path | None) -> int:
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            values = serve_values(args.name, args.image, args.base, namespace=args.namespace, replicas=args.replicas,
                                  gpus=args.gpus, max_batch=args.max_batch, rate_limit=args.rate_limit,
                                  keys_secret=args.keys_secret, env_secret=args.env_secret, model_pvc=args.model_pvc)
            text = render(SERVE_TEMPLATE, values)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _write(text, args.out)
    if args.command == "multinode":
        try:
            spec = load_spec(args.spec)
            values = multinode_values(spec.train, args.name or f"prefix-{spec.client}-{spec.task}", args.image,
                                      args.job_file, namespace=args.namespace, shared_pvc=args.pvc,
                                      secret_name=args.secret, deadline_s=args.deadline_s)
            text = render(MULTINODE_TEMPLATE, values)
        except (SpecError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _write(text, args.out)
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
