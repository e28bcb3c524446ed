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
from typing import Any

from loraserve import __version__
from loraserve.config import Settings
from loraserve.torch_extras import hide_unloadable

_ENV_PREFIX = "LORASERVE_"


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


def build_top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve",
        description="Serve one base model and any number of LoRA adapters behind an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="serve the base model and its adapters over HTTP (see `loraserve serve --help`)")
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
        build_top_parser().parse_args(argv)  # prints help or a usage error and exits
    serve, engine_dests = build_serve_parser()
    given = vars(serve.parse_args([*_env_engine_argv(serve, engine_dests), *argv[1:]]))
    ours = {name: given[name] for name in Settings.cli_fields() if name in given}
    engine_args = {dest: given[dest] for dest in engine_dests if dest in given}
    return Settings(**ours, engine_args=engine_args)


def main(argv: Sequence[str] | None = None) -> None:
    # Before anything imports transformers or vLLM, which break on an unloadable torchvision.
    hidden = hide_unloadable()
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hidden:
        logging.getLogger(__name__).warning(
            "%s cannot load beside this torch (PyPI's CUDA builds beside a CPU torch); loraserve runs without "
            "them. `pip uninstall -y %s` removes them and this check.",
            ", ".join(hidden),
            " ".join(hidden),
        )
    import uvicorn

    from loraserve.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
