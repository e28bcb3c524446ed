"""Run by site in every interpreter started below loraserve's server (see loraserve.child_site).

- Modules named in LORASERVE_HIDDEN_MODULES look uninstalled (loraserve.torch_extras).
- vLLM's log level applies from its first import: vLLM configures its logging
  only when an engine starts, so warnings logged while importing (Triton, …)
  would otherwise reach stderr through Python's last-resort handler in every
  process.

- Under a server (LORASERVE_MAIN_PID is set), the process ends when its parent
  dies: after a kill -9 of the server, vLLM's EngineCore and workers (and their
  helpers) held gigabytes for good. A watchdog thread notices the parent is
  gone (the process was re-parented), asks the process to stop with SIGTERM,
  and kills it 5 s later if it has not.

Then the interpreter's own sitecustomize runs, if one exists further down the
path, so nothing it did is lost.
"""

import importlib.machinery
import importlib.util
import logging
import os
import sys

for _name in os.environ.get("LORASERVE_HIDDEN_MODULES", "").split(","):
    if _name.strip() and _name.strip() not in sys.modules:
        # The documented way to block an import: `import` raises ImportError, find_spec answers None.
        sys.modules[_name.strip()] = None  # type: ignore[assignment]

if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())

if os.environ.get("LORASERVE_MAIN_PID"):
    import signal
    import threading
    import time

    _parent = os.getppid()

    def _end_with_parent() -> None:
        # A parent of 1 at start: it died before this process got here (nothing under a server is init's).
        while os.getppid() == _parent and _parent != 1:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_end_with_parent, name="loraserve-end-with-parent", daemon=True).start()

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
