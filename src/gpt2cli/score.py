"""Scoring text: how surprising each token is to the model, and what that sums to per text.

`score_texts` tokenizes texts, runs `GPT2.scored_logits` over them (several texts per padded
batch, long ones in Hugging Face's strided windows) and reduces each block of logits at once to
what is kept: the actual token's log-probability, its rank, and optionally the top alternatives,
so memory stays flat in the length of the text. `TextScore` holds a text's totals with
lm-evaluation-harness's definitions (bits per byte, byte and word perplexity) and llama.cpp's
standard error of the mean NLL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gpt2cli import ops
from gpt2cli.errors import GPT2Error

if TYPE_CHECKING:
    from gpt2cli.model import GPT2, ScoredBlock


@dataclass(frozen=True)
class TextScore:
    """A text's scores: per scored token (in order) and in total.

    `ids[i]` is the i-th scored token, `logprobs[i]` its natural log-probability given the
    tokens before it, `ranks[i]` its place among all tokens sorted by the model's logits
    (1 = the model's top choice; equal logits are ordered by id). With `top` > 0, `top_ids` and
    `top_logprobs` [n, top] hold the most likely tokens at each place, most likely first.
    """

    positions: NDArray[np.intp]  # [n]: index of each scored token among the text's tokens
    ids: NDArray[np.intp]  # [n]
    logprobs: NDArray[np.float32]  # [n]
    ranks: NDArray[np.intp]  # [n]
    top_ids: NDArray[np.intp]  # [n, top]
    top_logprobs: NDArray[np.float32]  # [n, top]
    n_bytes: int  # UTF-8 bytes of the whole text
    n_words: int  # len(re.split(r"\s+", text)), lm-evaluation-harness's word count

    @property
    def n_tokens(self) -> int:
        """Tokens scored."""
        return len(self.ids)

    @property
    def nll(self) -> float:
        """Total negative log-likelihood, in nats."""
        return -float(self.logprobs.sum(dtype=np.float64))

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per token, in nats."""
        return self.nll / self.n_tokens

    @property
    def nll_stderr(self) -> float | None:
        """Standard error of the mean NLL (std / sqrt(n)); None for fewer than 2 tokens."""
        if self.n_tokens < 2:
            return None
        return float(self.logprobs.astype(np.float64).std(ddof=1)) / math.sqrt(self.n_tokens)

    @property
    def perplexity(self) -> float:
        """Token perplexity: exp(mean NLL)."""
        return _exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float:
        """NLL / bytes / ln 2: what an ideal arithmetic coder with this model would spend."""
        return self.nll / self.n_bytes / math.log(2) if self.n_bytes else math.inf

    @property
    def byte_perplexity(self) -> float:
        """exp(NLL / bytes)."""
        return _exp(self.nll / self.n_bytes) if self.n_bytes else math.inf

    @property
    def word_perplexity(self) -> float:
        """exp(NLL / words)."""
        return _exp(self.nll / self.n_words)

    def totals(self) -> dict[str, Any]:
        """The totals as JSON-ready values (a float that is not finite becomes None)."""
        values = {
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "n_words": self.n_words,
            "nll": self.nll,
            "mean_nll": self.mean_nll,
            "nll_stderr": self.nll_stderr,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "byte_perplexity": self.byte_perplexity,
            "word_perplexity": self.word_perplexity,
        }
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()
        }


def _exp(x: float) -> float:
    """math.exp, with inf instead of OverflowError (a random model's word perplexity can be)."""
    return math.exp(x) if x < 709.0 else math.inf


def score_text(
    model: GPT2, text: str, *, stride: int | None = None, bos: bool = True, top: int = 0
) -> TextScore:
    """Score one text: every token's log-probability and rank, and the text's totals."""
    return score_texts(model, [text], stride=stride, bos=bos, top=top)[0]


def score_texts(
    model: GPT2,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    bos: bool = True,
    top: int = 0,
    progress: Callable[[int, int], None] | None = None,
    names: Sequence[str] | None = None,
) -> list[TextScore]:
    """Score several texts, batched together; every text is checked before any is scored.

    `bos` puts `<|endoftext|>` before each text, so its first token is scored too; `stride`
    is the window stride for texts longer than the context (default n_ctx // 2); `top` keeps
    that many most likely alternatives per token. `progress`, if given, is called after each
    block with the tokens scored so far and the total to score. `names` name the texts in
    errors (default: "text N").
    """
    names = names or [f"text {i} (counting from 0)" for i in range(len(texts))]
    sequences = [
        scoring_ids(model, text, bos=bos, name=name)
        for text, name in zip(texts, names, strict=True)
    ]
    return _score(
        model, sequences, texts, stride=stride, top=top, first=1 if bos else 0, progress=progress
    )


