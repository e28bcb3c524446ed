"""LoRAX's native API with the fake engine; every answer is parsed with lorax-client's own pydantic types."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from lorax.types import Response as LoraxResponse
from lorax.types import StreamResponse

PROMPT = "hello world"


def _generate(client: TestClient, path: str = "/generate", **parameters: object) -> dict:
    response = client.post(path, json={"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _events(text: str) -> list[dict]:
    return [json.loads(line.removeprefix("data:")) for line in text.splitlines() if line.startswith("data:")]


def test_generate_answers_text_and_with_details_what_lorax_client_parses(client: TestClient) -> None:
    plain = _generate(client, max_new_tokens=3)
    assert plain == {"generated_text": "hello worldhello"}  # the fake engine says "hello", " world" in turn
    detailed = LoraxResponse(**_generate(client, max_new_tokens=3, details=True))
    assert detailed.generated_text == "hello worldhello"
    details = detailed.details
    assert details is not None
    assert details.finish_reason == "length" and details.generated_tokens == 3 and details.seed is None
    assert [t.text for t in details.tokens] == ["hello", " world", "hello"]
    assert all(isinstance(t.logprob, float) and isinstance(t.special, bool) for t in details.tokens)
    assert details.prompt_tokens == 2 and details.prefill == []


def test_the_compat_route_is_a_list_or_a_stream(client: TestClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    listed = client.post("/", json=body)
    assert listed.status_code == 200 and [LoraxResponse(**r).generated_text for r in listed.json()] == ["hello world"]
    streamed = client.post("/", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [StreamResponse(**e) for e in _events(streamed.text)]
    assert [e.token.text for e in events] == ["hello", " world"]
    assert [e.generated_text for e in events] == [None, "hello world"]
    assert "[DONE]" not in streamed.text  # lorax-client parses every data line as JSON


def test_generate_stream_ends_with_text_and_details(client: TestClient) -> None:
    response = client.post(
        "/generate_stream",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True, "stop": ["hello w"]}},
    )
    events = [StreamResponse(**e) for e in _events(response.text)]
    last = events[-1]
    assert last.details is not None and last.details.finish_reason == "stop_sequence"
    assert last.details.generated_tokens == len(events)
    assert last.generated_text == "".join(e.token.text for e in events[:-1]) + last.token.text


def test_parameters_map_to_the_engine(client: TestClient, engine) -> None:  # type: ignore[no-untyped-def]
    _generate(client, max_new_tokens=2)
    greedy = engine.calls[-1][2]
    assert greedy.temperature == 0 and greedy.seed is None  # do_sample false and no knobs: greedy
    _generate(
        client, max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3, stop=["x"],
        repetition_penalty=1.1, ignore_eos_token=True, return_k_alternatives=2, decoder_input_details=True,
    )  # fmt: skip
    options = engine.calls[-1][2]
    assert (options.temperature, options.top_k, options.top_p, options.seed) == (0.7, 5, 0.9, 3)
    assert options.stop == ("x",) and options.repetition_penalty == 1.1 and options.ignore_eos
    assert options.logprobs == 2 and options.prompt_logprobs == 0


def test_alternatives_prefill_full_text_and_best_of(client: TestClient) -> None:
    answer = LoraxResponse(
        **_generate(
            client, max_new_tokens=2, details=True, return_k_alternatives=2, decoder_input_details=True,
            return_full_text=True,
        )
    )  # fmt: skip
    assert answer.generated_text == PROMPT + "hello world"
    assert answer.details is not None
    assert all(len(t.alternative_tokens or []) == 2 for t in answer.details.tokens)
    assert answer.details.prefill[0].logprob is None and len(answer.details.prefill) == 2
    best = LoraxResponse(**_generate(client, max_new_tokens=2, details=True, best_of=2, do_sample=True))
    assert best.details is not None and len(best.details.best_of_sequences or []) == 1


def test_headers_name_the_model_and_count_tokens(client: TestClient) -> None:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert response.headers["x-model-id"] == "tiny"
    assert response.headers["x-prompt-tokens"] == "2" and response.headers["x-generated-tokens"] == "3"
    assert response.headers["x-total-tokens"] == "5" and int(response.headers["x-total-time"]) >= 0
    assert "x-adapter-id" not in response.headers


@pytest.mark.parametrize(
    ("parameters", "status", "kind"),
    [
        ({"temperature": -1}, 422, "validation"),
        ({"watermark": True}, 422, "validation"),
        ({"typical_p": 0.5}, 422, "validation"),
        ({"adapter_source": "pbase", "adapter_id": "a/b"}, 422, "validation"),
        ({"best_of": 2}, 422, "validation"),  # best_of needs sampling, as LoRAX says
        ({"max_new_tokens": 500}, 422, "validation"),  # beyond the context
        ({"adapter_id": "acme/missing\n"}, 404, "not_found"),
        ({"adapter_id": "x", "merged_adapters": {"ids": ["a/b"]}}, 422, "validation"),
        ({"merged_adapters": {"ids": ["a/b"], "density": 2}}, 422, "validation"),
    ],
)
def test_errors_are_lorax_shaped(client: TestClient, parameters: dict, status: int, kind: str) -> None:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_type"} and response.json()["error_type"] == kind
    assert client.get("/health").status_code == 200


def test_a_streaming_request_that_cannot_stream_is_refused(client: TestClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    response = client.post("/generate_stream", json=body)
    assert response.status_code == 422 and "decoder_input_details" in response.json()["error"]


def test_tokenize_and_info(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"inputs": "hello world"}).json()
    assert [t["text"] for t in tokens] == ["hello", "world"]
    assert [(t["start"], t["stop"]) for t in tokens] == [(0, 5), (6, 11)]
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 64 and info["model_dtype"] == "float32"
    assert info["max_best_of"] == 8 and info["model_device_type"] == "cpu"


def test_a_local_adapter_through_the_native_api(adapter_client: TestClient) -> None:
    response = adapter_client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "plain", "adapter_source": "local", "max_new_tokens": 2}},
    )
    assert response.status_code == 200
    assert response.headers["x-adapter-id"] == "plain" and response.headers["x-adapter-source"] == "local"
    assert response.headers["x-model-id"] == "tiny"


def test_every_native_route_answers_errors_in_loraxs_shape(client: TestClient) -> None:
    from loraserve.errors import LORAX_PATHS
    from loraserve.routes.lorax import router

    assert {route.path for route in router.routes} == LORAX_PATHS  # type: ignore[attr-defined]


def test_an_impossible_token_logprob_is_finite_json(client: TestClient, engine) -> None:  # type: ignore[no-untyped-def]
    from loraserve.engine import TokenLogprob

    real = engine.generate

    async def impossible(*args, **kwargs):  # type: ignore[no-untyped-def]
        async for delta in real(*args, **kwargs):
            delta.logprobs = [TokenLogprob(lp.token_id, lp.token, float("-inf"), lp.top) for lp in delta.logprobs or []]
            yield delta

    engine.generate = impossible
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}})
    assert "Infinity" not in response.text  # strict JSON parsers refuse -Infinity
    assert [t["logprob"] for t in response.json()["details"]["tokens"]] == [-9999.0, -9999.0]
