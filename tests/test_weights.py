"""gpt2cli.weights: every checkpoint layout we accept, and every way a folder can be wrong."""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2cli import weights
from gpt2cli.errors import GPT2Error
from tests.factory import (
    TINY,
    random_params,
    write_bf16_gpt2,
    write_random_gpt2,
    write_save_pretrained_gpt2,
    write_sharded_gpt2,
)


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


def _shape(key: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    return lambda f: rewrite(f, lambda t: t.update({key: np.zeros(shape, np.float32)}))


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a zip holding a pickle")


def _lose_a_shard(folder: Path) -> None:
    for path in folder.glob("model*.safetensors"):
        path.unlink()
    write_sharded_gpt2(folder, TINY, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()


# (what is wrong, how to break a tiny model folder, a fragment the one-line message must hold)
BROKEN: list[tuple[str, Callable[[Path], None], str]] = [
    ("no config", lambda f: (f / "config.json").unlink(), "config.json: missing"),
    ("config not json", lambda f: (f / "config.json").write_text("{"), "not a readable JSON"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    ("pickle only", _pickle_only, "never unpickles"),
    ("missing shard", _lose_a_shard, "00002-of-00002.safetensors: missing, though"),
    (
        "missing tensor",
        lambda f: rewrite(f, lambda t: t.pop("h.1.mlp.c_fc.bias")),
        "missing tensor 'h.1.mlp.c_fc.bias'",
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
    ("truncated", _truncate, "model.safetensors: truncated"),
    (
        "not safetensors",
        lambda f: (f / "model.safetensors").write_text("<html>404</html>"),
        "model.safetensors: not a safetensors file",
    ),
    ("empty file", lambda f: (f / "model.safetensors").write_bytes(b""), "not a safetensors"),
    (
        "integer dtype",
        lambda f: rewrite(f, lambda t: t.update({"ln_f.bias": np.zeros(32, np.int32)})),
        "tensor 'ln_f.bias' has dtype I32; supported are F32, F16 and BF16",
    ),
    (
        "float64",
        lambda f: rewrite(f, lambda t: t.update({"ln_f.bias": np.zeros(32, np.float64)})),
        "tensor 'ln_f.bias' has dtype F64",
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
    ("no layers", lambda f: _edit_config(f, n_layer=0), "needs a positive integer n_layer"),
]


def broken(tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    """A tiny model folder in `tmp_path`, damaged."""
    folder = write_random_gpt2(tmp_path / "model", TINY, tokenizer=False)
    damage(folder)
    return folder


@pytest.mark.parametrize(("damage", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_folder_is_one_line_naming_the_problem(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    folder = broken(tmp_path, damage)
    with pytest.raises(GPT2Error) as raised:
        weights.load(folder)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    assert str(folder) in text  # names the folder or the file in it


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