def score_ids(model: GPT2, ids: Sequence[int], *, top: int = 0) -> TextScore:
    """Score token ids as they are, with nothing put before them (the first is not scored):
    `gpt2 score --no-bos` for callers that hold ids rather than text, such as `gpt2 serve`
    scoring a prompt sent as ids for `echo` and `logprobs`. Ids longer than the context are
    scored in windows, as texts are."""
    sequence = model.scoring_sequence(ids, bos=False)
    return _score(model, [sequence], [model.tokenizer.decode(ids)], top=top, first=0)[0]


def _score(
    model: GPT2,
    sequences: Sequence[NDArray[np.intp]],
    texts: Sequence[str],
    *,
    stride: int | None = None,
    top: int,
    first: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[TextScore]:
    """Score checked sequences (`scoring_ids`); `first` is the position of each text's first
    token in its sequence (1 after `<|endoftext|>`)."""
    if top < 0:
        raise GPT2Error(f"top must be >= 0, got {top}")
    top = min(top, model.config.n_vocab)
    collected: list[list[_Block]] = [[] for _ in texts]
    total, done = sum(len(s) - 1 for s in sequences), 0
    for block in model.scored_logits(sequences, stride=stride):
        collected[block.row].append(_reduce(block, top))
        done += len(block.targets)
        if progress is not None:
            progress(done, total)
    return [
        _text_score(blocks, text, top, first=first)
        for blocks, text in zip(collected, texts, strict=True)
    ]


def combined(scores: Sequence[TextScore]) -> TextScore:
    """Several texts' scores as one: tokens, bytes and words added, so the totals are pooled."""
    return TextScore(
        positions=np.concatenate([s.positions for s in scores]),
        ids=np.concatenate([s.ids for s in scores]),
        logprobs=np.concatenate([s.logprobs for s in scores]),
        ranks=np.concatenate([s.ranks for s in scores]),
        top_ids=np.concatenate([s.top_ids for s in scores]),
        top_logprobs=np.concatenate([s.top_logprobs for s in scores]),
        n_bytes=sum(s.n_bytes for s in scores),
        n_words=sum(s.n_words for s in scores),
    )


def scoring_ids(model: GPT2, text: str, *, bos: bool, name: str | None = None) -> NDArray[np.intp]:
    """The ids a text is scored over (`<|endoftext|>` first with `bos`), checked for length.

    A text with nothing to score (empty, or one token without `bos`) is a GPT2Error, which
    starts with `name` when given.
    """
    try:
        return model.scoring_sequence(model.tokenizer.encode(text), bos=bos)
    except GPT2Error as e:
        raise GPT2Error(f"{name}: {e}" if name else str(e)) from None


@dataclass
class _Block:
    positions: NDArray[np.intp]
    ids: NDArray[np.intp]
    logprobs: NDArray[np.float32]
    ranks: NDArray[np.intp]
    top_ids: NDArray[np.intp]
    top_logprobs: NDArray[np.float32]


def _reduce(block: ScoredBlock, top: int) -> _Block:
    """A block's logits [n, V] -> what is kept of them: logprob, rank and top alternatives."""
    logits, targets = block.logits, block.targets  # [n, V], [n]
    lse, chosen = block.logsumexp(), block.chosen()  # [n], [n]
    ranks = np.asarray(1 + (logits > chosen[:, None]).sum(axis=-1), np.intp)  # [n]: likelier ones
    ties = (logits == chosen[:, None]).sum(axis=-1) > 1  # [n]: rows where another id ties
    for i in np.flatnonzero(ties):  # ties are ordered by id: count the tied ids below the target
        ranks[i] = ranks[i] + np.count_nonzero(logits[i, : targets[i]] == chosen[i])
    top_ids = ops.top_ids(logits, top)  # [n, top]
    top_logprobs = (np.take_along_axis(logits, top_ids, axis=-1) - lse[:, None]).astype(np.float32)
    return _Block(
        positions=block.positions,
        ids=targets,
        logprobs=(chosen - lse).astype(np.float32),
        ranks=ranks,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
    )


def _text_score(blocks: list[_Block], text: str, top: int, *, first: int) -> TextScore:
    """One text's blocks, in position order, joined into its TextScore; `first` is the position
    of the text's first token in the scored sequence (1 after `<|endoftext|>`)."""
    blocks.sort(key=lambda b: int(b.positions[0]))

    def join(field: str, empty: NDArray[Any]) -> NDArray[Any]:
        return np.concatenate([getattr(b, field) for b in blocks]) if blocks else empty

    return TextScore(
        positions=join("positions", np.zeros(0, np.intp)) - first,
        ids=join("ids", np.zeros(0, np.intp)),
        logprobs=join("logprobs", np.zeros(0, np.float32)),
        ranks=join("ranks", np.zeros(0, np.intp)),
        top_ids=join("top_ids", np.zeros((0, top), np.intp)),
        top_logprobs=join("top_logprobs", np.zeros((0, top), np.float32)),
        n_bytes=len(text.encode("utf-8")),
        n_words=len(re.split(r"\s+", text)),
    )
