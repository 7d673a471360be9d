"""Narrow weights (gpt2cli.quant): the dtype names, bfloat16 rounding, int8 error bounds, the
converted weights' cache (keyed by content, rebuilt when damaged), the `fast` extra's absence,
and int8 and bfloat16 models against float32 on the tiny fixture."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2cli import cache, cachelist, quant
from gpt2cli.errors import GPT2Error
from gpt2cli.model import GPT2
from tests.factory import TINY, write_random_gpt2

needs_numba = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None,
    reason="int8 and bfloat16 need the fast extra (numba)",
)
# a subprocess in which `import numba` fails, as when the extra is not installed
WITHOUT_NUMBA = "import sys; sys.modules['numba'] = None; "


def test_check_dtype_accepts_the_three_names_and_lists_them_otherwise() -> None:
    assert quant.DTYPES == ("float32", "bfloat16", "int8")
    assert [quant.check_dtype(d) for d in quant.DTYPES] == list(quant.DTYPES)
    with pytest.raises(
        GPT2Error, match=r"^unknown dtype 'fp8'; choose one of float32, bfloat16, int8$"
    ):
        quant.check_dtype("fp8")


def test_bfloat16_rounds_to_nearest_ties_to_even() -> None:
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)  # bfloat16's spacing at 1.0
    values = np.array(
        [one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0**-20, -(one + ulp / 2), 0.0, -0.0],
        np.float32,
    )
    expected = np.array(
        [one, one + 2 * ulp, one + ulp, -one, 0.0, -0.0], np.float32
    )  # tie down to even, tie up to even, above the tie: up; the sign kept, zeros kept
    got = quant.from_bfloat16(quant.to_bfloat16(values))
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got[-1]) and not np.signbit(got[-2])


def test_bfloat16_keeps_nan_and_inf_and_overflows_to_inf() -> None:
    big = np.finfo(np.float32).max
    values = np.array([np.nan, -np.nan, np.inf, -np.inf, big, -big], np.float32)
    got = quant.from_bfloat16(quant.to_bfloat16(values))
    assert np.isnan(got[:2]).all() and np.signbit(got[1])
    np.testing.assert_array_equal(got[2:], [np.inf, -np.inf, np.inf, -np.inf])
    signalling = np.array([0x7F800001], np.uint32).view(np.float32)  # a NaN with low bits only
    assert np.isnan(quant.from_bfloat16(quant.to_bfloat16(signalling))).all()


def test_bfloat16_matches_torch_on_random_values() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-30, 30, 100_000))).astype(np.float32)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(quant.to_bfloat16(x), theirs)


@pytest.mark.parametrize("block", [32, 64, 100])
def test_int8_round_trip_is_within_half_a_step_of_each_block(block: int) -> None:
    rng = np.random.default_rng(block)
    m = (rng.standard_t(3, (50, 250)) * 0.1).astype(np.float32)
    m[3, :block] = 0.0  # an all-zero block: scale 0, weights 0
    q, scales = quant.quantize_int8(m, block)
    assert q.shape == m.shape and q.dtype == np.int8 and scales.shape == (50, -(-250 // block))
    assert np.abs(q).max() <= 127 and scales[3, 0] == 0
    back = quant.dequantize_int8(q, scales, block)
    step = np.repeat(scales, block, axis=-1)[:, :250]
    assert (np.abs(back - m) <= step / 2 + 1e-7).all()
    # each block's largest weight is represented exactly up to float rounding
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(m).max(axis=1), rtol=1e-6)


def test_int8_of_a_block_with_nan_or_inf_is_nan() -> None:
    m = np.ones((2, 64), np.float32)
    m[0, 3], m[1, 40] = np.nan, np.inf
    q, scales = quant.quantize_int8(m, 32)
    assert np.isnan(scales[0, 0]) and np.isnan(scales[1, 1])
    assert np.isfinite(scales[0, 1]) and np.isfinite(scales[1, 0])
    back = quant.dequantize_int8(q, scales, 32)
    assert np.isnan(back[0, :32]).all() and (back[0, 32:] == 1).all()


def test_equalizing_inputs_keeps_a_large_input_from_coarsening_its_block() -> None:
    """An input whose weights are all 30x larger (it reads an outlier channel) sets the scale of
    every block it is in; divided out by `equalize` (and multiplied back), its neighbours keep
    their precision, and the matrix it stands for is the same."""
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    m[:, 5] *= 30
    columns = quant.equalize(m)
    assert columns.shape == (96,) and columns.dtype == np.float32 and (columns > 0).all()
    plain = quant.dequantize_int8(*quant.quantize_int8(m))
    equalized = quant.dequantize_int8(*quant.quantize_int8(m / columns)) * columns
    neighbours = np.r_[0:5, 6:32]  # the rest of the large input's block
    error = [np.abs(w - m)[:, neighbours].mean() for w in (plain, equalized)]
    assert error[1] < 0.5 * error[0]
    np.testing.assert_allclose(equalized, m, atol=np.abs(m).max() / 127)


def test_importing_quant_and_the_cli_imports_no_numba() -> None:
    code = (
        "import sys, gpt2cli.quant, gpt2cli.model, gpt2cli.cli; "
        "gpt2cli.quant.check_dtype('int8'); print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_numba_int8_is_one_line_naming_the_fast_extra(tiny_model_dir: Path) -> None:
    code = WITHOUT_NUMBA + (
        "from gpt2cli.errors import GPT2Error\n"
        "from gpt2cli.model import GPT2\n"
        f"GPT2.from_pretrained({str(tiny_model_dir)!r}, dtype='float32')\n"  # float32 still works
        "try:\n"
        f"    GPT2.from_pretrained({str(tiny_model_dir)!r}, dtype='int8')\n"
        "except GPT2Error as e:\n"
        "    sys.exit(f'gpt2: error: {e}')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "dtype int8 needs the fast extra" in lines[0] and "pip install" in lines[0]
    assert "[fast]" in lines[0]


def _entries(folder: Path, dtype: str) -> list[Path]:
    return sorted(folder.glob(f"{dtype}-*.npy"))


def _kl(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-position KL divergence of softmax(logits) from softmax(reference), in nats."""
    p = np.exp(reference - reference.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    log_q = logits - logits.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    log_p = np.log(np.maximum(p, 1e-30))
    kl: np.ndarray = (p * (log_p - log_q)).sum(-1)
    return kl


@needs_numba
@pytest.mark.parametrize(
    ("dtype", "max_kl", "agree"), [("bfloat16", 2e-3, 0.97), ("int8", 1e-2, 0.9)]
)
def test_narrow_models_give_logits_close_to_float32(
    tiny_model_dir: Path, dtype: str, max_kl: float, agree: float
) -> None:
    ours = GPT2.from_pretrained(tiny_model_dir)
    narrow = GPT2.from_pretrained(tiny_model_dir, dtype=dtype)
    assert (ours.dtype, narrow.dtype) == ("float32", dtype)
    ids = np.random.default_rng(0).integers(0, TINY.n_vocab, 100)
    reference, logits = ours(ids), narrow(ids)  # 100 rows: BLAS on widened weights
    assert logits.dtype == np.float32 and logits.shape == reference.shape
    kl = _kl(logits.astype(np.float64), reference.astype(np.float64))
    assert kl.mean() < max_kl
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= agree
    # decoding (a few rows: the kernels) gives what the whole pass gives at each position
    state, step_logits = narrow.prefill([ids[:60], ids[:50]], 64)
    np.testing.assert_allclose(step_logits[0], logits[59], rtol=1e-3, atol=1e-3)
    nxt = np.array([ids[60], ids[50]])
    after = narrow.step(state, nxt)
    np.testing.assert_allclose(after[0], logits[60], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(after[1], logits[50], rtol=1e-3, atol=1e-3)


@needs_numba
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_loading_compiles_every_kernel_decoding_and_prefilling_use(
    tiny_model_dir: Path, dtype: str
) -> None:
    """numba compiles a kernel for each new type of argument (a read-only array is one): what
    the load compiled (announced on a terminal) is all that running needs, nothing mid-run."""
    from gpt2cli import kernels

    model = GPT2.from_pretrained(tiny_model_dir, dtype=dtype)
    compiled = {k.__name__: len(k.signatures) for k in kernels.compiled_kernels()}
    model(np.arange(40))  # 40 rows: widened for BLAS
    state, logits = model.prefill([[1, 2], [3]], 8)
    model.step(state, logits.argmax(-1))  # 2 rows: the kernels
    assert {k.__name__: len(k.signatures) for k in kernels.compiled_kernels()} == compiled


@needs_numba
def test_the_first_run_on_a_terminal_says_it_compiles_and_later_runs_do_not(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.terminal import run_on_terminal

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))  # nothing compiled yet
    args = ["generate", "-m", str(tiny_model_dir), "--dtype", "int8", "-t", "2", "Hello"]
    shown = []
    for _ in range(2):
        status, terminal, _ = run_on_terminal(args, stream="stderr", env=env)
        assert status == 0, terminal
        shown.append(terminal.count("gpt2: compiling the int8 kernels (once)…"))
    assert shown == [1, 0]
    assert any((tmp_path / "numba").rglob("*.nbi"))  # numba's cache, where it was told


@needs_numba
def test_a_float16_checkpoint_loads_as_int8(tmp_path: Path) -> None:
    folder = write_random_gpt2(tmp_path / "f16", TINY, seed=1, tokenizer=False, dtype=np.float16)
    model = GPT2.from_pretrained(folder, dtype="int8")
    logits = model(np.arange(10))
    assert np.isfinite(logits).all() and model.dtype == "int8"


@needs_numba
def test_the_same_weights_in_two_folders_are_converted_and_stored_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    first = GPT2.from_pretrained(tiny_model_dir, dtype="int8")
    second = GPT2.from_pretrained(copy, dtype="int8")
    folder = cache.folder()
    assert folder is not None
    (entry,) = _entries(folder, "int8")
    index = cache.Index.read(folder)
    assert set(index.sources(entry.name)) == {str(tiny_model_dir), str(copy)}
    ids = np.arange(20)
    np.testing.assert_array_equal(first(ids), second(ids))
    GPT2.from_pretrained(copy, dtype="bfloat16")
    assert len(_entries(folder, "bfloat16")) == 1 and len(_entries(folder, "int8")) == 1
    listed = {e.path.name: e.kind for e in cachelist.entries(folder)}  # `gpt2 cache` shows
    assert listed[entry.name] == listed[_entries(folder, "bfloat16")[0].name] == "narrow weights"


@needs_numba
@pytest.mark.parametrize("damage", ["truncate", "zero rows", "not a file"])
def test_a_damaged_entry_is_rebuilt(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = GPT2.from_pretrained(tiny_model_dir, dtype="int8")(np.arange(20))
    folder = cache.folder()
    assert folder is not None
    (entry,) = _entries(folder, "int8")
    size = entry.stat().st_size
    if damage == "truncate":
        with open(entry, "r+b") as f:
            f.truncate(size - 1000)
    elif damage == "zero rows":  # the head's first rows, past the .npy header
        with open(entry, "r+b") as f:
            f.seek(128)
            f.write(b"\0" * 4096)
    else:
        entry.unlink()
        entry.mkdir()
    again = GPT2.from_pretrained(tiny_model_dir, dtype="int8")(np.arange(20))
    np.testing.assert_array_equal(again, good)
    if damage != "not a file":
        assert entry.stat().st_size == size


@needs_numba
def test_a_read_only_cache_only_means_converting_on_each_load(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "cache"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("XDG_CACHE_HOME", str(locked))
    logits = GPT2.from_pretrained(tiny_model_dir, dtype="int8")(np.arange(20))
    assert np.isfinite(logits).all() and not any(locked.iterdir())


@needs_numba
def test_a_cache_that_is_a_file_only_means_converting_on_each_load(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gpt2cli").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    logits = GPT2.from_pretrained(tiny_model_dir, dtype="bfloat16")(np.arange(20))
    assert np.isfinite(logits).all()
