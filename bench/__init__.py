"""`make bench`: gpt2cli beside its references (tiktoken, transformers), measured in one run."""
