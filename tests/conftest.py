"""Shared fixtures: the real GPT-2 vocabulary, random-weight model folders, an isolated cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from gpt2cli.model import GPT2
from tests.factory import GPT2_124M, TINY, reference_model, write_random_gpt2
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = Path(
    os.environ.get("GPT2_TOKENIZER_DIR", ROOT.parent / "shared" / "gpt2-tokenizer")
)
# tiktoken_ext/openai_public.py's pattern for gpt2, spelled as tiktoken spells it (not imported
# from gpt2cli, so the reference does not share our code)
TIKTOKEN_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


@pytest.fixture(autouse=True)
def _isolated_hub_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep every test away from the user's Hugging Face cache and from the real hub."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no real hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the session's cached files (tokenizer tables, transposed weights) out of the user's
    ~/.cache, and its hub files out of theirs, from before the first fixture of any scope runs:
    session- and module-scoped models load before `_isolated_hub_cache` applies. One cache
    folder for the whole session, as one user's runs share theirs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home_session")))
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no real hub
        yield


@pytest.fixture(scope="session")
def gpt2_vocab_dir() -> Path:
    """The real GPT-2 vocabulary in `../shared/gpt2-tokenizer/`: the tiktoken reference's source."""
    if not (SHARED_TOKENIZER / "vocab.json").is_file():
        pytest.skip(
            f"real GPT-2 vocabulary not found at {SHARED_TOKENIZER} "
            "(set GPT2_TOKENIZER_DIR to a folder with vocab.json and merges.txt)"
        )
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def model_124m_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 124M-shaped random-weight folder, written once per session (about 500 MB)."""
    return write_random_gpt2(tmp_path_factory.mktemp("gpt2-124m"), GPT2_124M, seed=0)


@pytest.fixture(scope="session")
def ours_124m(model_124m_dir: Path) -> GPT2:
    """gpt2cli's model on the 124M-shaped random weights."""
    return GPT2.from_pretrained(model_124m_dir)


@pytest.fixture(scope="session")
def reference_124m(model_124m_dir: Path) -> Any:
    """transformers' GPT2LMHeadModel on the same weights."""
    return reference_model(model_124m_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight GPT-2 folder with the real vocabulary and tokenizer files."""
    return write_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), TINY, seed=0)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hugging Face hub on a free port (tests/hub_server.py), set as HF_ENDPOINT.

    Add repos with `fake_hub.add("owner/name", Repo.from_folder(folder))`. huggingface_hub reads
    HF_ENDPOINT when it is imported, so run what talks to it in a subprocess.
    """
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_vocab_dir: Path) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built from the shared vocabulary (its ranks file is offline).

    The byte table is OpenAI's `bytes_to_unicode` from GPT-2's encoder.py, written out here so
    that the reference shares no code with gpt2cli.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    vocab = json.loads((gpt2_vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t != "<|endoftext|>"}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=TIKTOKEN_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]},
    )
