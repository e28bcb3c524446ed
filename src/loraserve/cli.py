"""``loraserve serve …``: parse flags and environment into ``Settings``, start uvicorn. No logic."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from loraserve import __version__, logs
from loraserve.config import Settings
from loraserve.shutdown import Drain
from loraserve.torch_extras import hide_unloadable

_ENV_PREFIX = "LORASERVE_"
logger = logging.getLogger("loraserve")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argparse_type(annotation: Any) -> dict[str, Any]:
    """argparse kwargs for a Settings field's annotation."""
    if typing.get_origin(annotation) is list:
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if annotation is bool:
        return {"action": "store_true"}
    if annotation in (int, float, Path):
        return {"type": annotation}
    return {"type": str}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loraserve", "loraserve's own settings (also LORASERVE_<NAME> variables).")
    for name, info in Settings.cli_fields().items():
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default: {default})"
        # SUPPRESS: an absent flag leaves the value to the environment or the default.
        group.add_argument(
            _flag(name),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{info.description}{shown}",
            **_argparse_type(info.annotation),
        )


def _env_engine_argv(parser: argparse.ArgumentParser, engine_dests: set[str]) -> list[str]:
    """LORASERVE_<FLAG> variables for vLLM's flags, as argv that the real argv overrides."""
    argv: list[str] = []
    for action in parser._actions:
        if action.dest not in engine_dests or not action.option_strings:
            continue
        value = os.environ.get(_ENV_PREFIX + action.dest.upper())
        if value is None:
            continue
        long_flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:
            truthy = value.strip().lower() in ("1", "true", "yes", "on")
            if truthy:
                argv.append(long_flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append("--no-" + long_flag[2:])
        else:
            argv += [long_flag, value]
    return argv


_SERVE_DESCRIPTION = (
    "Serve the base model and its adapters over HTTP. Besides loraserve's own flags, every vLLM engine flag "
    "is accepted under vLLM's own name and passed to the engine. Use --help=loraserve for loraserve's flags, "
    "--help=LoRAConfig (or any group below) for one group, --help=<word> to search flag names, and "
    "--help=all for every flag."
)

_ENGINE_FLAGS_EPILOG = """\
vLLM's engine flags: every one is accepted under vLLM's own name and passed to
the engine, e.g. --max-model-len, --dtype, --gpu-memory-utilization,
--max-num-seqs, --max-loras, --max-lora-rank, --max-cpu-loras,
--enable-prefix-caching, --tensor-parallel-size. To list them (this loads
vLLM, a few seconds):
  --help=all       every flag
  --help=GROUP     one of vLLM's groups: ModelConfig, CacheConfig, LoRAConfig,
                   ParallelConfig, SchedulerConfig, ...
  --help=WORD      flags whose names contain WORD
"""
# `--help` topics answered without loading vLLM: loraserve's own flags and the pointer to vLLM's.
_OWN_HELP_TOPICS = ("", "loraserve")


def _help_topic(argv: Sequence[str]) -> str | None:
    """The topic of a help request in ``argv`` ("" for plain -h/--help), or None when none is asked."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return ""
        if arg.startswith("--help="):
            return arg.partition("=")[2]
    return None


def build_own_help_parser() -> argparse.ArgumentParser:
    """`serve`'s help for loraserve's own flags: plain argparse, so --help never waits for vLLM."""
    parser = argparse.ArgumentParser(
        prog="loraserve serve",
        usage="loraserve serve [--model MODEL] [--port PORT] [FLAG ...]",
        description="Serve the base model and its adapters over HTTP.",
        epilog=_ENGINE_FLAGS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_settings_flags(parser)
    return parser


def build_top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve",
        description="Serve one base model and any number of LoRA adapters behind an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="serve the base model and its adapters over HTTP (see `loraserve serve --help`)")
    commands.add_parser("adapters", help="list, pull, rm or prune cached adapters (see `loraserve adapters --help`)")
    return parser


def build_serve_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    """Return the `serve` parser and the dests of vLLM's engine flags.

    It is vLLM's own parser class (JSON and dotted flags, --help=<group>), used
    directly rather than as a subparser: vLLM's class rewrites argv that starts
    with "serve" the way `vllm serve` wants it.
    """
    from loraserve.engine.vllm_engine import add_engine_cli_args, engine_parser_class

    serve = engine_parser_class()(prog="loraserve serve", description=_SERVE_DESCRIPTION, conflict_handler="resolve")
    engine_dests = add_engine_cli_args(serve)
    _add_settings_flags(serve)  # after vLLM's, so ours win where names clash (--model …)
    return serve, engine_dests


def parse_settings(argv: Sequence[str]) -> Settings:
    argv = list(argv)
    if argv[:1] != ["serve"]:
        if _help_topic(argv) not in (None, ""):  # `loraserve --help=loraserve` means serve's topic
            argv = ["serve", *argv]
        else:
            build_top_parser().parse_args(argv)  # prints help or a usage error and exits
    topic = _help_topic(argv[1:])
    if topic in _OWN_HELP_TOPICS:
        build_own_help_parser().print_help()
        raise SystemExit(0)
    if topic is not None:
        # Help on vLLM's flags loads vLLM; what it logs on import (Triton, the LoRA-op check) is not help.
        logging.disable(logging.WARNING)
    serve, engine_dests = build_serve_parser()
    given = vars(serve.parse_args([*_env_engine_argv(serve, engine_dests), *argv[1:]]))
    ours = {name: given[name] for name in Settings.cli_fields() if name in given}
    engine_args = {dest: given[dest] for dest in engine_dests if dest in given}
    return Settings(**ours, engine_args=engine_args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["adapters"]:  # the cache commands: no server logging, vLLM or torch
        from loraserve.adapters.cache_cli import main as adapters_main

        raise SystemExit(adapters_main(argv[1:]))
    # Before anything imports vLLM, which reads its log settings from the environment at import.
    logs.configure(logs.level_from_argv(argv))
    topic = _help_topic(argv)
    if topic is None:
        logger.info("loraserve %s", __version__)
    # Before anything imports transformers or vLLM, which break on an unloadable torchvision; help on
    # loraserve's own flags imports neither, so it skips the check and answers at once.
    hidden = [] if topic in _OWN_HELP_TOPICS else hide_unloadable()
    settings = parse_settings(argv)
    if hidden:
        logger.warning(
            "%s cannot load beside this torch (PyPI's CUDA builds beside a CPU torch); loraserve runs without "
            "them. `pip uninstall -y %s` removes them and this check.",
            ", ".join(hidden),
            " ".join(hidden),
        )
    from loraserve.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through our format (logs.configure)
        access_log=False,  # loraserve.observe writes one richer line per request instead
        # Our own deadline ends running requests cleanly first; this only bounds a connection that hangs.
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 10,
    )
    _DrainingServer(config, app.state.drain).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which also tells the app to drain the moment a stop signal arrives
    (uvicorn's own lifespan shutdown comes only after every connection has closed)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain.begin()
        super().handle_exit(sig, frame)
