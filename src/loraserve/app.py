"""``create_app``: the lifespan builds the services once; handlers and routers are registered here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext

import anyio
from fastapi import FastAPI

from loraserve import __version__
from loraserve.access import OPEN_PATHS, ApiKeyMiddleware, ConcurrencyLimitMiddleware, load_api_keys
from loraserve.adapters.named import NamedAdapters
from loraserve.adapters.ref import SourceKind
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.sources import HubSource, LocalSource, S3Source, Source
from loraserve.adapters.store import AdapterStore
from loraserve.adapters.validate import BaseShapes
from loraserve.base_model import BaseModel, resolve_base_model
from loraserve.body_limit import BodyLimitMiddleware
from loraserve.config import Settings
from loraserve.engine import Engine
from loraserve.errors import LoraserveError, install_error_handlers
from loraserve.gc_heap import frozen_heap
from loraserve.generation import Generator
from loraserve.header_limit import HeaderLimitMiddleware
from loraserve.metrics import ServerMetrics
from loraserve.models import ModelCatalog
from loraserve.observe import RequestObserver
from loraserve.routes import lora_admin, lorax, openai, system
from loraserve.services import Services
from loraserve.shutdown import Drain, DrainMiddleware
from loraserve.templates import ChatFormat, has_chat_template, load_tokenizer, start_sandbox, stop_sandbox

logger = logging.getLogger(__name__)


def _start_vllm(model_path: str, served_name: str, settings: Settings) -> Engine:
    # Imported here so unit tests with a fake engine never import vLLM.
    from loraserve.engine.vllm_engine import VllmEngine

    return VllmEngine.start(model_path, served_name, settings.engine_args, settings.engine_cpu_priority)


def _adapter_registry(
    settings: Settings, engine: Engine, base: BaseModel, base_chat: ChatFormat, metrics: ServerMetrics
) -> AdapterRegistry:
    from huggingface_hub import get_token

    store = AdapterStore(
        settings.adapter_cache_path(), int(settings.adapter_cache_size), wait_timeout=settings.adapter_wait_timeout
    )
    store.events = metrics
    store.open()
    sources: dict[SourceKind, Source] = {
        "hub": HubSource(settings.adapter_source_timeout),
        "local": LocalSource(settings.adapter_dir),
        "s3": S3Source(settings.adapter_source_timeout),
    }
    registry = AdapterRegistry(
        engine=engine,
        store=store,
        sources=sources,
        base_shapes=BaseShapes.from_folder(base.path),
        base_names=base.names(),
        base_tokenizer=base_chat.tokenizer,
        max_lora_rank=engine.max_lora_rank,
        resolve_ttl=settings.adapter_resolve_ttl,
        server_token=get_token(),
        source_timeout=settings.adapter_source_timeout,
        allowed=settings.allow_adapter,
    )
    store.set_evict_hook(registry.forget)
    return registry


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        base = resolve_base_model(settings)
        tokenizer = load_tokenizer(base.path)
        if not has_chat_template(tokenizer):
            logger.warning("%s has no chat template: /v1/chat/completions will answer 400.", base.served_name)
        running = engine if engine is not None else _start_vllm(str(base.path), base.served_name, settings)
        try:
            await anyio.to_thread.run_sync(start_sandbox)
            base_chat = ChatFormat(tokenizer)
            adapters = _adapter_registry(settings, running, base, base_chat, metrics)
            for spec in settings.preload_adapter:
                try:
                    await adapters.preload(spec)
                except LoraserveError as exc:  # the server still starts; the adapter loads on first use
                    logger.error("could not preload adapter %s: %s", spec, exc.message)
                except Exception:
                    logger.exception("could not preload adapter %s", spec)
            named = NamedAdapters(adapters, LocalSource(settings.adapter_dir), base.names())
            catalog = ModelCatalog(base, running.max_model_len, base_chat, adapters, named)
            drain.attach(asyncio.get_running_loop())
            generator = Generator(running, catalog, settings.max_n, drain)
            app.state.services = Services(settings, running, catalog, generator, metrics)
            metrics.watch_cache(adapters.cache_summary)
            # The real engine's imports are what makes a full collection slow; a fake engine's tests skip it.
            with frozen_heap() if engine is None else nullcontext():
                logger.info("Serving %s on http://%s:%d/v1", base.served_name, settings.host, settings.port)
                yield
        finally:
            stop_sandbox()
            if engine is None:
                await running.shutdown()

    drain = Drain(settings.shutdown_timeout)
    model_paths = frozenset(
        route.path  # type: ignore[attr-defined]
        for router in (openai.router, lorax.router)
        for route in router.routes
        if route.path != "/tokenize"  # type: ignore[attr-defined]
    )
    metrics = ServerMetrics(model_paths)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    api_keys = load_api_keys(api_key, settings.api_key_file)
    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.drain = drain  # the CLI's server calls drain.begin() when a stop signal arrives
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(system.router)
    app.include_router(lora_admin.router)
    app.include_router(lorax.router)
    # Middleware runs in the reverse order of adding: the observer first, the body limit last.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.max_concurrent_requests, paths=model_paths)
    app.add_middleware(DrainMiddleware, drain=drain)
    open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_without_key else set())
    app.add_middleware(ApiKeyMiddleware, keys=api_keys, open_paths=open_paths)  # before anything costs work
    app.add_middleware(HeaderLimitMiddleware)
    # Added last, so it runs first: every answer, refusals included, gets an id, a log line and its count.
    app.add_middleware(RequestObserver, on_finish=metrics.observe_request)
    return app
