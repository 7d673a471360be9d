"""Weights in panels for the compiled kernels: float32, or a narrower dtype, bfloat16 or int8.

Decoding reads every weight once per token, so it runs at the speed of memory: half the bytes
(bfloat16) or a quarter and a little (int8) decode up to 2x or 4x faster. Only the matrices of
the products narrow (each block's c_attn, c_proj, c_fc and c_proj, and the output head, which is
the embedding when tied); activations, layer norms, biases, softmax and the KV cache stay
float32, and the products accumulate in float32.

- bfloat16: float32's top 16 bits, rounded to nearest, ties to even (`to_bfloat16`).
- int8: weight-only and symmetric, one float32 scale per BLOCK consecutive input weights of each
  output (ggml's q8_0 uses 32): w ~= scale * q with q in [-127, 127] (`quantize_int8`), after
  each input's weights are divided by a factor of its own (`equalize`), which multiplies the
  input instead: an input whose weights are all large no longer coarsens its block's steps
  (on the heavy-tailed fixture, 0.42x the KL divergence).

A matrix is a `Packed` M [n_out, n_in] stored in panels (`panels`: LANES outputs side by side
for each input, the layout the kernels read with vector loads). float32 panels (the float32
layout with the `fast` extra, `weights.transposed_layout`) go through `gpt2cli.kernels` at any
number of rows; narrow ones up to NARROW_ROWS rows, more through BLAS, on a float32 copy
widened a piece at a time into a reused buffer. The narrow weights are converted once and kept
in the user's cache (`pack`), keyed by the weights' content.

This module imports no numba: `check_dtype` and the names are cheap; `load_kernels` imports it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from gpt2cli import cache
from gpt2cli.errors import GPT2Error, missing_extra

DTYPES = ("float32", "bfloat16", "int8")
# int8: input weights per scale, as ggml's q8_0. Measured on 124M-shaped heavy-tailed weights
# (docs/performance.md), mean KL divergence from float32 over 1,024 tokens: 32 0.013, 64 0.026,
# 128 0.042, 256 0.047 nats; a 1-row product with the head took 1.7x as long at 32 as at 128
BLOCK = 32
# products of up to this many rows run on the bfloat16 and int8 kernels; more rows (a prefill)
# widen the weights for BLAS, which is faster there (measured, int8, 124M's shapes: at 64 rows
# the kernel took 0.5-1.4x the time of widening and BLAS for block matrices and 0.5x for the
# head, at 128 rows 1.2-3x and 0.75x). float32 panels take any number of rows on the kernel,
# which nothing widens: 0.35-0.6x BLAS's time up to 128 rows, 0.98-1.07x at 512 (AVX-512;
# compiled for AVX2, 1.1x at 512), where copying the panels for BLAS cost 1.15-1.2x
NARROW_ROWS = 64
# bytes of float32 widened at a time for BLAS: a whole block matrix, the head in pieces
WIDEN_BYTES = 16 << 20
# outputs side by side in a panel: one AVX-512 vector of float32s (two AVX2 ones)
LANES = 16
PACK_FORMAT = 3  # change it when the cached narrow weights' layout changes
_ALIGN = 64  # bytes: each array in a cache entry starts on a cache line
_CHECK_ROWS = 16  # rows of each matrix (at its start and middle) compared on loading

Array = NDArray[np.float32]
_NARROW: dict[str, np.dtype[Any]] = {"bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}


def check_dtype(name: str) -> str:
    """`name` if it is one of DTYPES, else a GPT2Error listing them."""
    if name not in DTYPES:
        raise GPT2Error(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def to_bfloat16(x: NDArray[Any]) -> NDArray[np.uint16]:
    """The bfloat16 bits nearest to float32 `x`, ties to even; Inf stays Inf, values past
    bfloat16's largest round to Inf, and NaN stays NaN (made quiet, sign kept)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    with np.errstate(over="ignore"):  # only NaNs wrap (their bits are past 0xFF800000)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out: NDArray[np.uint16] = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return out


