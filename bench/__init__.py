"""`make bench`: gpt2cli beside its references (tiktoken, transformers), measured in one run."""

import gpt2cli  # noqa: F401 (first, as `gpt2` does: it sets OpenBLAS's spin time before NumPy loads)
