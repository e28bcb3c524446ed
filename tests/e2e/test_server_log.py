"""The start log at the default level: loraserve's own lines, not vLLM's, torch's or tqdm's chatter."""

from __future__ import annotations

from tests.e2e.conftest import RunningServer


def _start_log(server: RunningServer) -> list[str]:
    lines = server.log.read_text(errors="replace").splitlines()
    started = next(i for i, line in enumerate(lines) if "Application startup complete" in line)
    return lines[: started + 1]


def test_the_start_log_is_loraserves_own(server: RunningServer) -> None:
    lines = _start_log(server)
    text = "\n".join(lines)
    assert len(lines) < 40, text
    # Every line in our format, from loraserve or uvicorn: vLLM's processes log nothing at this level.
    strangers = [line for line in lines if " loraserve" not in line and " uvicorn" not in line]
    assert strangers == [], text
    for noise in ("Triton", "Attempted to load", "it/s]", "Found duplicate keys", "EngineCore", "Warning"):
        assert noise not in text
    assert sum("correction is active" in line for line in lines) <= 1  # once per server, not per process
    wanted = [
        "loraserve 0.1.0",
        "Model: HuggingFaceTB/SmolLM2-135M-Instruct",
        "Starting the vLLM engine",
        "Engine: vLLM",
        "dtype float32",
        "Serving HuggingFaceTB/SmolLM2-135M-Instruct on http://",
    ]
    assert [w for w in wanted if w not in text] == [], text
