"""Training checkpoints: atomic, pickle-free, resumable to the exact same result.

A checkpoint is a directory ``step-00000100/`` holding::

    trainable.safetensors   prefix parameters        optimizer.safetensors + optimizer.json
    best.safetensors        best-so-far prefix       scheduler.json, state.json (step, history ...)
    rng-rank{r}.safetensors + rng-rank{r}.json       every rank's RNG state
    COMPLETE                written last: only directories with it are ever loaded
    deepspeed/              DeepSpeed runs only: the engine's ZeRO shards (each rank's optimizer
                            partition; torch-pickled by DeepSpeed), ``optimizer.*`` is then absent

It is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint that looks complete. Older checkpoints are pruned to the newest K.
``trainable`` is always the full prefix (gathered from the shards under ZeRO-3).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import PrefixError
from .files import fsync_dir, fsync_tree

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
DEEPSPEED_DIR = "deepspeed"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_DIR = re.compile(r"^\.step-(\d{8})\.tmp$")


class IncompatibleCheckpointError(PrefixError):
    """A complete checkpoint exists but was written by a run this one cannot continue (e.g. another
    DeepSpeed stage or process count). Not skipped: resuming from an older one would be wrong too."""


def _split(obj, prefix: str, tensors: dict):
    """Replace tensors in a nested structure by references, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_tree(obj, directory: Path, name: str) -> None:
    """Save a nested dict of tensors and JSON values as ``name.safetensors`` + ``name.json``."""
    tensors: dict = {}
    skeleton = _split(obj, name, tensors)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(directory: Path, name: str):
    tensors = load_file(directory / f"{name}.safetensors")
    return _join(json.loads((directory / f"{name}.json").read_text()), tensors)


def load_optimizer_state(optimizer, tree: dict) -> None:
    state = {int(k): v for k, v in tree["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": tree["param_groups"]})


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], npy[1].numpy().astype(np.uint32), *npy[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def begin(root: Path, step: int) -> Path:
    """Create (empty) the temporary directory for a checkpoint at ``step``."""
    tmp = Path(root) / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Mark ``tmp`` complete (the marker is the last file written, after everything else is on
    disk), rename it into place and prune to the newest ``keep``; leftover temporary directories
    of interrupted saves are removed."""
    root = Path(root)
    fsync_tree(tmp)
    (tmp / MARKER).write_text(str(step))
    fsync_tree(tmp)
    final = step_dir(root, step)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)
    for old in complete_checkpoints(root)[max(keep, 1) :]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():
        if _TMP_DIR.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def check_deepspeed_shards(tag_dir: Path, rank: int) -> None:
    """Raise unless ``tag_dir`` (a DeepSpeed checkpoint tag folder) holds non-empty files for ``rank``."""
    mine = [f for f in Path(tag_dir).glob(f"*zero_pp_rank_{rank}_*") if f.is_file() and f.stat().st_size > 0]
    if not mine:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed shard of rank {rank}")


def newest_loadable(root: Path, load, agree=None) -> tuple[Path, object] | None:
    """Try ``load(path)`` on complete checkpoints, newest first; a corrupt one is skipped with a
    warning. Incomplete ones (no marker) are never considered. With several processes, ``agree(ok)``
    returns whether every process loaded its part, so all of them pick the same checkpoint.
    :class:`IncompatibleCheckpointError` is raised, not skipped."""
    for path in complete_checkpoints(root):
        try:
            data, error = load(path), None
        except IncompatibleCheckpointError:
            raise
        except Exception as err:
            data, error = None, err
        ok = error is None
        if agree is not None:
            ok = agree(ok)
        if ok:
            return path, data
        reason = error if error is not None else "another process could not load its part of it"
        log.warning("skipping checkpoint %s: it cannot be loaded (%s)", path, reason)
    return None
