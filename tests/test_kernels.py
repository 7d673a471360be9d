"""The compiled kernels (gpt2cli.kernels) against NumPy on random shapes: 1 to 16 rows and
quant.NARROW_ROWS (whole and partial tiles of rows), odd sizes, int8 blocks cut short at the end
of a row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba", reason="the kernels need the fast extra (numba)")

from gpt2cli import kernels, quant

# (rows, n_out, n_in, block): 1-16 rows and NARROW_ROWS; outputs that are no multiple of a
# panel's LANES; inputs that are no multiple of the block (a shorter last block) or smaller than
# one
SHAPES = [
    (1, 768, 768, 32),
    (1, 37, 100, 32),
    (2, 129, 96, 64),
    (3, 50, 33, 32),
    (4, 17, 7, 32),
    (5, 64, 250, 128),
    (8, 300, 64, 32),
    (13, 1, 40, 16),
    (16, 75, 130, 32),
    (quant.NARROW_ROWS, 33, 70, 32),
]


def _case(rows: int, n_out: int, n_in: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    m = (
        rng.standard_t(3, (n_out, n_in)).astype(np.float32) * 0.05
    )  # heavy tails, as trained weights
    return x, m


@pytest.mark.parametrize(("rows", "n_out", "n_in", "block"), SHAPES)
def test_int8_kernel_equals_numpy_on_the_dequantised_weights(
    rows: int, n_out: int, n_in: int, block: int
) -> None:
    x, m = _case(rows, n_out, n_in, seed=rows)
    q, scales = quant.quantize_int8(m, block)
    out = np.full((rows, n_out), np.nan, np.float32)
    kernels.int8_matmul(x, quant.panels(q), quant.panels(scales), block, out)
    expected = x.astype(np.float64) @ quant.dequantize_int8(q, scales, block).T.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("rows", "n_out", "n_in", "block"), [*SHAPES, (512, 40, 70, 32)])
def test_bf16_and_f32_panel_kernels_equal_numpy(
    rows: int, n_out: int, n_in: int, block: int
) -> None:
    x, m = _case(rows, n_out, n_in, seed=100 + rows)
    bits = quant.to_bfloat16(m)
    for data, weights in ((quant.panels(bits), quant.from_bfloat16(bits)), (quant.panels(m), m)):
        out = np.full((rows, n_out), np.nan, np.float32)
        kernels.panel_matmul(x, data, out)
        expected = x.astype(np.float64) @ weights.T.astype(np.float64)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_a_rows_float32_product_is_the_same_in_any_batch_on_the_kernel() -> None:
    """Each row of 2 or more sums its inputs in the same order wherever it sits in a tile: a
    row's outputs are bit for bit the same alone in a pair or among 64 rows."""
    x, m = _case(64, 50, 96, seed=11)
    p = quant.panels(m)
    every = np.empty((64, 50), np.float32)
    kernels.panel_matmul(x, p, every)
    for lo, hi in [(0, 2), (5, 7), (9, 17), (30, 63)]:
        part = np.empty((hi - lo, 50), np.float32)
        kernels.panel_matmul(x[lo:hi], p, part)
        np.testing.assert_array_equal(part, every[lo:hi])


@pytest.mark.parametrize(("n_out", "n_in", "block"), [(37, 100, 32), (64, 250, 128), (5, 7, 32)])
def test_widening_kernels_give_exactly_numpys_float32_weights(
    n_out: int, n_in: int, block: int
) -> None:
    _, m = _case(1, n_out, n_in, seed=n_in)
    q, scales = quant.quantize_int8(m, block)
    out = np.full((n_in, n_out), np.nan, np.float32)  # M.T: the outputs side by side
    kernels.int8_widen(quant.panels(q), quant.panels(scales), block, out)
    np.testing.assert_array_equal(out, quant.dequantize_int8(q, scales, block).T)
    bits = quant.to_bfloat16(m)
    out[:] = np.nan
    kernels.bf16_widen(quant.panels(bits), out)
    np.testing.assert_array_equal(out, quant.from_bfloat16(bits).T)


