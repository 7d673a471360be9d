"""gpt2cli.weights: every checkpoint layout we accept, and every way a folder can be wrong."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from gpt2cli import cache, quant, weights
from gpt2cli.config import GPT2Config
from gpt2cli.errors import CorruptWeightsError, GPT2Error
from gpt2cli.model import GPT2 as Model
from tests.factory import (
    TINY,
    hf_config,
    random_params,
    write_bf16_gpt2,
    write_random_gpt2,
    write_save_pretrained_gpt2,
    write_sharded_gpt2,
)
from tests.test_jsonfile import within


def flat(params: weights.Params) -> dict[str, np.ndarray]:
    """picoGPT's nested params back as hub keys, to compare with a file read by safetensors."""
    out = {"wte.weight": params["wte"], "wpe.weight": params["wpe"]}
    out |= {"ln_f.weight": params["ln_f"]["g"], "ln_f.bias": params["ln_f"]["b"]}
    names = {"g": "weight", "b": "bias", "w": "weight"}
    for i, block in enumerate(params["blocks"]):
        for part, layers in block.items():
            if part.startswith("ln_"):
                layers = {"": layers}
            for layer, tensors in layers.items():
                prefix = ".".join(p for p in (f"h.{i}", part, layer) if p)
                out |= {f"{prefix}.{names[k]}": v for k, v in tensors.items()}
    if "lm_head" in params:
        out["lm_head.weight"] = params["lm_head"]
    return out


def assert_same(params: weights.Params, expected: dict[str, np.ndarray]) -> None:
    got = flat(params)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float32, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_hub_layout_loads_every_tensor_as_the_file_holds_it(tiny_model_dir: Path) -> None:
    config, params = weights.load(tiny_model_dir)
    assert config == TINY
    assert_same(params, load_file(str(tiny_model_dir / "model.safetensors")))
    assert "lm_head" not in params  # tied to wte


def test_float32_tensors_are_read_only_views_of_the_mapped_file(tiny_model_dir: Path) -> None:
    _, params = weights.load(tiny_model_dir)
    for key, array in flat(params).items():
        base = array
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap), key
        assert not array.flags.writeable, key


def test_picogpt_config_names_are_accepted(tmp_path: Path) -> None:
    folder = write_random_gpt2(tmp_path / "m", TINY, tokenizer=False)
    raw = json.loads((folder / "config.json").read_text())
    raw["n_vocab"], raw["n_ctx"] = raw.pop("vocab_size"), raw.pop("n_positions")
    (folder / "config.json").write_text(json.dumps(raw))
    assert weights.read_config(folder) == TINY


def test_float16_is_widened_to_float32_once(tmp_path: Path) -> None:
    folder = write_random_gpt2(tmp_path / "m", TINY, dtype=np.float16, tokenizer=False)
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["wte.weight"].dtype == np.float16
    _, params = weights.load(folder)
    assert_same(params, {k: v.astype(np.float32) for k, v in stored.items()})


def test_bfloat16_is_widened_exactly_as_torch_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file as load_torch

    folder = write_bf16_gpt2(tmp_path / "m", TINY)
    reference = {k: v.float().numpy() for k, v in load_torch(folder / "model.safetensors").items()}
    _, params = weights.load(folder)
    assert_same(params, reference)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    folder = write_sharded_gpt2(tmp_path / "m", TINY, shards=3)
    assert len(list(folder.glob("model-*-of-00003.safetensors"))) == 3
    _, params = weights.load(folder)
    assert_same(params, random_params(TINY))


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_layout_matches_transformers(tmp_path: Path, tied: bool) -> None:
    import transformers

    folder = write_save_pretrained_gpt2(tmp_path / "m", TINY, tied=tied)
    state = transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()
    reference = {k.removeprefix("transformer."): v.numpy() for k, v in state.items()}
    if tied:  # transformers lists the tied head under its own name; we keep it once, as wte
        np.testing.assert_array_equal(reference.pop("lm_head.weight"), reference["wte.weight"])
    _, params = weights.load(folder)
    assert_same(params, reference)
    assert ("lm_head" in params) is not tied


def rewrite(folder: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Apply `change` to the tensors of `folder`'s model.safetensors and save them again."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_attention_mask_buffers_of_old_checkpoints_are_ignored(tmp_path: Path) -> None:
    folder = write_random_gpt2(tmp_path / "m", TINY, tokenizer=False)
    mask = np.tril(np.ones((1, 1, TINY.n_ctx, TINY.n_ctx), dtype=np.float32))

    def add_buffers(t: dict[str, np.ndarray]) -> None:
        for i in range(TINY.n_layer):  # in any dtype: they are skipped unread
            t[f"h.{i}.attn.bias"] = mask if i else mask.astype(np.uint8)
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)

    rewrite(folder, add_buffers)
    _, params = weights.load(folder)
    assert_same(params, random_params(TINY))


