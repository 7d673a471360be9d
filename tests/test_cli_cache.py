"""`gpt2 cache` and `gpt2 cache clear`: gpt2cli's cache of derived files beside the hub's downloads.

Each test has a user cache of its own (XDG_CACHE_HOME under tmp_path) and a hub cache filled by
`gpt2 download` from the fake hub (tests/hub_server.py), or written as huggingface_hub writes one.
The commands run as users run them, in a subprocess (huggingface_hub reads HF_HUB_CACHE when it is
imported); models are loaded in this process, as `gpt2 generate` loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpt2cli import quant
from gpt2cli.model import GPT2
from tests.factory import TINY, write_random_gpt2
from tests.hub_server import FakeHub, Repo
from tests.terminal import run_on_terminal
from tests.test_cli_download import assert_fails, downloaded, gpt2

# the layout file: the npy header, then the head [V, D] and each block's two c_proj weights
# (with the fast extra, all four of its matrices, 12 n_embd² instead of 5, in panels: the head's
# outputs padded to a whole panel)
_PER_LAYER = 12 if quant.kernels_installed() else 5
_HEAD_ROWS = -(-TINY.n_vocab // quant.LANES) * quant.LANES if _PER_LAYER == 12 else TINY.n_vocab
LAYOUT_BYTES = 128 + 4 * (_HEAD_ROWS * TINY.n_embd + TINY.n_layer * _PER_LAYER * TINY.n_embd**2)


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """gpt2cli's cache folder for this test alone (`$XDG_CACHE_HOME/gpt2cli`), empty."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gpt2cli"


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return write_random_gpt2(tmp_path / "tiny", TINY, seed=5)


def listing(*args: str, **env: str) -> dict[str, Any]:
    result = gpt2("cache", "--json", *args, **env)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def hub_repo(owner_name: str) -> Path:
    return Path(os.environ["HF_HUB_CACHE"], "models--" + owner_name.replace("/", "--"))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (symlinks followed) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_same_weights_in_two_folders_and_the_hub_are_one_layout_entry(
    fake_hub: FakeHub, user_cache: Path, tiny_folder: Path, tmp_path: Path
) -> None:
    fake_hub.add("someone/tiny", Repo.from_folder(tiny_folder))
    snapshot = downloaded(gpt2("download", "someone/tiny"))
    copy = shutil.copytree(tiny_folder, tmp_path / "copy")
    for folder in (tiny_folder, copy, snapshot):
        GPT2.from_pretrained(folder).tokenizer  # noqa: B018 - loads the tokenizer tables too
    shown = listing()

    ours = shown["cache"]
    assert ours["folder"] == str(user_cache)
    (layout,) = [e for e in ours["entries"] if e["kind"] == "transposed layout"]
    assert layout["sources"] == [str(tiny_folder), str(copy), str(snapshot)]
    assert layout["size"] == LAYOUT_BYTES
    assert [e["kind"] for e in ours["entries"]] == [
        "transposed layout",
        "tokenizer tables",
        "index of hashes",
    ]
    # the sizes are the files' own, and every file in the folder is listed
    on_disk = {str(p): p.stat().st_size for p in user_cache.iterdir()}
    assert {e["path"]: e["size"] for e in ours["entries"]} == on_disk
    assert ours["size"] == sum(on_disk.values())

    (model,) = shown["hub"]["models"]
    repo = hub_repo("someone/tiny")
    blobs = sum(p.stat().st_size for p in (repo / "blobs").iterdir())
    assert model == {
        "repo_id": "someone/tiny",
        "path": str(repo),
        "size": blobs,
        "revisions": [{"commit": snapshot.name, "refs": ["main"]}],
    }
    assert shown["hub"]["size"] == blobs

    text = gpt2("cache")
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[0] == f"gpt2cli's cache: {user_cache}"
    assert sum(line.startswith("transposed layout") for line in lines) == 1
    for shown_source in (str(tiny_folder), str(copy), f"someone/tiny@{snapshot.name[:7]} (hub)"):
        assert any(line.endswith(shown_source) for line in lines), shown_source
    assert any(line.startswith("someone/tiny") and "(main)" in line for line in lines)


