"""``prefixflow serve``: one frozen base model serving every client's registered prefix over the OpenAI API.

Modules: ``app`` (HTTP routes), ``server`` (the process's state: base, engine thread, bank, keys, limits),
``engine_loop`` (the thread that owns ``prefix_core.DecodeEngine``), ``bank`` (registered prefixes in memory),
``keys`` (API keys, hashed), ``openai_api`` (request bodies and response shapes), ``metrics`` (Prometheus),
``prefixflow.services.mlflow_flavor`` holds the pyfunc flavour of a registered prefix (``mlflow models serve``).
"""
