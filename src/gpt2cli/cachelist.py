"""What gpt2cli keeps on disk, for `gpt2 cache`: its own cache and the hub's GPT-2 downloads.

gpt2cli's cache (`gpt2cli.cache`, `$XDG_CACHE_HOME/gpt2cli`) holds only files derived from others
(tokenizer tables, transposed layouts, the index of weight hashes), so clearing it costs time on
the next runs, never data. The Hugging Face hub cache holds the downloads, shared with
transformers and other tools: it is read through huggingface_hub's `scan_cache_dir` (which
imports it, so only `gpt2 cache` pays for that) and cleared only repo by repo, when a repo is
named, through huggingface_hub's delete strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2cli import cache, hub, jsonfile
from gpt2cli.errors import GPT2Error
from gpt2cli.output import escape_controls, terminal_console, write_stdout

# the files gpt2cli writes in its cache, by name; anything else there is listed, never removed
KINDS = (
    (re.compile(r"layout-[0-9a-f]{32}\.npy"), "transposed layout"),
    (re.compile(r"(bfloat16|int8)-[0-9a-f]{32}\.npy"), "narrow weights"),  # gpt2cli.quant
    (re.compile(r"tokenizer-[0-9a-f]{32}\.marshal"), "tokenizer tables"),
    (re.compile(re.escape(cache.INDEX)), "index of hashes"),
    (re.compile(r".+\.\d+\.partial"), "unfinished write"),  # cache.store's, left by a crash
)
OTHER = "not gpt2cli's"
_HASH_IN_NAME = re.compile(r"(?<=-)([0-9a-f]{8})[0-9a-f]{24}(?=\.)")
_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/(?P<commit>[^/]+)$")


@dataclass(frozen=True)
class Entry:
    """A file in gpt2cli's cache."""

    kind: str  # one of KINDS' kinds, or OTHER
    path: Path
    size: int  # bytes
    sources: tuple[str, ...] = ()  # the folders it was derived from, those still there
    recorded: int = 0  # how many folders the index recorded, gone ones included


@dataclass(frozen=True)
class HubModel:
    """A model repo in the hub cache."""

    repo_id: str
    path: Path
    size: int  # bytes of its blobs
    revisions: tuple[tuple[str, tuple[str, ...]], ...]  # (commit, its refs such as main)


@dataclass(frozen=True)
class Listing:
    """Everything `gpt2 cache` shows."""

    folder: Path | None  # gpt2cli's cache; None without a home folder
    entries: list[Entry]
    hub_folder: Path
    hub_models: list[HubModel]  # the GPT-2 ones
    hub_others: list[HubModel]  # the other models there, counted but not listed

    def to_json(self) -> dict[str, Any]:
        return {
            "cache": {
                "folder": str(self.folder) if self.folder else None,
                "size": sum(e.size for e in self.entries),
                "entries": [
                    {"kind": e.kind, "path": str(e.path), "size": e.size, "sources": [*e.sources]}
                    for e in self.entries
                ],
            },
            "hub": {
                "folder": str(self.hub_folder),
                "size": sum(m.size for m in self.hub_models),
                "models": [
                    {
                        "repo_id": m.repo_id,
                        "path": str(m.path),
                        "size": m.size,
                        "revisions": [{"commit": c, "refs": [*refs]} for c, refs in m.revisions],
                    }
                    for m in self.hub_models
                ],
                "other_models": len(self.hub_others),
                "other_models_size": sum(m.size for m in self.hub_others),
            },
        }


def listing() -> Listing:
    """gpt2cli's cache entries and the hub cache's model repos, GPT-2 ones apart."""
    folder = cache.folder()
    hub_folder, _, models = _hub_models()
    gpt2 = [m for m in models if _is_gpt2(m)]
    others = [m for m in models if m not in gpt2]
    return Listing(folder, entries(folder) if folder else [], hub_folder, gpt2, others)


