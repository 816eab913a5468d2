"""The bad-input corpus: every kind of bad input a user can hand us (spec, data, artifacts, CLI arguments,
registry references, server requests), each through the real CLI as a subprocess or the real server over HTTP.
Each must end in one clear message (exit code 2, or HTTP 400/401/403/404 in OpenAI's error shape), never a
traceback, and must change nothing: the registry's models, versions, aliases and tags, the tracking runs and the
state folder's files are compared before and after every case."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from support.cli import prefixflow
from support.harness import World, registry_snapshot
from support.pipeline import patched_environ, spec_dict, write_task
from support.serving import register_random_prefix, served_model_dir

pytestmark = pytest.mark.slow

VOLATILE = (".db", ".db-journal", ".db-wal", ".db-shm", ".log", ".lock")


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
    return World(root, env, model=model, data=write_task(root / "task.jsonl", n=60), other_model=other,
                 prefix=prefix, keys=keys)


def cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``prefixflow ARGS`` as a user runs it (none of our settings inherited, wide terminal)."""
    return prefixflow(*args, env=env, timeout=timeout)


def state(w: World) -> dict:
    """What must not change: registry (models, versions, aliases, tags), runs, and the state folder's files."""
    from mlflow import MlflowClient

    registry = registry_snapshot(MlflowClient(tracking_uri=f"sqlite:///{w.home / 'mlflow' / 'mlflow.db'}"))
    files = {}
    for path in sorted(w.home.rglob("*")):
        rel = path.relative_to(w.home)
        if path.is_file() and rel.parts[0] != "prefect" and not path.name.endswith(VOLATILE):
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {**registry, "files": files}


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


# data files: the spec points data.source at a file written into the case's folder
def _data(name: str, content: str | bytes) -> Callable[[World, Path], list[str]]:
    def argv(w: World, f: Path) -> list[str]:
        path = f / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["run", _spec(w, f, _set("data.source", str(path)))]
    return argv


def _rows(n: int, **extra) -> str:
    return "".join(json.dumps({"source": f"a{i}", "target": f"b{i}", **extra}) + "\n" for i in range(n))


# artifacts: a copy of acme's downloaded prefix, damaged, given to `prefixflow generate`
def _damaged(damage: Callable[[Path], None], *extra: str) -> Callable[[World, Path], list[str]]:
    def argv(w: World, f: Path) -> list[str]:
        folder = f / "prefix"
        shutil.copytree(w.prefix, folder)
        damage(folder)
        return ["generate", "--prefix", str(folder), "--model", str(w.model), *extra, "red cat"]
    return argv


def _truncate(folder: Path) -> None:
    weights = folder / "prefix.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _flip(folder: Path) -> None:
    weights = folder / "prefix.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


