"""The request dependencies: each runs on the event loop, never as a hop through the worker-thread pool."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from loraserve.app import create_app
from loraserve.config import Settings
from tests.unit.conftest import FakeEngine


def _calls(dependant: Dependant) -> Iterator[object]:
    for dependency in dependant.dependencies:
        yield dependency.call
        yield from _calls(dependency)


def test_every_route_dependency_is_a_coroutine(settings: Settings, engine: FakeEngine) -> None:
    # FastAPI runs a plain `def` dependency in a worker thread for every request: under load that thread hop
    # (and its fight for the GIL with the engine's output thread) showed as 40 % of the API process's samples.
    app = create_app(settings, engine)
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    assert routes
    blocking = sorted(
        f"{route.path}: {getattr(call, '__name__', call)}"
        for route in routes
        for call in _calls(route.dependant)
        if call is not None and not inspect.iscoroutinefunction(call)
    )
    assert blocking == []