def entries(folder: Path) -> list[Entry]:
    """The files in gpt2cli's cache `folder`, largest first within each kind."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise GPT2Error(
            f"{folder}: gpt2cli's cache is not a folder; remove it or set "
            "XDG_CACHE_HOME to another place"
        ) from None
    except OSError as e:
        raise GPT2Error(f"{folder}: gpt2cli's cache cannot be read ({e.strerror})") from None
    index = cache.Index.read(folder)
    found = []
    for name in names:
        path = folder / name
        try:
            info = os.lstat(path)
        except OSError:  # removed meanwhile
            continue
        regular = stat.S_ISREG(info.st_mode)
        kind = next((k for pattern, k in KINDS if regular and pattern.fullmatch(name)), OTHER)
        size = info.st_size if regular else _tree_size(path)
        recorded = index.sources(name)
        sources = tuple(s for s in recorded if os.path.isdir(s))
        found.append(Entry(kind, path, size, sources, len(recorded)))
    order = [k for _, k in KINDS] + [OTHER]
    return sorted(found, key=lambda e: (order.index(e.kind), -e.size, e.path.name))


def clear(hub_names: Sequence[str] = ()) -> list[tuple[Path, int]]:
    """Remove every file gpt2cli wrote in its cache and, of the hub cache, the model repos named
    in `hub_names` (all their revisions); return what was removed with its size.

    The names are checked first, so a name that is not in the hub cache removes nothing.
    """
    doomed: list[HubModel] = []
    info: Any = None
    if hub_names:
        hub_folder, info, models = _hub_models()
        named = {_named(name, models, hub_folder).repo_id for name in hub_names}
        doomed = [m for m in models if m.repo_id in named]
        _check_removable(doomed)
    removed: list[tuple[Path, int]] = []
    folder = cache.folder()
    for entry in entries(folder) if folder else []:
        if entry.kind == OTHER:
            continue
        try:
            entry.path.unlink()
        except FileNotFoundError:  # another `gpt2 cache clear` was first
            continue
        except OSError as e:
            raise GPT2Error(f"cannot remove {entry.path}: {e.strerror}") from None
        removed.append((entry.path, entry.size))
    for model in doomed:
        # one repo's scan at a time: delete_revisions takes commit hashes, and two repos can
        # hold the same commit (a repo and its copy, `gpt2` and `openai-community/gpt2`)
        scanned = frozenset(r for r in info.repos if r.repo_path == model.path)
        strategy = dataclasses.replace(info, repos=scanned).delete_revisions(
            *(commit for commit, _ in model.revisions)
        )
        with hub._hub_output(progress=False):  # its log of what it could not delete
            try:
                strategy.execute()
            except OSError as e:
                where = e.filename or model.path
                raise GPT2Error(f"cannot remove {where}: {e.strerror}") from None
        if model.path.exists():
            raise GPT2Error(f"cannot remove {model.path} (permission denied?)")
        removed.append((model.path, model.size))
    return removed


def _named(name: str, models: list[HubModel], hub_folder: Path) -> HubModel:
    """The hub model `name` names: a known name or alias (gpt2, 124M) or a repo id as cached."""
    known = {key: m.repo_id for m in hub.KNOWN_MODELS for key in (m.name, m.alias) if key}
    by_id = {m.repo_id: m for m in models}
    for repo_id in (known.get(name), name):
        if repo_id in by_id:
            return by_id[repo_id]
    raise GPT2Error(
        f"{name} is not in the hub cache ({hub_folder}); `gpt2 cache` lists the models there"
    )


def _check_removable(models: list[HubModel]) -> None:
    """Refuse before deleting anything when a folder of the repos cannot be changed (read-only
    file system, no permission): huggingface_hub would delete what it can and leave the rest."""
    for model in models:
        for where, _, _ in os.walk(model.path):
            if not os.access(where, os.W_OK | os.X_OK):
                raise GPT2Error(f"cannot remove {model.path}: {where} is read-only")
        if not os.access(model.path.parent, os.W_OK | os.X_OK):
            raise GPT2Error(f"cannot remove {model.path}: {model.path.parent} is read-only")


def _hub_models() -> tuple[Path, Any, list[HubModel]]:
    """The hub cache's folder, huggingface_hub's scan of it (None when there is no such folder)
    and its model repos, largest first."""
    with hub._importing_hub():
        from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE)
    info = _scan(folder)
    if info is None:
        return folder, None, []
    models = [
        HubModel(
            repo.repo_id,
            repo.repo_path,
            repo.size_on_disk,
            tuple(
                (r.commit_hash, tuple(sorted(r.refs)))
                for r in sorted(repo.revisions, key=lambda r: (-r.last_modified, r.commit_hash))
            ),
        )
        for repo in info.repos
        if repo.repo_type == "model"
    ]
    return folder, info, sorted(models, key=lambda m: (-m.size, m.repo_id))


def _scan(folder: Path) -> Any:
    """huggingface_hub's scan of the hub cache, or None when there is no cache yet."""
    with hub._importing_hub():
        from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        return scan_cache_dir(folder)
    except CacheNotFound:
        return None
    except (OSError, ValueError) as e:  # a file in its place, a folder we may not read
        reason = getattr(e, "strerror", None) or "not a folder"
        raise GPT2Error(
            f"{folder}: the hub cache cannot be read ({reason}); check HF_HUB_CACHE / HF_HOME"
        ) from None


def _is_gpt2(model: HubModel) -> bool:
    """Whether a cached repo is a GPT-2 model gpt2cli could run: a known one, or one whose cached
    config.json says model_type gpt2 (as gpt2cli reads it, the default)."""
    if model.repo_id in {m.repo_id for m in hub.KNOWN_MODELS}:
        return True
    for commit, _ in model.revisions:
        with contextlib.suppress(GPT2Error):
            config = jsonfile.read(model.path / "snapshots" / commit / hub.CONFIG_FILE)
            if isinstance(config, dict) and config.get("model_type", "gpt2") == "gpt2":
                return True
    return False


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under a folder (0 for anything else that is not a file)."""
    if not path.is_dir() or path.is_symlink():
        return 0
    total = 0
    for where, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(where, name))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


# printing


def size_text(n_bytes: int) -> str:
    """Bytes as a short human size: 296 MB, 1.9 MB, 12 kB, 1.4 GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n_bytes} B"


