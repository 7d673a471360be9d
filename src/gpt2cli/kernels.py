"""Compiled (numba) products of a few rows with weights in float32, bfloat16 or int8.

Decoding multiplies 1 to 16 rows by every weight matrix, so it is bound by reading the weights:
these kernels read each weight once for all the rows, widen it (int8 times its block's scale;
bfloat16 shifted into a float32's high half) in registers, or for several rows once into a
buffer in L1, and accumulate in float32. Each
matrix is stored as [n_out, n_in] (`gpt2cli.quant.Packed`), so an output is a dot product of
contiguous rows; the outputs are split into CHUNK-row pieces over numba's threads (`prange`).
The widening kernels widen a whole matrix for BLAS, which wins past `quant.KERNEL_ROWS` rows.

Imported only for `dtype="int8"`/`"bfloat16"` (`quant.load_kernels`; `f32_matmul` serves a
float32 `quant.Packed`, which the float32 model does not use yet): numba costs about 0.2 s to
import and compiles each kernel once, into its on-disk cache (`cache=True`), under the user's
cache folder when the package folder is read-only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpt2cli import cache, threads


def _prepare_environment() -> None:
    """Before numba is imported: its cache beside this file, or under the user's cache folder
    when the package folder is read-only; its thread pool the size of the usable cores."""
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    writable = os.access(pycache if pycache.is_dir() else here, os.W_OK)
    folder = cache.folder()
    if not writable and folder is not None:
        os.environ.setdefault("NUMBA_CACHE_DIR", str(folder / "numba"))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads.usable_cores()))


_prepare_environment()

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

_POOL = numba.get_num_threads()  # the threads numba starts (NUMBA_NUM_THREADS): its limit
# outputs per prange iteration: 48 pieces for a 768-output matrix, enough for two threads to
# share the work evenly when one of them runs late
CHUNK = 16
# float32 reassociation (vectorised sums) and fused multiply-adds, but no assumption that values
# are finite: NaN and Inf weights must reach the logits, where GPT2.head reports them
_MATH = {"reassoc", "contract", "arcp"}
_JIT: dict[str, Any] = {"fastmath": _MATH, "cache": True, "nogil": True}

F32 = NDArray[np.float32]


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _dots(x: F32, w: F32, out: F32, j: int) -> None:  # pragma: no cover (compiled)
    """out[:, j] = x @ w: each row of x [m, n] against one weight row w [n], four rows at a
    time so that each weight is loaded once for four products."""
    m = x.shape[0]
    r = 0
    while r + 4 <= m:
        x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(w.shape[0]):
            a0 += x0[k] * w[k]
            a1 += x1[k] * w[k]
            a2 += x2[k] * w[k]
            a3 += x3[k] * w[k]
        out[r, j], out[r + 1, j], out[r + 2, j], out[r + 3, j] = a0, a1, a2, a3
        r += 4
    while r < m:
        xr = x[r]
        a = np.float32(0.0)
        for k in range(w.shape[0]):
            a += xr[k] * w[k]
        out[r, j] = a
        r += 1


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _widen_int8(q: Any, scales: F32, block: int, buf: F32) -> None:  # pragma: no cover
    """buf [n] = the int8 row q [n] times each block's scale (the last block may be shorter)."""
    for b in range(scales.shape[0]):
        s = scales[b]
        qb = q[b * block : (b + 1) * block]
        wb = buf[b * block : (b + 1) * block]
        for t in range(qb.shape[0]):
            wb[t] = np.float32(qb[t]) * s


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _widen_bf16(u: Any, bits: Any) -> None:  # pragma: no cover (compiled)
    """bits [n] (a float32 buffer seen as uint32) = the bfloat16 row u [n] as float32s."""
    for k in range(u.shape[0]):
        bits[k] = np.uint32(u[k]) << np.uint32(16)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def int8_matmul(x: F32, q: Any, scales: F32, block: int, out: F32) -> None:  # pragma: no cover
    """out [m, n_out] = x [m, n_in] @ dequantised(q [n_out, n_in], scales [n_out, n_blocks]).T.

    One row: a dot product per block, scaled, read straight from the int8 weights. More rows:
    each weight row is widened once into a small float32 buffer (in L1), then dotted with all.
    """
    m, n_in = x.shape
    n_out = q.shape[0]
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        buf = np.empty(n_in, np.float32)
        for j in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
            if m == 1:
                x0 = x[0]
                a = np.float32(0.0)
                for b in range(scales.shape[1]):
                    qb = q[j, b * block : (b + 1) * block]
                    xb = x0[b * block : (b + 1) * block]
                    p = np.float32(0.0)
                    for t in range(qb.shape[0]):
                        p += xb[t] * np.float32(qb[t])
                    a += scales[j, b] * p
                out[0, j] = a
            else:
                _widen_int8(q[j], scales[j], block, buf)
                _dots(x, buf, out, j)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def bf16_matmul(x: F32, u: Any, out: F32) -> None:  # pragma: no cover (compiled)
    """out [m, n_out] = x [m, n_in] @ widened(u [n_out, n_in] bfloat16 bits).T."""
    n_in = x.shape[1]
    n_out = u.shape[0]
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        buf = np.empty(n_in, np.float32)
        bits = buf.view(np.uint32)
        for j in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
            _widen_bf16(u[j], bits)
            _dots(x, buf, out, j)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def f32_matmul(x: F32, w: F32, out: F32) -> None:  # pragma: no cover (compiled)
    """out [m, n_out] = x [m, n_in] @ w [n_out, n_in].T."""
    n_out = w.shape[0]
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        for j in range(c * CHUNK, min(n_out, (c + 1) * CHUNK)):
            _dots(x, w[j], out, j)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def int8_widen(q: Any, scales: F32, block: int, out: F32) -> None:  # pragma: no cover
    """out [n_out, n_in] = q [n_out, n_in] times each block's scale, as float32."""
    for j in prange(q.shape[0]):
        _widen_int8(q[j], scales[j], block, out[j])


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def bf16_widen(u: Any, out: F32) -> None:  # pragma: no cover (compiled)
    """out [n_out, n_in] = the bfloat16 bits u [n_out, n_in] as float32."""
    bits = out.view(np.uint32)
    for j in prange(u.shape[0]):
        _widen_bf16(u[j], bits[j])


def use_threads(n: int) -> None:
    """Run the kernels on n threads (1 to the pool's size) from the calling thread on: numba's
    count is per thread, so the thread that runs the model sets it (`threads.kernel_threads`)."""
    n = max(1, min(n, _POOL))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def compiled_kernels() -> list[Any]:
    """Every kernel, for `quant.load_kernels` to compile or load from the cache."""
    return [int8_matmul, bf16_matmul, f32_matmul, int8_widen, bf16_widen]


def is_cached(kernel: Any) -> bool:
    """Whether numba's on-disk cache holds compiled code for `kernel` (its index file exists);
    true when numba's cache cannot be inspected, so that nothing is announced wrongly."""
    try:
        return bool(os.path.exists(kernel._cache._cache_file._index_path))
    except AttributeError:
        return True
