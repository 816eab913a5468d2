"""Browser tests of the stack's web UIs (Playwright driving Debian's chromium, no browser download).

A stack of its own is started with ``ui_host`` set to a name that only chromium resolves (mapped to 127.0.0.1
with ``--host-resolver-rules``), as when the UIs are reached from another machine: each UI must work at the
address the stack gives it. A spec is deployed with ``prefixflow deploy``; the Prefect UI must list the
deployment with its schedule; a person then retrains from the UI: a custom run with ``train.max_steps`` edited
in the form, which must train with the edited value and register a version, whose aliases the MLflow UI shows.
The SeaweedFS admin page must load. Screenshots go to ``$PREFIXFLOW_TEST_OUTPUT/ui`` (default
``test-output/ui``). The default ``ui_host`` is checked through ``/ui-settings`` in test_stack.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from prefixflow import processes
from prefixflow.infra.stack import running_stack
from support.harness import World, require, wait_until
from support.pipeline import save_tiny_model, spec_dict, write_task
from support.stack_ports import stack_config_with_free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UI_HOST = "prefixflow-ui.test"  # reserved TLD: reachable only through chromium's host mapping
TIMEOUT_MS = 90_000  # page loads and waits: the CI machine has 2 busy cores
SCHEDULE = "0 3 * * 1"
DEPLOYMENT = "ui-smoke"  # flows.deploy.deployment_name: CLIENT-TASK; also the registered model's name
SCHEDULE_TEXT = "At 03:00 AM, only on Monday"  # how the Prefect UI spells "0 3 * * 1"
API_BANNER = "Can't connect to Server API"  # the Prefect UI's error toast when its health check of the API fails


def _output_dir() -> Path:
    """Where screenshots are kept: ``$PREFIXFLOW_TEST_OUTPUT/ui``, else ``test-output/ui`` in the repo."""
    path = Path(os.environ.get("PREFIXFLOW_TEST_OUTPUT") or REPO / "test-output") / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _screenshot_after(page, name: str) -> Iterator[None]:
    """Save the page as NAME.png after the block, whether its checks passed or failed."""
    try:
        yield
    finally:
        path = _output_dir() / f"{name}.png"
        page.screenshot(path=str(path))
        print(f"screenshot: {path}")


def _see(locator) -> None:
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=TIMEOUT_MS)


def _form_field(page, label: str):
    """The input of the Prefect form property whose label starts with ``label`` (its ``for`` points nowhere)."""
    prop = "ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
    return page.locator(f"xpath=//span[contains(@class, 'schema-form-property__label')]"
                        f"[starts-with(normalize-space(), '{label}')]/{prop}//*[self::input or self::textarea]")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser_context():
    """Headless chromium (support.harness.require: skipped where it is missing, a failure in CI)."""
    executable = require("chromium")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
            f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1"]
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=args, headless=True)
        context = chromium.new_context(viewport={"width": 1400, "height": 900})  # one cache for all pages
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        chromium.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("uistack")
    config = stack_config_with_free_ports(root, ui_host=UI_HOST)
    with running_stack(config) as env:
        yield World(root, env, config=config)


def _deployment(api_url: str) -> dict | None:
    """The deployment as the Prefect API returns it, or None while it does not exist."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{api_url}/deployments/name/prefix-pipeline/{DEPLOYMENT}", timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the serve process's group, wait up to 30 s, then SIGKILL whatever is left in the group."""
    processes.stop_group(proc.pid, 30, proc)


@pytest.fixture(scope="module")
def deployment(stack, tmp_path_factory) -> Iterator[dict]:
    """`prefixflow deploy` serving SPEC on the stack; yields the deployment from the Prefect API.

    The serve process is stopped before the stack (a server going away first leaves it retrying forever).
    """
    root = tmp_path_factory.mktemp("deploy")
    specs = root / "specs"
    specs.mkdir()
    spec = spec_dict(save_tiny_model(root / "model"), write_task(specs / "data.jsonl", n=80), client="ui",
                     task="smoke", schedule=SCHEDULE, train__max_steps=7)
    (specs / f"{DEPLOYMENT}.yaml").write_text(yaml.safe_dump(spec))
    log_path = root / "deploy.log"
    env = {**os.environ, **stack.env, "PREFIXFLOW_HOME": str(root / "state")}
    with open(log_path, "w") as log:
        proc = processes.start([sys.executable, "-m", "prefixflow.cli", "deploy", str(specs)], cwd=REPO,
                               env=env, stdout=log, stderr=subprocess.STDOUT)

    def found() -> dict | None:
        assert proc.poll() is None, f"prefixflow deploy exited with {proc.returncode}:\n{log_path.read_text()}"
        return _deployment(stack.env["PREFECT_API_URL"])

    try:
        yield wait_until(found, 180, 1, message=lambda: f"no deployment:\n{log_path.read_text()}")
    finally:
        _stop(proc)


# ---------------------------------------------------------------- the UIs