def test_clear_removes_the_derived_files_and_leaves_the_hub_cache(
    fake_hub: FakeHub, user_cache: Path, tiny_folder: Path
) -> None:
    fake_hub.add("someone/tiny", Repo.from_folder(tiny_folder))
    snapshot = downloaded(gpt2("download", "someone/tiny"))
    GPT2.from_pretrained(snapshot).tokenizer  # noqa: B018
    (user_cache / "notes.txt").write_text("mine")
    hub_before = tree(hub_repo("someone/tiny"))
    sizes = {str(p): p.stat().st_size for p in user_cache.iterdir() if p.name != "notes.txt"}

    result = gpt2("cache", "clear")
    assert result.returncode == 0 and result.stderr == ""
    *removed, total = result.stdout.splitlines()
    assert sorted(line.split("  ")[-1] for line in removed) == sorted(sizes)
    assert total.split() == [*_human(sum(sizes.values())).split(), "freed"]
    assert sorted(p.name for p in user_cache.iterdir()) == ["notes.txt"]  # not gpt2cli's: kept
    assert tree(hub_repo("someone/tiny")) == hub_before
    assert listing()["cache"]["entries"] == [
        {"kind": "not gpt2cli's", "path": str(user_cache / "notes.txt"), "size": 4, "sources": []}
    ]
    assert gpt2("cache", "clear").stdout == f"nothing to remove in {user_cache}\n"
    # made again on the next load, from the hub's files still there
    GPT2.from_pretrained(snapshot)
    assert len(list(user_cache.glob("layout-*.npy"))) == 1


def test_clear_hub_by_name_removes_those_models_only(
    fake_hub: FakeHub, user_cache: Path, tiny_folder: Path, tmp_path: Path
) -> None:
    other = write_random_gpt2(tmp_path / "other", TINY, seed=6)
    fake_hub.add("openai-community/gpt2", Repo.from_folder(tiny_folder))
    fake_hub.add("someone/tiny", Repo.from_folder(tiny_folder))
    fake_hub.add("someone/other", Repo.from_folder(other))
    for name in ("gpt2", "someone/tiny", "someone/other"):
        downloaded(gpt2("download", name))
    kept = tree(hub_repo("someone/other"))
    sizes = {m["repo_id"]: m["size"] for m in listing()["hub"]["models"]}

    result = gpt2("cache", "clear", "--hub", "124M", "--hub", "someone/tiny", HF_HUB_OFFLINE="1")
    assert result.returncode == 0 and result.stderr == ""
    assert [line.lstrip() for line in result.stdout.splitlines()] == [
        f"{_human(sizes['openai-community/gpt2'])}  {hub_repo('openai-community/gpt2')}",
        f"{_human(sizes['someone/tiny'])}  {hub_repo('someone/tiny')}",
        f"{_human(sizes['openai-community/gpt2'] + sizes['someone/tiny'])}  freed",
    ]
    assert not hub_repo("openai-community/gpt2").exists() and not hub_repo("someone/tiny").exists()
    assert tree(hub_repo("someone/other")) == kept
    assert [m["repo_id"] for m in listing()["hub"]["models"]] == ["someone/other"]


def test_a_name_not_in_the_hub_cache_is_one_line_and_removes_nothing(
    fake_hub: FakeHub, user_cache: Path, tiny_folder: Path
) -> None:
    fake_hub.add("someone/tiny", Repo.from_folder(tiny_folder))
    snapshot = downloaded(gpt2("download", "someone/tiny"))
    GPT2.from_pretrained(snapshot)
    ours = sorted(user_cache.iterdir())
    for name in ("gpt2-xl", "someone/else"):
        result = gpt2("cache", "clear", "--hub", "someone/tiny", "--hub", name)
        assert_fails(result, f"{name} is not in the hub cache", "`gpt2 cache` lists")
    assert sorted(user_cache.iterdir()) == ours
    assert hub_repo("someone/tiny").is_dir()


