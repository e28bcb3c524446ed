"""Run by site in every interpreter started below loraserve's server (see loraserve.child_site).

- Modules named in LORASERVE_HIDDEN_MODULES look uninstalled (loraserve.torch_extras).
- vLLM's log level applies from its first import: vLLM configures its logging
  only when an engine starts, so warnings logged while importing (Triton, …)
  would otherwise reach stderr through Python's last-resort handler in every
  process.

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

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