class _Smuggled:
    """Unpickling this writes the file UNPICKLED next to the case (the test asserts it never appears)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle(folder: Path) -> None:
    """A pickle in place of the weights, its checksum rewritten in the manifest so only the format refuses it."""
    weights = folder / "prefix.safetensors"
    torch.save({"x": _Smuggled(folder.parent / "UNPICKLED")}, weights)
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest["files"] = {k: (digest if k == weights.name else v) for k, v in manifest["files"].items()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _other_base(w: World, f: Path) -> list[str]:
    return ["generate", "--prefix", str(w.prefix), "--model", str(w.other_model), "red cat"]


def _sweep(section) -> Callable[[World, Path], list[str]]:
    return lambda w, f: ["sweep", _spec(w, f, _set("sweep", section) if section is not None else None)]


def _keys_file(text: str) -> Callable[[World, Path], list[str]]:
    def argv(w: World, f: Path) -> list[str]:
        (f / "keys.yaml").write_text(text)
        return ["serve", "--base", str(w.model), "--port", "1", "--keys", str(f / "keys.yaml")]
    return argv


def _folder_of_specs(command: str, *specs: Callable[[dict], None] | str) -> Callable[[World, Path], list[str]]:
    def argv(w: World, f: Path) -> list[str]:
        folder = f / "specs"
        folder.mkdir()
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                text = spec
            else:
                data = spec_dict(w.model, w.data)
                spec(data)
                text = yaml.safe_dump(data)
            (folder / f"s{i}.yaml").write_text(text)
        return [command, str(folder)]
    return argv


def _same(data: dict) -> None:
    return None


def _fleet_file(build: Callable[[dict], dict | str]) -> Callable[[World, Path], list[str]]:
    """``prefixflow fleet FILE``: ``build(spec)`` gives the fleet file's content (a mapping, or its text) from a
    valid spec."""
    def argv(w: World, f: Path) -> list[str]:
        content = build(spec_dict(w.model, w.data))
        (f / "fleet.yaml").write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return ["fleet", str(f / "fleet.yaml")]
    return argv


def _two_clients(spec: dict, second: dict) -> dict:
    shared = {k: v for k, v in spec.items() if k not in ("client", "task")}
    return {"defaults": shared, "clients": [{"client": "acme", "task": "rev"}, second]}


CASES = [
    # --- spec ---
    Case("spec file missing", lambda w, f: ["run", str(f / "nope.yaml")], "does not exist"),
    Case("spec not YAML", _run(text="client: [unclosed\n"), "not valid YAML"),
    Case("spec not a mapping", _run(text="- a\n- b\n"), "must hold a mapping"),
    Case("spec empty", _run(text=""), "must hold a mapping"),
    Case("spec with a Python object tag", _run(text="client: !!python/object/apply:os.system ['true']\n"),
         "not valid YAML"),
    Case("spec unknown field", _run(_set("train.max_stesp", 5)), "unknown field"),
    Case("spec missing client", _run(lambda d: d.pop("client")), "client"),
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
    Case("prefix length 0", _run(_set("prefix.num_virtual_tokens", 0)), "prefix.num_virtual_tokens"),
    Case("unknown prefix init", _run(_set("prefix.init", "xavier")), "prefix.init"),
    Case("init text without text init", _run(_set("prefix.init_text", "hello")), "prefix.init: text"),
    Case("init_from without champion init", _run(_set("prefix.init_from", "acme/rev@champion")),
         "prefix.init: champion"),
    Case("init_from not a reference", _run(_set("prefix", {"init": "champion", "init_from": "acme"})),
         "not a registry reference"),
    Case("init_from a version that is not there",
         _run(_set("prefix", {"init": "champion", "init_from": "acme/rev/77"})), "no version 77"),
    Case("unknown mixed precision", _run(_set("train.mixed_precision", "fp8")), "train.mixed_precision"),
    Case("gate metric not computed", _run(_set("evaluate.gate", {"metric": "chrf"})), "computed metrics"),
    Case("unknown metric", _run(_set("evaluate.metrics", ["bleu", "perplexity"])), "evaluate.metrics"),
    Case("schedule not cron", _run(_set("schedule", "every monday")), "cron"),
    Case("unknown trigger", _run(_set("trigger", "on_upload")), "on_new_data"),
    Case("validation fraction 1.5", _run(_set("data.validation_fraction", 1.5)), "validation_fraction"),
    Case("several processes for single", _run(_set("train.machines", 2)), "strategy single runs one process"),
    Case("base model folder missing", _run(_set("base_model", "/nonexistent/model")), "/nonexistent/model"),
    Case("base model folder without a model", lambda w, f: ["run", _spec(w, f, _set("base_model", str(w.root)))],
         "is not a model folder"),
    # --- data ---
    Case("data file missing", _run(_set("data.source", "/nonexistent/data.jsonl")), "/nonexistent/data.jsonl"),
    Case("data file empty", _data("d.jsonl", ""), "is empty"),
    Case("data not JSON lines", _data("d.jsonl", "this is not json\n{also not}\n"), "d.jsonl"),
    Case("data without the source column", _data("d.jsonl", _rows(60).replace('"source"', '"input"')), "source"),
    Case("data without the target column", _data("d.csv", "source,label\n" + "a,b\n" * 60), "target"),
    Case("data not UTF-8", _data("d.csv", b"source,target\n" + b"\xff\xfe\x00a,b\n" * 60), "d.csv"),
    Case("data in an unknown format", _data("d.xlsx", "source,target\na,b\n"), "d.xlsx"),
    Case("data smaller than one batch", _data("d.jsonl", _rows(3)), "fewer than one batch"),
    Case("data with every target empty", _data("d.jsonl", _rows(60).replace('"target": "b', '"target": " ", "b": "')),
         "empty after filtering"),
    Case("data with null sources", _data("d.jsonl", "".join(json.dumps({"source": None, "target": f"b{i}"}) + "\n"
                                                           for i in range(60))), "'source'"),
    # --- artifacts (prefixflow generate --prefix FOLDER) ---
    Case("prefix folder missing", lambda w, f: ["generate", "--prefix", str(f / "nothing"), "red"], "nothing"),
    Case("prefix weights truncated", _damaged(_truncate), "checksum"),
    Case("prefix weights tampered", _damaged(_flip), "checksum"),
    Case("prefix weights missing", _damaged(lambda d: (d / "prefix.safetensors").unlink()), "prefix.safetensors"),
    Case("prefix manifest missing", _damaged(lambda d: (d / "manifest.json").unlink()), "manifest.json"),
    Case("prefix manifest not JSON", _damaged(lambda d: (d / "manifest.json").write_text("{")), "manifest.json"),
    Case("pickle smuggled in as weights", _damaged(_pickle), "prefix.safetensors"),
    Case("prefix for another base", _other_base, "trained on"),
    # --- CLI arguments ---
    Case("unknown retrain mode", lambda w, f: ["run", _spec(w, f), "--retrain", "sometimes"], "--retrain"),
    Case("unknown precision", _damaged(lambda d: None, "--precision", "fp8"), "--precision"),
    Case("generate without a prompt", lambda w, f: ["generate", "--prefix", str(w.prefix)], "prompt"),
    Case("max new tokens 0", _damaged(lambda d: None, "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("port out of range", lambda w, f: ["serve", "--base", str(w.model), "--port", "70000"], "--port"),
    Case("keys file missing", lambda w, f: ["serve", "--base", str(w.model), "--keys", str(f / "k.yaml")],
         "k.yaml"),
    Case("keys file not YAML", _keys_file("keys: [unclosed\n"), "keys.yaml"),
    Case("keys file of another shape", _keys_file("- just\n- a list\n"), "keys.yaml"),
    Case("serve on a GPU that is not there", lambda w, f: ["serve", "--base", str(w.model), "--device", "cuda:3"],
         "--device cuda:3"),
    Case("serve on an unknown device", lambda w, f: ["serve", "--base", str(w.model), "--device", "tpu"],
         "is not a device"),
    Case("key for a client with a bad name", lambda w, f: ["keys", "add", "--client", "../acme", "--file",
                                                           str(f / "k.yaml")], "client '../acme'"),
    Case("fleet folder missing", lambda w, f: ["fleet", str(f / "none")], "none"),
    Case("fleet folder without specs", _folder_of_specs("fleet"), "no *.yaml specs"),
    Case("fleet with one bad spec", _folder_of_specs("fleet", _same, "client: [\n"), "s1.yaml"),
    Case("fleet with the same client and task twice", _folder_of_specs("fleet", _same, _same), "acme/rev"),
    Case("fleet file with a bad client", _fleet_file(lambda d: _two_clients(
        d, {"client": "globex", "task": "rev", "train": {"max_steps": -3}})), "clients[1] (globex/rev)"),
    Case("fleet file with an unknown top-level key", _fleet_file(lambda d: {"clients": [d], "train": {}}),
         "unknown top-level key"),
    Case("fleet file without clients", _fleet_file(lambda d: {"defaults": d}), "`clients:`"),
    Case("fleet file with the same client and task twice", _fleet_file(lambda d: _two_clients(
        d, {"client": "acme", "task": "rev"})), "acme/rev"),
    Case("fleet file whose client's data is missing", _fleet_file(lambda d: _two_clients(
        d, {"client": "globex", "task": "rev", "data": {"source": "nowhere.jsonl"}})), "clients[1] (globex/rev)"),
    Case("deploy folder missing", lambda w, f: ["deploy", str(f / "none")], "none is not a folder of specs"),
    Case("deploy with the same client and task twice", _folder_of_specs("deploy", _same, _same), "acme/rev"),
    Case("sweep without a sweep section", _sweep(None), "sweep"),
    Case("sweep with an unknown parameter", _sweep({"trials": 2, "space": {"train.momentum": [0.9]}}),
         "train.momentum"),
    Case("sweep with 0 trials", _sweep({"trials": 0, "space": {"train.learning_rate": [0.01]}}), "sweep.trials"),
    Case("run key that is not one", lambda w, f: ["run", _spec(w, f), "--run-key", "../../x"], "--run-key"),
    # --- registry references ---
    Case("reference with path traversal", lambda w, f: ["pull", "models:/../../etc@champion", "--out", str(f / "o")],
         "not a registry reference"),
    Case("unknown registered model", lambda w, f: ["pull", "acme/nope@champion", "--out", str(f / "o")],
         "no registered model"),
    Case("unknown alias", lambda w, f: ["pull", "acme/rev@nope", "--out", str(f / "o")], "no alias @nope"),
    Case("unknown version", lambda w, f: ["pull", "acme/rev/99", "--out", str(f / "o")], "99"),
    Case("reference without alias or version", lambda w, f: ["pull", "acme/rev", "--out", str(f / "o")],
         "CLIENT/TASK@ALIAS"),
    Case("generate with an unknown reference", lambda w, f: ["generate", "--prefix", "globex/nope@champion", "x"],
         "no registered model"),
    Case("promote an unknown version", lambda w, f: ["promote", "acme/rev/42"], "42"),
    Case("promote a model that is not there", lambda w, f: ["promote", "initech/rev/1"], "no registered model"),
    Case("rollback without a previous champion", lambda w, f: ["rollback", "acme/rev"], "@previous"),
    Case("rollback of a model that is not there", lambda w, f: ["rollback", "initech/rev"], "no registered model"),
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
    _record(case.kind, argv[0], result.returncode, out)


REPORT_ENV = "PREFIXFLOW_CORPUS_REPORT"  # a file: each case's outcome appended as a JSON line (docs/reliability.md)


def _record(kind: str, command: str, code: int, output: str) -> None:
    if os.environ.get(REPORT_ENV):
        at = ("\n" + output).rfind("\nerror: ")  # the last message line and what it wraps onto
        message = " ".join((output[at:] if at >= 0 else output[-300:]).split())
        with open(os.environ[REPORT_ENV], "a") as fh:
            fh.write(json.dumps({"kind": kind, "command": command, "exit": code, "message": message[:400]}) + "\n")
