"""Shared fixtures: the real GPT-2 vocabulary, random-weight model folders, an isolated hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factory import TINY, write_random_gpt2

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = Path(
    os.environ.get("GPT2_TOKENIZER_DIR", ROOT.parent / "shared" / "gpt2-tokenizer")
)


@pytest.fixture(autouse=True)
def _isolated_hub_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every test away from the user's Hugging Face cache and from the real hub."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no real hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session")
def gpt2_vocab_dir() -> Path:
    """The real GPT-2 vocabulary in `../shared/gpt2-tokenizer/` (the tiktoken reference's source)."""
    if not (SHARED_TOKENIZER / "vocab.json").is_file():
        pytest.skip(
            f"real GPT-2 vocabulary not found at {SHARED_TOKENIZER} "
            "(set GPT2_TOKENIZER_DIR to a folder with vocab.json and merges.txt)"
        )
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight GPT-2 folder with the real vocabulary and tokenizer files."""
    return write_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), TINY, seed=0)
