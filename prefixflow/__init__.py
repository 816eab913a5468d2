"""prefixflow: the pipeline around prefix_core (data -> prefix training -> evaluation -> registry).

Import direction (nothing imports upward): ``cli`` (the ``prefixflow`` command) -> ``flows`` -> ``tasks``
(Prefect tasks) -> ``launch`` (how a training runs) -> ``services`` (spec, storage, MLflow, metrics; no Prefect)
-> ``prefix_core``. ``infra`` (the local stack, configs, templates) and ``processes`` sit beside them; ``infra``
uses only ``processes``.
See docs/architecture.md.
"""

__version__ = "0.1.0"
