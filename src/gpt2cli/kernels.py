"""Compiled (numba) products of a few rows with weights in float32, bfloat16 or int8.

Decoding multiplies 1 to 16 rows by every weight matrix, so it is bound by reading the weights:
these kernels read each weight once for all the rows and widen it (int8 times its block's scale,
bfloat16 shifted into a float32's high half) in registers.

Matrices are stored in panels (`gpt2cli.quant.panels`): [n_panels, n_in, LANES], LANES outputs
side by side for each input, so one vector load holds one input's weights for LANES outputs, and
each panel is one stream of memory. A panel's outputs accumulate in a tile of TILE_ROWS rows x
LANES outputs kept in registers (`_tile`): each weight is loaded and widened once per TILE_ROWS
rows, and an int8 block's scale multiplies a whole tile of partial sums once per block, not each
weight. Panels are shared out over numba's threads (`prange`). float32 panels read at 36-38 GB/s
on one row where OpenBLAS's matrix-vector product reads 24-25 (124M's matrices, 2 threads).

The widening kernels widen narrow panels into a float32 buffer for BLAS, which wins past
`quant.NARROW_ROWS` rows. Imported only where a kernel runs (`quant.load_kernels`): numba costs
about 0.2 s to import and compiles each kernel once, into its on-disk cache (`cache=True`), under
the user's cache folder when the package folder is read-only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpt2cli import cache, threads
from gpt2cli.quant import LANES


def _prepare_environment() -> None:
    """Before numba is imported: its cache beside this file, or under the user's cache folder
    when the package folder is read-only; its thread pool the size of the usable cores; plain
    error messages."""
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    writable = os.access(pycache if pycache.is_dir() else here, os.W_OK)
    folder = cache.folder()
    if not writable and folder is not None:
        os.environ.setdefault("NUMBA_CACHE_DIR", str(folder / "numba"))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads.usable_cores()))
    # no colorama: numba would otherwise make it write a colour reset to stdout at exit
    os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")


_prepare_environment()

import numba  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

_POOL = numba.get_num_threads()  # the threads numba starts (NUMBA_NUM_THREADS): its limit
# float32 reassociation (vectorised sums) and fused multiply-adds, but no assumption that values
# are finite: NaN and Inf weights must reach the logits, where GPT2.head reports them
_MATH = {"reassoc", "contract", "arcp"}
_JIT: dict[str, Any] = {"fastmath": _MATH, "cache": True, "nogil": True}

F32 = NDArray[np.float32]


def _avx512() -> bool:
    """Whether numba compiles for AVX-512 (the host's features, or NUMBA_CPU_FEATURES when
    set): 32 vector registers of 16 float32s, where AVX2 has 16 of 8."""
    from numba.core import codegen, config

    host: Any = codegen.get_host_cpu_features
    features = getattr(config, "CPU_FEATURES", None)  # "" (NUMBA_CPU_NAME=generic): no AVX
    features = host() if features is None else features
    return "+avx512f" in str(features).split(",")


# rows of x in one tile of accumulators for 2 rows or more (TILE_ROWS x LANES float32s). With
# AVX-512, eight rows (eight of its 32 vector registers): each weight widened once feeds eight
# rows, so a decoding batch of 8 reads each panel once (measured on 124M's head at 5-8 rows:
# 1.25x four rows' speed; its blocks 1.0-1.15x). Elsewhere four: on AVX2 eight rows would take
# all 16 of its registers and spill (a 124M step's products at 8 rows, compiled for AVX2 on
# the AVX-512 machine: int8 1.3-1.6x and bfloat16 1.4-1.8x faster with four rows; two or three
# were slower). One row keeps a tile of ROWS, which LLVM keeps in registers (eight were slower
# there: 0.85-0.9x, AVX-512)
TILE_ROWS = 8 if _avx512() else 4
ROWS = 4  # rows of a one-row kernel's tile


def _stack_tile_typer(typingctx: Any, dtype: Any, rows: Any) -> Any:  # pragma: no cover
    """A pointer to `rows` (a constant) * LANES values of `dtype` on the stack (an alloca):
    unlike an array numba allocates on its heap, LLVM keeps it in registers once the loops over
    it unroll."""
    if not isinstance(rows, types.IntegerLiteral):
        return None
    alloca: Any = cgutils.alloca_once
    pointer: Any = types.CPointer

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        size = context.get_constant(types.intp, rows.literal_value * LANES)
        return alloca(builder, context.get_value_type(dtype.dtype), size=size)

    return pointer(dtype.dtype)(dtype, rows), codegen


_stack_tile: Any = intrinsic(_stack_tile_typer)


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _tile(rows: int) -> F32:  # pragma: no cover (compiled)
    """`rows` (a constant) x LANES float32 accumulators, zeroed, on the stack."""
    tile = numba.carray(_stack_tile(np.float32, rows), (rows, LANES))  # type: ignore[attr-defined]
    _zero(tile)
    return tile


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _zero(tile: F32) -> None:  # pragma: no cover (compiled)
    for i in range(tile.shape[0]):
        for j in range(LANES):
            tile[i, j] = 0


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _store(tile: F32, out: F32, r: int, lo: int) -> None:  # pragma: no cover (compiled)
    """out[r + i, lo + j] = tile[i, j] for the rows and outputs that exist."""
    for i in range(min(tile.shape[0], out.shape[0] - r)):
        for j in range(min(LANES, out.shape[1] - lo)):
            out[r + i, lo + j] = tile[i, j]


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _add(tile: F32, x: F32, r: int, k: int, j: int, v: Any) -> None:  # pragma: no cover
    """Column j of the tile of rows r.. += each row's input k times the weight v (past x's last
    row, its last row again: computed, not stored)."""
    last = x.shape[0] - 1
    for i in range(tile.shape[0]):
        tile[i, j] += x[min(r + i, last), k] * v


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def int8_matmul(x: F32, q: Any, scales: F32, block: int, out: F32) -> None:  # pragma: no cover
    """out [m, n_out] = x [m, n_in] @ M.T, M the int8 panels q [n_panels, n_in, LANES] times
    scales [n_panels, n_blocks, LANES] (one per `block` inputs of each output)."""
    m, n_in = x.shape
    for c in prange(q.shape[0]):
        qc, sc = q[c], scales[c]
        if m == 1:  # one row: four inputs at a time, their products summed before scaling
            total = _tile(ROWS)
            x0 = x[0]
            for b in range(sc.shape[0]):
                sb, k, end = sc[b], b * block, min(n_in, (b + 1) * block)
                while k + 4 <= end:
                    q0, q1, q2, q3 = qc[k], qc[k + 1], qc[k + 2], qc[k + 3]
                    y0, y1, y2, y3 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
                    for j in range(LANES):
                        p = y0 * np.float32(q0[j]) + y1 * np.float32(q1[j])
                        p += y2 * np.float32(q2[j]) + y3 * np.float32(q3[j])
                        total[0, j] += sb[j] * p
                    k += 4
                for t in range(k, end):
                    qt, y0 = qc[t], x0[t]
                    for j in range(LANES):
                        total[0, j] += sb[j] * (y0 * np.float32(qt[j]))
            _store(total, out, 0, c * LANES)
            continue
        total = _tile(TILE_ROWS)
        for r in range(0, m, TILE_ROWS):
            for b in range(sc.shape[0]):
                sb = sc[b]
                for k in range(b * block, min(n_in, (b + 1) * block)):
                    qk = qc[k]
                    for j in range(LANES):
                        _add(total, x, r, k, j, np.float32(qk[j]) * sb[j])
            _store(total, out, r, c * LANES)
            _zero(total)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def panel_matmul(x: F32, u: Any, out: F32) -> None:  # pragma: no cover (compiled)
    """out [m, n_out] = x [m, n_in] @ M.T, M the panels u [n_panels, n_in, LANES] of float32s
    or of bfloat16s (their bits as uint16: `_value`)."""
    m, n_in = x.shape
    for c in prange(u.shape[0]):
        uc = u[c]
        if m == 1:  # one row: four inputs at a time, into four rows of sums (four chains)
            total = _tile(ROWS)
            x0 = x[0]
            for k in range(0, n_in - 3, 4):
                u0, u1, u2, u3 = uc[k], uc[k + 1], uc[k + 2], uc[k + 3]
                y0, y1, y2, y3 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
                for j in range(LANES):
                    total[0, j] += y0 * _value(u0[j])
                    total[1, j] += y1 * _value(u1[j])
                    total[2, j] += y2 * _value(u2[j])
                    total[3, j] += y3 * _value(u3[j])
            for k in range(n_in - n_in % 4, n_in):
                uk, y0 = uc[k], x0[k]
                for j in range(LANES):
                    total[0, j] += y0 * _value(uk[j])
            for j in range(LANES):
                total[0, j] += total[1, j] + total[2, j] + total[3, j]
            _store(total, out, 0, c * LANES)
            continue
        total = _tile(TILE_ROWS)
        for r in range(0, m, TILE_ROWS):
            for k in range(n_in):
                uk = uc[k]
                for j in range(LANES):
                    _add(total, x, r, k, j, _value(uk[j]))
            _store(total, out, r, c * LANES)
            _zero(total)


def _value(v: Any) -> Any:  # pragma: no cover (compiled, as `_typed_value` gives it)
    """A panel's value as float32: a float32 as it is, bfloat16 bits (a uint16) widened."""
    raise NotImplementedError


