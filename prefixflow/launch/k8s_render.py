"""Kubernetes manifests for training beyond one machine, and the entry point of each training pod.

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

CLI::

    python -m prefixflow.launch.k8s_render multinode SPEC.yaml --image IMG --job-file /shared/.../job.json --out FILE

Each pod runs ``python -m prefixflow.launch.node_launch`` (this machine's ranks; rank from
``$JOB_COMPLETION_INDEX``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefixflow.services.spec import TrainSpec

from prefixflow.launch.command import INFRA

K8S_DIR = INFRA / "k8s"
MULTINODE_TEMPLATE = K8S_DIR / "multinode-train.yaml"
WORK_POOL_TEMPLATE = K8S_DIR / "work-pool-template.json"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # one command for now: multinode
    if args.command == "multinode":
        from prefixflow.services.spec import SpecError, load_spec

        try:
            spec = load_spec(args.spec)
            values = multinode_values(spec.train, args.name or f"prefix-{spec.client}-{spec.task}", args.image,
                                      args.job_file, namespace=args.namespace, shared_pvc=args.pvc,
                                      secret_name=args.secret, deadline_s=args.deadline_s)
            text = render(MULTINODE_TEMPLATE, values)
        except (SpecError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.out:
            args.out.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    sys.exit(main())
