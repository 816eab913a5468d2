"""Structured output (``response_format``): outputs that finish follow their JSON schema; keywords that cannot be
enforced are refused with 400; the OpenAI client gets JSON back over HTTP."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from prefixflow.serving.structured import StructuredOutputError, check_schema
from support.pipeline import patched_environ
from support.serving import serve_process


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


NAME = {"type": "string", "minLength": 2, "maxLength": 24}
SCHEMAS = {
    "scalars": _obj({"name": NAME, "rating": {"type": "number", "minimum": 0, "maximum": 5},
                     "seats": {"type": "integer", "minimum": 1, "maximum": 500}, "open_now": {"type": "boolean"}}),
    "optional": _obj({"name": NAME, "city": NAME, "phone": {"type": "string", "maxLength": 16}}, ["name"]),
    "enums": _obj({"name": NAME, "cuisine": {"enum": ["italian", "japanese", "mexican", "indian"]},
                   "stars": {"type": "integer", "enum": [1, 2, 3]}}),
    "nested": _obj({"name": NAME, "address": _obj({"street": NAME, "city": NAME,
                                                   "geo": _obj({"lat": {"type": "integer", "minimum": -90,
                                                                        "maximum": 90},
                                                                "lon": {"type": "integer", "minimum": -180,
                                                                        "maximum": 180}})})}),
    "array": _obj({"name": NAME, "dishes": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}}),
    "array_of_objects": _obj({"menu": {"type": "array", "minItems": 1, "maxItems": 2,
                                       "items": _obj({"dish": NAME, "price": {"type": "integer", "minimum": 1,
                                                                             "maximum": 99}})}}),
    "any_of": _obj({"name": NAME, "website": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
                    "capacity": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                           {"const": "unknown"}]}}),
    "ref": {"$defs": {"place": _obj({"city": NAME, "country": NAME})},
            **_obj({"name": NAME, "home": {"$ref": "#/$defs/place"},
                    "branches": {"type": "array", "items": {"$ref": "#/$defs/place"}, "maxItems": 2}})},
    "pattern": _obj({"name": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "top_array": {"type": "array", "items": _obj({"dish": NAME, "vegan": {"type": "boolean"}}), "minItems": 1,
                  "maxItems": 2},
    "top_enum": {"enum": ["cheap", "moderate", "expensive"]},
    "const": _obj({"kind": {"const": "restaurant"}, "name": NAME}),
}


@pytest.mark.parametrize(("keyword", "schema"), [
    ("allOf", {"allOf": [{"type": "object"}, {"required": ["a"]}]}),
    ("oneOf", _obj({"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}})),
    ("uniqueItems", {"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
    ("not", {"$defs": {"x": {"not": {"type": "null"}}}, "$ref": "#/$defs/x"}),
    ("multipleOf", {"type": "array", "items": {"type": "integer", "multipleOf": 5}}),
    ("minProperties", _obj({"a": {"type": "object", "minProperties": 1}})),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "string"}}}),
    ("if", {"anyOf": [{"if": {"type": "string"}, "then": {"maxLength": 3}}]}),
])
def test_keywords_that_cannot_be_enforced_are_refused_with_where_they_are(keyword, schema):
    with pytest.raises(StructuredOutputError, match=rf"'{keyword}', which structured output cannot enforce"):
        check_schema(schema)


def test_enforced_schemas_pass_the_check():
    for schema in SCHEMAS.values():
        check_schema(schema)
    check_schema({"type": "array", "uniqueItems": False})


def _restaurant_prompts(tok, n: int) -> list[list[int]]:
    messages = [{"role": "user", "content": "Describe a restaurant as a JSON document."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return [list(ids)] * n


@pytest.mark.slow
def test_every_finished_output_follows_its_schema_and_a_cut_one_says_length():
    """SmolLM2 (real tokenizer and model), greedy, the 12 schemas in one batch: the outputs that end with ``stop``
    (or EOS, which the server reports as stop) parse and validate; most finish; a request cut by max_new_tokens
    ends with ``length``."""
    from prefix_core import DecodeEngine, load_base_model
    from prefix_core.sampling import SamplingParams
    from prefixflow.serving.structured import StructuredOutput

    base, tok = load_base_model("smollm2-135m", dtype=torch.float32)
    structured = StructuredOutput(tok, base.config.vocab_size)
    engine = DecodeEngine(base, tok, max_batch=len(SCHEMAS) + 1, prefill_chunk=1024)
    prompts = _restaurant_prompts(tok, len(SCHEMAS) + 1)
    for (name, schema), prompt in zip(SCHEMAS.items(), prompts, strict=False):
        factory = structured.constraint({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
        engine.add(name, prompt, None, SamplingParams(max_new_tokens=120, constraint=factory))
    factory = structured.constraint({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}})
    engine.add("cut", prompts[-1], None, SamplingParams(max_new_tokens=6, constraint=factory))
    tokens, reasons = {}, {}
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons.pop("cut") == "length"
    finished = [name for name, reason in reasons.items() if reason in ("stop", "eos")]
    assert len(finished) >= 10, reasons  # not a test that passes because nothing finished
    for name in finished:
        text = tok.decode(tokens[name], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def _tiny_model_with_a_real_tokenizer(path):
    """A tiny random llama over SmolLM2's tokenizer (a byte-level BPE that can write any JSON)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prefix_core.base_model import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_the_openai_client_gets_json_that_follows_the_schema_and_refusals_say_why(tmp_path):
    model = _tiny_model_with_a_real_tokenizer(tmp_path / "model")
    env = {"PREFIXFLOW_HOME": str(tmp_path / "home")}
    answer = _obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 1,
                                                                              "maximum": 3}})
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer, "strict": True}}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)), serve_process(model, env) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Is it open?"}]
        for temperature in (0, 1):
            res = client.chat.completions.create(model="base", messages=messages, response_format=fmt, n=3,
                                                 max_tokens=40, temperature=temperature, seed=5)
            for choice in res.choices:
                assert choice.finish_reason == "stop", choice
                jsonschema.validate(json.loads(choice.message.content), answer)
        chunks = list(client.chat.completions.create(model="base", messages=messages, response_format=fmt,
                                                     max_tokens=40, stream=True, temperature=0))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), answer)
        res = client.completions.create(model="base", prompt="q:", max_tokens=40, temperature=0,
                                        extra_body={"response_format": {"type": "json_object"}})
        text = res.choices[0].text  # any JSON object: a random model may still be writing one at max_tokens
        assert isinstance(json.loads(text), dict) if res.choices[0].finish_reason == "stop" else text.startswith("{")
        res = client.chat.completions.create(model="base", messages=messages, response_format=fmt, max_tokens=3)
        assert res.choices[0].finish_reason == "length"
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "allOf": []}}}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="base", messages=messages, response_format=bad)
        assert err.value.body["param"] == "response_format" and "'allOf'" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError, match=r"needs json_schema\.schema"):
            client.chat.completions.create(model="base", messages=messages,
                                           response_format={"type": "json_schema", "json_schema": {"name": "x"}})
