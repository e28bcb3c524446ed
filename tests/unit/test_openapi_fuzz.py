"""A schema-driven fuzz of /openapi.json (schemathesis): whatever it sends, no 5xx.

Driven through Hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.
Adapter names it makes up are looked up on an empty Hub-protocol server, so they are 404s.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from loraserve.app import create_app
from loraserve.config import Settings
from loraserve.errors import LORAX_PATHS
from tests.support.fake_hub import FakeHub, patch_default_endpoint
from tests.unit.adapters.helpers import write_base
from tests.unit.conftest import FakeEngine


def test_no_input_makes_the_server_fail(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_base(model_dir)
    engine = FakeEngine(max_model_len=64)  # every generated request stays small and fast
    settings = Settings(model=str(model_dir), served_model_name="tiny", cache_dir=tmp_path / "cache")
    statuses: Counter[int] = Counter()
    with FakeHub() as hub, TestClient(create_app(settings, engine=engine)) as client:
        patch_default_endpoint(monkeypatch, hub.url)
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/generate", "/"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @hypothesis_settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case) -> None:  # type: ignore[no-untyped-def]
                response = case.call()
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.path, case.body, response.text)
                if response.status_code >= 400 and case.path in LORAX_PATHS:  # LoRAX's own error shape
                    assert set(response.json()) == {"error", "error_type"}, response.text
                elif response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
    assert statuses[200] > 0 and statuses[400] > 0  # the fuzz reached both the engine and the validation
