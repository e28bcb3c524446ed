"""Let a request follow its adapter's ``add_lora`` into vLLM without waiting for the answer, safely.

The first request for an adapter used to wait for ``add_lora``'s answer before it was sent: vLLM handles a
utility call between two steps, so under load the answer came after the step in flight, and the request then
waited for the step after that before it was scheduled. Sending the request right behind ``add_lora`` saves
that step, because EngineCore reads its input queue in order: it handles ``add_lora`` first, then adds the
request, in the same pause between steps.

Unguarded, that is unsafe: when vLLM refuses the adapter, the request would still be scheduled, and the worker
would try to load the adapter again inside the step; a load error there stops the engine. So this plugin,
registered as a ``vllm.general_plugins`` entry point (vLLM calls it in EngineCore's process), makes EngineCore
remember the LoRA ids whose ``add_lora`` failed and leave out any request that names one (the API side aborts
those requests when it gets the refusal, and loraserve never reuses a LoRA id). The API side asks for the
``loraserve_lora_guard`` utility first and keeps waiting for ``add_lora`` when it is not there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("loraserve.lora_guard")

GUARD_UTILITY = "loraserve_lora_guard"
GUARD_VERSION = 1
_REFUSED = "_loraserve_refused_loras"


def refused_ids(core: Any) -> set[int]:
    """The LoRA ids whose ``add_lora`` failed on this EngineCore."""
    refused: set[int] = core.__dict__.setdefault(_REFUSED, set())
    return refused


def guard_add_lora(original: Callable[..., bool]) -> Callable[..., bool]:
    def add_lora(self: Any, lora_request: Any) -> bool:
        try:
            loaded = original(self, lora_request)
        except BaseException:
            refused_ids(self).add(lora_request.lora_int_id)
            raise
        if loaded is False:
            refused_ids(self).add(lora_request.lora_int_id)
        return loaded

    add_lora.__wrapped__ = original  # type: ignore[attr-defined]
    return add_lora


def guard_add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        lora = getattr(request, "lora_request", None)
        if lora is not None and lora.lora_int_id in refused_ids(self):
            # Never scheduled, so never loaded inside a step; the API side aborts it.
            logger.info(
                "not scheduling request %s: the engine refused its LoRA %d", request.request_id, lora.lora_int_id
            )
            return None
        return original(self, request, *args, **kwargs)

    add_request.__wrapped__ = original  # type: ignore[attr-defined]
    return add_request


def _guard(self: Any) -> int:
    return GUARD_VERSION


def apply() -> bool:
    """Guard vLLM's EngineCore in this process; return whether it is guarded. Idempotent; never raises."""
    try:
        from vllm.v1.engine.core import EngineCore
    except Exception:  # another vLLM layout: the API side finds no guard and waits for add_lora
        logger.debug("vLLM's EngineCore not found; requests will wait for add_lora", exc_info=True)
        return False
    if getattr(EngineCore, GUARD_UTILITY, None) is not None:
        return True
    if not callable(getattr(EngineCore, "add_lora", None)) or not callable(getattr(EngineCore, "add_request", None)):
        logger.debug("vLLM's EngineCore has no add_lora/add_request; requests will wait for add_lora")
        return False
    EngineCore.add_lora = guard_add_lora(EngineCore.add_lora)
    EngineCore.add_request = guard_add_request(EngineCore.add_request)
    setattr(EngineCore, GUARD_UTILITY, _guard)
    return True
