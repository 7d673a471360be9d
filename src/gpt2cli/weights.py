"""Load a GPT-2 checkpoint folder (`config.json` + safetensors) into picoGPT's nested NumPy dicts.

float32 tensors are views of the memory-mapped file (zero-copy: pages are read on first touch and
shared with the page cache); float16 and bfloat16 tensors are widened to float32 once. The
safetensors header is parsed here rather than through `safe_open`, whose numpy tensors are copies.
Nothing is ever unpickled: a folder with only `pytorch_model.bin` is refused. Every file is
untrusted: JSON goes through `gpt2cli.jsonfile`, each header field is type- and bounds-checked
before use, and a shard index can name only files in the folder itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from gpt2cli import cache, jsonfile, quant
from gpt2cli.config import GPT2Config
from gpt2cli.errors import CorruptWeightsError, GPT2Error

# {"wte": [V, D], "wpe": [C, D], "blocks": [{"ln_1": {"g", "b"}, "attn": {"c_attn": {"w", "b"},
#  "c_proj": {"w", "b"}}, "ln_2": {"g", "b"}, "mlp": {"c_fc": {"w", "b"}, "c_proj": {"w", "b"}}}],
#  "ln_f": {"g", "b"}} and "lm_head": [V, D] only when the checkpoint's head is not tied to wte;
# `transposed_layout` may replace the head and block matrices by `quant.Packed` float32 panels.
Params = dict[str, Any]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")
NO_PICKLE = (
    "gpt2cli never unpickles checkpoints (loading a pickle can run arbitrary code); "
    "get a model.safetensors: pick a hub revision that has one, or convert it yourself "
    "with safetensors' convert script"
)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
_MAX_DIMS = 32  # numpy 1.x's limit; GPT-2's tensors have 1 or 2

# checkpoint dtype -> (dtype as stored, little-endian); F32 is used in place, the others widened
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
# config.json options that change GPT-2's attention math, with GPT-2's own values
_GPT2_ATTENTION = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
# GPT2Model's causal-mask buffers, saved by old transformers versions: not weights
_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def load(folder: str | os.PathLike[str]) -> tuple[GPT2Config, Params]:
    """Read `folder`'s `config.json` and safetensors weights, every tensor checked against it."""
    folder = Path(folder)
    config = read_config(folder)
    tensors, where = _read_tensors(folder)
    return config, _nest(tensors, config, where)


LAYOUT_FORMAT = 4  # change it when the cached copies' layout changes
_FINGERPRINT_ROWS = 192  # rows of the head hashed into the cache key
# (part, matrix): each block's weights that are laid out anew, in their order in the cache
# entry: both c_proj (transposed), and with the `fast` extra all four (in panels)
_PROJECTIONS = (("attn", "c_proj"), ("mlp", "c_proj"))
_ALL_FOUR = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
_F32 = np.dtype("<f4")


