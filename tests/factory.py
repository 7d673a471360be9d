"""Random-weight GPT-2 checkpoints written to disk the way the hub stores them.

Weights are drawn so that the model behaves like a trained one numerically: logits span tens of
units and attention is far from uniform, so comparisons against transformers are not trivially met
by a model whose logits are all near zero.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gpt2cli.config import GPT2Config

PACKAGE_VOCAB = Path(__file__).resolve().parents[1] / "src" / "gpt2cli" / "data"

TINY = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=32, n_head=4, n_layer=2)
GPT2_124M = GPT2Config()


def random_params(config: GPT2Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Hub-layout tensors (`wte.weight`, `h.0.attn.c_attn.weight`, ...) in Conv1D `[in, out]`."""
    rng = np.random.default_rng(seed)
    d = config.n_embd

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def gain() -> np.ndarray:
        return (1.0 + normal(d, std=0.1)).astype(np.float32)

    params = {
        "wte.weight": normal(config.n_vocab, d, std=0.3),
        "wpe.weight": normal(config.n_ctx, d, std=0.1),
        "ln_f.weight": gain(),
        "ln_f.bias": normal(d, std=0.05),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        params |= {
            p + "ln_1.weight": gain(),
            p + "ln_1.bias": normal(d, std=0.05),
            p + "attn.c_attn.weight": normal(d, 3 * d, std=1.5 / np.sqrt(d)),
            p + "attn.c_attn.bias": normal(3 * d, std=0.05),
            p + "attn.c_proj.weight": normal(d, d, std=0.5 / np.sqrt(d)),
            p + "attn.c_proj.bias": normal(d, std=0.05),
            p + "ln_2.weight": gain(),
            p + "ln_2.bias": normal(d, std=0.05),
            p + "mlp.c_fc.weight": normal(d, 4 * d, std=1.0 / np.sqrt(d)),
            p + "mlp.c_fc.bias": normal(4 * d, std=0.05),
            p + "mlp.c_proj.weight": normal(4 * d, d, std=0.5 / np.sqrt(4 * d)),
            p + "mlp.c_proj.bias": normal(d, std=0.05),
        }
    return params


def heavy_tailed_params(
    config: GPT2Config,
    seed: int = 0,
    *,
    df: float = 4.0,
    outliers: int = 4,
    scale: float = 10.0,
    logit_scale: float = 0.5,
) -> dict[str, np.ndarray]:
    """`random_params` made harder for a weight quantiser, as trained GPT-2's weights are: every
    matrix drawn from Student's t with `df` degrees of freedom (same standard deviation), and
    `outliers` channels of the residual stream whose weights are `scale` times larger. In each
    layer the rows of c_attn and c_fc that read those channels are scaled up and the layer
    norm's gain and bias there scaled down to match (the function is unchanged, the weights
    are not), and so are wte's columns against ln_f; wte is also the input embedding, so those
    channels carry large values along the residual stream, as GPT-2's do. ln_f is scaled by
    `logit_scale` so that the next-token distributions are as spread as a trained model's (a
    few nats of entropy), not the near-certainty of `random_params`' logits."""
    params = random_params(config, seed)
    rng = np.random.default_rng(seed + 1)
    t_std = np.sqrt(df / (df - 2))  # the standard deviation of Student's t
    for name, value in params.items():
        if value.ndim == 2:
            draw = rng.standard_t(df, value.shape) / t_std * value.std()
            params[name] = draw.astype(np.float32)
    channels = rng.choice(config.n_embd, outliers, replace=False)

    def outlier(weight: str, norm: str, rows: bool) -> None:
        if rows:
            params[weight][channels, :] *= scale
        else:
            params[weight][:, channels] *= scale
        for part in ("weight", "bias"):
            params[f"{norm}.{part}"][channels] /= scale

    for i in range(config.n_layer):
        outlier(f"h.{i}.attn.c_attn.weight", f"h.{i}.ln_1", rows=True)
        outlier(f"h.{i}.mlp.c_fc.weight", f"h.{i}.ln_2", rows=True)
    outlier("wte.weight", "ln_f", rows=False)
    for part in ("weight", "bias"):
        params[f"ln_f.{part}"] *= logit_scale
    return params


def hf_config(config: GPT2Config) -> dict[str, object]:
    """`config.json` as transformers writes it for GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.n_vocab,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }


def write_random_gpt2(
    folder: Path,
    config: GPT2Config,
    *,
    seed: int = 0,
    tokenizer: bool = True,
    dtype: type[np.floating] = np.float32,
    heavy_tailed: bool = False,
) -> Path:
    """Write `config.json`, `model.safetensors` and (optionally) the GPT-2 tokenizer files;
    `heavy_tailed` writes `heavy_tailed_params` instead of `random_params`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    draw = heavy_tailed_params if heavy_tailed else random_params
    tensors = {k: v.astype(dtype) for k, v in draw(config, seed).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(PACKAGE_VOCAB / name, folder / name)
    return folder


def _copy_tokenizer(folder: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(PACKAGE_VOCAB / name, folder / name)


def write_sharded_gpt2(folder: Path, config: GPT2Config, *, shards: int = 2, seed: int = 0) -> Path:
    """Write the weights as `model-0000k-of-0000n.safetensors` shards plus their index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    params = random_params(config, seed)
    keys = list(params)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: params[key] for key in keys[k::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(v.nbytes for v in params.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _copy_tokenizer(folder)
    return folder


def write_bf16_gpt2(folder: Path, config: GPT2Config, *, seed: int = 0) -> Path:
    """Write `model.safetensors` in bfloat16, through torch as transformers would save it."""
    import torch
    from safetensors.torch import save_file as save_torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    tensors = {
        k: torch.from_numpy(v).to(torch.bfloat16) for k, v in random_params(config, seed).items()
    }
    save_torch(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(folder)
    return folder


def write_save_pretrained_gpt2(
    folder: Path, config: GPT2Config, *, seed: int = 0, tied: bool = True
) -> Path:
    """Write a folder with transformers' own `GPT2LMHeadModel.save_pretrained`.

    The weights are `random_params`; an untied head gets its own random `lm_head.weight`.
    """
    import torch
    import transformers

    hf = transformers.GPT2Config(**hf_config(config) | {"tie_word_embeddings": tied})
    model = transformers.GPT2LMHeadModel(hf)
    state = {
        "transformer." + k: torch.from_numpy(v) for k, v in random_params(config, seed).items()
    }
    if not tied:
        rng = np.random.default_rng(seed + 1)
        head = rng.standard_normal((config.n_vocab, config.n_embd), dtype=np.float32) * 0.3
        state["lm_head.weight"] = torch.from_numpy(head)
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, loaded
    model.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


def reference_model(folder: Path) -> Any:
    """transformers' GPT2LMHeadModel from `folder`: eager attention, float32, in eval mode."""
    import torch
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    )
    return hf.eval()
