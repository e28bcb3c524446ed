"""One log for the server: loraserve's lines at the chosen level, everyone else's detail only at debug.

At the default level a user should see the version, the model, progress with
elapsed time, the address to call and then one line per request — not vLLM's
and torch's start-up chatter, 122 dtype warnings, progress bars that redraw on
one line (nothing when piped), or the same line once per process. vLLM, torch,
tqdm and Python read their settings from the environment, and every process
vLLM starts inherits it, so ``configure`` must run before vLLM is imported.
A variable the user set is never overridden.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from loraserve import child_site
from loraserve.config import LogLevel

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
# Set in the process that runs the server, so vLLM's other processes know they are not it.
MAIN_PID_ENV = "LORASERVE_MAIN_PID"

# Below debug: what the rest of the stack may print. vLLM's own warnings at start are about its
# build (Triton, tcmalloc, the V1 runner), not about anything a user of loraserve can change.
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}
_DEBUG_ENV = {"VLLM_LOGGING_LEVEL": "DEBUG"}
_QUIET_LOGGERS = ("vllm", "transformers", "huggingface_hub", "filelock", "urllib3", "botocore", "boto3")


def level_from_argv(argv: Sequence[str]) -> LogLevel:
    """``--log-level`` as the command line or ``LORASERVE_LOG_LEVEL`` gives it, read before the full parse
    (which imports vLLM); an invalid value is left for the parser to report."""
    value = os.environ.get("LORASERVE_LOG_LEVEL", "info")
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--log-level="):
            value = arg.partition("=")[2]
    value = value.strip().lower()
    return next((level for level in LEVELS if level == value), "info")


def configure(level: LogLevel) -> None:
    """Our format and level for loraserve and uvicorn; the rest of the stack quiet below debug."""
    os.environ[MAIN_PID_ENV] = str(os.getpid())  # this process runs the server, whatever its parent said
    for name, value in (_DEBUG_ENV if level == "debug" else _QUIET_ENV).items():
        os.environ.setdefault(name, value)
    child_site.install()  # vLLM's processes apply its log level from their first import
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_plain_uvicorn_name)
    if level != "debug":
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)


def _plain_uvicorn_name(record: logging.LogRecord) -> bool:
    # uvicorn logs its start and stop lines as "uvicorn.error", which reads as an error at INFO.
    if record.name == "uvicorn.error":
        record.name = "uvicorn"
    return True


def in_main_process() -> bool:
    """Whether this is the server's own process (not one of vLLM's engine or worker processes)."""
    return os.environ.get(MAIN_PID_ENV) == str(os.getpid())


@contextmanager
def progress(logger: logging.Logger, task: str, every_s: float = 10.0) -> Iterator[None]:
    """Log ``task``, a line with the elapsed time every ``every_s`` while it runs, and how long it took.

    Plain lines rather than a bar that redraws one line: they show in a pipe, a file or journald.
    """
    started = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            logger.info("%s… %.0f s", task, time.monotonic() - started)

    logger.info("%s…", task)
    ticker = threading.Thread(target=tick, name="loraserve-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    logger.info("%s: done in %.0f s", task, time.monotonic() - started)
