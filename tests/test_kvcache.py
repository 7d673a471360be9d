"""The KV cache and its memory: lazily paged zeros, the fit check before allocating, and malloc
keeping a forward pass's freed activations."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2cli import kvcache
from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState, lazy_zeros
from gpt2cli.model import GPT2
from tests.factory import TINY


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def test_lazy_zeros_are_writable_float32_zeros_of_any_size() -> None:
    for shape in [(0,), (3, 0, 2), (2, 3), (1024, 1024)]:
        zeros = lazy_zeros(shape)
        assert zeros.shape == shape and zeros.dtype == np.float32
        assert not zeros.any()
        zeros[...] = 1.5  # a private mapping: writable
        assert (zeros == 1.5).all()


def test_an_empty_cache_has_the_configs_shape_and_no_positions() -> None:
    state = DecodeState.empty(TINY, 3, 40, logits=3)
    shape = (TINY.n_layer, 3, TINY.n_head, 40, TINY.head_dim)  # [L, B, H, C, hd]
    assert state.keys.shape == state.values.shape == shape
    assert state.keys.dtype == state.values.dtype == np.float32
    assert not state.keys.any() and not state.values.any()
    assert state.capacity == 40
    assert state.lengths.tolist() == [0, 0, 0] and state.room.tolist() == [40, 40, 40]


def test_rows_of_a_cache_share_its_memory_and_lengths(tiny: GPT2) -> None:
    state, _ = tiny.prefill([[1, 2], [3, 4, 5], [6]], 10)
    middle = state.rows(1, 3)
    tiny.step(middle, [7, 8])
    assert state.lengths.tolist() == [2, 4, 2]
    assert state.keys[:, 1, :, 3].any() and not state.keys[:, 0, :, 3].any()  # row 0 not run
    assert middle.room.tolist() == [6, 8]


def test_cache_positions_a_row_never_wrote_hold_finite_values(tiny: GPT2) -> None:
    """A short row attends (at weight 0) over positions only the longest row wrote; a NaN left
    there by uninitialised memory would turn its logits into NaN."""
    rng = np.random.default_rng(0)
    state, _ = tiny.prefill([rng.integers(0, TINY.n_vocab, n) for n in (3, 30)], 60)
    for _ in range(10):
        tiny.step(state, [1, 2])
    assert state.lengths.tolist() == [13, 40]
    assert np.isfinite(state.keys[:, 0, :, 30:40]).all()  # row 0 never wrote 30..39
    assert np.isfinite(state.values[:, 0, :, 30:40]).all()
    assert (state.keys[:, 0, :, 30:40] == 0).all()


def test_a_batch_too_large_for_memory_is_refused_before_allocating() -> None:
    available = kvcache.available_memory()
    assert available is not None and available > 0
    rows = available // (2 * TINY.n_layer * TINY.n_ctx * TINY.n_embd * 4) + 1  # cache alone
    with pytest.raises(GPT2Error, match=r"need about .* GiB .* use fewer samples"):
        kvcache.check_fits(TINY, rows, TINY.n_ctx, logits=0)
    with pytest.raises(GPT2Error, match=r"need about .* GiB .* use fewer samples"):
        DecodeState.empty(TINY, rows, TINY.n_ctx, logits=0)
    kvcache.check_fits(TINY, 2, TINY.n_ctx, logits=2)  # an ordinary batch fits


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_repeated_prefill_reuses_freed_activation_memory(model_124m_dir: Path) -> None:
    """A 1,024-token prefill frees and reallocates tens of MB of activations per layer; kept by
    malloc (`keep_freed_memory`), a second one faults in little beyond its new KV cache (75 MB,
    18,432 pages) instead of about 100,000 pages. In a process of its own: malloc's thresholds
    in this one depend on everything the session ran before (torch's import, earlier loads)."""
    script = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from gpt2cli.model import GPT2\n"
        "model = GPT2.from_pretrained(sys.argv[1])\n"
        "ids = np.random.default_rng(3).integers(0, 50257, 1024)\n"
        "model.prefill([ids[:128]])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "model.prefill([ids])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    for _ in range(2):  # the first builds the cached layout, whose large frees change malloc's
        run = subprocess.run(  # thresholds; the second loads it, as a user's later runs do
            [sys.executable, "-c", script, str(model_124m_dir)],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
    assert int(run.stdout) < 30_000
