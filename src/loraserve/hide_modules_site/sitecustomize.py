"""Put on PYTHONPATH by loraserve.torch_extras: hide unloadable modules in every Python process started below it.

vLLM starts plain interpreters of its own (``python -m vllm.model_executor.models.registry``,
its spawned EngineCore and workers); site imports this file in each of them
before anything else runs. Then it runs the interpreter's own sitecustomize, if
one exists further down the path, so nothing it did is lost.
"""

import importlib.machinery
import importlib.util
import os
import sys

for _name in os.environ.get("LORASERVE_HIDDEN_MODULES", "").split(","):
    if _name.strip() and _name.strip() not in sys.modules:
        # The documented way to block an import: `import` raises ImportError, find_spec answers None.
        sys.modules[_name.strip()] = None  # type: ignore[assignment]

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [entry for entry in sys.path if os.path.abspath(entry or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
