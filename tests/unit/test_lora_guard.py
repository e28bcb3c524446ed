"""EngineCore's guard: a request whose LoRA the engine refused is never scheduled (so never loaded in a step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from loraserve.engine import lora_guard


@dataclass
class _Lora:
    lora_int_id: int


@dataclass
class _Request:
    request_id: str
    lora_request: _Lora | None


@dataclass
class _Core:
    """Stands in for EngineCore: add_lora as the worker answers it, add_request into a list."""

    answers: dict[int, bool | Exception] = field(default_factory=dict)
    scheduled: list[str] = field(default_factory=list)

    def add_lora(self, lora_request: _Lora) -> bool:
        answer = self.answers[lora_request.lora_int_id]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def add_request(self, request: _Request, request_wave: int = 0) -> None:
        self.scheduled.append(request.request_id)


class _Guarded(_Core):
    add_lora = lora_guard.guard_add_lora(_Core.add_lora)  # type: ignore[assignment]
    add_request = lora_guard.guard_add_request(_Core.add_request)  # type: ignore[assignment]


def test_requests_of_a_refused_lora_are_left_out_and_the_others_scheduled() -> None:
    core = _Guarded(answers={1: True, 2: ValueError("Adapter bias is not supported."), 3: False})
    assert core.add_lora(_Lora(1)) is True
    with pytest.raises(ValueError, match="bias"):
        core.add_lora(_Lora(2))  # the utility still fails: the API side gets the reason
    assert core.add_lora(_Lora(3)) is False
    for request_id, lora in (("a", 1), ("b", 2), ("c", 3), ("base", None)):
        core.add_request(_Request(request_id, _Lora(lora) if lora else None), 0)
    assert core.scheduled == ["a", "base"]
    assert lora_guard.refused_ids(core) == {2, 3}


def test_apply_guards_vllms_engine_core_once() -> None:
    from vllm.v1.engine.core import EngineCore

    assert lora_guard.apply() is True
    assert lora_guard.apply() is True  # idempotent: not wrapped twice
    add_lora: Any = EngineCore.add_lora
    add_request: Any = EngineCore.add_request
    assert not hasattr(add_lora.__wrapped__, "__wrapped__") and not hasattr(add_request.__wrapped__, "__wrapped__")
    # The utility the API side asks for before it lets requests follow add_lora.
    assert getattr(EngineCore, lora_guard.GUARD_UTILITY)(object()) == lora_guard.GUARD_VERSION
