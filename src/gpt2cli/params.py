"""A generation request's options, checked once: the one place for their ranges and messages.

`GenerationParams` is immutable and valid from the moment it exists: `gpt2 generate`, `--jsonl`
rows and `gpt2 serve` each read their options (Click, JSON rows, request bodies check the types)
and build one, and a bad value is a `ParamError` naming the option, which each front end words
its own way (a usage error, an invalid row, a 400 with `param`). `fit_prompt` is the rule for a
prompt in the context: what is kept of it and how many new tokens it leaves room for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from gpt2cli.config import too_long
from gpt2cli.errors import GPT2Error
from gpt2cli.sampling import SamplingOptions

MAX_TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's limit)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias; -100 bans the token
MAX_PENALTY = 2.0  # OpenAI's range for the presence and frequency penalties
MAX_DRAFT_TOKENS = 64  # tokens a speculative step may draft per row (prompt lookup, a draft model)
# bounds that keep one request's options from slowing a shared batch or overflowing float32:
MAX_REPETITION_PENALTY = 1e4  # and 1e-4 at the other end: 30 / 1e-4 is still a logit
MAX_LENGTH_PENALTY = 10.0  # length**10 for 1,024 tokens is 1e30: scores stay finite
MAX_NGRAM = 64  # no_repeat_ngram: each step compares every earlier n-gram of each row
MAX_BANS, MAX_BAN_CHARS = 256, 1000  # each ban is checked against each row at each step

EarlyStopping = bool | Literal["never"]


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

    The keyword-only options shape the next-token scores before sampling or search, as
    transformers' `generate()` does (their semantics are each field's comment); their defaults
    change nothing. `num_beams` > 1 searches instead of sampling and returns the `n` best beams;
    `best_of` draws that many samples and keeps the `n` with the highest mean logprob;
    `prompt_lookup` K drafts up to K tokens from the text so far and verifies them in one pass.
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
    _: KW_ONLY
    # transformers' RepetitionPenaltyLogitsProcessor over prompt + generated ids (1: off)
    repetition_penalty: float = 1.0
    # OpenAI: minus F for a token generated at least once / F per time generated (0: off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' no_repeat_ngram_size over prompt + generated ids (0: off)
    no_repeat_ngram: int = 0
    # OpenAI: (id, bias) pairs added to those tokens' logits, ids ascending; -100 bans the token
    logit_bias: tuple[tuple[int, float], ...] = ()
    # transformers' bad_words_ids, as texts: each one's token sequence never completes
    ban: tuple[str, ...] = ()
    # vLLM's min_tokens: neither <|endoftext|> nor a stop string ends a sample before this many
    min_tokens: int = 0
    # transformers' MinPLogitsWarper (0: off) and TypicalLogitsWarper (1: off)
    min_p: float = 0.0
    typical_p: float = 1.0
    # transformers' beam search: num_beams (1: sampling), length_penalty, early_stopping
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    # OpenAI: draw best_of samples, keep the n with the highest mean logprob (None: n)
    best_of: int | None = None
    # transformers' prompt_lookup_num_tokens (0: off); draft_tokens: per step with a draft model
    prompt_lookup: int = 0
    draft_tokens: int = 5

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
        for name in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
            try:  # each checked alone, so the error names it
                SamplingOptions(**{name: getattr(self, name)})
            except GPT2Error as e:
                raise ParamError(name, str(e)) from None
        self._check_processors()
        self._check_search()

    def _check_processors(self) -> None:
        """The score processors' ranges (see each field's comment)."""
        if not 1 / MAX_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ParamError(
                "repetition_penalty",
                f"repetition_penalty must be between {1 / MAX_REPETITION_PENALTY:g} and "
                f"{MAX_REPETITION_PENALTY:g} (1 turns it off), got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ParamError(
                    name,
                    f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value}",
                )
        if not 0 <= self.no_repeat_ngram <= MAX_NGRAM:
            raise ParamError(
                "no_repeat_ngram",
                f"no_repeat_ngram must be between 0 (off) and {MAX_NGRAM}, "
                f"got {self.no_repeat_ngram}",
            )
        ids = [id for id, _ in self.logit_bias]
        if ids != sorted(set(ids)) or any(id < 0 for id in ids):
            raise ParamError(
                "logit_bias", "logit_bias needs distinct token ids >= 0, in ascending order"
            )
        for id, bias in self.logit_bias:
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ParamError(
                    "logit_bias",
                    f"the logit bias of token {id} must be between -{MAX_LOGIT_BIAS:g} and "
                    f"{MAX_LOGIT_BIAS:g}, got {bias}",
                )
        if any(not text for text in self.ban):
            raise ParamError("ban", "a banned text must not be empty")
        if len(self.ban) > MAX_BANS or any(len(text) > MAX_BAN_CHARS for text in self.ban):
            raise ParamError(
                "ban", f"at most {MAX_BANS} banned texts of at most {MAX_BAN_CHARS} characters each"
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError(
                "min_tokens",
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens}",
            )

    def _check_search(self) -> None:
        """Beam search, best-of and speculative drafting: their ranges and what they exclude."""
        if self.num_beams < 1:
            raise ParamError(
                "num_beams",
                f"num_beams must be at least 1 (1: no beam search), got {self.num_beams}",
            )
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ParamError(
                "length_penalty",
                f"length_penalty must be between -{MAX_LENGTH_PENALTY:g} and "
                f"{MAX_LENGTH_PENALTY:g}, got {self.length_penalty}",
            )
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ParamError(
                "early_stopping",
                f"early_stopping must be true, false or never, got {self.early_stopping!r}",
            )
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError(
                "best_of", f"best_of must be at least n ({self.n}), got {self.best_of}"
            )
        for name in ("prompt_lookup", "draft_tokens"):
            value, low = getattr(self, name), int(name == "draft_tokens")
            if not low <= value <= MAX_DRAFT_TOKENS:
                raise ParamError(
                    name, f"{name} must be between {low} and {MAX_DRAFT_TOKENS}, got {value}"
                )
        if self.num_beams == 1:
            return
        if self.n > self.num_beams:
            raise ParamError("n", f"n must be at most num_beams ({self.num_beams}), got {self.n}")
        contradicting = {  # sampling options that mean nothing to a deterministic search
            "top_p": self.top_p != 1.0,
            "min_p": self.min_p != 0.0,
            "typical_p": self.typical_p != 1.0,
            "best_of": self.best_of is not None,
            "prompt_lookup": self.prompt_lookup != 0,
        }
        for name, given in contradicting.items():
            if given:
                raise ParamError(
                    name, f"{name} is a sampling option: it does not go with num_beams > 1"
                )

    @property
    def sampling(self) -> SamplingOptions:
        """How each next token is chosen."""
        return SamplingOptions(
            self.temperature, self.top_k, self.top_p, min_p=self.min_p, typical_p=self.typical_p
        )

    @functools.cached_property
    def bias_arrays(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """`logit_bias` as arrays of ids [m] and biases [m], -100 as -inf (a ban), built once
        per request rather than at every step (50,000 biases took 130 ms a step)."""
        ids = np.array([id for id, _ in self.logit_bias], np.int64)  # [m]
        bias = np.array([bias for _, bias in self.logit_bias], np.float32)  # [m]
        bias[bias == -MAX_LOGIT_BIAS] = -np.inf
        return ids, bias

    @property
    def draws(self) -> int:
        """Sequences the request runs at once: its beams, its best_of samples, or its n."""
        return max(self.num_beams, self.best_of or self.n)


def logit_bias(items: Iterable[tuple[object, object]]) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` map ({"50256": -100}), or the command line's ID=BIAS pairs, as the
    (id, bias) pairs `GenerationParams` holds: ids are decimal integers (as text or numbers),
    each given once; biases are numbers (their range is `GenerationParams`' to check)."""
    pairs: dict[int, float] = {}
    for key, value in items:
        if isinstance(key, str) and key.strip().isdecimal() and len(key.strip()) <= 9:
            key = int(key.strip())
        if isinstance(key, bool) or not isinstance(key, int):
            raise ParamError("logit_bias", f"a logit_bias key must be a token id, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(
                "logit_bias", f"the logit bias of token {key} must be a number, got {value!r}"
            )
        if key in pairs:
            raise ParamError("logit_bias", f"token {key} is given two logit biases")
        pairs[key] = math.copysign(math.inf, value) if abs(value) > 1e300 else float(value)
    return tuple(sorted(pairs.items()))


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