def test_stored_copy_of_a_tied_head_is_not_kept_twice(tmp_path: Path) -> None:
    folder = write_random_gpt2(tmp_path / "m", TINY, tokenizer=False)
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["wte.weight"].copy()}))
    _, params = weights.load(folder)
    assert "lm_head" not in params


def _edit_config(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | changes))


# A string that stands for raw JSON text in a value written by `dumps`: NaN as Python writes it,
# an integer too long for Python to write, nesting too deep for it to write.
RAW = "\x00raw\x00"


def dumps(value: object, raw: str = "") -> str:
    """`value` as JSON text, with the RAW string in it replaced by the JSON text `raw`."""
    return json.dumps(value).replace(json.dumps(RAW), raw)


DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = "9" * 5000


def _config(key: str, raw: str) -> Callable[[Path], None]:
    """Set config.json's `key` to the JSON text `raw`."""

    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(dumps(config | {key: RAW}, raw))

    return damage


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header and data section."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(path: Path, header: str, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header.encode())) + header.encode() + data)


def _header(key: str | None, field: str | None, raw: str) -> Callable[[Path], None]:
    """Set model.safetensors' header entry `key` (or its `field`, or with no key the whole
    header) to the JSON text `raw`; a `field` of "-" is removed instead."""

    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = split(path)
        if key is None:
            text = raw
        elif field == "-":
            text = json.dumps(header | {key: {"shape": header[key]["shape"]}})
        else:
            entry: object = RAW if field is None else header[key] | {field: RAW}
            text = dumps(header | {key: entry}, raw)
        join(path, text, data)

    return damage


def _sharded(folder: Path, weight_map: str | None = None, text: str | None = None) -> None:
    """Replace the single file by two shards and their index; `weight_map` (JSON text) replaces
    the index's weight_map, `text` the whole index."""
    (folder / "model.safetensors").unlink()
    write_sharded_gpt2(folder, TINY, shards=2)
    index = folder / weights.INDEX_FILE
    if weight_map is not None:
        index.write_text(dumps(json.loads(index.read_text()) | {"weight_map": RAW}, weight_map))
    if text is not None:
        index.write_text(text)


def _shard_named(name: object) -> Callable[[Path], None]:
    """An index whose first tensor is said to be in the shard `name`."""

    def damage(folder: Path) -> None:
        _sharded(folder)
        path = folder / weights.INDEX_FILE
        index = json.loads(path.read_text())
        index["weight_map"][next(iter(index["weight_map"]))] = name
        path.write_text(json.dumps(index))

    return damage


