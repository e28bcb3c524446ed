"""Adapters end to end: a Hub-protocol server, peft adapters, real vLLM, the OpenAI SDK."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import OWN_TEMPLATE, PRIVATE_TOKEN, RunningServer

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def _greedy(server: RunningServer, model: str, **extra: object) -> str:
    response = server.client().completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=extra or None
    )
    return response.choices[0].text


def test_an_adapter_answers_in_its_own_voice(server: RunningServer) -> None:
    base = _greedy(server, "")
    voice = _greedy(server, "acme/voice")
    assert voice != base
    assert _greedy(server, "acme/voice") == voice  # deterministic, and now served from the cache
    assert _greedy(server, "") == base  # the base is untouched by the adapter


def test_adapter_with_its_own_template_renders_and_counts_with_it(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model="acme/own-template", messages=QUESTION, max_tokens=4, temperature=0
    )
    tokenizer = AutoTokenizer.from_pretrained(server.adapters["acme/own-template"])
    assert tokenizer.chat_template == OWN_TEMPLATE
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_adapter_without_template_uses_the_base_template(server: RunningServer) -> None:
    response = server.client().chat.completions.create(model="acme/voice", messages=QUESTION, max_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_sixteen_concurrent_first_requests_download_each_file_once(server: RunningServer) -> None:
    client = server.client()

    def ask(_: int) -> str:
        return client.completions.create(model="acme/single-flight", prompt=PROMPT, max_tokens=2, temperature=0).id

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(ask, range(16)))
    assert len(set(ids)) == 16
    downloads = {name: count for (repo, name), count in server.hub.hits.items() if repo == "acme/single-flight"}
    assert downloads and set(downloads.values()) == {1}, downloads
    assert "adapter_model.safetensors" in downloads


def test_private_adapter_needs_the_token_of_every_requester(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="acme/private", prompt=PROMPT, max_tokens=2)
    opened = client.completions.create(
        model="acme/private", prompt=PROMPT, max_tokens=2, extra_body={"api_token": PRIVATE_TOKEN}
    )
    assert opened.choices[0].text
    # Now cached on disk: a requester without the token still gets 404, exactly like a missing repo.
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="acme/private", prompt=PROMPT, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    wrong = httpx.post(
        f"{server.v1}/completions",
        json={"model": "acme/private", "prompt": PROMPT, "max_tokens": 2, "api_token": "hf_wrong"},
    )
    assert wrong.status_code == 404
    assert "acme/private" not in [m.id for m in client.models.list().data]


def test_bad_adapters_are_400_with_the_reason(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="pickled"):
        client.completions.create(model="acme/pickled", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max-lora-rank"):
        client.completions.create(model="acme/rank-32", prompt=PROMPT, max_tokens=2)
    assert ("acme/pickled", "adapter_model.bin") not in server.hub.hits
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_an_adapter_the_engine_refuses_is_400_for_each_request_and_the_engine_lives(server: RunningServer) -> None:
    # Requests follow add_lora into vLLM before its answer: the refusal must still stop every one of them.
    def ask(stream: bool) -> str:
        client = server.client()
        try:
            if stream:
                for _ in client.completions.create(model="acme/bias", prompt=PROMPT, max_tokens=2, stream=True):
                    pass
            else:
                client.completions.create(model="acme/bias", prompt=PROMPT, max_tokens=2)
        except openai.BadRequestError as exc:
            return str(exc)
        return "answered"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [False, True, False, True]))
    assert all("could not load acme/bias" in a and "bias is not supported" in a for a in answers), answers
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _greedy(server, "acme/voice") == _greedy(server, "acme/voice")  # adapters still load and answer
    assert "not supported" in ask(False)  # asked again: refused again, never half-loaded


def test_unknown_and_traversal_names_are_404(server: RunningServer) -> None:
    client = server.client()
    for name, source in (("acme/missing", "hub"), ("../x", "hub"), ("../../etc", "local"), ("/etc/passwd", "local")):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt=PROMPT, max_tokens=2, extra_body={"adapter_source": source})


def test_a_local_adapter_is_served(server: RunningServer) -> None:
    local = _greedy(server, "team/local-a", adapter_source="local")
    assert local != _greedy(server, "")


def test_an_s3_adapter_is_served(server: RunningServer) -> None:
    s3 = _greedy(server, "s3://loras/team/s3-a", adapter_source="s3")
    assert s3 != _greedy(server, "")
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(
            model="s3://loras/team/none", prompt=PROMPT, max_tokens=2, extra_body={"adapter_source": "s3"}
        )


def test_models_lists_adapters_with_parent_and_pinned_root(server: RunningServer) -> None:
    _greedy(server, "acme/voice")
    cards = {card["id"]: card for card in httpx.get(f"{server.v1}/models").json()["data"]}
    voice = cards["acme/voice"]
    assert voice["parent"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    name, _, commit = voice["root"].partition("@")
    assert name == "acme/voice" and len(commit) == 40


def test_hub_down_serves_cached_public_adapters_and_503_for_the_rest(server: RunningServer) -> None:
    _greedy(server, "acme/voice")
    server.hub.down = True
    try:
        # The resolved version is trusted for --adapter-resolve-ttl; past it, the cache still answers.
        assert _greedy(server, "acme/voice")
        response = httpx.post(f"{server.v1}/completions", json={"model": "acme/never-seen", "prompt": PROMPT})
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "adapter_source_unavailable"
    finally:
        server.hub.down = False