def test_prefect_ui_lists_the_deployment_with_its_schedule(page, deployment, stack):
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [SCHEDULE]
    ui = stack.config.ui_urls()["prefect"]
    assert ui == f"http://{UI_HOST}:{stack.config.prefect_port}"
    with _screenshot_after(page, "prefect-deployments"):
        with page.expect_request(_is_health_check) as health:  # the UI checks the API once, as it starts
            page.goto(f"{ui}/deployments")
        _see(page.get_by_text(DEPLOYMENT, exact=True))  # listed: the UI reached the API at the stack's address
    with _screenshot_after(page, "prefect-deployment"):
        page.get_by_text(DEPLOYMENT, exact=True).click()
        _see(page.get_by_text(SCHEDULE_TEXT))
        assert f"/deployments/deployment/{deployment['id']}" in page.url
        _settled(page, health.value)  # only now would its error banner have shown
        assert page.get_by_text(API_BANNER).count() == 0, f"error banner after the health check {health.value.url}"


def _is_health_check(request) -> bool:
    return request.url.split("?")[0].rstrip("/").endswith("/api/health")


def _settled(page, request) -> None:
    """Return once ``request`` has ended (answered or failed) and the page's script has handled the outcome."""
    response = request.response()  # None if the request failed
    if response is not None:
        response.finished()
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => setTimeout(done)))")


def test_a_custom_run_from_the_ui_trains_the_edited_spec_and_registers_it(page, deployment, stack):
    """Retraining as a person does it: Run > Custom run, edit train.max_steps (7 -> 4) in the form, Submit. The
    served deployment runs it; the run must use 4 steps, register a version, and the MLflow UI show its
    aliases and, on the version's run, the data it was trained on (lineage)."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    ui = stack.config.ui_urls()["prefect"]
    with _screenshot_after(page, "prefect-custom-run"):
        page.goto(f"{ui}/deployments/deployment/{deployment['id']}")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        expect(page).to_have_url(re.compile(r"/run(\?|$)"), timeout=TIMEOUT_MS)
        expect(_form_field(page, "Client")).to_have_value("ui", timeout=TIMEOUT_MS)
        _see(_form_field(page, "Num Virtual Tokens"))  # a default the spec did not set is editable too
        max_steps = _form_field(page, "Max Steps")  # train.max_steps
        expect(max_steps).to_have_value("7", timeout=TIMEOUT_MS)
        max_steps.scroll_into_view_if_needed()
        max_steps.fill("4")
        expect(max_steps).to_have_value("4")
    with _screenshot_after(page, "prefect-custom-run-submitted"):
        page.get_by_role("button", name="Submit").click()
        run = _flow_run_of(stack.env["PREFECT_API_URL"], deployment["id"])
    run = _finished(stack.env["PREFECT_API_URL"], run["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["spec"]["train"]["max_steps"] == 4

    mlflow = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    champion = mlflow.get_model_version_by_alias(DEPLOYMENT, "champion")
    tracked = mlflow.get_run(champion.run_id)
    assert tracked.data.tags["prefect.flow_run_id"] == run["id"]  # the version is this run's
    assert tracked.data.params["train.max_steps"] == "4"
    # as if MLflow's one-time "new model registry UI" announcement had been closed (it would cover the screenshot)
    page.add_init_script("localStorage.setItem('_mlflow_model_registry_promo_modal_dismissed_v1', 'true')")
    with _screenshot_after(page, "mlflow-registered-models"):
        page.goto(f"{stack.config.ui_urls()['mlflow']}/#/models")
        _see(page.get_by_role("heading", name="Registered Models"))
        _see(page.get_by_role("link", name=DEPLOYMENT, exact=True))
    with _screenshot_after(page, "mlflow-registered-model-aliases"):
        page.get_by_role("link", name=DEPLOYMENT, exact=True).click()
        for alias in ("champion", "candidate"):
            _see(page.get_by_text(re.compile(rf"^@?\s*{alias}$")).first)
    spec = run["parameters"]["spec"]
    with _screenshot_after(page, "mlflow-run-datasets"):  # the version's run shows the data it was trained on
        page.goto(f"{stack.config.ui_urls()['mlflow']}/#/experiments/{tracked.info.experiment_id}/runs/"
                  f"{tracked.info.run_id}")
        _see(page.get_by_text(f"{spec['client']}/{spec['task']}:train").first)


def _api(api_url: str, path: str, body: dict | None = None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{api_url}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=10) as resp:
        return json.loads(resp.read())


def _flow_run_of(api_url: str, deployment_id: str, timeout: float = 60) -> dict:
    """The flow run the UI created for the deployment (the form's Submit creates it on the server)."""
    def manual() -> list[dict]:
        runs = _api(api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
        return [r for r in runs if r["state"]["type"] != "SCHEDULED" or r["auto_scheduled"] is False]

    return wait_until(manual, timeout, 1, message="no flow run of the deployment after Submit")[0]


def _finished(api_url: str, flow_run_id: str, timeout: float = 600) -> dict:
    """The flow run once its state is final (the served deployment picks it up within seconds)."""
    runs = []

    def final() -> dict | None:
        runs.append(_api(api_url, f"/flow_runs/{flow_run_id}"))
        return runs[-1] if runs[-1]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_until(final, timeout, 2, message=lambda: f"flow run {flow_run_id} still {runs[-1]['state']['type']}")


def test_seaweedfs_admin_page_loads(page, stack):
    from playwright.sync_api import expect

    with _screenshot_after(page, "seaweedfs-admin"):
        page.goto(stack.config.ui_urls()["s3"])
        expect(page).to_have_title(re.compile("SeaweedFS Admin"), timeout=TIMEOUT_MS)
        _see(page.get_by_role("heading", name="Volume Servers"))
