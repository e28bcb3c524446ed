from __future__ import annotations

import pytest

from loraserve.cli import parse_settings


def test_defaults_serve_the_embedded_model_with_lora_on() -> None:
    settings = parse_settings(["serve"])
    assert settings.model is None
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.engine_args["enable_lora"] is True
    assert settings.engine_args["max_loras"] >= 2


def test_vllm_flags_pass_through_under_their_own_names() -> None:
    settings = parse_settings(
        ["serve", "--model", "/m", "--max-model-len", "1024", "--tensor-parallel-size", "2", "--max-loras", "3"]
    )
    assert settings.model == "/m"
    assert settings.engine_args["max_model_len"] == 1024
    assert settings.engine_args["tensor_parallel_size"] == 2
    assert settings.engine_args["max_loras"] == 3
    assert "model" not in settings.engine_args


def test_environment_fills_both_our_settings_and_engine_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_PORT", "9001")
    monkeypatch.setenv("LORASERVE_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("LORASERVE_ENFORCE_EAGER", "true")
    settings = parse_settings(["serve"])
    assert settings.port == 9001
    assert settings.engine_args["max_model_len"] == 512
    assert settings.engine_args["enforce_eager"] is True
    # The command line wins over the environment.
    assert parse_settings(["serve", "--port", "9002", "--max-model-len", "256"]).engine_args["max_model_len"] == 256


def test_bad_flag_value_exits_with_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["serve", "--port", "not-a-number"])
