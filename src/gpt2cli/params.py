"""A generation request's options, checked once: the one place for their ranges and messages.

`GenerationParams` is immutable and valid from the moment it exists: `gpt2 generate`, `--jsonl`
rows and `gpt2 serve` each read their options (Click, JSON rows, request bodies check the types)
and build one, and a bad value is a `ParamError` naming the option, which each front end words
its own way (a usage error, an invalid row, a 400 with `param`). `fit_prompt` is the rule for a
prompt in the context: what is kept of it and how many new tokens it leaves room for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpt2cli.config import too_long
from gpt2cli.errors import GPT2Error
from gpt2cli.sampling import SamplingOptions

MAX_TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's limit)


class ParamError(GPT2Error):
    """A bad option: `param` is its name (as a `--jsonl` field and a request body name it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerationParams:
    """How one prompt is continued; the defaults are `gpt2 generate`'s.

    `n` samples are drawn together from one generator seeded with `seed` (None: fresh
    randomness). A sample ends at `<|endoftext|>` (unless `ignore_eos`), at a `stop` string, after
    `max_tokens` new tokens or at the end of the context. A prompt that leaves no room is an
    error, or with `truncate` keeps its last tokens (`fit_prompt`). `top_logprobs` alternatives
    come with each token. With `echo` the request's first event is its prompt, scored (each
    token's logprob and alternatives, from the request's own prefill) with `echo_logprobs`;
    `max_tokens` 0 is allowed only then: the prompt alone.
    """

    max_tokens: int = 40
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: bool = False
    top_logprobs: int = 0
    echo: bool = False
    echo_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.echo else 1):
            alone = " (0 with echo: the prompt alone)" if self.echo else ""
            raise ParamError(
                "max_tokens", f"max_tokens must be at least 1{alone}, got {self.max_tokens}"
            )
        if self.n < 1:
            raise ParamError("n", f"n (samples) must be at least 1, got {self.n}")
        if self.seed is not None and self.seed < 0:
            raise ParamError("seed", f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ParamError(
                "top_logprobs",
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
            )
        if any(not s for s in self.stop):
            raise ParamError("stop", "a stop string must not be empty")
        if self.echo_logprobs and not self.echo:
            raise ParamError("echo_logprobs", "echo_logprobs goes with echo")
        checks: dict[str, dict[str, float]] = {  # each checked alone, so the error names it
            "temperature": {"temperature": self.temperature},
            "top_k": {"top_k": self.top_k},
            "top_p": {"top_p": self.top_p},
        }
        for name, option in checks.items():
            try:
                SamplingOptions(**option)  # type: ignore[arg-type]
            except GPT2Error as e:
                raise ParamError(name, str(e)) from None

    @property
    def sampling(self) -> SamplingOptions:
        """How each next token is chosen."""
        return SamplingOptions(self.temperature, self.top_k, self.top_p)


def fit_prompt(
    prompt: Sequence[int], params: GenerationParams, n_ctx: int, eot: int
) -> tuple[list[int], int]:
    """The prompt as it runs, and its budget of new tokens (at most `max_tokens`, at most what
    the context has left), or a ParamError saying why it cannot run.

    An empty prompt starts from `<|endoftext|>` (`eot`). With `truncate` a long prompt keeps its
    last tokens, leaving room for `max_tokens` (and at least one token).
    """
    kept = list(prompt) or [eot]
    if params.truncate:
        kept = kept[-max(1, n_ctx - params.max_tokens) :]
    if len(kept) > n_ctx or (len(kept) == n_ctx and params.max_tokens > 0):
        raise ParamError("prompt", too_long(len(kept), n_ctx, room=params.max_tokens > 0))
    return kept, min(params.max_tokens, n_ctx - len(kept))
