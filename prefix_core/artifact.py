"""PrefixArtifact: a folded prefix on disk (safetensors + JSON manifest; never pickle).

Layout of an artifact directory::

    manifest.json          format version, base identity + geometry, P, dtype, template, config, hashes
    prefix.safetensors     serving form: ``{site}.key`` / ``{site}.value``, ``[kv_heads, P, head_dim]``
    trainable.safetensors  the PrefixEncoder state (embedding + MLP) to continue training (optional)

Saving is atomic (written to a temporary sibling, then renamed over the target); loading verifies
the SHA-256 of every file, so a truncated or corrupt artifact is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .base_model import base_identity
from .encoder import kv_to_table, table_to_kv
from .errors import ArtifactError, BaseModelMismatchError
from .files import atomic_write_dir
from .geometry import Geometry, geometry_from_config

# Deferred imports: peft_interop (peft) is deferred to the PEFT export and import.

FORMAT = "prefixflow.prefix"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREFIX_FILE = "prefix.safetensors"
TRAINABLE_FILE = "trainable.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PrefixArtifact:
    """A folded prefix: per-site keys/values, optional trainable state, and a manifest."""

    def __init__(self, manifest: dict, tensors: dict[str, torch.Tensor], trainable_state: dict | None = None):
        self.manifest = manifest
        self.tensors = tensors
        self.trainable_state = trainable_state or {}

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: torch.Tensor, base: nn.Module, prefix_config: dict, trainable_state=None,
                   dtype: torch.dtype = torch.float32, **fields) -> PrefixArtifact:
        geometry = geometry_from_config(base.config)
        p = table.shape[0]
        if table.shape[1] != geometry.width:
            raise ArtifactError(
                f"prefix table has width {table.shape[1]} but {geometry.describe()} needs {geometry.width}"
            )
        kv = table_to_kv(table, geometry)
        tensors = {}
        for site, key, value in zip(geometry.sites, kv.keys, kv.values, strict=True):
            tensors[f"{site.name}.key"] = key[0].to(dtype).contiguous()
            tensors[f"{site.name}.value"] = value[0].to(dtype).contiguous()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": {**base_identity(base), "geometry": geometry.to_dict()},
            "num_virtual_tokens": p,
            "dtype": str(dtype).removeprefix("torch."),
            "prefix_config": dict(prefix_config),
            "prompt_template": fields.pop("prompt_template", None),
            "training": fields.pop("training", {}),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **fields,
        }
        return cls(manifest, tensors, trainable_state)

    @classmethod
    def from_model(cls, model, dtype: torch.dtype = torch.float32, **fields) -> PrefixArtifact:
        """Fold ``model.prefix`` (a PrefixModel's) into an artifact."""
        state = {k: v.detach().float().cpu().clone() for k, v in model.prefix.state_dict().items()}
        return cls.from_table(model.prefix.fold().cpu(), model.base, model.config.to_dict(), state, dtype, **fields)

    # --- views ----------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.manifest["base_model"]["geometry"])

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.manifest["num_virtual_tokens"])

    @property
    def prompt_template(self) -> str | None:
        return self.manifest.get("prompt_template")

    def keys_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        sites = self.geometry.sites
        return ([self.tensors[f"{s.name}.key"] for s in sites], [self.tensors[f"{s.name}.value"] for s in sites])

    def table(self) -> torch.Tensor:
        """The folded table ``[P, W]`` float32 (PEFT's ``prompt_embeddings`` layout)."""
        keys, values = self.keys_values()
        return kv_to_table([k.float() for k in keys], [v.float() for v in values])

    def check_base(self, base: nn.Module) -> None:
        """Refuse a base model other than the one this prefix was trained on."""
        want = self.manifest["base_model"]
        have_geometry = geometry_from_config(base.config)
        if have_geometry.to_dict() != want["geometry"]:
            raise BaseModelMismatchError(
                f"This prefix was trained on {want['name']!r} ({self.geometry.describe()}) but the base model "
                f"is {base_identity(base)['name']!r} ({have_geometry.describe()}). Load the base model the "
                "prefix was trained on."
            )
        have = base_identity(base)
        if have["fingerprint"] != want["fingerprint"]:
            raise BaseModelMismatchError(
                f"This prefix was trained on {want['name']!r} (weights {want['fingerprint'][:12]}) but the base "
                f"model is {have['name']!r} (weights {have['fingerprint'][:12]}): same shape, different weights. "
                "Load the base model the prefix was trained on."
            )

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the artifact directory atomically; returns its path."""
        path = Path(path)

        def write(tmp: Path) -> None:
            save_file(self.tensors, tmp / PREFIX_FILE)
            files = {PREFIX_FILE: _sha256(tmp / PREFIX_FILE)}
            if self.trainable_state:
                save_file(self.trainable_state, tmp / TRAINABLE_FILE)
                files[TRAINABLE_FILE] = _sha256(tmp / TRAINABLE_FILE)
            manifest = dict(self.manifest, files=files)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

        atomic_write_dir(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PrefixArtifact:
        """Read and verify an artifact directory."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise ArtifactError(f"{path} is not a prefix artifact: it has no {MANIFEST}")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path / MANIFEST} is corrupt ({err}); re-export or re-download the prefix") from err
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a prefixflow prefix (format {manifest.get('format')!r})")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {manifest['format_version']}; this prefixflow reads up to "
                f"{FORMAT_VERSION}. Upgrade prefixflow."
            )
        files = manifest.get("files", {})
        if PREFIX_FILE not in files:
            raise ArtifactError(f"{path / MANIFEST} lists no {PREFIX_FILE}")
        loaded = {}
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise ArtifactError(f"{f} is missing; the artifact is incomplete")
            if _sha256(f) != digest:
                raise ArtifactError(f"{f} is corrupt or truncated (checksum mismatch); re-export or re-download it")
            try:
                loaded[name] = load_file(f)
            except SafetensorError as err:
                raise ArtifactError(f"{f} is not a readable safetensors file: {err}") from err
        art = cls(manifest, loaded[PREFIX_FILE], loaded.get(TRAINABLE_FILE))
        art._check_shapes(path)
        return art

    def _check_shapes(self, where) -> None:
        p = self.num_virtual_tokens
        for s in self.geometry.sites:
            for part in ("key", "value"):
                t = self.tensors.get(f"{s.name}.{part}")
                if t is None or tuple(t.shape) != (s.kv_heads, p, s.head_dim):
                    raise ArtifactError(
                        f"{where}: tensor {s.name}.{part} is {None if t is None else tuple(t.shape)}, "
                        f"expected {(s.kv_heads, p, s.head_dim)}"
                    )

    # --- PEFT interop ---------------------------------------------------------------------------
    def to_peft(self, path: str | Path) -> Path:
        """Write a PEFT prefix-tuning adapter (decoder-only models): ``adapter_config.json`` and
        ``adapter_model.safetensors`` holding ``prompt_embeddings [P, W]``."""
        from .peft_interop import write_peft_adapter

        return write_peft_adapter(self, Path(path))

    @classmethod
    def from_peft(cls, path: str | Path, base: nn.Module, **fields) -> PrefixArtifact:
        """Import a PEFT prefix-tuning adapter saved for ``base``."""
        from .peft_interop import read_peft_adapter

        return read_peft_adapter(cls, Path(path), base, **fields)
