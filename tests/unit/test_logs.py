"""The log level is known before vLLM is imported; the rest of the stack stays quiet below debug."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from loraserve import logs


@pytest.mark.parametrize(
    ("argv", "env", "level"),
    [
        ([], None, "info"),
        (["serve", "--log-level", "debug"], None, "debug"),
        (["serve", "--log-level=warning"], "debug", "warning"),
        (["serve"], "ERROR", "error"),
        (["serve", "--log-level", "loud"], None, "info"),  # the real parser reports it
    ],
)
def test_level_comes_from_the_command_line_then_the_environment(
    argv: list[str], env: str | None, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("LORASERVE_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("LORASERVE_LOG_LEVEL", env)
    assert logs.level_from_argv(argv) == level


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("VLLM_LOGGING_LEVEL", "TQDM_DISABLE", "PYTHONWARNINGS", logs.MAIN_PID_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", "")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.getLogger("vllm").setLevel(logging.NOTSET)


def test_below_debug_vllm_and_progress_bars_are_quiet_in_every_process(clean_env: None) -> None:
    logs.configure("info")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert os.environ["TQDM_DISABLE"] == "1"
    assert "child_site" in os.environ["PYTHONPATH"]  # applied in vLLM's processes from their first import
    assert logs.in_main_process()


def test_debug_shows_vllm_and_a_users_setting_wins(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "0")
    logs.configure("debug")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["TQDM_DISABLE"] == "0"


def test_progress_logs_start_ticks_and_duration(caplog: pytest.LogCaptureFixture) -> None:
    import time

    logger = logging.getLogger("loraserve.test")
    with caplog.at_level(logging.INFO, logger="loraserve.test"), logs.progress(logger, "Working", every_s=0.05):
        time.sleep(0.2)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "Working…"
    assert any(m.startswith("Working… ") and m.endswith(" s") for m in messages[1:-1])
    assert messages[-1].startswith("Working: done in ")
