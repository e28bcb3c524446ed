from __future__ import annotations

import subprocess
import sys

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


def _run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run loraserve's main in a fresh interpreter; report whether it imported vLLM."""
    code = (
        "import sys\nfrom loraserve.cli import main\n"
        f"try:\n    main({list(argv)!r})\nexcept SystemExit as exit:\n    code = exit.code or 0\n"
        "print('VLLM-IMPORTED' if 'vllm' in sys.modules else 'NO-VLLM')\nsys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("argv", [["serve", "--help"], ["serve", "-h"], ["serve", "--help=loraserve"]])
def test_help_on_our_flags_answers_without_loading_vllm_or_logging(argv: list[str]) -> None:
    result = _run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("NO-VLLM")
    assert "--adapter-cache-size" in result.stdout and "--help=all" in result.stdout
    assert len(result.stdout.splitlines()) < 120  # our flags and a pointer to vLLM's, not vLLM's whole usage
    assert result.stderr == ""


def test_top_level_help_topic_means_serves() -> None:
    result = _run_cli("--help=loraserve")
    assert result.returncode == 0, result.stderr
    assert "--adapter-dir" in result.stdout


def test_help_on_a_vllm_group_lists_its_flags_without_log_lines() -> None:
    result = _run_cli("serve", "--help=LoRAConfig")
    assert result.returncode == 0, result.stderr
    assert "--max-lora-rank" in result.stdout
    assert result.stderr == ""
    assert "Triton" not in result.stdout and "correction" not in result.stdout


def test_access_flags_from_the_command_line_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_API_KEY", "sk-from-env")
    argv = ["serve", "--metrics-without-key", "--max-concurrent-requests", "4"]
    settings = parse_settings([*argv, "--allow-adapter", "acme/*", "--allow-adapter", "local:*"])
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(settings)  # a key never reaches a log through the settings
    assert settings.metrics_without_key is True
    assert settings.max_concurrent_requests == 4
    assert settings.allow_adapter == ["acme/*", "local:*"]
    assert parse_settings(["serve"]).metrics_without_key is False
