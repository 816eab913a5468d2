"""prepare_data: load a task's data, clean it, split it by group, tokenize for statistics, and write
the splits as JSON lines under the state folder, cached by content.

Output folder ``$PREFIXFLOW_HOME/data/CLIENT/TASK/KEY/``: ``train.jsonl``, ``validation.jsonl``,
``test.jsonl`` (one ``{"source", "target", "group"}`` object per line), ``rejected.jsonl`` (each
quarantined row with its row number and reason) and ``meta.json`` (counts, token-length statistics,
the content fingerprint). KEY hashes the sources' bytes (or S3 ETags), the data spec and the base
model, so a rerun on unchanged data reuses the folder without reading the data again.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path

from pydantic import BaseModel

from prefix_core.data import Example, encode, render
from prefix_core.files import atomic_write_dir
from prefixflow import settings
from prefixflow.services.errors import AccessDenied, DataError
from prefixflow.services.spec import DataSpec, PipelineSpec
from prefixflow.services.storage import fetch, home, source_fingerprint

# Deferred imports: datasets, transformers and prefix_core.base_model (torch) are deferred to the steps that load data
# or a tokenizer; the CLI's preflight imports this module.

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


class PreparedData(BaseModel):
    """What prepare_data hands to the next tasks: where the splits are, and what happened to the rows."""

    uri: str
    fingerprint: str  # sha256 of the prepared splits' content
    cache_key: str
    reused: bool
    counts: dict[str, int]
    stats: dict[str, dict]
    rejected_uri: str | None
    seconds: float


def _load_table(uri: str) -> tuple[list[dict], dict[str, str]]:
    """Rows and ``{column: type}`` of a csv/jsonl/parquet file, a saved datasets folder or a datasets name."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parser errors are reported below, once
    path = fetch(uri)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{uri} is a dataset with splits {list(ds)}; save the split to use on its own")
                ds = ds["train"]
        elif path.suffix.lower() in FORMATS:
            if path.is_file() and path.stat().st_size == 0:
                raise DataError(f"data file {uri} is empty; it needs rows with the source and target columns")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train", **kwargs)
        elif path.exists():
            raise DataError(f"{uri}: unknown data format {path.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")
        elif _local_path_missing(uri):
            raise DataError(f"data file {uri} does not exist")
        else:
            ds = datasets.load_dataset(uri, split="train")
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"{uri} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    except FileNotFoundError:
        raise DataError(f"data source {uri} does not exist (not a file, a saved dataset or a reachable "
                        "datasets name)") from None
    except Exception as err:  # datasets wraps parser errors in many types
        cause = err.__cause__ or err
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{uri} is not UTF-8 text ({cause.reason} at byte {cause.start}); "
                            "re-save it as UTF-8") from None
        if "offline" in str(err).lower() or "connect" in str(err).lower():
            raise DataError(f"{uri!r} is not a local file or folder, and the Hugging Face Hub is not reachable "
                            "to load it as a datasets name: use a local path or s3:// URI") from None
        first = (str(cause).splitlines() or ["no details"])[0][:300]
        if path.suffix.lower() in (".jsonl", ".json") and "JSON" in str(cause):
            raise DataError(f"{uri} is not valid JSON lines ({first}); each line must be one JSON object with the "
                            "source and target columns") from None
        raise DataError(f"cannot read {uri}: {type(cause).__name__}: {first}") from None
    types = {name: getattr(feat, "dtype", type(feat).__name__) for name, feat in ds.features.items()}
    return ds.to_list(), types


def _check_columns(uri: str, types: dict[str, str], columns: dict[str, str | None]) -> None:
    for role, col in columns.items():
        if col is None:
            continue
        if col not in types:
            raise DataError(f"{uri} has no column {col!r} (data.{role}); available columns: "
                            f"{', '.join(types) or 'none'}")
        kind = types[col]
        if kind not in ("string", "large_string") and not kind.startswith(("int", "float", "bool")):
            raise DataError(f"column {col!r} of {uri} holds {kind} values, not text; point data.{role} at a "
                            f"text column (available: {', '.join(f'{c} ({t})' for c, t in types.items())})")


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from an empty CSV cell
        return None
    return value if isinstance(value, str) else str(value)


