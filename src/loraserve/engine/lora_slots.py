"""Slots that already hold zeros are not zeroed again when vLLM moves an adapter into them.

vLLM wraps every LoRA-capable layer of the model (all linear layers, the embedding, the LM head), and each time
it moves an adapter into a slot (``LoRAModelManager.activate_adapter``) it zeroes that slot in every layer the
adapter does not target (``reset_lora``): for a q/k/v/o adapter on SmolLM2, the MLP of every layer plus the
embedding's and LM head's vocabulary-sized matrices, about half of the activation's time. When the slot's previous
adapter did not target those layers either (the usual case: adapters of one base share their target modules),
they are zero already.

Each layer here remembers which of its slots it holds at zero: a ``reset_lora`` makes a slot zero, a
``set_lora`` makes it not (vLLM's ``set_lora`` begins with its own ``reset_lora``, which is skipped the same way
when it can be). Nothing is assumed about a layer's slots before its first reset: a slot counts as zero only
once a reset was done or seen here. These two methods are the only ones vLLM writes slots with.
"""

from __future__ import annotations

from typing import Any

_ZERO = "_loraserve_zero_slots"


def follow(module: Any) -> None:
    """Remember ``module``'s zero slots from now on (idempotent). ``module`` is one of vLLM's LoRA layers."""
    if _ZERO in module.__dict__:
        return
    reset, write = module.reset_lora, module.set_lora  # the class's methods, bound to this layer
    zero: set[int] = set()

    def reset_lora(index: int) -> None:
        if index in zero:
            return
        reset(index)
        zero.add(index)

    def set_lora(index: int, *args: Any, **kwargs: Any) -> None:
        try:
            write(index, *args, **kwargs)
        finally:  # even a write that failed half-way leaves the slot not known to be zero
            zero.discard(index)

    # Instance attributes: vLLM's own calls (set_lora's inner reset included) find them before the class's.
    object.__setattr__(module, "reset_lora", reset_lora)
    object.__setattr__(module, "set_lora", set_lora)
    object.__setattr__(module, _ZERO, zero)


def installed(manager_class: Any) -> bool:
    """Whether :func:`skip_zero_resets` wrapped ``activate_adapter``, under or over other wrappers."""
    method = manager_class.activate_adapter
    while method is not None:
        if getattr(method, _ZERO, False):
            return True
        method = getattr(method, "__wrapped__", None)
    return False


def skip_zero_resets(manager_class: Any) -> None:
    """Make ``manager_class`` (vLLM's ``LoRAModelManager``) follow its layers' zero slots before it writes one."""
    if installed(manager_class):
        return
    original = manager_class.activate_adapter

    def activate_adapter(self: Any, lora_id: int) -> bool:
        if lora_id not in getattr(self, "_active_adapters", ()):  # an active adapter is not written again
            for module in self.modules.values():
                if callable(getattr(module, "reset_lora", None)) and callable(getattr(module, "set_lora", None)):
                    follow(module)
        result: bool = original(self, lora_id)
        return result

    setattr(activate_adapter, _ZERO, True)
    activate_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    manager_class.activate_adapter = activate_adapter