def _shape(key: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    return lambda f: rewrite(f, lambda t: t.update({key: np.zeros(shape, np.float32)}))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a zip holding a pickle")


def _lose_a_shard(folder: Path) -> None:
    _sharded(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()


def _replace(name: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    """Put what `make` creates where the file `name` was."""

    def damage(folder: Path) -> None:
        (folder / name).unlink()
        make(folder / name)

    return damage


# (what is wrong, how to break a tiny model folder, a fragment the one-line message must hold)
BROKEN: list[tuple[str, Callable[[Path], None], str]] = [
    ("no config", lambda f: (f / "config.json").unlink(), "config.json: missing; a model folder"),
    (
        "config not json",
        lambda f: (f / "config.json").write_text("{"),
        "config.json is not valid JSON: Expecting property name",
    ),
    ("config not utf-8", lambda f: (f / "config.json").write_bytes(b'{"a": "\xff"}'), "not UTF-8"),
    (
        "config an array",
        lambda f: (f / "config.json").write_text("[1]"),
        "config.json must be a JSON object, not [1]",
    ),
    ("config deep", _config("task_specific_params", DEEP), "config.json nests arrays or objects"),
    ("config 5000 digits", _config("n_embd", DIGITS), "config.json holds an integer of more than"),
    ("config a directory", _replace("config.json", Path.mkdir), "config.json: is a directory"),
    (
        "config symlink loop",
        _replace("config.json", lambda p: p.symlink_to("config.json")),
        "config.json: is a symlink loop, not a file",
    ),
    ("eps NaN", _config("layer_norm_epsilon", "NaN"), "must be a positive finite number, not nan"),
    ("eps Infinity", _config("layer_norm_epsilon", "Infinity"), "positive finite number, not inf"),
    ("eps 1e400", _config("layer_norm_epsilon", "1e400"), "positive finite number, not inf"),
    ("eps -1", _config("layer_norm_epsilon", "-1"), "layer_norm_epsilon must be a positive"),
    ("eps a string", _config("layer_norm_epsilon", '"1e-5"'), "finite number, not '1e-5'"),
    ("n_embd true", _config("n_embd", "true"), "config.json: n_embd must be an integer >= 1"),
    ("n_embd 1.0", _config("n_embd", "32.0"), "n_embd must be an integer >= 1, not 32.0"),
    ("n_head list", _config("n_head", "[4]"), "config.json: n_head must be an integer"),
    ("n_layer 2**64", _config("n_layer", str(2**64)), "not 18446744073709551616"),
    ("n_ctx 10**12", _config("n_positions", "1000000000000"), "implies [1000000000000, 32]"),
    ("n_inner NaN", _config("n_inner", "NaN"), "n_inner nan is not supported"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    ("weights a directory", _replace("model.safetensors", Path.mkdir), "is a directory, not a"),
    (
        "weights a dangling symlink",
        _replace("model.safetensors", lambda p: p.symlink_to("../../blobs/gone")),
        "model.safetensors: is a symlink to ../../blobs/gone, which does not exist",
    ),
    ("pickle only", _pickle_only, "never unpickles"),
    ("missing shard", _lose_a_shard, "00002-of-00002.safetensors: missing, though"),
    (
        "shard outside",
        _shard_named("../outside.safetensors"),
        "index.json: weight_map names '../outside.safetensors'; a shard must be a plain file name",
    ),
    ("shard absolute", _shard_named("/etc/passwd"), "weight_map names '/etc/passwd'; a shard"),
    ("shard in a subfolder", _shard_named("sub/m.safetensors"), "names 'sub/m.safetensors'"),
    ("shard dot-dot", _shard_named(".."), "weight_map names '..'; a shard must be"),
    ("shard backslash", _shard_named("..\\x.safetensors"), "a shard must be a plain file name"),
    ("shard NUL", _shard_named("a\x00b"), "weight_map names 'a\\x00b'"),
    ("shard newline", _shard_named("a\nb"), "weight_map names 'a\\nb'; a shard must be"),
    ("shard a number", _shard_named(5), "index.json: weight_map value must be a string, not 5"),
    ("weight_map a list", lambda f: _sharded(f, "[]"), "weight_map must be a JSON object, not []"),
    ("weight_map empty", lambda f: _sharded(f, "{}"), "index.json: weight_map lists no files"),
    ("no weight_map", lambda f: _sharded(f, text="{}"), "index.json has no 'weight_map'"),
    ("index deep", lambda f: _sharded(f, text=DEEP), "index.json nests arrays or objects"),
    ("index not json", lambda f: _sharded(f, text="{"), "index.json is not valid JSON"),
    (
        "missing tensor",
        lambda f: rewrite(f, lambda t: t.pop("h.1.mlp.c_fc.bias")),
        "missing tensor 'h.1.mlp.c_fc.bias'",
    ),
    (
        "no tensors",
        lambda f: join(f / "model.safetensors", "{}", b""),
        "model.safetensors: missing tensor 'wte.weight'",
    ),
    (
        "wrong shape",
        _shape("wpe.weight", (64, TINY.n_embd)),
        "tensor 'wpe.weight' has shape [64, 32], config.json implies [128, 32]",
    ),
    ("transposed", _shape("h.0.mlp.c_fc.weight", (128, 32)), "'h.0.mlp.c_fc.weight' has shape"),
    (
        "unexpected tensor",
        _shape("h.2.ln_1.weight", (TINY.n_embd,)),
        "unexpected tensor 'h.2.ln_1.weight' for a 2-layer GPT-2",
    ),
    ("empty tensor", _shape("h.0.ln_1.bias", (0,)), "tensor 'h.0.ln_1.bias' is empty"),
    ("truncated", _truncate, "model.safetensors: truncated"),
    (
        "not safetensors",
        lambda f: (f / "model.safetensors").write_text("<html>404</html>"),
        "model.safetensors: not a safetensors file",
    ),
    ("empty file", lambda f: (f / "model.safetensors").write_bytes(b""), "not a safetensors"),
    (
        "header not json",
        _header(None, None, "{]"),
        "model.safetensors: the safetensors header is not valid JSON",
    ),
    ("header an array", _header(None, None, "[]"), "header must be a JSON object, not []"),
    ("header deep", _header("__metadata__", None, DEEP), "header nests arrays or objects"),
    ("header 5000 digits", _header("x", None, DIGITS), "header holds an integer of more than"),
    ("entry a list", _header("ln_f.bias", None, "[]"), "'ln_f.bias' must be a JSON object, not"),
    ("entry without dtype", _header("ln_f.bias", "-", ""), "tensor 'ln_f.bias' has no 'dtype'"),
    ("dtype a list", _header("ln_f.bias", "dtype", '["F32"]'), "dtype must be a string, not ['F"),
    ("shape an object", _header("ln_f.bias", "shape", "{}"), "shape must be a JSON array, not {}"),
    ("shape [true]", _header("ln_f.bias", "shape", "[true]"), "shape must be an integer >= 0"),
    ("shape [NaN]", _header("ln_f.bias", "shape", "[NaN]"), ">= 0, not nan"),
    ("shape [Infinity]", _header("ln_f.bias", "shape", "[Infinity]"), ">= 0, not inf"),
    ("shape [10**30]", _header("ln_f.bias", "shape", str([10**30])), "not 1000000000000000"),
    ("shape [-1]", _header("ln_f.bias", "shape", "[-1]"), ">= 0, not -1"),
    ("shape 40-D", _header("ln_f.bias", "shape", str([1] * 40)), "shape has 40 dimensions"),
    (
        "shape 2**62 squared",
        _header("ln_f.bias", "shape", str([2**62, 2**62])),
        "tensor 'ln_f.bias' has 128 bytes for shape [4611686018427387904, 4611686018427387904]",
    ),
    (
        "offsets past the end",
        _header("ln_f.bias", "data_offsets", "[0, 1000000000000]"),
        "model.safetensors: truncated (",
    ),
    ("offsets [5]", _header("ln_f.bias", "data_offsets", "[5]"), "must be [begin, end], not [5]"),
    ("offsets backwards", _header("ln_f.bias", "data_offsets", "[8, 4]"), "end before they begin"),
    ("offsets 1.5", _header("ln_f.bias", "data_offsets", "[0, 1.5]"), ">= 0, not 1.5"),
    (  # the safetensors library refuses tensors that share bytes; loading them is wrong weights
        "offsets overlap",
        _header("ln_f.bias", "data_offsets", "[0, 128]"),
        "bytes overlap the previous tensor's (data_offsets begin at 0, where 128 was expected)",
    ),
    (
        "bytes after the data",
        lambda f: (f / "model.safetensors").open("ab").write(b"\0" * 4),
        "model.safetensors: 4 bytes after the last tensor's data",
    ),
    (
        "a tensor twice",
        lambda f: rewrite(f, lambda t: t.update({"transformer.wte.weight": t["wte.weight"] * 0})),
        "tensor 'wte.weight' is a second copy of 'wte.weight'",
    ),
    (
        "integer dtype",
        lambda f: rewrite(f, lambda t: t.update({"ln_f.bias": np.zeros(32, np.int32)})),
        "tensor 'ln_f.bias' has dtype 'I32'; supported are F32, F16 and BF16",
    ),
    (
        "float64",
        lambda f: rewrite(f, lambda t: t.update({"ln_f.bias": np.zeros(32, np.float64)})),
        "tensor 'ln_f.bias' has dtype 'F64'",
    ),
    ("model type", lambda f: _edit_config(f, model_type="llama"), "model_type 'llama'"),
    (
        "activation",
        lambda f: _edit_config(f, activation_function="relu"),
        "activation_function 'relu' is not supported",
    ),
    (
        "layer-scaled attention",
        lambda f: _edit_config(f, scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx=True is not supported",
    ),
    ("heads", lambda f: _edit_config(f, n_head=5), "n_embd 32 is not divisible by n_head 5"),
    ("no layers", lambda f: _edit_config(f, n_layer=0), "n_layer must be an integer >= 1"),
]
# The cases whose weight file is damaged: a CorruptWeightsError, which a downloader may fetch anew
CORRUPT = {
    "truncated",
    "not safetensors",
    "empty file",
    "header not json",
    "header an array",
    "header deep",
    "header 5000 digits",
    "entry a list",
    "entry without dtype",
    "dtype a list",
    "shape an object",
    "shape [true]",
    "shape [NaN]",
    "shape [Infinity]",
    "shape [10**30]",
    "shape [-1]",
    "shape 40-D",
    "shape 2**62 squared",
    "offsets past the end",
    "offsets [5]",
    "offsets backwards",
    "offsets 1.5",
    "offsets overlap",
    "bytes after the data",
}


def broken(tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    """A tiny model folder in `tmp_path`, damaged."""
    folder = write_random_gpt2(tmp_path / "model", TINY, tokenizer=False)
    damage(folder)
    return folder


@pytest.mark.parametrize(("name", "damage", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_folder_is_one_line_naming_the_problem(
    tmp_path: Path, name: str, damage: Callable[[Path], None], message: str
) -> None:
    folder = broken(tmp_path, damage)
    with pytest.raises(GPT2Error) as raised:
        weights.load(folder)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text and len(text) < 500
    assert str(folder) in text  # names the folder or the file in it
    assert "download" not in text  # a local folder: nobody knows where it came from
    assert isinstance(raised.value, CorruptWeightsError) is (name in CORRUPT)
    if name in CORRUPT:
        assert raised.value.path == folder / "model.safetensors"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model-00001-of-00002"])
def test_fifo_in_place_of_a_file_is_named_without_blocking(tmp_path: Path, name: str) -> None:
    folder = broken(tmp_path, _sharded if name.startswith("model-") else lambda f: None)
    if name.startswith("model-"):
        name += ".safetensors"
    _replace(name, os.mkfifo)(folder)
    error = within(10, lambda: weights.load(folder))
    assert isinstance(error, GPT2Error)
    assert str(error) == f"{folder / name}: is a FIFO (named pipe), not a file"


def test_shard_symlinked_outside_the_folder_under_a_plain_name_loads(tmp_path: Path) -> None:
    """The hub cache's layout: snapshots/<commit>/<name> -> ../../blobs/<hash>. The rule is on
    the name the index gives; a symlink in the folder is the folder owner's choice."""
    folder = write_sharded_gpt2(tmp_path / "snapshots" / "abc", TINY, shards=2)
    (tmp_path / "blobs").mkdir()
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(tmp_path / "blobs" / shard.name)
        shard.symlink_to(Path("..", "..", "blobs", shard.name))
    _, params = weights.load(folder)
    assert_same(params, random_params(TINY))


def test_nothing_is_ever_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    folder = write_random_gpt2(tmp_path / "m", TINY, tokenizer=False)
    _pickle_only(folder)
    with pytest.raises(GPT2Error, match="never unpickles"):
        weights.load(folder)


# --- fuzzing: mutated config.json, safetensors headers and shard indexes -----------------------

MICRO = GPT2Config(n_vocab=5, n_ctx=3, n_embd=4, n_head=2, n_layer=1)
OUTSIDE = "\x00outside\x00"  # stands for the absolute path of a valid weight file outside
BIG = "\x00big\x00"  # stands for a 5000-digit integer
NESTED = "\x00deep\x00"  # stands for arrays nested 100,000 deep
HOSTILE_VALUES = [
    *(None, True, False, 0, -1, 1, 2, 4, 5, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30)),
    *(0.0, 1.5, 1e-5, 1e400, -1e400, math.nan),
    *("", "F32", "F16", "BF16", "I32", "gpt2", "gelu_new", [], {}, [True], [0, 2**64], [4, 4]),
    *("../outside.safetensors", "/etc/passwd", "..", ".", "a/b", OUTSIDE, BIG, NESTED),
    *("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"),
]
_leaf = st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=4)
HOSTILE = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.recursive(
        _leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c)
    ),
)


def _edit(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one part replaced, removed or added, at a random depth."""
    if isinstance(value, (dict, list)) and value and draw(st.booleans()):
        key = draw(st.sampled_from(list(value) if isinstance(value, dict) else range(len(value))))
        copy = value.copy()
        copy[key] = _edit(draw, value[key])
        return copy
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "remove" and isinstance(value, dict) and value:
        removed = draw(st.sampled_from(list(value)))
        return {k: v for k, v in value.items() if k != removed}
    if action == "add" and isinstance(value, dict):
        return value | {draw(st.sampled_from([*value, "x", "__metadata__"])): draw(HOSTILE)}
    if action == "add" and isinstance(value, list):
        return [*value, draw(HOSTILE)]
    return draw(HOSTILE)


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> str:
    """JSON text of `base` after one to three edits, sometimes cut short."""
    value = base
    for _ in range(draw(st.integers(1, 3))):
        value = _edit(draw, value)
    text = json.dumps(value)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


def _materialize(text: str, outside: Path) -> str:
    """Put the raw JSON the placeholder strings stand for into `text`."""
    raw = {OUTSIDE: json.dumps(str(outside)), BIG: DIGITS, NESTED: DEEP}
    for placeholder, value in raw.items():
        text = text.replace(json.dumps(placeholder), value)
    return text


_OPENED: list[str] | None = None  # files opened while auditing


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `outside.safetensors` (valid MICRO weights, never to be opened) and the
    audit hook that records every file Python opens (hooks cannot be removed: it stays idle)."""
    root = tmp_path_factory.mktemp("fuzz")
    save_file(random_params(MICRO), str(root / "outside.safetensors"))
    sys.addaudithook(_audit)
    return root


def load_audited(folder: Path) -> None:
    """`weights.load(folder)`: it succeeds or raises GPT2Error, and opens nothing outside it."""
    global _OPENED
    _OPENED = []
    try:
        weights.load(folder)
    except GPT2Error as e:
        assert "\n" not in str(e) and len(str(e)) < 1000, str(e)
    finally:
        opened, _OPENED = _OPENED, None
    assert str(folder / "config.json") in opened  # the audit sees the opens it should
    outside = [p for p in opened if os.path.commonpath([p, str(folder)]) != str(folder)]
    assert not outside, outside


FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _micro_folder(root: Path, name: str, *, shards: int = 0) -> Path:
    folder = root / name
    if shards:
        write_sharded_gpt2(folder, MICRO, shards=shards)
    else:
        write_random_gpt2(folder, MICRO, tokenizer=False)
    return folder


@FUZZ
@given(st.data())
def test_fuzzed_config_loads_or_is_one_gpt2error(fuzz_root: Path, data: st.DataObject) -> None:
    folder = fuzz_root / "config"
    if not folder.exists():
        _micro_folder(fuzz_root, "config")
    text = data.draw(mutated(hf_config(MICRO)))
    (folder / "config.json").write_text(_materialize(text, fuzz_root / "outside.safetensors"))
    load_audited(folder)


@FUZZ
@given(st.data())
def test_fuzzed_safetensors_header_loads_or_is_one_gpt2error(
    fuzz_root: Path, data: st.DataObject
) -> None:
    folder = fuzz_root / "header"
    if not folder.exists():
        _micro_folder(fuzz_root, "header")
    header, body = split(fuzz_root / "outside.safetensors")  # the same tensors as the folder's
    text = _materialize(data.draw(mutated(header)), fuzz_root / "outside.safetensors")
    cut = data.draw(st.none() | st.integers(0, len(body)))
    join(folder / "model.safetensors", text, body[:cut])
    if data.draw(st.integers(0, 9)) == 0:  # a length prefix that lies
        with (folder / "model.safetensors").open("r+b") as f:
            f.write(struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))))
    load_audited(folder)


@FUZZ
@given(st.data())
def test_fuzzed_shard_index_loads_or_is_one_gpt2error_and_stays_in_the_folder(
    fuzz_root: Path, data: st.DataObject
) -> None:
    folder, original = fuzz_root / "index", fuzz_root / "original.index.json"
    if not folder.exists():
        _micro_folder(fuzz_root, "index", shards=2)
        original.write_bytes((folder / weights.INDEX_FILE).read_bytes())
    index = json.loads(original.read_text())
    if data.draw(st.booleans()):  # aim at the shard names
        key = data.draw(st.sampled_from(sorted(index["weight_map"])))
        index["weight_map"][key] = data.draw(st.sampled_from(HOSTILE_VALUES) | st.text())
        text = json.dumps(index)
    else:
        text = data.draw(mutated(index))
    (folder / weights.INDEX_FILE).write_text(_materialize(text, fuzz_root / "outside.safetensors"))
    load_audited(folder)


# --- through the `gpt2` command -----------------------------------------------------------------

GPT2 = [sys.executable, "-m", "gpt2cli"]
CLI_CASES = [
    "config not json",
    "config deep",
    "config 5000 digits",
    "config a directory",
    "config symlink loop",
    "eps NaN",
    "n_embd true",
    "shard outside",
    "shard absolute",
    "weight_map a list",
    "dtype a list",
    "shape an object",
    "shape [true]",
    "header deep",
    "offsets past the end",
    "truncated",
]


@pytest.mark.parametrize(
    ("damage", "message"),
    [(*b[1:],) for b in BROKEN if b[0] in CLI_CASES]
    + [(_replace(n, os.mkfifo), "is a FIFO") for n in ("config.json", "model.safetensors")],
    ids=[b[0] for b in BROKEN if b[0] in CLI_CASES] + ["config fifo", "weights fifo"],
)
@pytest.mark.parametrize(
    "command", [["generate", "-m"], ["download"]], ids=["generate", "download"]
)
def test_gpt2_refuses_a_hostile_folder_in_one_line(
    tmp_path: Path, damage: Callable[[Path], None], message: str, command: list[str]
) -> None:
    folder = broken(tmp_path, damage)
    result = subprocess.run(
        [*GPT2, *command, str(folder), *(["hi"] if command[0] == "generate" else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


# the transposed layout of the head and every block's weight matrices, cached in the user's cache
# (weights.transposed_layout)


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user cache of the test's own, `$XDG_CACHE_HOME/gpt2cli`: entries are keyed by
    content, so the session's shared cache may already hold one for the same weights."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gpt2cli"


def _layout_entries() -> list[Path]:
    return sorted(Path(os.environ["XDG_CACHE_HOME"], "gpt2cli").glob("layout-*.npy"))


def _layout(folder: Path) -> tuple[weights.Params, weights.Params]:
    """The folder's params as loaded, and as GPT2.from_pretrained lays them out."""
    _, params = weights.load(folder)
    return params, weights.transposed_layout(params, weights.weight_files(folder))


# with the fast extra the layout holds panels for its kernel (quant.Packed), else transposed copies
PANELS = importlib.util.find_spec("numba") is not None


def _laid_out_matrices(params: weights.Params) -> list[Any]:
    """The matrices transposed_layout lays out: the head, then each block's four (in panels,
    with the fast extra) or two `c_proj` (transposed, without it)."""
    head = params.get("lm_head", params["wte"])
    parts = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
    if not PANELS:
        parts = (("attn", "c_proj"), ("mlp", "c_proj"))
    return [head] + [b[part][name]["w"] for b in params["blocks"] for part, name in parts]


def _stored_values(params: weights.Params) -> int:
    """The float32s the layout's cache entry holds for the loaded `params` (panels pad each
    matrix's outputs to a whole panel)."""
    shapes = [
        m.shape if i == 0 else m.shape[::-1] for i, m in enumerate(_laid_out_matrices(params))
    ]
    if not PANELS:
        return sum(n_out * n_in for n_out, n_in in shapes)
    return sum(-(-n_out // quant.LANES) * quant.LANES * n_in for n_out, n_in in shapes)


def _mapped(a: np.ndarray) -> bool:
    """Whether `a` is a view of a memory-mapped file."""
    base = a.base
    while base is not None and not isinstance(base, np.memmap | mmap.mmap):
        base = getattr(base, "base", None)
    return base is not None and not a.flags.owndata


def _assert_laid_out(loaded: weights.Params, laid_out: weights.Params) -> None:
    """Every array holds the loaded values; the weight matrices as float32 panels or in
    transposed memory order, a view of the one mapped cache file either way; the rest the
    loaded arrays themselves."""
    pairs = zip(_laid_out_matrices(loaded), _laid_out_matrices(laid_out), strict=True)
    for i, (before, after) in enumerate(pairs):
        if PANELS:  # the head is M [V, D] itself, each block's M its w.T
            assert isinstance(after, quant.Packed) and after.dtype == "float32"
            m = before if i == 0 else before.T
            np.testing.assert_array_equal(after[np.arange(len(m))], m)
            assert _mapped(after.data)
        else:
            np.testing.assert_array_equal(after, before)
            assert after.T.flags.c_contiguous and _mapped(after)
    assert laid_out["wpe"] is loaded["wpe"]
    for b_before, b_after in zip(loaded["blocks"], laid_out["blocks"], strict=True):
        assert b_after["ln_1"] is b_before["ln_1"]
        assert b_after["attn"]["c_proj"]["b"] is b_before["attn"]["c_proj"]["b"]


def test_the_transposed_layout_is_made_once_then_memory_mapped_from_the_cache(
    tmp_path: Path, user_cache: Path
):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=11)
    before = set(_layout_entries())
    loaded, laid_out = _layout(folder)
    _assert_laid_out(loaded, laid_out)
    (entry,) = set(_layout_entries()) - before
    made = entry.stat().st_mtime_ns
    loaded, again = _layout(folder)
    _assert_laid_out(loaded, again)
    assert set(_layout_entries()) - before == {entry}  # the second load made nothing new
    assert entry.stat().st_mtime_ns == made  # nor rewrote it


def test_the_laid_out_model_gives_the_loaded_params_logits(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=17)
    loaded, laid_out = _layout(folder)
    ids = np.arange(40) * 997 % TINY.n_vocab
    plain = Model(TINY, loaded)(ids)
    np.testing.assert_allclose(Model(TINY, laid_out)(ids), plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Model.from_pretrained(folder)(ids), plain, rtol=1e-5, atol=1e-5)


def test_rewritten_weights_get_a_new_layout_not_the_stale_one(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=12)
    _layout(folder)
    write_random_gpt2(folder, TINY, seed=13)  # same file, same size, other values
    _assert_laid_out(*_layout(folder))


@pytest.mark.parametrize(
    "damage", ["truncate", "flip-head", "zero-head-input", "flip-c_proj", "fifo"]
)
def test_a_damaged_layout_entry_is_rebuilt_not_used(
    tmp_path: Path, user_cache: Path, damage: str
) -> None:
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=14)
    before = set(_layout_entries())
    loaded, _ = _layout(folder)
    (entry,) = set(_layout_entries()) - before
    if damage == "truncate":
        os.truncate(entry, entry.stat().st_size - 4)
    elif damage != "fifo":  # right size and header, wrong values
        flat = np.load(entry)
        n_vocab, n_embd = loaded["wte"].shape
        head = -(-n_vocab // quant.LANES) * quant.LANES * n_embd if PANELS else n_vocab * n_embd
        if damage == "zero-head-input" and PANELS:  # one input of the head, every output
            flat[:head].reshape(-1, n_embd, quant.LANES)[:, 5] = 0
        elif damage == "zero-head-input":  # of the head's [D, V] copy
            flat[n_vocab * 5 : n_vocab * 6] = 0
        else:
            part = slice(0, head) if damage == "flip-head" else slice(head, None)
            flat[part] = -flat[part]
        np.save(entry, flat)
    else:
        entry.unlink()
        os.mkfifo(entry)
    _assert_laid_out(*within(10, lambda: _layout(folder)))  # type: ignore[misc]


def test_an_unwritable_cache_leaves_the_params_as_loaded(tmp_path: Path, monkeypatch):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=15)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    loaded, laid_out = _layout(folder)
    assert laid_out is loaded


def test_an_untied_head_is_the_one_transposed(tmp_path: Path, user_cache: Path):
    folder = write_save_pretrained_gpt2(tmp_path / "m", TINY, seed=16, tied=False)
    loaded, laid_out = _layout(folder)
    _assert_laid_out(loaded, laid_out)
    assert laid_out["wte"] is loaded["wte"]  # the embedding table stays as it is


def _hub_snapshot(hub: Path, folder: Path) -> Path:
    """`folder`'s files laid out as the Hugging Face cache stores a download: each file a blob
    named by its hash (sha256 for the weights, as for LFS files), the snapshot's names symlinks."""
    repo = hub / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("c0ffee" * 7)[:40]
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in folder.iterdir():
        data = path.read_bytes()
        name = hashlib.sha256(data) if path.suffix == ".safetensors" else hashlib.sha1(data)
        (repo / "blobs" / name.hexdigest()).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("../../blobs", name.hexdigest()))
    return snapshot


def _index(user_cache: Path) -> dict[str, Any]:
    return json.loads((user_cache / "index.json").read_text())


def test_copies_of_the_same_weights_share_one_layout(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=18)
    copy = shutil.copytree(folder, tmp_path / "copy")
    snapshot = _hub_snapshot(tmp_path / "hub", folder)
    for each in (folder, copy, snapshot):
        _assert_laid_out(*_layout(each))
    (entry,) = _layout_entries()
    assert entry.stat().st_size == 128 + 4 * _stored_values(_layout(copy)[0])
    index = _index(user_cache)
    assert index["sources"] == {entry.name: [str(folder), str(copy), str(snapshot)]}
    # the local files were hashed (once: remembered with their identity); the hub's blob is
    # named by its sha256, the same hash, so it needed none
    assert sorted(index["files"]) == sorted(str(f / "model.safetensors") for f in (folder, copy))
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert {known["sha256"] for known in index["files"].values()} == {digest}
    assert (snapshot / "model.safetensors").resolve().name == digest


def test_a_copy_that_differs_anywhere_gets_its_own_layout(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=19)
    copy = shutil.copytree(folder, tmp_path / "copy")
    tensors = load_file(copy / "model.safetensors")
    tensors["h.1.mlp.c_proj.weight"][70, 5] += 1  # a row no check or sample looks at
    save_file(tensors, copy / "model.safetensors")
    _layout(folder)
    loaded, laid_out = _layout(copy)
    _assert_laid_out(loaded, laid_out)
    assert len(_layout_entries()) == 2


def test_a_files_hash_is_remembered_while_the_file_is_unchanged(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=20)
    _layout(folder)
    (entry,) = _layout_entries()
    # the index says the unchanged file has another hash: it is believed (not hashed again),
    # so the layout is made under another name; the layout still holds the file's own values
    index = _index(user_cache)
    (known,) = index["files"].values()
    known["sha256"] = "0" * 64
    (user_cache / "index.json").write_text(json.dumps(index))
    _assert_laid_out(*_layout(folder))
    (other,) = set(_layout_entries()) - {entry}
    # touched, the file is hashed again: its own hash, its first layout
    os.utime(folder / "model.safetensors")
    _assert_laid_out(*_layout(folder))
    assert _index(user_cache)["files"][str(folder / "model.safetensors")]["sha256"] != "0" * 64
    assert _index(user_cache)["sources"] == {entry.name: [str(folder)], other.name: [str(folder)]}


@pytest.mark.parametrize("damage", ["garbage", "fifo", "other-format", "wrong-types"])
def test_a_damaged_index_is_ignored_and_rewritten(tmp_path: Path, user_cache: Path, damage: str):
    folder = write_random_gpt2(tmp_path / "m", TINY, seed=21)
    _layout(folder)
    index = user_cache / "index.json"
    weights_file = str(folder / "model.safetensors")
    identity = _index(user_cache)["files"][weights_file]["identity"]
    index.unlink()
    if damage == "garbage":
        index.write_bytes(b"{\x00 not json")
    elif damage == "fifo":
        os.mkfifo(index)
    elif damage == "other-format":  # a hash it would believe, were the format its own
        forged = {weights_file: {"identity": identity, "sha256": "0" * 64}}
        index.write_text(json.dumps({"format": 99, "files": forged}))
    else:
        index.write_text(json.dumps({"format": 1, "files": {weights_file: 3}, "sources": []}))
    _assert_laid_out(*within(10, lambda: _layout(folder)))  # type: ignore[misc]
    (entry,) = _layout_entries()  # the same one: no forged hash was used
    assert _index(user_cache)["sources"] == {entry.name: [str(folder)]}


def test_two_loads_writing_the_index_at_once_both_are_kept(tmp_path: Path, user_cache: Path):
    folder = write_random_gpt2(tmp_path / "a", TINY, seed=22)
    copies = [shutil.copytree(folder, tmp_path / name) for name in ("b", "c")]
    _layout(folder)
    (entry,) = _layout_entries()
    # two processes loading a copy each: both read the index before either writes it
    indexes = [cache.Index.read(user_cache), cache.Index.read(user_cache)]
    for index, copy in zip(indexes, copies, strict=True):
        index.sha256(copy / "model.safetensors")
        index.derived(entry.name, copy)
    assert all(index.save() for index in indexes)
    index = _index(user_cache)
    assert index["sources"] == {entry.name: [str(f) for f in (folder, *copies)]}
    assert sorted(index["files"]) == [str(f / "model.safetensors") for f in (folder, *copies)]