def test_other_models_in_the_hub_cache_are_counted_not_listed(user_cache: Path) -> None:
    bert = _cached_repo("someone/bert", {"config.json": b'{"model_type": "bert"}'})
    _cached_repo("someone/gpt", {"config.json": b'{"model_type": "gpt2"}', "x": b"12345"})
    hub = listing()["hub"]
    assert [m["repo_id"] for m in hub["models"]] == ["someone/gpt"]
    assert (hub["other_models"], hub["other_models_size"]) == (1, 22)
    assert "not GPT-2, not listed: 1 other model, 22 B" in gpt2("cache").stdout
    result = gpt2("cache", "clear", "--hub", "someone/bert")  # named: removed all the same
    assert result.returncode == 0 and result.stdout.splitlines()[0] == f"22 B  {bert}"
    assert not bert.exists()


def test_empty_caches_are_listed_as_empty(user_cache: Path) -> None:
    result = gpt2("cache")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"gpt2cli's cache: {user_cache}\n(empty)\n\n"
        f"Hugging Face hub cache: {os.environ['HF_HUB_CACHE']}\n(no GPT-2 models)\n"
    )
    assert listing() == {
        "cache": {"folder": str(user_cache), "size": 0, "entries": []},
        "hub": {
            "folder": os.environ["HF_HUB_CACHE"],
            "size": 0,
            "models": [],
            "other_models": 0,
            "other_models_size": 0,
        },
    }


def test_on_a_terminal_the_listing_is_a_table(user_cache: Path, tiny_folder: Path) -> None:
    GPT2.from_pretrained(tiny_folder)
    status, shown, stderr = run_on_terminal(["cache"], env=os.environ | {"NO_COLOR": "1"})
    assert (status, stderr) == (0, "")
    assert "gpt2cli's cache" in shown and "transposed layout" in shown
    assert f"transposed layout  {_human(LAYOUT_BYTES)}" in shown
    assert str(tiny_folder) in "".join(shown.split())  # folded to fit 100 columns, maybe


def test_a_cache_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "gpt2cli").write_text("")  # gpt2cli's folder is a file
    for command in (["cache"], ["cache", "clear"]):
        result = gpt2(*command, XDG_CACHE_HOME=str(tmp_path))
        assert_fails(result, f"{tmp_path / 'gpt2cli'}: gpt2cli's cache is not a folder")


def test_a_hub_cache_that_is_a_file_is_one_line_and_clear_alone_never_reads_it(
    tmp_path: Path, user_cache: Path, tiny_folder: Path
) -> None:
    hub = tmp_path / "hub-file"
    hub.write_text("")
    for command in (["cache"], ["cache", "clear", "--hub", "gpt2"]):
        assert_fails(gpt2(*command, HF_HUB_CACHE=str(hub)), f"{hub}: the hub cache cannot be read")
    GPT2.from_pretrained(tiny_folder)
    result = gpt2("cache", "clear", HF_HUB_CACHE=str(hub))
    assert result.returncode == 0 and result.stdout.endswith("freed\n")


def _cached_repo(repo_id: str, files: dict[str, bytes]) -> Path:
    """A model repo in the hub cache as huggingface_hub writes one: blobs named by hash, a
    snapshot of symlinks to them, and refs/main naming the snapshot's commit."""
    repo = hub_repo(repo_id)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (repo / "snapshots" / commit / name).symlink_to(Path("../../blobs", blob))
    return repo


def _human(n: int) -> str:
    from gpt2cli.cachelist import size_text

    return size_text(n)


def test_sizes_are_shown_with_their_unit() -> None:
    from gpt2cli.cachelist import size_text

    assert [
        size_text(n) for n in (0, 999, 1000, 12_345, 1_910_277, 295_947_392, 6_500_000_000)
    ] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "12 kB",
        "1.9 MB",
        "296 MB",
        "6.5 GB",
    ]
