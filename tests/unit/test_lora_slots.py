"""Slots already at zero are not zeroed again: vLLM's own activate_adapter, reset_lora and set_lora run here."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from loraserve.engine import lora_fix, lora_linear, lora_slots

SLOTS, RANK, HIDDEN, OUT = 2, 4, 8, 6


@pytest.fixture
def manager_class(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's LoRAModelManager with its activate_adapter restored after the test."""
    pytest.importorskip("vllm")
    manager = importlib.import_module(lora_fix.MODEL_MANAGER).LoRAModelManager
    monkeypatch.setattr(manager, "activate_adapter", manager.activate_adapter)
    return manager


def _layer_class() -> type:
    """A layer with vLLM's real single-slice linear ``reset_lora``/``set_lora`` (set_lora calls reset_lora first)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    class Layer:
        reset_lora = BaseLinearLayerWithLoRA.reset_lora
        set_lora = BaseLinearLayerWithLoRA.set_lora

        def __init__(self) -> None:
            self.n_slices, self.tp_size = 1, 1
            self.lora_a_stacked = (torch.zeros(SLOTS, 1, RANK, HIDDEN),)
            self.lora_b_stacked = (torch.zeros(SLOTS, 1, OUT, RANK),)
            self.resets = 0

    original = Layer.reset_lora

    def counted(self: Any, index: int) -> None:
        self.resets += 1
        original(self, index)

    Layer.reset_lora = counted  # type: ignore[method-assign]
    return Layer


def _adapter(lora_id: int, targets: list[str]) -> Any:
    gen = torch.Generator().manual_seed(lora_id)
    weights = {
        name: SimpleNamespace(
            lora_a=torch.randn(RANK, HIDDEN, generator=gen), lora_b=torch.randn(OUT, RANK, generator=gen)
        )
        for name in targets
    }
    return SimpleNamespace(id=lora_id, get_lora=weights.get, get_module_to_save=lambda name: None)


def _manager(manager_class: Any, adapters: list[Any]) -> Any:
    """A LoRAModelManager with just the state activate_adapter reads: two layers, ``attn`` and ``mlp``."""
    manager = object.__new__(manager_class)
    layer = _layer_class()
    manager.modules = {"attn": layer(), "mlp": layer()}
    manager._active_adapters = {}
    manager.lora_index_to_id = [None] * SLOTS
    manager._registered_adapters = {adapter.id: adapter for adapter in adapters}
    manager.is_pooling_model = False
    return manager


def _move(manager: Any, out: int, into: int) -> None:
    """vLLM's LRU eviction from a slot (deactivate), then activation of another adapter there."""
    manager._deactivate_adapter(out)
    del manager._active_adapters[out]
    assert manager.activate_adapter(into)


def _slot(layer: Any, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_a_stacked[0][slot, 0], layer.lora_b_stacked[0][slot, 0]


def test_a_slot_zero_already_is_not_zeroed_again(manager_class: Any) -> None:
    lora_slots.skip_zero_resets(manager_class)
    adapters = [_adapter(i, ["attn"]) for i in (1, 2, 3, 4)]
    manager = _manager(manager_class, adapters)
    assert manager.activate_adapter(1) and manager.activate_adapter(2)
    mlp, attn = manager.modules["mlp"], manager.modules["attn"]
    assert mlp.resets == 2  # once per slot: nothing is assumed before the first reset
    _move(manager, 1, 3)
    _move(manager, 2, 4)
    assert mlp.resets == 2  # the attention-only adapters that followed found the MLP slots at zero
    assert attn.resets == 4  # a slot being written is still cleared first (set_lora's own reset)
    for slot, adapter in enumerate(adapters[2:]):
        lora_a, lora_b = _slot(attn, slot)
        assert torch.equal(lora_a, adapter.get_lora("attn").lora_a)
        assert torch.equal(lora_b, adapter.get_lora("attn").lora_b)
        assert not _slot(mlp, slot)[0].any() and not _slot(mlp, slot)[1].any()


def test_a_layer_the_previous_adapter_wrote_is_zeroed_for_the_next(manager_class: Any) -> None:
    lora_slots.skip_zero_resets(manager_class)
    both, attention_only = _adapter(1, ["attn", "mlp"]), _adapter(2, ["attn"])
    manager = _manager(manager_class, [both, attention_only])
    manager.lora_index_to_id = [None]  # one slot: the second adapter takes the first one's
    assert manager.activate_adapter(1)
    assert _slot(manager.modules["mlp"], 0)[0].any()
    _move(manager, 1, 2)
    lora_a, lora_b = _slot(manager.modules["mlp"], 0)
    assert not lora_a.any() and not lora_b.any()  # adapter 1's MLP weights must not reach adapter 2's requests
    _move(manager, 2, 1)
    assert torch.equal(_slot(manager.modules["mlp"], 0)[1], both.get_lora("mlp").lora_b)


def test_a_write_that_failed_half_way_is_zeroed_next_time(manager_class: Any) -> None:
    lora_slots.skip_zero_resets(manager_class)
    manager = _manager(manager_class, [_adapter(1, ["attn"])])
    attn = manager.modules["attn"]
    lora_slots.follow(attn)
    attn.reset_lora(0)
    bad = _adapter(9, ["attn"]).get_lora("attn")
    with pytest.raises(RuntimeError):  # the A matrix lands, the B matrix does not fit
        attn.set_lora(0, bad.lora_a, torch.randn(OUT + 1, RANK + 1))
    assert _slot(attn, 0)[0].any()
    resets = attn.resets
    attn.reset_lora(0)
    assert attn.resets == resets + 1 and not _slot(attn, 0)[0].any()


def test_it_wraps_once_beside_the_slot_tracking(manager_class: Any) -> None:
    lora_linear.track_slot_writes(manager_class)
    lora_slots.skip_zero_resets(manager_class)
    method = manager_class.activate_adapter
    lora_slots.skip_zero_resets(manager_class)
    lora_linear.track_slot_writes(manager_class)
    assert manager_class.activate_adapter is method and lora_slots.installed(manager_class)
    chain = 0
    while hasattr(method, "__wrapped__"):
        chain, method = chain + 1, method.__wrapped__
    assert chain == 2  # loraserve's two wrappers, each once
