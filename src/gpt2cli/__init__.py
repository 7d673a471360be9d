"""gpt2cli: GPT-2 text generation as a command-line tool and a small NumPy library.

The public names are imported on first use, so `import gpt2cli` (and `gpt2 --help`) stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) after each product before they
# sleep, and the compiled kernels' threads that run next on the same cores wait for them: the
# first decode steps after a prefill ran slower. 2^20 cycles (about 0.3 ms) still spans the gaps
# between a decode step's products (measured, 124M: float32 batch 1 unchanged, batch-8 decoding
# on the kernels 1.15-1.25x and int8 1.1-1.25x faster, prefill 1.07x). OpenBLAS reads it when
# NumPy is first imported, so it is set before any of our modules imports NumPy; a value the
# user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

_EXPORTS = {
    "GPT2Error": "gpt2cli.errors",
    "GPT2Config": "gpt2cli.config",
    "GPT2": "gpt2cli.model",
    "Tokenizer": "gpt2cli.tokenizer",
    "generate_text": "gpt2cli.generate",
}

__all__ = ["GPT2", "GPT2Config", "GPT2Error", "Tokenizer", "__version__", "generate_text"]

if TYPE_CHECKING:
    from gpt2cli.config import GPT2Config
    from gpt2cli.errors import GPT2Error
    from gpt2cli.generate import generate_text
    from gpt2cli.model import GPT2
    from gpt2cli.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt2cli' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
