"""gpt2cli: GPT-2 text generation as a command-line tool and a small NumPy library.

The public names are imported on first use, so `import gpt2cli` (and `gpt2 --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
