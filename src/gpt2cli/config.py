"""GPT-2's hyperparameters, with the names the checkpoints and picoGPT use."""

from dataclasses import dataclass


@dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2 model; the defaults are the 124M model's."""

    n_vocab: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_ctx: int = 1024  # positions in wpe: the hard limit on prompt + generated tokens
    n_embd: int = 768  # width of the residual stream
    n_head: int = 12  # attention heads; each is n_embd // n_head wide
    n_layer: int = 12  # transformer blocks
    layer_norm_epsilon: float = 1e-5  # added to the variance in every layer norm

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Parameters in the weights (tied head counted once), e.g. 124,439,808 for GPT-2 124M."""
        d = self.n_embd
        block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.n_vocab * d + self.n_ctx * d + self.n_layer * block + 2 * d


def too_long(n_tokens: int, n_ctx: int, *, room: bool = True) -> str:
    """The message for a prompt that does not fit the context (`room`: leaving a new token)."""
    most = n_ctx - 1 if room else n_ctx
    why = " to leave room to generate" if room else ""
    return (
        f"prompt is {n_tokens} tokens but the model's context is {n_ctx} tokens; "
        f"shorten it to at most {most} tokens{why}, or truncate it to its last tokens"
    )
