"""The bad-input corpus: every kind of bad input a user can hand us (spec, data, artifacts, CLI arguments,
registry references, server requests), each through the real CLI as a subprocess or the real server over HTTP.
Each must end in one clear message (exit code 2, or HTTP 400/401/403/404 in OpenAI's error shape), never a
traceback, and must change nothing: the registry's models, versions, aliases and tags, the tracking runs and the
state folder's files are compared before and after every case."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from support.pipeline import patched_environ, spec_dict, write_task
from support.serving import register_random_prefix, served_model_dir

pytestmark = pytest.mark.slow

USER_ENV_DROP = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "PREFIXFLOW_API_KEYS")
VOLATILE = (".db", ".db-journal", ".db-wal", ".db-shm", ".log", ".lock")


@dataclass
class World:
    root: Path
    home: Path
    env: dict[str, str]
    model: Path
    other_model: Path
    data: Path
    prefix: Path  # acme/rev's champion, downloaded
    keys: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A state folder with acme/rev v1 (@champion) and globex/rev v1 (@champion), registered through the product's
    registration code, a downloaded copy of acme's prefix, a second tiny base of another shape, and API keys."""
    root = tmp_path_factory.mktemp("bad-input")
    home = root / "home"
    env = {"PREFIXFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        from prefixflow.services import registry
        from support.tiny_models import char_tokenizer, make_base

        model = served_model_dir(root / "model")
        other = root / "other-model"  # gpt2-shaped: another prefix geometry than the llama's
        make_base("gpt2", seed=3).save_pretrained(other)
        char_tokenizer().save_pretrained(other)
        register_random_prefix(model, "acme", "rev", seed=1)
        register_random_prefix(model, "globex", "rev", seed=2)
        prefix = registry.download("acme/rev@champion", root / "acme-prefix")
    keys_file = root / "keys.yaml"
    keys = {}
    for client in ("acme", "globex"):
        out = cli("keys", "add", "--client", client, "--file", str(keys_file), env=env)
        assert out.returncode == 0, out.stderr
        keys[client] = out.stdout.strip().splitlines()[-1]
    keys["file"] = str(keys_file)
    return World(root, home, env, model, other, write_task(root / "task.jsonl", n=60), prefix, keys)


def cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``prefixflow ARGS`` as a user runs it (none of our settings inherited, wide terminal)."""
    base = {k: v for k, v in os.environ.items() if k not in USER_ENV_DROP}
    exe = Path(sys.executable).with_name("prefixflow")
    return subprocess.run([str(exe), *args], env={**base, "COLUMNS": "200", **env}, capture_output=True, text=True,
                          timeout=timeout)


def state(w: World) -> dict:
    """What must not change: registry (models, versions, aliases, tags), runs, and the state folder's files."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{w.home / 'mlflow' / 'mlflow.db'}")
    models = {}
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{m.name}'")
        models[m.name] = {"aliases": dict(m.aliases), "tags": dict(m.tags),
                          "versions": sorted((v.version, v.status, v.source, tuple(sorted(v.tags.items())))
                                             for v in versions)}
    runs = sorted((r.info.run_id, r.info.status) for e in client.search_experiments()
                  for r in client.search_runs([e.experiment_id]))
    files = {}
    for path in sorted(w.home.rglob("*")):
        rel = path.relative_to(w.home)
        if path.is_file() and rel.parts[0] != "prefect" and not path.name.endswith(VOLATILE):
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"models": models, "runs": runs, "files": files}


# --- the corpus -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """``argv(world, folder)`` builds the command (writing what it needs into ``folder``, outside the state);
    ``words``: what the one message must say."""

    kind: str
    argv: Callable[[World, Path], list[str]]
    words: str


def _spec(w: World, folder: Path, change: Callable[[dict], None] | None = None, text: str | None = None) -> str:
    path = folder / "spec.yaml"
    if text is None:
        data = spec_dict(w.model, w.data)
        if change:
            change(data)
        text = yaml.safe_dump(data)
    path.write_text(text)
    return str(path)


def _set(path: str, value) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return change


def _run(change=None, text=None, command="run"):
    return lambda w, f: [command, _spec(w, f, change, text)]


CASES = [  # the kinds run on this machine so far; the rest of the corpus follows
    Case("spec file missing", lambda w, f: ["run", str(f / "nope.yaml")], "does not exist"),
    Case("spec not YAML", _run(text="client: [unclosed\n"), "not valid YAML"),
    Case("spec not a mapping", _run(text="- a\n- b\n"), "must hold a mapping"),
    Case("spec empty", _run(text=""), "must hold a mapping"),
    Case("spec unknown field", _run(_set("train.max_stesp", 5)), "unknown field"),
    Case("client path traversal", _run(_set("client", "../globex")), "not a valid name"),
    Case("task with capitals", _run(_set("task", "E2E")), "not a valid name"),
    Case("template without {source}", _run(_set("data.template", "no placeholder")), "{source}"),
    Case("template with another field", _run(_set("data.template", "{source} {name}")), "only use the {source}"),
    Case("template with attribute access", _run(_set("data.template", "{source.__class__}")),
         "only use the {source}"),
    Case("batch size 0", _run(_set("train.batch_size", 0)), "train.batch_size"),
    Case("negative learning rate", _run(_set("train.learning_rate", -1e-3)), "train.learning_rate"),
    Case("infinite learning rate", _run(_set("train.learning_rate", float("inf"))), "finite"),
    Case("steps as words", _run(_set("train.max_steps", "many")), "train.max_steps"),
    Case("gate metric not computed", _run(_set("evaluate.gate", {"metric": "chrf"})), "computed metrics"),
    Case("schedule not cron", _run(_set("schedule", "every monday")), "cron"),
    Case("validation fraction 1.5", _run(_set("data.validation_fraction", 1.5)), "validation_fraction"),
    Case("several processes for single", _run(_set("train.machines", 2)), "strategy single runs one process"),
    Case("demo with 0 steps", lambda w, f: ["demo", "--steps", "0", "--state", str(f / "s")], "--steps"),
    Case("reference with path traversal", lambda w, f: ["pull", "models:/../../etc@champion", "--out", str(f / "o")],
         "not a registry reference"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_gets_one_message_and_changes_nothing(world, case, tmp_path):
    before = state(world)
    argv = case.argv(world, tmp_path)
    result = cli(*argv, env=world.env)
    out = result.stdout + result.stderr
    flat = " ".join(out.split())
    assert result.returncode == 2, f"exit {result.returncode}:\n{out}"
    assert "Traceback" not in out, out
    assert case.words in flat, out
    assert state(world) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "UNPICKLED").exists()
    _record(case.kind, " ".join(argv[:1]), result.returncode, flat)


REPORT_ENV = "PREFIXFLOW_CORPUS_REPORT"  # a file: each case's outcome appended as a JSON line (docs/reliability.md)


def _record(kind: str, command: str, code: int, output: str) -> None:
    if os.environ.get(REPORT_ENV):
        message = output[output.find("error:"):] if "error:" in output else output[-300:]
        with open(os.environ[REPORT_ENV], "a") as fh:
            fh.write(json.dumps({"kind": kind, "command": command, "exit": code, "message": message[:400]}) + "\n")