def source_text(source: str) -> str:
    """A folder an entry was derived from, a hub snapshot as `owner/name@commit (hub)`."""
    found = _SNAPSHOT.search(source.replace(os.sep, "/"))
    if found is None:
        return escape_controls(source)
    repo = found["repo"].replace("--", "/")  # a repo id never holds "--"
    return escape_controls(f"{repo}@{found['commit'][:7]} (hub)")


def _short_name(entry: Entry) -> str:
    """An entry's file name, a hash in it cut to 8 digits as a glob (`gpt2 cache --json` has it
    whole)."""
    name = escape_controls(entry.path.name)
    return name if entry.kind == OTHER else _HASH_IN_NAME.sub(r"\1*", name)


def _first_source(entry: Entry) -> str:
    """What a listed entry was derived from: its first folder, or why none is shown."""
    if entry.sources:
        return source_text(entry.sources[0])
    if entry.recorded:
        return "its folders are gone"
    return "unknown" if entry.kind == "transposed layout" else ""


Section = tuple[str, tuple[str, ...], list[tuple[str, ...]], str]  # title, header, rows, note


def print_listing(listing: Listing, *, as_json: bool = False) -> None:
    """`gpt2 cache`'s output: JSON, rich tables on a terminal, else aligned plain text."""
    if as_json:
        write_stdout(json.dumps(listing.to_json(), indent=2) + "\n")
        return
    sections = [_ours(listing), _hub(listing)]
    console = terminal_console()
    if console is not None:
        _print_rich(console, sections)
        return
    lines: list[str] = []
    for title, header, rows, note in sections:
        lines += [*([""] if lines else []), title]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows] if rows else []:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.append(f"({note})")
    write_stdout("\n".join(lines) + "\n")


def _ours(listing: Listing) -> Section:
    """gpt2cli's cache as a table: an entry's further sources each on a line of their own."""
    folder = str(listing.folder) if listing.folder else "none (no home folder)"
    rows: list[tuple[str, ...]] = []
    for e in listing.entries:
        rows.append((e.kind, size_text(e.size), _short_name(e), _first_source(e)))
        rows += [("", "", "", source_text(s)) for s in e.sources[1:]]
    if rows:
        rows.append(("total", size_text(sum(e.size for e in listing.entries)), "", ""))
    note = "`gpt2 cache clear` removes these files; gpt2cli makes them again when needed"
    header = ("KIND", "SIZE", "FILE", "DERIVED FROM")
    return f"gpt2cli's cache: {escape_controls(folder)}", header, rows, note if rows else "empty"


def _hub(listing: Listing) -> Section:
    """The hub cache's GPT-2 models as a table, the others counted in the note."""
    rows: list[tuple[str, ...]] = [
        (
            escape_controls(m.repo_id),
            ", ".join(c[:7] + (f" ({', '.join(refs)})" if refs else "") for c, refs in m.revisions),
            size_text(m.size),
            escape_controls(m.path.name),
        )
        for m in listing.hub_models
    ]
    if rows:
        rows.append(("total", "", size_text(sum(m.size for m in listing.hub_models)), ""))
    note = "`gpt2 cache clear --hub NAME` removes a model" if rows else "no GPT-2 models"
    if listing.hub_others:
        n, size = len(listing.hub_others), sum(m.size for m in listing.hub_others)
        note += f"; not GPT-2, not listed: {n} other model{'s' * (n != 1)}, {size_text(size)}"
    title = f"Hugging Face hub cache: {escape_controls(str(listing.hub_folder))}"
    return title, ("MODEL", "REVISIONS", "SIZE", "FOLDER"), rows, note


def _print_rich(console: Any, sections: list[Section]) -> None:
    from rich.table import Table
    from rich.text import Text

    for n, (title, header, table, note) in enumerate(sections):
        if n:
            console.print()
        console.print(Text(title, style="bold"))
        if table:
            grid = Table(box=None, pad_edge=False, header_style="bold")
            for column in header:  # paths fold on a narrow terminal; kinds and sizes do not
                short = column in ("KIND", "SIZE", "MODEL", "REVISIONS")
                grid.add_column(
                    column.lower(),
                    justify="right" if column == "SIZE" else "left",
                    no_wrap=short,
                    overflow="ellipsis" if short else "fold",
                )
            for i, row in enumerate(table):
                style = "bold" if i == len(table) - 1 else None
                grid.add_row(*(Text(c) for c in row), style=style)
            console.print(grid)
        console.print(Text(note, style="dim"))


def print_cleared(removed: list[tuple[Path, int]], folder: Path | None) -> None:
    """`gpt2 cache clear`'s output: each removed file or folder with its size, then the total."""
    if not removed:
        where = escape_controls(str(folder)) if folder else "gpt2cli's cache (no home folder)"
        write_stdout(f"nothing to remove in {where}\n")
        return
    width = max(len(size_text(n)) for _, n in removed)
    lines = [f"{size_text(n).rjust(width)}  {escape_controls(str(p))}" for p, n in removed]
    lines.append(f"{size_text(sum(n for _, n in removed)).rjust(width)}  freed")
    write_stdout("\n".join(lines) + "\n")
