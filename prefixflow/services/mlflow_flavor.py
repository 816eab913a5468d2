"""A registered prefix as an MLflow pyfunc model, for teams that serve through MLflow (one prefix per process).

Registration writes an ``MLmodel`` file into the prefix folder (``python_function`` flavour, loader this module,
data the folder itself), so every registered version loads with
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve -m models:/NAME@champion
--env-manager local`` serves it. ``predict`` generates greedily with the prefix on the base model named in its
manifest (or ``$PREFIXFLOW_BASE_MODEL``), rendering each input through the prefix's prompt template.

Input: a string, a list of strings, ``{"prompt": [...]}`` or a DataFrame with a ``prompt`` column (else its first
column). Output: a list of strings. ``params``: ``max_tokens`` (default 64), ``temperature`` (default 0), ``seed``
(-1: none).
"""

from __future__ import annotations

from pathlib import Path

from prefixflow import settings

# Deferred imports: mlflow and prefix_core (torch) are deferred: MLflow imports this module as a model's loader.

LOADER = "prefixflow.services.mlflow_flavor"
MLMODEL = "MLmodel"


def write_mlmodel(folder: Path) -> Path:
    """Add the pyfunc ``MLmodel`` file to a prefix folder (the prefix files stay where they are)."""
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec("max_tokens", "long", 64), ParamSpec("temperature", "double", 0.0),
                          ParamSpec("seed", "long", -1)])
    model = Model(signature=ModelSignature(inputs=None, outputs=None, params=params))
    add_to_model(model, loader_module=LOADER, data=".")
    model.save(Path(folder) / MLMODEL)
    return Path(folder) / MLMODEL


class PrefixPredictor:
    """Generation with one prefix on its base model (loaded once, at construction)."""

    def __init__(self, folder: Path) -> None:
        from prefix_core import DecodeEngine, PrefixArtifact, load_base_model

        self.artifact = PrefixArtifact.load(folder)
        base_name = settings.base_model_override() or self.artifact.manifest["base_model"]["name"]
        self.base, self.tokenizer = load_base_model(base_name)
        self.artifact.check_base(self.base)
        self.engine = DecodeEngine(self.base, self.tokenizer, max_batch=16)
        self._n = 0

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        from prefix_core.template import render

        params = params or {}
        prompts = _prompts(model_input)
        template = self.artifact.prompt_template
        ids = []
        for p in prompts:
            self._n += 1
            rid = self._n
            ids.append(rid)
            self.engine.add(rid, render(template, p) if template else p, self.artifact,
                            max_new_tokens=int(params.get("max_tokens", 64)),
                            temperature=float(params.get("temperature", 0.0)),
                            seed=None if params.get("seed", -1) in (None, -1) else int(params["seed"]))
        tokens = self.engine.run()
        return [self.tokenizer.decode(tokens[rid], skip_special_tokens=True).strip() for rid in ids]


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values()), []))
        return [value] if isinstance(value, str) else [str(v) for v in value]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a pandas DataFrame
        column = "prompt" if "prompt" in columns else columns[0]
        return [str(v) for v in model_input[column].tolist()]
    return [str(v) for v in model_input]


def _load_pyfunc(data_path: str) -> PrefixPredictor:
    """MLflow's entry point for the ``python_function`` flavour."""
    return PrefixPredictor(Path(data_path))
