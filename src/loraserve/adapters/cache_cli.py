"""``loraserve adapters list | pull | rm | prune``: the adapter cache from the shell, beside running servers.

Everything goes through ``AdapterStore``, so the rules are the server's own: a
download lands in ``tmp/`` and is renamed into place under the entry's file
lock (a server asking for the same adapter waits, then adopts it from disk),
and nothing is removed while a live process has marked it in use
(``inuse/<key>.<pid>``, written by a server when it loads an adapter into its
engine). A server that had a removed entry in its index fetches it again on
the next request. Imports neither vLLM nor torch: these commands answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

from loraserve.adapters.ref import AdapterRef, parse_ref, split_spec
from loraserve.adapters.sources import HubSource, LocalSource, S3Source, Snapshot, Source
from loraserve.adapters.store import AdapterStore, CacheEntry, EntryInUse, plan_eviction
from loraserve.adapters.validate import BaseShapes, check_adapter, check_structure
from loraserve.config import Settings
from loraserve.errors import CacheFull, LoraserveError

_DEFAULT_MAX_RANK = 16  # serve's default --max-lora-rank
# serve's settings these commands share (flags or LORASERVE_* variables); --model here is a plain folder.
_SETTINGS = ("cache_dir", "adapter_cache_dir", "adapter_dir", "adapter_cache_size")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CommandError(Exception):
    """What the command could not do, said to the user (exit status 1)."""


# -- arguments ----------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` in seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 7d, 12h, 30m or 45s")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_size(text: str) -> int:
    """``500MB``, ``20GiB``, ``1000`` in bytes (as --adapter-cache-size)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 20GiB") from exc


