"""picoGPT's loader, for porting code written against picoGPT: above `hub` and `weights`,
which stay unaware of it."""

from __future__ import annotations

import os

from gpt2cli import hub, weights
from gpt2cli.tokenizer import Tokenizer, load_tokenizer
from gpt2cli.weights import Params


def load_encoder_hparams_and_params(
    model_size: str, models_dir: str | os.PathLike[str] | None = None
) -> tuple[Tokenizer, dict[str, int], Params]:
    """picoGPT's loader, for porting its code: `(tokenizer, hparams, params)` for a model.

    `model_size` is anything `gpt2cli.hub.resolve` accepts ("124M", "gpt2", "owner/name", a
    folder). `models_dir`, when given, is the Hugging Face cache directory to use instead of the
    default one (`HF_HUB_CACHE`), so picoGPT's `models_dir="models"` keeps its models apart.
    """
    folder = hub.resolve(model_size, cache_dir=models_dir)
    config, params = weights.load(folder)
    hparams = {
        "n_vocab": config.n_vocab,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
    }
    return load_tokenizer(folder), hparams, params
