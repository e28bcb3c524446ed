"""The vLLM engine's request mapping: JSON mode's grammar is compact, as json_schema output is."""

from __future__ import annotations

import os

import pytest
import xgrammar

from loraserve.engine import SamplingOptions, StructuredOutput
from loraserve.engine.cpu_priority import YIELD_TO_ENV
from loraserve.engine.vllm_engine import COMPACT_JSON_OBJECT_GRAMMAR, _sampling_params, apply_cpu_defaults


def _accepts(text: str) -> bool:
    grammar = xgrammar.Grammar.from_ebnf(COMPACT_JSON_OBJECT_GRAMMAR)
    return bool(xgrammar.testing._is_grammar_accept_string(grammar, text))


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"name":"Frozen","age":2}',
        '{"a":[true,false,null,[]],"b":{"c":-0.5e+3},"d":"x\\n\\u00e9 \\"q\\" spaces inside strings"}',
    ],
)
def test_json_mode_grammar_accepts_compact_objects(text: str) -> None:
    assert _accepts(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"name":"Frozen", "age":2}',  # the space after a comma that xgrammar 0.2.8 lets through
        '{ "a":1}',
        '{"a": 1}',
        '{"a":1}\n',
        "[1,2]",  # JSON mode answers an object
        '{"a":01}',
        '{"a":"\x01"}',  # control characters must be escaped
    ],
)
def test_json_mode_grammar_refuses_whitespace_and_non_objects(text: str) -> None:
    assert not _accepts(text)


def test_json_object_requests_use_the_compact_grammar() -> None:
    options = SamplingOptions(max_tokens=8, structured=StructuredOutput("json_object"))
    params = _sampling_params(options).structured_outputs
    assert params is not None and params.grammar == COMPACT_JSON_OBJECT_GRAMMAR and not params.json_object


def test_on_a_cpu_the_engine_computes_on_every_core_unless_the_user_says_otherwise() -> None:
    environ: dict[str, str] = {}
    apply_cpu_defaults(environ)
    # This machine is a CPU one; the engine's processes yield to this one (cpu_priority).
    assert environ == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", YIELD_TO_ENV: str(os.getpid())}
    mine = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    apply_cpu_defaults(mine, priority="normal")
    assert mine == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