def transposed_layout(params: Params, files: list[Path]) -> Params:
    """`params` with the output head and every block's two `c_proj` weights replaced by the same
    values in transposed memory order (views, `.T`, of contiguous copies), or with the `fast`
    extra installed the head and all four of every block's matrices replaced by `quant.Packed`
    float32 panels for the compiled kernel (a numba that is installed but cannot load leaves
    them to a slower NumPy product): memory-mapped from one file in the user's cache
    (`gpt2cli.cache`), made and stored there on first use. `params` as they are when the cache
    cannot hold it (the model is then only slower).

    Why: BLAS multiplies a few rows by these matrices faster stored transposed (the head [D, V]:
    about 1.5x; `c_proj` as [n_out, n_in], used as w.T @ x.T: 1.1-1.9x, most on AVX2); the
    kernel reads panels faster still (`gpt2cli.kernels`: one row 1.5x OpenBLAS's speed on the
    products, eight 2.5x), and as fast as BLAS at a prefill's 512 rows. The checkpoint's own
    copies of the replaced matrices are not paged in but for the rows the load's check reads
    (a tied head's embedding rows come from its copy too), so memory does not grow. The
    key is the weight files' content: their sha256 (a hub file's blob name; a local file's
    hashed once and remembered by `cache.Index`), so every folder holding the same weights
    shares one copy, with the layout, the matrices' shapes and a hash of sampled head rows; a
    loaded copy is checked against rows of every matrix it holds. The folder is recorded in the
    index as one the copy was derived from, for `gpt2 cache` to show.
    """
    tied = "lm_head" not in params
    head = params["wte"] if tied else params["lm_head"]
    blocks = params["blocks"]
    in_panels = quant.kernels_installed()  # found, not loaded: numba loads at the first product
    parts = _ALL_FOUR if in_panels else _PROJECTIONS
    # (the stored array, whether the product's M [n_out, n_in] is its transpose): the head is M
    stored = [(head, False)] + [(b[part][name]["w"], True) for b in blocks for part, name in parts]
    shapes = [m.shape[::-1] if transposed else m.shape for m, transposed in stored]  # M's
    folder = cache.folder()
    layout = "panels" if in_panels else "transposed"
    key = content_key(f"{LAYOUT_FORMAT} {layout} {shapes}", params, files, folder)
    if key is None or folder is None:
        return params
    digest, index = key
    rows = head_rows(len(head))
    entry = folder / f"layout-{digest}.npy"
    # each M stored as panels [n_panels, n_in, LANES], or the stored array transposed (the head
    # as [D, V], each c_proj as [n_out, n_in])
    copy_shapes = [
        quant.panel_shape(n_out, n_in) if in_panels else m.shape[::-1]
        for (n_out, n_in), (m, _) in zip(shapes, stored, strict=True)
    ]
    sizes = [math.prod(shape) for shape in copy_shapes]
    total = sum(sizes)

    def cached() -> list[np.ndarray] | None:
        flat = load_flat(entry, total)
        if flat is None:
            return None
        ends = np.cumsum(sizes)
        copies = [
            flat[end - size : end].reshape(shape)
            for shape, size, end in zip(copy_shapes, sizes, ends, strict=True)
        ]
        # the head's hashed rows, and each block matrix's first input (beside its bias, which
        # every forward reads)
        head_copy = quant.panel_rows(copies[0], rows) if in_panels else copies[0][:, rows].T
        ok = np.array_equal(head_copy, head[rows], equal_nan=True) and all(
            np.array_equal(_first_input(c, in_panels)[: m.shape[1]], m[0], equal_nan=True)
            for c, (m, _) in zip(copies[1:], stored[1:], strict=True)
        )
        return copies if ok else None

    copies = cached()
    if copies is None:

        def write(f: BinaryIO) -> None:
            header = {"descr": "<f4", "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(f, header)
            for (m, transposed), (n_out, n_in) in zip(stored, shapes, strict=True):
                if not in_panels:
                    f.write(np.ascontiguousarray(m.T).data)
                    continue
                # a piece of whole panels at a time: no second copy of every weight in memory
                step = quant.LANES * quant.piece_panels(n_in)
                for lo in range(0, n_out, step):
                    f.write(quant.panels(quant.matrix_rows(m, transposed, lo, lo + step)).data)

        if cache.store(entry, write):
            copies = cached()
    if copies is None:
        index.save()  # the hashes at least
        return params
    index.derived(entry.name, files[0].parent)
    index.save()
    if in_panels:
        laid_out_copies = [
            quant.Packed("float32", c, n_out) for c, (n_out, _) in zip(copies, shapes, strict=True)
        ]
    else:
        laid_out_copies = [c.T for c in copies]
    replaced = iter(laid_out_copies[1:])  # in the order of `stored`
    laid_out = []
    for b in blocks:  # new dicts: the loaded `params` stay as they are
        b = {**b, **{part: dict(b[part]) for part, _ in parts}}
        for part, name in parts:
            b[part][name] = {**b[part][name], "w": next(replaced)}
        laid_out.append(b)
    return {**params, "blocks": laid_out, ("wte" if tied else "lm_head"): laid_out_copies[0]}


def _first_input(copy: np.ndarray, in_panels: bool) -> np.ndarray:
    """The weights of a block matrix's first input for every output (the checkpoint's first
    row of w [n_in, n_out]), from its copy: panels (padded past n_out) or [n_out, n_in]."""
    first: np.ndarray = copy[:, 0, :].reshape(-1) if in_panels else copy[:, 0]
    return first


def head_rows(n: int) -> np.ndarray:
    """The rows of an n-row head hashed into a cache key: three runs of rows (start, middle,
    end), not rows spread evenly: the kernel maps file pages in whole folios of up to
    megabytes, so touching 256 rows across the table would bring nearly all of it into memory,
    the copy the cached layouts exist to avoid reading."""
    run = min(n, _FINGERPRINT_ROWS // 3)
    return np.unique(np.concatenate([np.arange(s, s + run) for s in (0, (n - run) // 2, n - run)]))


def content_key(
    kind: str, params: Params, files: list[Path], folder: Path | None
) -> tuple[str, cache.Index] | None:
    """The name (32 hex digits) of a cache entry derived from `params` loaded from `files`, and
    the cache's index (to record the entry's source folder and save): a hash of `kind` (the
    entry's format and shapes), the files' sha256 (`cache.Index`) and sampled rows of the
    head. None when the cache folder cannot be made or the files cannot be hashed."""
    if folder is None:
        return None
    head = params["lm_head"] if "lm_head" in params else params["wte"]
    key = hashlib.sha256(kind.encode())
    try:
        folder.mkdir(parents=True, exist_ok=True)  # else hashing the weights would be for nothing
        index = cache.Index.read(folder)
        key.update(" ".join(index.sha256(path) for path in files).encode())
    except OSError:
        return None
    key.update(np.ascontiguousarray(head[head_rows(len(head))]).tobytes())
    return key.hexdigest()[:32], index


def load_flat(entry: Path, n: int, dtype: np.dtype[Any] = _F32) -> np.ndarray | None:
    """A cached .npy of n values of `dtype` (one-byte or little-endian), memory-mapped; else
    None when it is missing, of another shape, dtype or size (truncated), or unreadable."""
    f = cache.open_entry(entry, dtype.itemsize * n + 4096)
    if f is None:
        return None
    with f:
        try:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                return None
            header = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
            if header != ((n,), False, dtype) or os.fstat(f.fileno()).st_size != (
                offset + dtype.itemsize * n
            ):
                return None
            return np.asarray(np.memmap(f, dtype, "r", offset, (n,)))
        except (OSError, ValueError):
            return None


def read_config(folder: Path) -> GPT2Config:
    """Parse `config.json` (transformers' names or picoGPT's) into a GPT2Config."""
    path = folder / "config.json"
    raw = jsonfile.mapping(
        jsonfile.read(
            path,
            missing="missing; a model folder needs config.json next to its safetensors weights",
        ),
        str(path),
    )
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GPT2Error(
            f"{path}: model_type {jsonfile.show(model_type)} is not supported; "
            "gpt2cli runs GPT-2 models only"
        )
    activation = raw.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise GPT2Error(
            f"{path}: activation_function {jsonfile.show(activation)} is not supported; "
            "gpt2cli implements GPT-2's gelu_new only"
        )
    for option, gpt2 in _GPT2_ATTENTION.items():
        if raw.get(option, gpt2) != gpt2:
            raise GPT2Error(
                f"{path}: {option}={jsonfile.show(raw[option])} is not supported "
                f"(GPT-2 uses {gpt2})"
            )

    def integer(*names: str) -> int:
        """The first of `names` that is set (picoGPT's names come second), a positive integer."""
        for name in names:
            if raw.get(name) is not None:
                return jsonfile.integer(raw[name], f"{path}: {name}", minimum=1)
        raise GPT2Error(f"{path}: needs a positive integer {' or '.join(names)}")

    n_embd, n_head = integer("n_embd"), integer("n_head")
    if n_embd % n_head:
        raise GPT2Error(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}")
    n_inner = raw.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise GPT2Error(
            f"{path}: n_inner {jsonfile.show(n_inner)} is not supported (GPT-2 uses 4 * n_embd)"
        )
    eps = raw.get("layer_norm_epsilon", 1e-5)
    return GPT2Config(
        n_vocab=integer("vocab_size", "n_vocab"),
        n_ctx=integer("n_positions", "n_ctx"),
        n_embd=n_embd,
        n_head=n_head,
        n_layer=integer("n_layer"),
        layer_norm_epsilon=jsonfile.positive_number(eps, f"{path}: layer_norm_epsilon"),
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding `folder`'s weights: one file, or the shards of the index.

    Each is checked to be a regular file (or a symlink to one, as in the hub cache). A shard must
    be named by a plain file name: the index cannot point outside the folder.
    """
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if os.path.lexists(single):  # whatever it is: check_file says so if it is not a file
        jsonfile.check_file(single)
        return [single]
    if os.path.lexists(index):
        raw = jsonfile.mapping(jsonfile.read(index), str(index))
        weight_map = jsonfile.mapping(
            jsonfile.field(raw, "weight_map", str(index)), f"{index}: weight_map"
        )
        names = sorted({_shard_name(index, name) for name in weight_map.values()})
        if not names:
            raise GPT2Error(f"{index}: weight_map lists no files")
        for name in names:
            jsonfile.check_file(folder / name, missing=f"missing, though {INDEX_FILE} lists it")
        return [folder / name for name in names]
    if any(os.path.lexists(folder / name) for name in PICKLE_FILES):
        raise GPT2Error(f"{folder}: has PyTorch/TF weights but no {SINGLE_FILE}; {NO_PICKLE}")
    raise GPT2Error(f"{folder}: no {SINGLE_FILE} (or {INDEX_FILE} with its shards)")


def _shard_name(index: Path, name: Any) -> str:
    """A shard's file name from the index, refused unless it names a file in the folder itself.

    The rule is on the name: `../x`, `/x`, `a/b` (or `a\\b`) and names with control characters
    are refused before anything is opened, while a plain name may still be a symlink, as every
    file in the hub cache is (into ../../blobs).
    """
    shard = jsonfile.string(name, f"{index}: weight_map value")
    if shard in ("", ".", "..") or "/" in shard or "\\" in shard or not shard.isprintable():
        raise GPT2Error(
            f"{index}: weight_map names {jsonfile.show(shard)}; a shard must be a plain file name "
            "in the model folder"
        )
    return shard


def _read_tensors(folder: Path) -> tuple[dict[str, tuple[np.ndarray, Path]], str]:
    """Every tensor in the folder's weight files, by key with `transformer.` stripped, and the
    files' names for messages."""
    files = weight_files(folder)
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for path in files:
        for key, array in read_safetensors(path, skip=_BUFFER).items():
            name = key.removeprefix("transformer.")
            if name in tensors:  # `wte.weight` and `transformer.wte.weight`, or across shards
                raise GPT2Error(
                    f"{path}: tensor {jsonfile.show(key)} is a second copy of "
                    f"{jsonfile.show(name)} (first in {tensors[name][1]}); which one is meant?"
                )
            tensors[name] = (array, path)
    return tensors, ", ".join(map(str, files))


def read_safetensors(path: Path, skip: re.Pattern[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file as float32: views of the mapped file for F32 ones.

    Tensors whose key `skip` finds are left out unread, whatever their dtype. A file whose bytes
    do not form a safetensors file raises CorruptWeightsError; a missing one, or a FIFO or
    directory in its place, GPT2Error.
    """
    try:
        with jsonfile.open_file(path) as f, _corrupt(path):
            size = os.fstat(f.fileno()).st_size
            header, start = _header(f, path, size)
            entries = {
                key: _entry(path, key, info, start, size)
                for key, info in header.items()
                if key != "__metadata__"
            }
            _check_tiling(path, list(entries.values()), start, size)
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GPT2Error(f"{path}: cannot be read ({e.strerror})") from None
    return {
        key: _tensor(buffer, path, entry)
        for key, entry in entries.items()
        if not (skip and skip.search(key))
    }


def _check_tiling(path: Path, entries: list[_Entry], start: int, size: int) -> None:
    """The tensors' bytes must tile the data section, from `start` to the end of the file, with
    no overlap and no gap, as the safetensors library demands: a damaged or forged header whose
    tensors share bytes would otherwise load as silently wrong weights."""
    at = start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != at:
            how = "overlap" if entry.begin < at else "leave a gap after"
            raise GPT2Error(
                f"{path}: tensor {entry.name}'s bytes {how} the previous tensor's (data_offsets "
                f"begin at {entry.begin - start}, where {at - start} was expected)"
            )
        at = entry.end
    if at != size:
        raise GPT2Error(f"{path}: {size - at} bytes after the last tensor's data")


@contextlib.contextmanager
def _corrupt(path: Path) -> Iterator[None]:
    """Raise each GPT2Error of the block as a CorruptWeightsError of `path`."""
    try:
        yield
    except CorruptWeightsError:
        raise
    except GPT2Error as e:
        raise CorruptWeightsError(str(e), path) from None


def _header(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (an 8-byte length, then the JSON) and where the
    data section after it starts."""
    head = f.read(8)
    if len(head) < 8:
        raise GPT2Error(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise GPT2Error(
            f"{path}: not a safetensors file, or truncated (its header claims {n} bytes; "
            f"the file has {size - 8} after the header's 8-byte length)"
        )
    header = jsonfile.parse(f.read(n), f"{path}: the safetensors header")
    return jsonfile.mapping(header, f"{path}: the safetensors header"), 8 + n


class _Entry(NamedTuple):
    """A safetensors header entry, checked: its bytes lie inside the file."""

    name: str  # the tensor's key, quoted for messages
    dtype: str
    shape: list[int]
    begin: int  # offsets of its bytes in the file
    end: int


def _entry(path: Path, key: str, info: Any, start: int, size: int) -> _Entry:
    """A header entry checked for types and bounds; `start` is where the data section begins."""
    name = jsonfile.show(key)
    where = f"{path}: tensor {name}"
    entry = jsonfile.mapping(info, where)
    dtype = jsonfile.string(jsonfile.field(entry, "dtype", where), f"{where}: dtype")
    dims = jsonfile.array(jsonfile.field(entry, "shape", where), f"{where}: shape")
    if len(dims) > _MAX_DIMS:
        raise GPT2Error(f"{where}: shape has {len(dims)} dimensions, more than {_MAX_DIMS}")
    shape = [jsonfile.integer(n, f"{where}: shape") for n in dims]
    offsets = jsonfile.array(jsonfile.field(entry, "data_offsets", where), f"{where}: data_offsets")
    if len(offsets) != 2:
        raise GPT2Error(f"{where}: data_offsets must be [begin, end], not {jsonfile.show(offsets)}")
    begin, end = (jsonfile.integer(n, f"{where}: data_offsets") for n in offsets)
    if begin > end:
        raise GPT2Error(f"{where}: data_offsets {jsonfile.show(offsets)} end before they begin")
    if start + end > size:
        raise GPT2Error(
            f"{path}: truncated ({size} bytes; tensor {name} ends at byte {start + end})"
        )
    return _Entry(name, dtype, shape, start + begin, start + end)


def _tensor(buffer: mmap.mmap, path: Path, entry: _Entry) -> np.ndarray:
    """One checked header entry as a float32 array."""
    if entry.dtype not in _DTYPES:
        raise GPT2Error(
            f"{path}: tensor {entry.name} has dtype {jsonfile.show(entry.dtype)}; "
            "supported are F32, F16 and BF16"
        )
    dtype, shape = _DTYPES[entry.dtype], entry.shape
    count = math.prod(shape)
    if not count:
        raise GPT2Error(f"{path}: tensor {entry.name} is empty (shape {shape})")
    if entry.end - entry.begin != count * dtype.itemsize:
        raise CorruptWeightsError(
            f"{path}: tensor {entry.name} has {entry.end - entry.begin} bytes for shape {shape}",
            path,
        )
    array: np.ndarray = np.frombuffer(buffer, dtype, count, entry.begin).reshape(shape)
    if entry.dtype == "F16":
        array = array.astype(np.float32)
    elif entry.dtype == "BF16":  # bfloat16 is the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif not array.flags.aligned:  # the format does not promise alignment; numpy is slow without
        array = array.copy()
    return array


def _nest(tensors: dict[str, tuple[np.ndarray, Path]], config: GPT2Config, where: str) -> Params:
    """Arrange flat checkpoint keys into picoGPT's nested dict, checking each key and shape;
    `where` names the weight files for messages."""
    d, v = config.n_embd, config.n_vocab
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise GPT2Error(f"{where}: missing tensor {key!r}; is this a GPT-2 checkpoint?")
        array, path = tensors[key]
        if array.shape != shape:
            raise GPT2Error(
                f"{path}: tensor {key!r} has shape {list(array.shape)}, "
                f"config.json implies {list(shape)}"
            )
        used.add(key)
        return array

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {"w": take(prefix + ".weight", (n_in, n_out)), "b": take(prefix + ".bias", (n_out,))}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"g": take(prefix + ".weight", (d,)), "b": take(prefix + ".bias", (d,))}

    params: Params = {
        "wte": take("wte.weight", (v, d)),
        "wpe": take("wpe.weight", (config.n_ctx, d)),
        "blocks": [
            {
                "ln_1": norm(f"h.{i}.ln_1"),
                "attn": {
                    "c_attn": linear(f"h.{i}.attn.c_attn", d, 3 * d),
                    "c_proj": linear(f"h.{i}.attn.c_proj", d, d),
                },
                "ln_2": norm(f"h.{i}.ln_2"),
                "mlp": {
                    "c_fc": linear(f"h.{i}.mlp.c_fc", d, 4 * d),
                    "c_proj": linear(f"h.{i}.mlp.c_proj", 4 * d, d),
                },
            }
            for i in range(config.n_layer)
        ],
        "ln_f": norm("ln_f"),
    }
    # save_pretrained keeps lm_head outside the `transformer.` prefix; a tied head is usually
    # left out of the file, but some writers store a copy, which we drop rather than use twice
    if "lm_head.weight" in tensors:
        head = take("lm_head.weight", (v, d))
        if not np.array_equal(head, params["wte"]):
            params["lm_head"] = head
    extra = sorted(set(tensors) - used)
    if extra:
        raise GPT2Error(
            f"{tensors[extra[0]][1]}: unexpected tensor {jsonfile.show(extra[0])} for a "
            f"{config.n_layer}-layer GPT-2; does config.json match the weights?"
        )
    return params