@overload(_value, inline="always", jit_options={"fastmath": _MATH})
def _typed_value(v: Any) -> Any:  # pragma: no cover (compiled)
    def widened(v: Any) -> Any:
        return _bf16(v)

    def itself(v: Any) -> Any:
        return v

    return widened if v == types.uint16 else itself


@njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _bf16(bits: Any) -> Any:  # pragma: no cover (compiled)
    """The float32 that bfloat16 `bits` (a uint16) stand for."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def int8_widen(q: Any, scales: F32, block: int, out: F32) -> None:  # pragma: no cover
    """out [n_in, n] = the outputs of int8 panels q [n_panels, n_in, LANES] (times scales
    [n_panels, n_blocks, LANES]) side by side, as float32: the first n of them."""
    n = out.shape[1]
    for c in prange(q.shape[0]):
        lo = c * LANES
        width = min(LANES, n - lo)
        qc, sc = q[c], scales[c]
        for b in range(sc.shape[0]):
            sb = sc[b]
            for k in range(b * block, min(q.shape[1], (b + 1) * block)):
                qk, row = qc[k], out[k, lo : lo + width]
                if width == LANES:  # a whole panel: one vector
                    for j in range(LANES):
                        row[j] = np.float32(qk[j]) * sb[j]
                else:
                    for j in range(width):
                        row[j] = np.float32(qk[j]) * sb[j]


@njit(parallel=True, **_JIT)  # type: ignore[untyped-decorator]
def bf16_widen(u: Any, out: F32) -> None:  # pragma: no cover (compiled)
    """out [n_in, n] = the outputs of bfloat16 panels u [n_panels, n_in, LANES] side by side,
    as float32: the first n of them."""
    n = out.shape[1]
    for c in prange(u.shape[0]):
        lo = c * LANES
        width = min(LANES, n - lo)
        uc = u[c]
        for k in range(u.shape[1]):
            uk, row = uc[k], out[k, lo : lo + width]
            if width == LANES:  # a whole panel: one vector
                for j in range(LANES):
                    row[j] = _bf16(uk[j])
            else:
                for j in range(width):
                    row[j] = _bf16(uk[j])


def use_threads(n: int) -> None:
    """Run the kernels on n threads (1 to the pool's size) from the calling thread on: numba's
    count is per thread, so the thread that runs the model sets it (`threads.kernel_threads`)."""
    n = max(1, min(n, _POOL))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def compiled_kernels() -> list[Any]:
    """Every kernel, for `quant.load_kernels` to compile or load from the cache."""
    return [int8_matmul, panel_matmul, int8_widen, bf16_widen]


def is_cached(kernel: Any) -> bool:
    """Whether numba's on-disk cache holds compiled code for `kernel` (its index file exists);
    true when numba's cache cannot be inspected, so that nothing is announced wrongly."""
    try:
        return bool(os.path.exists(kernel._cache._cache_file._index_path))
    except AttributeError:
        return True
