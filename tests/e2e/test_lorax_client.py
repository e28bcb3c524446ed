"""LoRAX's native API driven by the real lorax-client (Client and AsyncClient), unchanged, on the real stack."""

from __future__ import annotations

import asyncio
import json

import pytest
from lorax import AsyncClient, Client, MergedAdapters
from lorax.errors import NotFoundError, ValidationError

from tests.e2e.conftest import RunningServer
from tests.support.adapters import make_peft_merge

PROMPT = "The capital of France is"


def _client(server: RunningServer) -> Client:
    return Client(server.url, timeout=120)


def _openai_greedy(server: RunningServer, model: str, max_tokens: int = 8) -> str:
    response = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    return response.choices[0].text


@pytest.mark.parametrize("adapter", [None, "acme/voice"])
def test_greedy_tokens_equal_the_openai_routes(server: RunningServer, adapter: str | None) -> None:
    answer = _client(server).generate(PROMPT, adapter_id=adapter, max_new_tokens=8, details=True)
    assert answer.generated_text == _openai_greedy(server, adapter or "")
    assert answer.details is not None
    assert answer.details.generated_tokens == len(answer.details.tokens) <= 8
    assert answer.details.prompt_tokens > 0


def test_details_prefill_and_alternatives_parse(server: RunningServer) -> None:
    answer = _client(server).generate(
        PROMPT, adapter_id="acme/voice", max_new_tokens=4, details=True, decoder_input_details=True,
        return_k_alternatives=3,
    )  # fmt: skip
    details = answer.details
    assert details is not None and details.finish_reason in ("length", "eos_token", "stop_sequence")
    assert details.prefill[0].logprob is None and all(t.logprob is not None for t in details.prefill[1:])
    assert all(len(t.alternative_tokens or []) == 3 for t in details.tokens)
    # The greedy token is the most likely alternative.
    assert all(t.id == (t.alternative_tokens or [])[0].id for t in details.tokens)


def test_the_stream_carries_each_token_then_the_whole_text(server: RunningServer) -> None:
    events = list(_client(server).generate_stream(PROMPT, adapter_id="acme/voice", max_new_tokens=8, details=True))
    last = events[-1]
    assert last.generated_text == _openai_greedy(server, "acme/voice")
    assert all(e.generated_text is None for e in events[:-1])
    assert last.details is not None and last.details.generated_tokens == len(events)
    assert "".join(e.token.text for e in events if not e.token.special) == last.generated_text


def test_the_async_client_works_too(server: RunningServer) -> None:
    async def run() -> tuple[str, str]:
        client = AsyncClient(server.url, timeout=120)
        answer = await client.generate(PROMPT, max_new_tokens=6)
        streamed = [e async for e in client.generate_stream(PROMPT, max_new_tokens=6)]
        return answer.generated_text, streamed[-1].generated_text or ""

    plain, streamed = asyncio.run(run())
    assert plain == streamed == _openai_greedy(server, "", 6)


def test_json_with_a_schema(server: RunningServer) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = _client(server).generate(
        "Name a city in JSON.", max_new_tokens=32, response_format={"type": "json_object", "schema": schema}
    )
    assert isinstance(json.loads(answer.generated_text)["city"], str)


def test_errors_raise_what_lorax_client_raises(server: RunningServer) -> None:
    client = _client(server)
    with pytest.raises(NotFoundError):
        client.generate(PROMPT, adapter_id="acme/does-not-exist", max_new_tokens=2)
    with pytest.raises(ValidationError):
        client.generate(PROMPT, max_new_tokens=100_000)
    with pytest.raises(ValidationError):
        client.generate(PROMPT, watermark=True, max_new_tokens=2)
    assert client.generate(PROMPT, max_new_tokens=2).generated_text  # and the server is fine


def test_a_merge_weighted_one_and_zero_answers_like_its_first_adapter(server: RunningServer) -> None:
    merged = MergedAdapters(ids=["acme/voice", "acme/concurrent"], weights=[1.0, 0.0], density=1.0)
    answer = _client(server).generate(PROMPT, merged_adapters=merged, max_new_tokens=8)
    assert answer.generated_text == _openai_greedy(server, "acme/voice")
    assert answer.generated_text != _openai_greedy(server, "acme/concurrent")


def test_a_half_and_half_linear_merge_equals_peft_and_every_strategy_serves(server: RunningServer) -> None:
    folders = [server.adapters["acme/voice"], server.adapters["acme/concurrent"]]
    local_root = server.log.parent / "adapters" / "local"
    make_peft_merge(server.model_dir, folders, [0.5, 0.5], local_root / "peft-half")
    reference = (
        _client(server)
        .generate(PROMPT, adapter_id="peft-half/merged", adapter_source="local", max_new_tokens=8)
        .generated_text
    )
    merged = MergedAdapters(ids=["acme/voice", "acme/concurrent"], weights=[0.5, 0.5], density=1.0)
    assert _client(server).generate(PROMPT, merged_adapters=merged, max_new_tokens=8).generated_text == reference
    # The same merge from the OpenAI routes: model names the base, the merge rides in the body.
    response = server.client().completions.create(
        model="", prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"merged_adapters": {"ids": ["acme/voice", "acme/concurrent"], "weights": [0.5, 0.5]}},
    )  # fmt: skip
    assert response.choices[0].text == reference and response.model.startswith("merged:")
    for strategy in ("ties", "dare_linear", "dare_ties"):
        spec = MergedAdapters(
            ids=["acme/voice", "acme/concurrent"], weights=[0.6, 0.4], merge_strategy=strategy, density=0.5
        )
        assert _client(server).generate(PROMPT, merged_adapters=spec, max_new_tokens=4).generated_text, strategy
