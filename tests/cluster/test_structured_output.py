"""Structured outputs: every output parses and validates against its JSON Schema, whatever the model.

The tiny random Llama would never write JSON on its own, so each valid output is the grammar's
doing; the real SmolLM2 shows the same on a model that tries. Runs in-process and on a pp=2 gang
(the mask is applied on the last stage); sampled requests too, and preemption (recompute) keeps
the grammar's state.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.protocol import GenerateRequest, InvalidRequestError, Resume
from model.sampling_params import SamplingParams
from tests.reference import close

SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "nested object": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                                 "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
                                "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False,
    },
    "enum": {"enum": ["red", "green", "blue"]},
    "array bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    "numeric bounds": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 10, "maximum": 20}, "ok": {"type": "boolean"}},
        "required": ["score", "ok"], "additionalProperties": False,
    },
    "pattern": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"], "additionalProperties": False,
    },
    "nullable": {
        "type": "object", "properties": {"note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
        "required": ["note"], "additionalProperties": False,
    },
    "const and boolean": {
        "type": "object", "properties": {"v": {"const": 2}, "flag": {"type": "boolean"}},
        "required": ["v", "flag"], "additionalProperties": False,
    },
    "array of objects": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["k", "n"], "additionalProperties": False},
    },
    "string formats": {
        "type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False,
    },
}  # fmt: skip
MAX_TOKENS = 160


def _params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, json_schema=json.dumps(schema), **{"temperature": 0, **kw})


async def _run(engine: LLMEngine, prompt, params: SamplingParams):
    text, reason = "", None
    async for out in engine.generate(GenerateRequest(prompt, params, raw=isinstance(prompt, str))):
        text += out.text
        reason = out.finish_reason
    return text, reason


def _check(schema: dict, text: str, reason: str) -> None:
    assert reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, worker_process="in_process"))
    yield engine
    close(engine)


def test_every_schema_holds_on_a_model_that_knows_no_json(tiny_engine):
    async def main():
        return await asyncio.gather(*(_run(tiny_engine, "x", _params(s)) for s in SCHEMAS.values()))

    for schema, (text, reason) in zip(SCHEMAS.values(), asyncio.run(main())):
        _check(schema, text, reason)


def test_sampled_and_seeded_requests_hold_too_and_seeds_repeat(tiny_engine):
    async def main():
        params = [_params(SCHEMAS["array of objects"], temperature=1.0, seed=s) for s in (1, 2, 1)]
        return await asyncio.gather(*(_run(tiny_engine, "x", p) for p in params))

    runs = asyncio.run(main())
    for text, reason in runs:
        _check(SCHEMAS["array of objects"], text, reason)
    assert runs[0] == runs[2]


def test_json_object_parses_and_unconstrained_requests_are_untouched(tiny_engine):
    async def main():
        plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        return await asyncio.gather(_run(tiny_engine, "x", _params({"type": "object"})), _run(tiny_engine, "x", plain),
                                    _run(tiny_engine, "x", plain))  # fmt: skip

    (obj, reason), plain_with, _ = asyncio.run(main())
    assert reason == "stop" and isinstance(json.loads(obj), dict)
    alone = asyncio.run(_run(tiny_engine, "x", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    assert plain_with == alone  # a constrained neighbour in the batch changes nothing


def test_a_schema_the_grammar_cannot_take_is_refused_before_queueing(tiny_engine):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
    with pytest.raises(InvalidRequestError, match="response_format schema"):
        asyncio.run(_run(tiny_engine, "x", _params(bad)))
    assert tiny_engine.stats().waiting == 0 and tiny_engine.stats().running == 0


def test_preempted_sequences_keep_their_grammar(tiny_llama_dir):
    # 8 blocks of 16 tokens for 4 outputs of ~70 tokens: some are preempted and recomputed.
    schema = {"type": "array", "minItems": 4, "maxItems": 4,
              "items": {"type": "object", "properties": {"word": {"type": "string", "minLength": 6, "maxLength": 8}},
                        "required": ["word"], "additionalProperties": False}}  # fmt: skip
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=8, worker_process="in_process"))
    try:

        async def main():
            params = [SamplingParams(max_tokens=110, temperature=1.0, seed=i, json_schema=json.dumps(schema)) for i in range(4)]
            return await asyncio.gather(*(_run(engine, "x", p) for p in params))

        for text, reason in asyncio.run(main()):
            _check(schema, text, reason)
        assert engine.stats().preemptions > 0
    finally:
        close(engine)


@pytest.mark.slow
def test_pipeline_gang_and_the_real_model(ray_cluster, smollm2_dir):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), pipeline_parallel_size=2, num_kv_blocks=64, cpus_per_worker=0.5))
    try:
        ask = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]

        async def main():
            return await asyncio.gather(*(_run(engine, ask, _params(SCHEMAS[n])) for n in ("flat object", "nested object", "refs")))

        for name, (text, reason) in zip(("flat object", "nested object", "refs"), asyncio.run(main())):
            _check(SCHEMAS[name], text, reason)
    finally:
        close(engine)


def test_a_resumed_request_keeps_its_grammar(tiny_engine):
    """A stream resumed from the tokens another replica delivered: the grammar is advanced through
    them, so the rest is the undisturbed rest and the whole is valid."""
    schema = SCHEMAS["refs"]
    params = _params(schema, temperature=1.0, seed=3)

    async def main():
        whole = [out async for out in tiny_engine.generate(GenerateRequest("Points:", params, raw=True))]
        delivered = tuple(t for o in whole[:6] for t in o.token_ids)
        request = GenerateRequest("Points:", params, raw=True, resume=Resume(delivered))
        return whole, [out async for out in tiny_engine.generate(request)]

    whole, outs = asyncio.run(main())
    assert [t for o in outs for t in o.token_ids] == [t for o in whole for t in o.token_ids]
    text = "".join(o.text for o in outs)
    assert text == "".join(o.text for o in whole)
    _check(schema, text, outs[-1].finish_reason)