def _clean(uri: str, rows: list[dict], spec: DataSpec, rejected: list[dict]) -> list[tuple[str, str, str]]:
    """Validate rows; bad ones go to ``rejected`` with the reason. Returns (source, target, group)."""
    out = []
    for i, row in enumerate(rows):
        source, target = _text(row.get(spec.source_column)), _text(row.get(spec.target_column))
        group = _text(row.get(spec.group_column)) if spec.group_column else source
        reason = None
        if not source or not source.strip():
            reason = f"empty {spec.source_column}"
        elif not target or not target.strip():
            reason = f"empty {spec.target_column}"
        elif "\ufffd" in source + target or "\x00" in source + target:
            reason = "undecodable characters (U+FFFD or NUL)"
        elif spec.group_column and (group is None or not group.strip()):
            reason = f"empty {spec.group_column}"
        if reason:
            rejected.append({"source_uri": uri, "row": i, "reason": reason, "source": source, "target": target})
            continue
        out.append((source.strip(), target.strip(), group.strip()))
    return out


def _dedupe(rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str, str]], int]:
    seen, out = set(), []
    for r in rows:
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            out.append(r)
    return out, len(rows) - len(out)


def _split_groups(rows, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Assign whole groups to splits: ``fractions`` of the groups each, the rest to train."""
    groups = list(dict.fromkeys(r[2] for r in rows))
    random.Random(seed).shuffle(groups)
    needed = len(fractions) + 1
    if len(groups) < needed:
        raise DataError(f"only {len(groups)} distinct groups after cleaning; need at least {needed} to split "
                        "without putting a group in two splits (add data or set data.test_source)")
    assign, start = {}, 0
    for name, frac in fractions.items():
        n = max(1, round(frac * len(groups)))
        n = min(n, len(groups) - start - 1)
        for g in groups[start : start + n]:
            assign[g] = name
        start += n
    out = {name: [] for name in ("train", *fractions)}
    for r in rows:
        out[assign.get(r[2], "train")].append(r)
    return out


def _length_stats(tokenizer, rows, template: str, max_length: int, enc_dec: bool) -> dict:
    if not rows:
        return {"rows": 0}
    encoded = encode(tokenizer, [Example(s, t) for s, t, _ in rows], template, max_length, encoder_decoder=enc_dec)
    prompts = sorted(len(tokenizer(render(template, s))["input_ids"]) for s, _, _ in rows)
    targets = sorted(len(e.target) for e in encoded)

    def summary(values: list[int]) -> dict:
        return {"min": values[0], "mean": round(statistics.fmean(values), 1),
                "p95": values[min(len(values) - 1, int(0.95 * len(values)))], "max": values[-1]}

    return {"rows": len(rows), "prompt_tokens": summary(prompts), "target_tokens": summary(targets),
            "truncated": sum(e.truncated for e in encoded)}


def _check_batch(spec: PipelineSpec, counts: dict[str, int]) -> None:
    """DataError when the train split holds fewer rows than one batch (training could not take a step)."""
    if counts["train"] < spec.train.batch_size:
        raise DataError(f"{spec.data.source} gives {counts['train']} training row(s) after the split "
                        f"({counts['read']} read, {counts['validation']} validation, {counts['test']} test), fewer "
                        f"than one batch (train.batch_size {spec.train.batch_size}): add rows or lower "
                        "train.batch_size")


def _local_path_missing(uri: str) -> bool:
    """True when ``uri`` reads as a local path (not s3:// nor a datasets name) that does not exist."""
    if "://" in uri or Path(uri).exists():
        return False
    return uri.startswith((".", "/", "~")) or ("/" in uri and Path(uri).parent.exists())


def preflight(spec: PipelineSpec) -> None:
    """Refuse, before anything starts, inputs missing on this machine: a base model written as a local path
    that is not a model folder, a local data file that does not exist, a warm start's ``prefix.init_from`` that
    does not resolve (ModelNotFoundError / DataError / RegistryError).
    Cheap: reads no data and loads no model; the rest is checked when the data is prepared. With one client's
    credentials in the environment (``PREFIXFLOW_CLIENT``), a spec of another client is refused (AccessDenied):
    the servers would refuse it halfway."""
    from prefix_core.base_model import check_model_folder

    owner = settings.client()
    if owner and spec.client != owner:
        raise AccessDenied(f"the credentials in this environment are client {owner}'s (PREFIXFLOW_CLIENT) and the "
                           f"spec is client {spec.client}'s: run it with eval \"$(prefixflow stack env --client "
                           f"{spec.client})\", or as the admin with eval \"$(prefixflow stack env)\"")
    check_model_folder(spec.base_model)
    if spec.prefix.init_from:  # a version named for a warm start must exist (its default, @champion, may not yet)
        from prefixflow.services import registry

        registry.resolve(spec.prefix.init_from)
    for uri in filter(None, (spec.data.source, spec.data.test_source)):
        if _local_path_missing(uri):
            raise DataError(f"data file {uri} does not exist: point data.source (or data.test_source) at a "
                            ".csv, .tsv, .jsonl, .json or .parquet file, a saved datasets folder or an s3:// URI")


def cache_key(spec: PipelineSpec) -> str:
    parts = [spec.data.model_dump_json(), spec.base_model, source_fingerprint(spec.data.source)]
    if spec.data.test_source:
        parts.append(source_fingerprint(spec.data.test_source))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def prepare(spec: PipelineSpec) -> PreparedData:
    """Load, clean, split and describe the data of ``spec``; reuse the cached result if unchanged."""
    t0 = time.time()
    key = cache_key(spec)
    out = home() / "data" / spec.client / spec.task / key
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        _check_batch(spec, meta["counts"])
        return PreparedData(**meta, uri=str(out), reused=True, seconds=time.time() - t0)
    d = spec.data
    rejected: list[dict] = []
    counts = {"read": 0}
    columns = {"source_column": d.source_column, "target_column": d.target_column, "group_column": d.group_column}

    def load(uri: str) -> list[tuple[str, str, str]]:
        rows, types = _load_table(uri)
        _check_columns(uri, types, columns)
        counts["read"] += len(rows)
        kept = _clean(uri, rows, d, rejected)
        if not kept:
            reasons = sorted({r["reason"] for r in rejected if r["source_uri"] == uri})
            raise DataError(f"{uri} is empty after filtering: {len(rows)} rows read, none usable "
                            f"({', '.join(reasons) or 'no rows'}); check data.source_column / data.target_column")
        return kept

    rows, duplicates = _dedupe(load(d.source))
    if d.test_source:
        test, test_dup = _dedupe(load(d.test_source))
        duplicates += test_dup
        test_groups = {r[2] for r in test}
        kept = [r for r in rows if r[2] not in test_groups]
        counts["overlap_removed"] = len(rows) - len(kept)  # groups also in the test data: kept out of training
        splits = {**_split_groups(kept, {"validation": d.validation_fraction}, d.seed), "test": test}
    else:
        splits = _split_groups(rows, {"validation": d.validation_fraction, "test": d.test_fraction}, d.seed)
    counts.update(rejected=len(rejected), duplicates=duplicates, **{s: len(splits[s]) for s in SPLITS})
    for name in SPLITS:
        if not splits[name]:
            reasons = sorted({r["reason"] for r in rejected})
            raise DataError(f"the {name} split is empty after filtering ({counts['read']} rows read, "
                            f"{len(rejected)} rejected: {', '.join(reasons) or 'none'}, {duplicates} duplicates); "
                            "check the columns and the data")

    _check_batch(spec, counts)
    from transformers import AutoConfig, AutoTokenizer

    from prefix_core.base_model import resolve_model_path

    model_path = resolve_model_path(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    enc_dec = bool(getattr(AutoConfig.from_pretrained(model_path), "is_encoder_decoder", False))
    stats = {name: _length_stats(tokenizer, splits[name], d.template, d.max_length, enc_dec) for name in SPLITS}
    content = hashlib.sha256()
    for name in SPLITS:
        for s, t, g in splits[name]:
            content.update(json.dumps([name, s, t, g]).encode())
    meta = {"fingerprint": content.hexdigest(), "cache_key": key, "counts": counts, "stats": stats,
            "rejected_uri": str(out / "rejected.jsonl") if rejected else None}

    def write(tmp: Path) -> None:
        for name in SPLITS:
            with open(tmp / f"{name}.jsonl", "w") as fh:
                for s, t, g in splits[name]:
                    fh.write(json.dumps({"source": s, "target": t, "group": g}) + "\n")
        if rejected:
            with open(tmp / "rejected.jsonl", "w") as fh:
                for r in rejected:
                    fh.write(json.dumps(r) + "\n")
        (tmp / "meta.json").write_text(json.dumps({**meta, "template": d.template}, indent=1))

    atomic_write_dir(out, write)
    return PreparedData(**meta, uri=str(out), reused=False, seconds=time.time() - t0)


def read_split(data_uri: str, name: str) -> list[dict]:
    """Rows of one prepared split (``train``, ``validation`` or ``test``)."""
    with open(Path(data_uri) / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh]