def build_parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    where = shared.add_argument_group("cache", "The same folders as `loraserve serve` (and its LORASERVE_* variables).")
    where.add_argument("--cache-dir", type=Path, help="loraserve's cache folder (default: ~/.cache/loraserve)")
    where.add_argument("--adapter-cache-dir", type=Path, help="the adapter cache (default: <cache-dir>/adapters)")

    parser = argparse.ArgumentParser(
        prog="loraserve adapters",
        description="Inspect and manage the adapter disk cache, also while servers use it: an adapter a live server "
        "has loaded is never removed.",
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", parents=[shared], help="cached adapters, their size, last use and users")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    pull = commands.add_parser("pull", parents=[shared], help="fetch an adapter into the cache and check it")
    pull.add_argument("ref", metavar="REF", help="org/name[@rev] on the Hub, local:NAME (with --adapter-dir), s3://…")
    pull.add_argument("--adapter-dir", type=Path, action="append", help="a root of local adapters (repeatable)")
    pull.add_argument("--adapter-cache-size", help="the cache's byte budget, as for serve (default: 10GiB)")
    pull.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    pull.add_argument("--model", type=Path, help="a local base model folder: also check the adapter's shapes")
    pull.add_argument("--max-lora-rank", type=int, default=_DEFAULT_MAX_RANK, help="largest rank accepted (default 16)")

    rm = commands.add_parser("rm", parents=[shared], help="remove adapters (every version, or one NAME@VERSION)")
    rm.add_argument("refs", metavar="REF", nargs="+", help="as `list` shows it; @VERSION may be a prefix (7+ chars)")

    prune = commands.add_parser("prune", parents=[shared], help="remove leftovers and adapters no server uses")
    prune.add_argument("--keep", type=parse_size, metavar="SIZE", help="keep the most recently used up to SIZE")
    prune.add_argument("--older-than", type=parse_duration, metavar="DURATION", help="only those unused this long")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    given = {name: value for name, value in vars(args).items() if name in _SETTINGS and value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = (f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise CommandError("; ".join(problems)) from exc


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    # Not logs.configure(): it silences huggingface_hub's progress bars, which `pull` shows.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    commands: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "list": _list,
        "pull": _pull,
        "rm": _rm,
        "prune": _prune,
    }
    try:
        return commands[args.action](args, _settings(args))
    except CommandError as exc:
        print(f"loraserve adapters {args.action}: {exc}", file=sys.stderr)
        return 1


# -- list ---------------------------------------------------------------------


@dataclass
class _Row:
    entry: CacheEntry
    users: list[int]

    def as_json(self) -> dict[str, Any]:
        e = self.entry
        return {
            "ref": spec_of(e.ref),
            "source": e.ref.source,
            "name": e.ref.name,
            "revision": e.ref.revision,
            "version": e.version,
            "key": e.key,
            "size_bytes": e.size,
            "last_used": datetime.fromtimestamp(e.last_used, UTC).isoformat(timespec="seconds"),
            "in_use_by": self.users,
            "public": e.public,
        }


def spec_of(ref: AdapterRef) -> str:
    """The reference as the commands (and --preload-adapter) take it."""
    return f"local:{ref.display()}" if ref.source == "local" else ref.display()


def _scan(settings: Settings) -> tuple[AdapterStore, list[Path]]:
    store = AdapterStore(settings.adapter_cache_path(), int(settings.adapter_cache_size))
    return store, store.scan()


def _list(args: argparse.Namespace, settings: Settings) -> int:
    store, unreadable = _scan(settings)
    rows = [_Row(e, store.in_use_by(e.key)) for e in sorted(store.entries(), key=lambda e: e.last_used, reverse=True)]
    leftovers = store.leftovers()
    leftover_bytes = sum(_size(p) for p in leftovers)
    downloads = store.downloads()
    total = sum(r.entry.size for r in rows)
    if args.json:
        document = {
            "cache_dir": str(store.root),
            "adapters": [r.as_json() for r in rows],
            "total_bytes": total,
            "unreadable_entries": len(unreadable),
            "leftovers": len(leftovers),
            "leftover_bytes": leftover_bytes,
            "downloads_in_progress": len(downloads),
        }
        print(json.dumps(document, indent=2))
        return 0
    if rows:
        now = time.time()
        table = [("REFERENCE", "SOURCE", "VERSION", "SIZE", "LAST USE", "IN USE BY")]
        for r in rows:
            e = r.entry
            users = ", ".join(f"pid {pid}" for pid in r.users) or "-"
            table.append((spec_of(e.ref), e.ref.source, e.version[:12], _human(e.size), _ago(now - e.last_used), users))
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        for line in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    print(f"{len(rows)} adapter{'s' * (len(rows) != 1)}, {_human(total)} in {store.root}")
    if leftovers or unreadable:
        print(
            f"leftovers: {len(leftovers)} temporary folder(s) or stale markers ({_human(leftover_bytes)}), "
            f"{len(unreadable)} unreadable entr{'y' if len(unreadable) == 1 else 'ies'}; "
            "`loraserve adapters prune` removes them"
        )
    if downloads:
        print(f"{len(downloads)} download(s) or removal(s) in progress")
    return 0


# -- pull ---------------------------------------------------------------------


def _source(kind: str, settings: Settings) -> Source:
    if kind == "local":
        if not settings.adapter_dir:
            raise CommandError("local:NAME needs --adapter-dir (the folder holding NAME)")
        return LocalSource(settings.adapter_dir)
    if kind == "s3":
        return S3Source(settings.adapter_source_timeout)
    return HubSource(settings.adapter_source_timeout)


def _checker(args: argparse.Namespace, name: str) -> tuple[Callable[[Path], object], str]:
    """The check a pulled adapter must pass, and what it shows."""
    if args.model is None:
        check = functools.partial(check_structure, max_rank=args.max_lora_rank)
        return check, "structure checked; --model BASE_FOLDER also checks its shapes"
    if not args.model.is_dir():
        raise CommandError(f"--model {args.model} is not a local model folder (a Hub id is not downloaded here)")
    base = BaseShapes.from_folder(args.model)
    names = frozenset({str(args.model), args.model.name})
    check = functools.partial(check_adapter, base=base, base_names=names, max_rank=args.max_lora_rank, name=name)
    return check, f"fits {args.model}"


def _pull(args: argparse.Namespace, settings: Settings) -> int:
    kind, name = split_spec(args.ref)
    try:
        ref = parse_ref(name, kind)
    except LoraserveError as exc:
        raise CommandError(f"{args.ref!r} is not an adapter reference (org/name[@rev], local:NAME or s3://…)") from exc
    source = _source(kind, settings)
    token = None
    if kind == "hub":
        from huggingface_hub import get_token  # only here: list, rm and prune never need it

        token = args.token or get_token()
    check, checked = _checker(args, ref.display())
    try:
        snapshot = source.resolve(ref, token)
    except LoraserveError as exc:
        raise CommandError(exc.message) from exc
    try:
        entry = asyncio.run(_fetch(settings, snapshot, source, token, check))
    except CacheFull as exc:
        raise CommandError(
            f"no room for {snapshot.root} ({_human(snapshot.total_size)}) within --adapter-cache-size "
            f"{_human(int(settings.adapter_cache_size))}: the other adapters are loaded by running servers. "
            "Raise the budget, or remove adapters once no server uses them."
        ) from exc
    except LoraserveError as exc:
        raise CommandError(exc.message) from exc
    if entry.fetch_seconds is None:  # found on disk: pulled before, or by a server meanwhile
        print(f"{spec_of(ref)} is cached as {entry.root} ({_human(entry.size)})")
    else:
        print(f"cached {entry.root} ({_human(entry.size)}, {checked}) in {entry.fetch_seconds:.1f} s")
    return 0


async def _fetch(
    settings: Settings, snapshot: Snapshot, source: Source, token: str | None, check: Callable[[Path], object]
) -> CacheEntry:
    store = AdapterStore(settings.adapter_cache_path(), int(settings.adapter_cache_size))
    store.open()
    for entry in store.entries():
        entry.pinned = bool(store.in_use_by(entry.key))  # room is never made with what a server has loaded

    async def report(entry: CacheEntry) -> None:
        print(f"evicting {entry.root} ({_human(entry.size)}, last used {_ago(time.time() - entry.last_used)})")

    store.set_evict_hook(report)
    if store.get(snapshot.key) is None:
        files = len(snapshot.files)
        print(f"pulling {snapshot.root} ({files} file{'s' * (files != 1)}, {_human(snapshot.total_size)})", flush=True)
    # A server fetching the same adapter holds the entry's lock: ensure() waits for it, then adopts its copy.
    return await store.ensure(snapshot, lambda dest: source.fetch(snapshot, dest, token), check)


# -- rm -----------------------------------------------------------------------


def matches(entry: CacheEntry, spec: str) -> bool:
    """Whether ``spec`` (a reference, with an optional @revision, @version or version prefix) names ``entry``."""
    kind, rest = split_spec(spec)
    name, _, version = rest.partition("@")
    if entry.ref.source != kind or entry.ref.name != name.rstrip("/"):
        return False
    if not version:
        return True
    return version in (entry.ref.revision, entry.version) or (len(version) >= 7 and entry.version.startswith(version))


def _rm(args: argparse.Namespace, settings: Settings) -> int:
    store, _ = _scan(settings)
    found: dict[str, CacheEntry] = {}
    for spec in args.refs:  # all of them first: a typo in the last one removes nothing
        named = [e for e in store.entries() if matches(e, spec)]
        if not named:
            raise CommandError(f"no cached adapter matches {spec!r} (see `loraserve adapters list`)")
        found.update((e.key, e) for e in named)
    refused = 0
    for entry in found.values():
        try:
            store.discard(entry)
        except EntryInUse as exc:
            refused += 1
            pids = ", ".join(map(str, exc.pids))
            print(
                f"loraserve adapters rm: {entry.root} is loaded by the loraserve server with pid {pids}; "
                "not removed. Unload it first (POST /v1/unload_lora_adapter with its name), or it can go once "
                "that server has evicted it or stopped.",
                file=sys.stderr,
            )
            continue
        print(f"removed {entry.root} ({_human(entry.size)})")
    return 1 if refused else 0


# -- prune --------------------------------------------------------------------


def plan_prune(
    entries: list[CacheEntry], in_use: set[str], keep: int | None, older_than: float | None, now: float
) -> list[CacheEntry]:
    """Entries to remove, least recently used first: not in use, unused for ``older_than`` seconds if given,
    and with ``keep``, only as many as must go for the cache to fit in ``keep`` bytes."""
    candidates = sorted(
        (e for e in entries if e.key not in in_use and (older_than is None or now - e.last_used >= older_than)),
        key=lambda e: e.last_used,
    )
    if keep is None:
        return candidates
    # The store's own eviction plan, over copies where everything but the candidates is held in place.
    chosen = {e.key for e in candidates}
    held = [replace(e, leases=0, pinned=e.key not in chosen) for e in entries]
    victims = plan_eviction(held, 0, keep)
    if victims is None:  # even all of them is not enough: remove all of them
        return candidates
    going = {v.key for v in victims}
    return [e for e in candidates if e.key in going]


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    store, unreadable = _scan(settings)
    entries = store.entries()
    in_use = {e.key for e in entries if store.in_use_by(e.key)}
    now = time.time()
    victims = plan_prune(entries, in_use, args.keep, args.older_than, now)
    verb = "would remove" if args.dry_run else "removed"
    freed = 0
    for path in [*store.leftovers(), *unreadable]:
        size = _size(path)
        if not args.dry_run:
            _remove(path)
        freed += size
        print(f"{verb} leftover {path.relative_to(store.root)} ({_human(size)})")
    for entry in victims:
        if not args.dry_run:
            try:
                store.discard(entry)
            except EntryInUse:  # a server loaded it since the plan: it stays
                print(f"kept {entry.root}: a server loaded it meanwhile")
                continue
        freed += entry.size
        print(f"{verb} {entry.root} ({_human(entry.size)}, last used {_ago(now - entry.last_used)})")
    remaining = [e for e in entries if e not in victims]
    kept = sum(e.size for e in remaining)
    print(
        f"{'would free' if args.dry_run else 'freed'} {_human(freed)}; "
        f"{len(remaining)} adapter{'s' * (len(remaining) != 1)} ({_human(kept)}) kept, {len(in_use)} in use"
    )
    if args.keep is not None and kept > args.keep:
        print(f"still above --keep {_human(args.keep)}: the rest is in use or more recent than --older-than")
    return 0


# -- helpers ------------------------------------------------------------------


def _human(size: int) -> str:
    return ByteSize(size).human_readable(separator=" ")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(path: Path) -> int:
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except FileNotFoundError:  # removed meanwhile (a download finished)
        return 0


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