def from_bfloat16(u: NDArray[np.uint16]) -> Array:
    """bfloat16 bits as float32 (exact: bfloat16 is a float32's high half)."""
    widened: Array = (u.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return widened


def equalize(m: Array) -> Array:
    """Per-input factors c [n_in] for quantising m [n_out, n_in] as (m / c) * c: the square
    root of each input's largest magnitude. Inputs whose weights are all large (the channels
    that read an outlier of the residual stream, scaled up where its layer norm is scaled
    down) would otherwise set the scale of every block they fall in, coarsening their
    neighbours' steps; divided out, they quantise like the rest, and x * c restores them."""
    largest = np.abs(m).max(axis=0)  # [n_in]
    usable = np.isfinite(largest) & (largest > 0)
    columns: Array = np.where(usable, np.sqrt(np.where(usable, largest, 1.0)), 1.0)
    return columns.astype(np.float32)


def panel_shape(n_out: int, n_in: int) -> tuple[int, int, int]:
    """The shape of an [n_out, n_in] matrix's panels: [ceil(n_out / LANES), n_in, LANES]."""
    return -(-n_out // LANES), n_in, LANES


def piece_panels(n_in: int) -> int:
    """Panels of n_in inputs in one piece of at most WIDEN_BYTES of float32 (one at least): what
    is widened, or written, at a time."""
    return max(1, WIDEN_BYTES // (4 * n_in * LANES))


def panels(m: NDArray[Any]) -> NDArray[Any]:
    """m [n_out, n] as panels [ceil(n_out / LANES), n, LANES]: panel c holds outputs c * LANES
    to c * LANES + LANES - 1 side by side for each of the n inputs (zeros past n_out)."""
    n_out, n = m.shape
    padded = np.zeros((panel_shape(n_out, n)[0] * LANES, n), m.dtype)
    padded[:n_out] = m
    return np.ascontiguousarray(padded.reshape(-1, LANES, n).transpose(0, 2, 1))


def panel_rows(p: NDArray[Any], ids: Any) -> NDArray[Any]:
    """Rows `ids` (an int array) of the matrix that panels p hold: [..., n]."""
    ids = np.asarray(ids)
    rows: NDArray[Any] = p[ids // LANES, :, ids % LANES]
    return rows


def quantize_int8(m: Array, block: int = BLOCK) -> tuple[NDArray[np.int8], Array]:
    """m [n_out, n_in] as int8 q [n_out, n_in] and scales [n_out, ceil(n_in / block)]: each
    block of `block` consecutive weights of a row scaled so that its largest magnitude is 127.
    A block holding NaN or Inf gets a NaN scale, so its products are NaN (GPT2.head reports it)."""
    rows, cols = m.shape
    pad = -cols % block
    blocks = np.pad(m, ((0, 0), (0, pad))).reshape(rows, -1, block)  # [n_out, n_blocks, block]
    with np.errstate(invalid="ignore"):
        scales = (np.abs(blocks).max(axis=-1) / 127).astype(np.float32)  # [n_out, n_blocks]
    scales[~np.isfinite(scales)] = np.nan
    inverse = np.divide(1, scales, out=np.zeros_like(scales), where=scales > 0)
    with np.errstate(invalid="ignore"):
        q = np.rint(blocks * inverse[..., None])  # NaN where the scale is NaN
    q = np.nan_to_num(q, nan=0.0).clip(-127, 127).astype(np.int8)
    return q.reshape(rows, -1)[:, :cols], scales


def dequantize_int8(q: NDArray[np.int8], scales: Array, block: int = BLOCK) -> Array:
    """The float32 weights [..., n_in] that int8 q [..., n_in] and its scales stand for."""
    widened: Array = q.astype(np.float32)
    widened *= np.repeat(scales, block, axis=-1)[..., : q.shape[-1]]
    return widened


@dataclass(frozen=True, eq=False)
class Packed:
    """A weight matrix M [n_out, n_in] used as `x @ M.T`, stored in `panels` [n_panels, n_in,
    LANES] of `dtype`: float32, the bfloat16 bits (uint16), or int8 with `scales` [n_panels,
    n_blocks, LANES] for blocks of `block` inputs.

    `linear(x, b)` is the product; `m[ids]` widens rows, the embedding lookup of a tied head.
    """

    dtype: str
    data: NDArray[Any]  # panels [n_panels, n_in, LANES]
    outputs: int  # n_out (the last panel may be part padding)
    scales: Array | None = None  # [n_panels, n_blocks, LANES], int8 only
    block: int = BLOCK
    columns: Array | None = None  # [n_in]: M = data's values times these (int8: `equalize`)

    @property
    def shape(self) -> tuple[int, int]:
        return self.outputs, self.data.shape[1]

    def __getitem__(self, ids: Any) -> Array:
        """Rows `ids` (ints) of M as float32 [..., n_in]."""
        if self.dtype == "int8":
            assert self.scales is not None
            q, scales = panel_rows(self.data, ids), panel_rows(self.scales, ids)
            widened = dequantize_int8(q, scales, self.block)
            if self.columns is not None:
                widened *= self.columns
            return widened
        if self.dtype == "bfloat16":
            return from_bfloat16(panel_rows(self.data, ids))
        rows: Array = panel_rows(self.data, ids)
        return rows

    def linear(self, x: Array, b: Array | None = None) -> Array:
        """x [..., n_in] @ M.T (+ b [n_out]) -> [..., n_out], in float32."""
        n_out, n_in = self.shape
        rows = x.reshape(-1, n_in)  # [m, n_in]
        if self.columns is not None:  # (x * c) @ data.T = x @ (data * c).T
            rows = rows * self.columns
        rows = np.ascontiguousarray(rows, np.float32)
        out = np.empty((len(rows), n_out), np.float32)  # [m, n_out]
        if self.dtype == "float32" and not float32_kernels():  # numba broken: NumPy, slower
            each = np.matmul(rows, self.data)  # [n_panels, m, LANES]
            out[:] = each.swapaxes(0, 1).reshape(len(rows), each.shape[0] * LANES)[:, :n_out]
        elif self.dtype == "float32" or len(rows) <= NARROW_ROWS:
            _kernel_product(self, rows, out)
        else:
            for lo, widened in self._pieces():  # [n_in, n] float32, n <= WIDEN_BYTES / 4 n_in
                np.matmul(rows, widened, out=out[:, lo : lo + widened.shape[1]])
        if b is not None:
            out += b
        return out.reshape(*x.shape[:-1], n_out)

    def _pieces(self) -> Iterator[tuple[int, Array]]:
        """M.T widened to float32 a piece of panels at a time, in one buffer reused by each call
        on this thread: (first output, M.T's columns [n_in, n] for n outputs). Widening costs
        about a tenth of the BLAS products that follow (measured in CPU time over a 256-token
        prefill: int8 1.01-1.06 s, float32 0.92-1.0 s)."""
        from gpt2cli import kernels

        n_out, n_in = self.shape
        step = piece_panels(n_in)
        buffer = _scratch(step * LANES * n_in)
        # on this thread alone: between BLAS products, OpenBLAS's other threads still spin on
        # the other cores, and a kernel thread there waits for its turn (measured with their
        # spin cut to 0.3 ms, OPENBLAS_THREAD_TIMEOUT=20: a 1,024-token int8 prefill at 346-376
        # tok/s on two threads, 428-478 on one)
        kernels.use_threads(1)
        for c in range(0, len(self.data), step):
            part = self.data[c : c + step]
            lo = c * LANES
            n = min(n_out - lo, len(part) * LANES)
            out = buffer[: n_in * n].reshape(n_in, n)
            if self.dtype == "int8":
                assert self.scales is not None
                kernels.int8_widen(part, self.scales[c : c + step], self.block, out)
            else:
                kernels.bf16_widen(part, out)
            yield lo, out


_local = threading.local()


def _scratch(n: int) -> Array:
    """A float32 buffer of at least n values, this thread's, reused from call to call."""
    buffer: Array | None = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < n:
        buffer = _local.buffer = np.empty(n, np.float32)
    return buffer


def _kernel_product(m: Packed, rows: Array, out: Array) -> None:
    """out = rows @ M.T on the compiled kernels, on this thread's chosen count of threads."""
    from gpt2cli import kernels, threads

    kernels.use_threads(threads.kernel_threads())
    if m.dtype == "int8":
        kernels.int8_matmul(rows, m.data, m.scales, m.block, out)
    else:
        kernels.panel_matmul(rows, m.data, out)


def kernels_installed() -> bool:
    """Whether the `fast` extra's numba is installed (found, not imported: that takes 0.2 s)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def float32_kernels() -> bool:
    """Whether the float32 kernel can run (the `fast` extra is installed), loading it once: a
    float32 model is laid out in panels for it when the extra is installed
    (`weights.transposed_layout`) and otherwise runs on BLAS alone, so a missing or broken
    extra is no error here."""
    if not kernels_installed():
        return False
    try:
        load_kernels("float32")
    except Exception:  # an optional speed-up: any failure means BLAS, as without the extra
        return False
    return True


def load_kernels(dtype: str) -> None:
    """Import `gpt2cli.kernels` and compile the ones `dtype` uses (or load them from numba's
    cache), saying so in one line on a terminal when they must be compiled (the first run: tens
    of seconds). A GPT2Error naming the `fast` extra when numba is not installed."""
    try:
        from gpt2cli import kernels
    except ImportError as e:
        if e.name == "numba" or (e.name or "").startswith("numba."):
            raise missing_extra("fast", f"dtype {dtype}") from None
        raise GPT2Error(f"dtype {dtype} needs numba, which cannot be imported: {e}") from None
    chosen = {
        "int8": [kernels.int8_matmul, kernels.int8_widen],
        "bfloat16": [kernels.panel_matmul, kernels.bf16_widen],
        "float32": [kernels.panel_matmul],
    }[dtype]
    terminal = sys.stderr is not None and sys.stderr.isatty()
    if terminal and not all(kernels.is_cached(k) for k in chosen):
        print(f"gpt2: compiling the {dtype} kernels (once)…", file=sys.stderr, flush=True)
    with _without_scipy():
        for kernel in chosen:  # one tiny call each: compiled (or loaded) now, not mid-generation
            _warm(kernels, kernel, dtype)


@contextlib.contextmanager
def _without_scipy() -> Iterator[None]:
    """numba's first compile or cache load imports scipy.linalg, when installed, to offer BLAS
    inside kernels, which ours do not use: 0.25 s of a start-up's 0.7. Unless it is already
    imported, it is made unimportable meanwhile (numba then offers no BLAS, and says nothing)."""
    name = "scipy.linalg"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def _warm(kernels: Any, kernel: Any, dtype: str) -> None:
    """Call `kernel` once on tiny arrays of the types the model passes it: numba compiles one
    version per type, and the weights are read-only (memory-mapped, or made so by `pack`)."""
    x, out = np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)
    data = np.zeros((1, 2, LANES), _NARROW.get(dtype, np.dtype("<f4")))
    scales = np.zeros((1, 1, LANES), np.float32)
    data.flags.writeable = scales.flags.writeable = False
    if kernel is kernels.int8_matmul:
        kernel(x, data, scales, BLOCK, out)
    elif kernel is kernels.int8_widen:
        kernel(data, scales, BLOCK, np.zeros((2, 2), np.float32))
    elif kernel is kernels.bf16_widen:
        kernel(data, np.zeros((2, 2), np.float32))
    else:
        kernel(x, data, out)


# --- the narrow weights, converted once and kept in the user's cache ---------------------------


def _matrices(params: dict[str, Any]) -> list[tuple[Array, bool]]:
    """The matrices that narrow, as (array, is_transposed): the head [V, D] as it is, then each
    block's c_attn, c_proj, c_fc and c_proj weights [n_in, n_out], transposed when packed."""
    head = params["lm_head"] if "lm_head" in params else params["wte"]
    found: list[tuple[Array, bool]] = [(head, False)]
    for b in params["blocks"]:
        found += [
            (b["attn"]["c_attn"]["w"], True),
            (b["attn"]["c_proj"]["w"], True),
            (b["mlp"]["c_fc"]["w"], True),
            (b["mlp"]["c_proj"]["w"], True),
        ]
    return found


def matrix_rows(m: Array, transposed: bool, lo: int, hi: int, cols: slice = slice(None)) -> Array:
    """Rows lo:hi (columns `cols`) of the packed matrix M (m.T when `transposed`) as float32,
    reading only those elements of the checkpoint's pages."""
    part = m[cols, lo:hi].T if transposed else m[lo:hi, cols]
    return np.ascontiguousarray(part, np.float32)


def _convert(
    dtype: str, rows: Array, block: int, columns: Array | None = None
) -> list[NDArray[Any]]:
    """Rows of M in `dtype`: [bits] for bfloat16, [q, scales] of rows / columns for int8."""
    if dtype == "bfloat16":
        return [to_bfloat16(rows)]
    return list(quantize_int8(rows / columns if columns is not None else rows, block))


def _convert_matrix(dtype: str, m: Array, transposed: bool, block: int) -> list[NDArray[Any]]:
    """The packed matrix M (m.T when `transposed`) in `dtype`, as the arrays `_layout` names,
    converted a piece of rows at a time (float32 temporaries stay small)."""
    n_out = m.shape[1] if transposed else m.shape[0]
    n_in = m.shape[0] if transposed else m.shape[1]
    step = max(1, WIDEN_BYTES // (4 * n_in))
    ranges = range(0, n_out, step)
    columns = None
    if dtype == "int8":
        largest = [np.abs(matrix_rows(m, transposed, lo, lo + step)).max(axis=0) for lo in ranges]
        columns = equalize(np.stack(largest))
    pieces = [
        _convert(dtype, matrix_rows(m, transposed, lo, lo + step), block, columns) for lo in ranges
    ]
    arrays = [panels(np.concatenate(parts)) for parts in zip(*pieces, strict=True)]
    return arrays if columns is None else [*arrays, columns[None]]


Layout = list[tuple[np.dtype[Any], tuple[int, ...]]]


def _layout(dtype: str, shape: tuple[int, int], block: int) -> Layout:
    """The arrays one matrix of `shape` [n_out, n_in] is stored as, in order: its panels (and
    for int8 its scales' panels and the inputs' factors)."""
    n_panels, n_in, _ = grid = panel_shape(*shape)
    data = (_NARROW[dtype], grid)
    if dtype == "bfloat16":
        return [data]
    f4 = np.dtype("<f4")
    return [data, (f4, (n_panels, -(-n_in // block), LANES)), (f4, (1, n_in))]


def pack(
    params: dict[str, Any], dtype: str, files: list[Path], block: int = BLOCK
) -> dict[str, Any]:
    """`params` with the head and every block's four matrices as `Packed` in `dtype` (bfloat16
    or int8), memory-mapped from one file in the user's cache, converted and stored there on
    first use; converted in memory when the cache cannot hold them (every load converts then).

    The entry is keyed by the weight files' content (their sha256, as for the transposed layout:
    the same weights in two folders are stored once), the format, dtype, block and shapes. A
    loaded entry must have the expected size and hold what converting rows of each matrix
    gives (a few rows each, so loading reads few of the checkpoint's pages): a truncated or
    stale entry is rebuilt.
    """
    from gpt2cli import weights

    matrices = _matrices(params)
    shapes = [(m.shape[::-1] if t else m.shape) for m, t in matrices]
    layouts = [_layout(dtype, shape, block) for shape in shapes]
    spans = _spans(layouts)
    total = spans[-1][-1][1]
    folder = cache.folder()
    key = weights.content_key(f"{PACK_FORMAT} {dtype} {block} {shapes}", params, files, folder)
    arrays = None
    if key is not None and folder is not None:
        digest, index = key
        entry = folder / f"{dtype}-{digest}.npy"
        arrays = _cached(entry, total, layouts, spans, matrices, dtype, block)
        if arrays is None and cache.store(
            entry, lambda f: _write(f, total, matrices, spans, dtype, block)
        ):
            arrays = _cached(entry, total, layouts, spans, matrices, dtype, block)
        if arrays is not None:
            index.derived(entry.name, files[0].parent)
        index.save()
    if arrays is None:  # no cache: converted in memory, on every load
        arrays = [_convert_matrix(dtype, m, t, block) for m, t in matrices]
        for array in (a for matrix in arrays for a in matrix):
            array.flags.writeable = False  # as memory-mapped ones: one compiled kernel for both
    packed = [_packed(dtype, a, block, shape[0]) for a, shape in zip(arrays, shapes, strict=True)]
    return _replace(params, packed)


def _packed(dtype: str, arrays: list[NDArray[Any]], block: int, n_out: int) -> Packed:
    if dtype == "int8":
        return Packed(dtype, arrays[0], n_out, arrays[1], block, arrays[2][0])
    return Packed(dtype, arrays[0], n_out, block=block)


def _spans(
    layouts: list[Layout],
) -> list[list[tuple[int, int]]]:
    """Each array's (start, end) byte offsets in the entry's data, each start aligned."""
    at, spans = 0, []
    for layout in layouts:
        matrix = []
        for dtype, shape in layout:
            at = -(-at // _ALIGN) * _ALIGN
            matrix.append((at, at + dtype.itemsize * int(np.prod(shape))))
            at = matrix[-1][1]
        spans.append(matrix)
    return spans


def _write(
    f: BinaryIO,
    total: int,
    matrices: list[tuple[Array, bool]],
    spans: list[list[tuple[int, int]]],
    dtype: str,
    block: int,
) -> None:
    """Write the entry: a .npy header for `total` bytes, then each matrix converted, one at a
    time (one narrow matrix in memory, not every one)."""
    np.lib.format.write_array_header_1_0(
        f, {"descr": "|u1", "fortran_order": False, "shape": (total,)}
    )
    start = f.tell()
    for (m, transposed), matrix_spans in zip(matrices, spans, strict=True):
        arrays = _convert_matrix(dtype, m, transposed, block)
        for array, (begin, _) in zip(arrays, matrix_spans, strict=True):
            f.write(b"\0" * (start + begin - f.tell()))
            f.write(array.tobytes())


def _cached(
    entry: Path,
    total: int,
    layouts: list[Layout],
    spans: list[list[tuple[int, int]]],
    matrices: list[tuple[Array, bool]],
    dtype: str,
    block: int,
) -> list[list[NDArray[Any]]] | None:
    """The entry's arrays, memory-mapped, if it is whole and holds what converting a few rows
    of each matrix gives; else None."""
    from gpt2cli import weights

    flat = weights.load_flat(entry, total, np.dtype("u1"))
    if flat is None:
        return None
    arrays: list[list[NDArray[Any]]] = [
        [flat[b:e].view(d).reshape(shape) for (d, shape), (b, e) in zip(layout, sp, strict=True)]
        for layout, sp in zip(layouts, spans, strict=True)
    ]
    for (m, transposed), stored in zip(matrices, arrays, strict=True):
        n_out = m.shape[1] if transposed else m.shape[0]
        n_in = stored[0].shape[1]
        cols = slice(0, min(block, n_in))
        for lo in (0, n_out // 2):
            ids = np.arange(lo, min(n_out, lo + _CHECK_ROWS))
            columns = stored[2][0, cols] if dtype == "int8" else None
            part = matrix_rows(m, transposed, lo, ids[-1] + 1, cols)
            expected = _convert(dtype, part, block, columns)
            got = [
                panel_rows(s, ids)[:, c]
                for s, c in zip(stored[:2], (cols, slice(0, 1)), strict=False)
            ]
            if not all(
                np.array_equal(a, b, equal_nan=True) for a, b in zip(expected, got, strict=True)
            ):
                return None
    return arrays


def _replace(params: dict[str, Any], packed: list[Packed]) -> dict[str, Any]:
    """`params` with the matrices of `_matrices` replaced by `packed`, in that order (new dicts:
    the loaded `params` stay as they are)."""
    it = iter(packed)
    head = next(it)
    blocks = []
    for b in params["blocks"]:
        attn = {**b["attn"], "c_attn": {**b["attn"]["c_attn"], "w": next(it)}}
        attn["c_proj"] = {**b["attn"]["c_proj"], "w": next(it)}
        mlp = {**b["mlp"], "c_fc": {**b["mlp"]["c_fc"], "w": next(it)}}
        mlp["c_proj"] = {**b["mlp"]["c_proj"], "w": next(it)}
        blocks.append({**b, "attn": attn, "mlp": mlp})
    return {**params, "blocks": blocks, ("lm_head" if "lm_head" in params else "wte"): head}
