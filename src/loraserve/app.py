"""``create_app``: the lifespan builds the services once; handlers and routers are registered here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loraserve import __version__
from loraserve.base_model import resolve_base_model
from loraserve.body_limit import BodyLimitMiddleware
from loraserve.config import Settings
from loraserve.engine import Engine
from loraserve.errors import install_error_handlers
from loraserve.generation import Generator
from loraserve.models import ModelCatalog
from loraserve.routes import openai, system
from loraserve.services import Services
from loraserve.templates import has_chat_template, load_tokenizer

logger = logging.getLogger(__name__)


def _start_vllm(model_path: str, served_name: str, settings: Settings) -> Engine:
    # Imported here so unit tests with a fake engine never import vLLM.
    from loraserve.engine.vllm_engine import VllmEngine

    return VllmEngine.start(model_path, served_name, settings.engine_args)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = resolve_base_model(settings)
        tokenizer = load_tokenizer(base.path)
        if not has_chat_template(tokenizer):
            logger.warning("%s has no chat template: /v1/chat/completions will answer 400.", base.served_name)
        running = engine if engine is not None else _start_vllm(str(base.path), base.served_name, settings)
        catalog = ModelCatalog(base, running.max_model_len)
        app.state.services = Services(settings, running, catalog, Generator(running, tokenizer, catalog))
        logger.info("Serving %s on http://%s:%d/v1", base.served_name, settings.host, settings.port)
        try:
            yield
        finally:
            if engine is None:
                await running.shutdown()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(system.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    return app