def test_compiled_for_an_avx2_cpu_the_kernels_take_tiles_of_four_rows_and_stay_exact(
    tmp_path: Path,
) -> None:
    """An AVX2-only CPU has 16 vector registers, too few for tiles of eight rows: compiled for
    one (numba told a Haswell's features, into a cache of its own), the kernels take four rows a
    tile and pass this file's comparisons with NumPy again."""
    from bench.common import HASWELL_FEATURES

    env = os.environ | {
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": HASWELL_FEATURES,
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    tile = [sys.executable, "-c", "from gpt2cli import kernels; print(kernels.TILE_ROWS)"]
    assert subprocess.run(tile, env=env, capture_output=True, text=True).stdout == "4\n"
    compared = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "numpy or nan_and_inf or one_thread"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stdout[-3000:]
    assert " passed" in compared.stdout and "deselected" in compared.stdout


def test_nan_and_inf_weights_reach_the_outputs() -> None:
    """The kernels assume nothing is finite: a NaN weight makes its output NaN, an Inf one Inf."""
    x = np.ones((2, 64), np.float32)
    m = np.full((3, 64), 0.5, np.float32)
    m[1, 5], m[2, 9] = np.nan, np.inf
    out = np.empty((2, 3), np.float32)
    for data in (quant.panels(m), quant.panels(quant.to_bfloat16(m))):
        kernels.panel_matmul(x, data, out)
        assert np.isfinite(out[:, 0]).all() and np.isnan(out[:, 1]).all()
        assert np.isinf(out[:, 2]).all()
    q, scales = quant.quantize_int8(m)
    kernels.int8_matmul(x, quant.panels(q), quant.panels(scales), quant.BLOCK, out)
    assert np.isfinite(out[:, 0]).all() and not np.isfinite(out[:, 1:]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_packed_matrix_gives_the_same_product_on_the_kernels_and_on_blas(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Narrow weights: up to NARROW_ROWS rows run on the kernels, more on BLAS over pieces
    widened into one buffer (made small here so that a matrix takes several); float32 runs on
    the kernel throughout, or on NumPy when the kernel cannot load: all give the same product."""
    monkeypatch.setattr(quant, "WIDEN_BYTES", 4 * 100 * 2 * quant.LANES)  # 2 panels a piece
    monkeypatch.setattr(quant, "NARROW_ROWS", 16)
    x, m = _case(32, 45, 100, seed=7)
    columns = quant.equalize(m)
    q, scales = quant.quantize_int8(m / columns)
    packed = {
        "float32": quant.Packed("float32", quant.panels(m), 45),
        "bfloat16": quant.Packed("bfloat16", quant.panels(quant.to_bfloat16(m)), 45),
        "int8": quant.Packed("int8", quant.panels(q), 45, quant.panels(scales), columns=columns),
    }[dtype]
    exact = x @ packed[np.arange(45)].T + np.arange(45, dtype=np.float32)  # the widened rows'
    np.testing.assert_allclose(
        packed.linear(x, np.arange(45, dtype=np.float32)), exact, rtol=1e-4, atol=1e-4
    )
    bias = np.arange(45, dtype=np.float32)
    many = packed.linear(x, bias)  # [32, 45]: BLAS
    few = np.concatenate([packed.linear(x[i : i + 4], bias) for i in range(0, len(x), 4)])
    assert many.shape == few.shape == (len(x), 45) and many.dtype == np.float32
    np.testing.assert_allclose(few, many, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(packed.linear(x[:3][None], bias)[0], many[:3], rtol=1e-4, atol=1e-4)
    if dtype == "float32":
        monkeypatch.setattr(quant, "float32_kernels", lambda: False)
        np.testing.assert_allclose(packed.linear(x, bias), many, rtol=1e-4, atol=1e-4)
        assert packed.linear(x[:0], bias).shape == (0, 45)


def test_one_thread_gives_the_same_outputs_as_all() -> None:
    x, m = _case(8, 200, 96, seed=3)
    q, scales = quant.quantize_int8(m)
    outs = []
    for n in (1, 2):
        kernels.use_threads(n)
        out = np.empty((8, 200), np.float32)
        kernels.int8_matmul(x, quant.panels(q), quant.panels(scales), quant.BLOCK, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_the_users_thread_count_wins_and_a_bad_one_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpt2cli import threads
    from gpt2cli.errors import GPT2Error

    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.delenv(threads.THREADS_VARIABLE, raising=False)
    assert 1 <= threads.kernel_threads() <= threads.usable_cores()
    monkeypatch.setenv(threads.THREADS_VARIABLE, "1")
    assert threads.kernel_threads() == 1 and threads.user_choice() == threads.THREADS_VARIABLE
    monkeypatch.setenv(threads.THREADS_VARIABLE, "two")
    with pytest.raises(GPT2Error, match=r"^GPT2CLI_THREADS='two': set it to a positive number"):
        threads.kernel_threads()
    monkeypatch.delenv(threads.THREADS_VARIABLE)
    with pytest.raises(GPT2Error, match="positive"):
        threads.apply_user_threads(0)
    with pytest.raises(GPT2Error, match=f"at most {threads.MAX_THREADS}, got 10000"):
        threads.apply_user_threads(10_000)
    for text in ("99999999999999999999", "\u00b2"):  # huge; a digit int() refuses
        monkeypatch.setenv(threads.THREADS_VARIABLE, text)
        with pytest.raises(GPT2Error, match="positive number of threads, at most"):
            threads.user_threads()
    monkeypatch.delenv(threads.THREADS_VARIABLE)
    threads.apply_user_threads(1)
    assert threads.kernel_threads() == 1 and threads.blas_threads() in (1, None)


def test_the_kernels_thread_count_follows_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a user's count, the kernels take one thread for each core others left idle over
    the last KERNEL_REFIT_S: renewed once that has passed."""
    from gpt2cli import threads

    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.delenv(threads.THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(threads, "KERNEL_REFIT_S", 0.0)

    class Busy:
        def busy_cores(self) -> float:
            return float(threads.usable_cores())

    monkeypatch.setattr(threads, "_kernel_sampler", (0.0, Busy()))
    assert threads.kernel_threads() == 1  # every core busy: one thread, never none


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_a_float32_model_runs_every_product_on_the_kernel_as_blas_would(
    tiny_model_dir: Path, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the extra, a float32 model's head and every block matrix are panels: a prefill and
    each decoding step, one row or a batch, multiply them on the kernel, with the logits of the
    layout BLAS multiplies (the extra absent); the embedding rows come from the head's panels."""
    from gpt2cli.model import GPT2

    model = GPT2.from_pretrained(tiny_model_dir)
    assert isinstance(model.params["wte"], quant.Packed)
    quant.float32_kernels()  # loaded (its warm-up calls made) before counting
    prompts = [[(7 * i + j) % 50257 for j in range(16 + i % 3)] for i in range(rows)]
    calls = []
    product = kernels.panel_matmul
    monkeypatch.setattr(
        kernels, "panel_matmul", lambda *a: calls.append((len(a[0]), a[1].shape[1])) or product(*a)
    )
    state, logits = model.prefill(prompts, 24)
    on = model.step(state, logits.argmax(-1))
    n_embd, n_layer = model.config.n_embd, model.config.n_layer
    assert len(calls) == 2 * (4 * n_layer + 1)  # the prefill's and the step's
    assert calls[-1] == (rows, n_embd)  # the step's head, one row per sequence
    assert sum(n_in == 4 * n_embd for _, n_in in calls) == 2 * n_layer  # the MLP's c_proj

    monkeypatch.setattr(quant, "kernels_installed", lambda: False)
    blas = GPT2.from_pretrained(tiny_model_dir)  # the transposed layout, on BLAS
    assert isinstance(blas.params["wte"], np.ndarray)
    calls.clear()
    state, logits = blas.prefill(prompts, 24)
    np.testing.assert_allclose(on, blas.step(state, logits.argmax(-1)), rtol=1e-4, atol=1e-4)
    assert calls == []
