"""Shared fixtures (the helpers behind them live in tests/support/, a package the tests import)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test process (pytest-xdist runs two) gets a Prefect home of its own: flows run without a harness start
# an ephemeral API on PREFECT_HOME/prefect.db, and two servers migrating one SQLite file would collide.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefixflow-tests-prefect-")
# pytest-xdist workers share the cores: each worker and every rank it launches computes on its share (two
# trainings with a thread per core each would oversubscribe the CPU, and OpenMP slows down far more than 2x).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest
import torch

from prefixflow.flows.embedded import prefect_defaults
from prefixflow.launch.protocol import STEP_HOOK_ENV
from support.faults import STEP_HOOK
from support.tiny_models import ALL_FAMILIES, DECODER_ONLY, char_tokenizer

prefect_defaults()  # before any test module imports prefect (it reads its settings once, at import)
# The ranks of every training a test launches load the fault hook of tests/support/faults.py (a no-op unless
# the test sets PREFIXFLOW_FAULT): the product's one test seam.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)
os.environ[STEP_HOOK_ENV] = STEP_HOOK
if "OMP_NUM_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Rough seconds per xdist group under ``make test`` on a 2-core AVX2 CPU (only their order matters: it decides
# which groups start first). Groups not listed take seconds.
# The demo's end-to-end test (one test of about 5 minutes) starts first, the many-test groups next.
GROUP_SECONDS = {"test_cli": 900, "live_stack": 700, "test_distributed": 600, "test_pipeline": 500,
                 "test_bad_input": 420, "test_slurm": 300, "test_sweep": 250, "test_termination": 230,
                 "test_embedded_ddp": 160, "test_ui_browser": 150, "test_stack": 120, "test_serve": 90,
                 "test_disk_full": 75, "test_stack_auth": 140,
                 "test_node_launch": 60, "test_launch": 45, "test_base_model": 40, "test_packaging": 25}


@pytest.fixture
def fault_rng(request):
    """A seeded random generator for a fault test; a failure shows the seed (``PREFIXFLOW_TEST_SEED`` replays)."""
    from support.faults import seeded_rng

    return seeded_rng(request)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Work units for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): a test module stays on one
    worker, so its module-scoped fixtures (a Slurm cluster, a Prefect harness) start once; every test that uses
    the session-wide ``live_stack`` shares one worker, so one stack starts. The longest groups go first (longest
    first packs two workers best); the order inside a group is kept."""
    groups: dict[str, list] = {}
    for item in items:
        group = "live_stack" if "_running_stack" in getattr(item, "fixturenames", ()) else item.path.stem
        item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    items[:] = [i for g in sorted(groups, key=lambda g: -GROUP_SECONDS.get(g, 0)) for i in groups[g]]


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's ephemeral API servers (started by flows run without a harness) while output is still
    captured; at interpreter exit their log line would hit a closed stream."""
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=DECODER_ONLY)
def decoder_family(request):
    return request.param


@pytest.fixture(scope="session")
def _running_stack(tmp_path_factory):
    """(StackConfig, client env) of the session's real local stack (SeaweedFS S3, MLflow, Prefect on free
    ports), up for the whole session."""
    from prefixflow.infra.stack import running_stack
    from support.stack_ports import stack_config_with_free_ports

    config = stack_config_with_free_ports(tmp_path_factory.mktemp("stack"))
    with running_stack(config) as env:
        yield config, env


@pytest.fixture(scope="session")
def live_stack_config(_running_stack):
    """The StackConfig of the live stack: fault tests stop its services and bring them back through it."""
    return _running_stack[0]


@pytest.fixture(scope="session")
def live_stack(_running_stack):
    """The client env dict of the real local stack (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*, ...); it does
    not touch os.environ: set it per test, e.g. ``for k, v in live_stack.items(): monkeypatch.setenv(k, v)``.
    Mark such tests slow."""
    return dict(_running_stack[1])
