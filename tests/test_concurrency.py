"""Pipelines at once against the real stack (``prefixflow stack up``), each a ``prefixflow run`` process as a
platform's scheduler would start them: eight clients at once register with no cross-talk; two runs of one
client/task at once never make two champions nor lose a version; the same run key twice at once is refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.faults import pause_fault
from support.harness import World, wait_until
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).with_name("prefixflow"))


@pytest.fixture(scope="module")
def stack(live_stack, tmp_path_factory) -> World:
    """The live stack's client env with a state folder of this module's own, and a tiny base."""
    root = tmp_path_factory.mktemp("concurrency")
    return World(root, {**live_stack, "PREFIXFLOW_HOME": str(root / "state")},
                 model=save_tiny_model(root / "tiny-llama"))


def start(stack: World, spec: dict, run_key: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``prefixflow run SPEC --run-key KEY`` as a process of its own; its output goes to ROOT/KEY.log."""
    path = stack.root / f"{run_key}.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = open(stack.root / f"{run_key}.log", "w")  # noqa: SIM115 -- closed by finish()
    return subprocess.Popen([EXE, "run", str(path), "--run-key", run_key], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "200", **stack.env, **(extra_env or {})})


def finish(stack: World, proc: subprocess.Popen, run_key: str, timeout: float = 900) -> tuple[int, str]:
    """Exit code and (whitespace-flattened) output of a process from :func:`start`."""
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout and proc.stdout.close()
    return code, " ".join((stack.root / f"{run_key}.log").read_text().split())


def wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Until every one of ``paths`` exists; fails at once if one of ``procs`` ends first."""
    def appeared() -> bool:
        assert all(p.poll() is None for p in procs), "a run ended before reaching its pause"
        return all(p.exists() for p in paths)

    wait_until(appeared, timeout, 0.5, message=f"not all of {paths} appeared")


def registry(stack: World):
    from prefixflow.services import tracking

    with patched_environ(stack.env):
        return tracking.client()


def test_eight_clients_at_once_all_register_with_no_cross_talk(stack):
    clients = [f"conc{i}" for i in range(8)]
    procs = {}
    for i, client in enumerate(clients):
        data = write_task(stack.root / f"{client}.jsonl", n=80, seed=i)
        procs[client] = start(stack, spec_dict(stack.model, data, client=client, task="at-once"), f"eight-{client}")
    results = {c: finish(stack, p, f"eight-{c}") for c, p in procs.items()}
    for client, (code, out) in results.items():
        assert code == 0, f"{client}: {out[-3000:]}"
        assert f"registered {client}-at-once v1" in out, out[-3000:]

    c = registry(stack)
    digests = set()
    for client in clients:
        name = f"{client}-at-once"
        model = c.get_registered_model(name)
        versions = c.search_model_versions(f"name = '{name}'")
        assert [(str(v.version), v.status) for v in versions] == [("1", "READY")]
        assert model.tags["client"] == client and dict(model.aliases) == {"candidate": "1", "champion": "1"}
        run = c.get_run(versions[0].run_id)
        assert c.get_experiment(run.info.experiment_id).name == f"prefixflow-{client}"
        assert run.data.params["client"] == client and run.data.params["data.source"].endswith(f"{client}.jsonl")
        with patched_environ(stack.env):
            from prefixflow.services import registry as reg

            folder = reg.download(f"{client}/at-once@champion", stack.root / "pulled" / client)
        digests.add(hashlib.sha256((folder / "prefix.safetensors").read_bytes()).hexdigest())
    assert len(digests) == len(clients)  # each client's own prefix, trained on its own data


def test_two_runs_of_one_task_at_once_make_one_champion_and_keep_both_versions(stack):
    """Both runs finish training before either evaluates (they pause at their last step and are let go
    together), so both are gated against no champion. Registration is serialized: the first becomes champion;
    the second stays @candidate and says why, instead of replacing a champion it was never compared with."""
    data = write_task(stack.root / "twice.jsonl", n=80)
    spec = spec_dict(stack.model, data, client="twice", task="at-once")
    marks = {key: stack.root / f"{key}.paused" for key in ("twice-a", "twice-b")}
    procs = {key: start(stack, spec, key, pause_fault(0, 6, mark)) for key, mark in marks.items()}
    wait_for(list(marks.values()), list(procs.values()))
    for mark in marks.values():
        mark.unlink()
    results = {key: finish(stack, p, key) for key, p in procs.items()}
    assert all(code == 0 for code, _ in results.values()), results

    c = registry(stack)
    versions = {v.tags["prefixflow.run_key"]: str(v.version) for v in c.search_model_versions("name = 'twice-at-once'")}
    assert set(versions) == set(marks) and sorted(versions.values()) == ["1", "2"]
    aliases = dict(c.get_registered_model("twice-at-once").aliases)
    assert aliases == {"champion": "1", "candidate": "2"}  # one champion, the other kept as the candidate
    second = next(k for k, v in versions.items() if v == "2")
    assert "note: @champion moved to v1 while this run was evaluated against no champion" in results[second][1]
    assert "`prefixflow promote twice/at-once/2`" in results[second][1]


def test_the_same_run_key_twice_at_once_is_refused_while_the_first_trains(stack):
    """A second `prefixflow run --run-key K` while the first still trains K must not touch that training (it
    would be taken for one left by a killed command): exit 2, one message; the first finishes and registers."""
    data = write_task(stack.root / "samekey.jsonl", n=80)
    spec = spec_dict(stack.model, data, client="samekey", task="at-once")
    mark = stack.root / "samekey.paused"
    first = start(stack, spec, "same-key", pause_fault(0, 3, mark))
    try:
        wait_for([mark], [first])  # the first command trains, paused after step 3
        again = subprocess.run([EXE, "run", str(stack.root / "same-key.yaml"), "--run-key", "same-key"],
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", **stack.env},
                               timeout=600)
    finally:
        mark.unlink(missing_ok=True)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 2, out[-3000:]
    assert "this run is being trained by another command (pid" in out and "Traceback" not in out, out[-3000:]
    code, first_out = finish(stack, first, "same-key")
    assert code == 0 and "registered samekey-at-once v1" in first_out, first_out[-3000:]
    versions = registry(stack).search_model_versions("name = 'samekey-at-once'")
    assert [str(v.version) for v in versions] == ["1"]
