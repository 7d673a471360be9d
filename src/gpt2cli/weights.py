"""Load a GPT-2 checkpoint folder (`config.json` + safetensors) into picoGPT's nested NumPy dicts.

float32 tensors are views of the memory-mapped file (zero-copy: pages are read on first touch and
shared with the page cache); float16 and bfloat16 tensors are widened to float32 once. The
safetensors header is parsed here rather than through `safe_open`, whose numpy tensors are copies.
Nothing is ever unpickled: a folder with only `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error

if TYPE_CHECKING:
    from gpt2cli.tokenizer import Tokenizer

# {"wte": [V, D], "wpe": [C, D], "blocks": [{"ln_1": {"g", "b"}, "attn": {"c_attn": {"w", "b"},
#  "c_proj": {"w", "b"}}, "ln_2": {"g", "b"}, "mlp": {"c_fc": {"w", "b"}, "c_proj": {"w", "b"}}}],
#  "ln_f": {"g", "b"}} and "lm_head": [V, D] only when the checkpoint's head is not tied to wte.
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
    tensors = _read_tensors(folder)
    return config, _nest(tensors, config)


def read_config(folder: Path) -> GPT2Config:
    """Parse `config.json` (transformers' names or picoGPT's) into a GPT2Config."""
    path = folder / "config.json"
    if not path.is_file():
        raise GPT2Error(
            f"{path}: missing; a model folder needs config.json next to its safetensors weights"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GPT2Error(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise GPT2Error(f"{path}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise GPT2Error(
            f"{path}: model_type {model_type!r} is not supported; gpt2cli runs GPT-2 models only"
        )
    activation = raw.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise GPT2Error(
            f"{path}: activation_function {activation!r} is not supported; "
            "gpt2cli implements GPT-2's gelu_new only"
        )
    for option, gpt2 in _GPT2_ATTENTION.items():
        if raw.get(option, gpt2) != gpt2:
            raise GPT2Error(
                f"{path}: {option}={raw[option]!r} is not supported (GPT-2 uses {gpt2})"
            )

    def integer(*names: str) -> int:
        for name in names:
            value = raw.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        raise GPT2Error(f"{path}: needs a positive integer {' or '.join(names)}")

    n_embd, n_head = integer("n_embd"), integer("n_head")
    if n_embd % n_head:
        raise GPT2Error(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}")
    n_inner = raw.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise GPT2Error(f"{path}: n_inner {n_inner} is not supported (GPT-2 uses 4 * n_embd)")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise GPT2Error(f"{path}: layer_norm_epsilon must be a positive number, not {eps!r}")
    return GPT2Config(
        n_vocab=integer("vocab_size", "n_vocab"),
        n_ctx=integer("n_positions", "n_ctx"),
        n_embd=n_embd,
        n_head=n_head,
        n_layer=integer("n_layer"),
        layer_norm_epsilon=float(eps),
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding `folder`'s weights: one file, or the shards of the index."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise GPT2Error(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise GPT2Error(f"{folder / missing[0]}: missing, though {INDEX_FILE} lists it")
        return [folder / n for n in names]
    if any((folder / name).is_file() for name in PICKLE_FILES):
        raise GPT2Error(f"{folder}: has PyTorch/TF weights but no {SINGLE_FILE}; {NO_PICKLE}")
    raise GPT2Error(f"{folder}: no {SINGLE_FILE} (or {INDEX_FILE} with its shards)")


def _read_tensors(folder: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Every tensor in the folder's weight files, by key with `transformer.` stripped."""
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for path in weight_files(folder):
        for key, array in read_safetensors(path, skip=_BUFFER).items():
            tensors[key.removeprefix("transformer.")] = (array, path)
    return tensors


def read_safetensors(path: Path, skip: re.Pattern[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file as float32: views of the mapped file for F32 ones.

    Tensors whose key `skip` finds are left out unread, whatever their dtype.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise GPT2Error(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise GPT2Error(
                    f"{path}: not a safetensors file, or truncated (header of {n} bytes "
                    f"in a {size}-byte file); download it again"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise GPT2Error(f"{path}: not a safetensors file (header is not JSON)") from None
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GPT2Error(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise GPT2Error(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return {
        key: _tensor(buffer, 8 + n, size, path, key, info)
        for key, info in header.items()
        if not (skip and skip.search(key))
    }


def _tensor(
    buffer: mmap.mmap, start: int, size: int, path: Path, key: str, info: Any
) -> np.ndarray:
    """One header entry as a float32 array; `start` is where the data section begins."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if not all(isinstance(n, int) and n >= 0 for n in [*shape, begin, end]):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise GPT2Error(f"{path}: tensor {key!r} has a malformed header entry") from None
    if dtype_name not in _DTYPES:
        raise GPT2Error(
            f"{path}: tensor {key!r} has dtype {dtype_name}; supported are F32, F16 and BF16"
        )
    dtype = _DTYPES[dtype_name]
    count = math.prod(shape)
    if end - begin != count * dtype.itemsize:
        raise GPT2Error(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape}")
    if start + end > size:
        raise GPT2Error(
            f"{path}: truncated ({size} bytes, tensor {key!r} ends at byte {start + end}); "
            "download it again"
        )
    array: np.ndarray = np.frombuffer(buffer, dtype, count, start + begin).reshape(shape)
    if dtype_name == "F16":
        array = array.astype(np.float32)
    elif dtype_name == "BF16":  # bfloat16 is the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif not array.flags.aligned:  # the format does not promise alignment; numpy is slow without
        array = array.copy()
    return array


def _nest(tensors: dict[str, tuple[np.ndarray, Path]], config: GPT2Config) -> Params:
    """Arrange flat checkpoint keys into picoGPT's nested dict, checking each key and shape."""
    d, v = config.n_embd, config.n_vocab
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            where = ", ".join(sorted({str(p) for _, p in tensors.values()})) or "the weights"
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
            f"{tensors[extra[0]][1]}: unexpected tensor {extra[0]!r} for a {config.n_layer}-layer "
            "GPT-2; does config.json match the weights?"
        )
    return params


def load_encoder_hparams_and_params(
    model_size: str, models_dir: str | os.PathLike[str] | None = None
) -> tuple[Tokenizer, dict[str, int], Params]:
    """picoGPT's loader, for porting its code: `(tokenizer, hparams, params)` for a model.

    `model_size` is anything `gpt2cli.hub.resolve` accepts ("124M", "gpt2", "owner/name", a
    folder). `models_dir`, when given, is the Hugging Face cache directory to use instead of the
    default one (`HF_HUB_CACHE`), so picoGPT's `models_dir="models"` keeps its models apart.
    """
    from gpt2cli import hub
    from gpt2cli.tokenizer import load_tokenizer

    folder = hub.resolve(model_size, cache_dir=models_dir)
    config, params = load(folder)
    hparams = {
        "n_vocab": config.n_vocab,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
    }
    return load_tokenizer(folder), hparams, params
