"""Scoring text: how surprising each token is to the model, and what that sums to per text.

`scored_logits` runs sequences through the model (`GPT2.run_prompts`), several per padded batch
and long ones in Hugging Face's strided windows (`score_windows`), and the output head
(`GPT2.head`) only where a token is scored, yielding the logits a `ScoredBlock` at a time.
`score_texts` tokenizes texts and reduces each block at once to what is kept: the actual token's
log-probability, its rank, and optionally the top alternatives, so memory stays flat in the
length of the text. `score_hidden` does the same from hidden states a prefill already computed
(`GPT2.prefill_into`), and `token_logprobs` gives one sequence's log-probabilities alone.
`TextScore` holds a text's totals with lm-evaluation-harness's definitions (bits per byte, byte
and word perplexity) and llama.cpp's standard error of the mean NLL. `kl_divergence` compares a
model (int8 or bfloat16 weights) with a reference (float32) on the same windows, as llama.cpp's
`perplexity --kl-divergence` does: a `KLReport` of the KL divergence and top-token agreement.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from gpt2cli import ops
from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState

if TYPE_CHECKING:
    from gpt2cli.model import GPT2, Array, Ids
    from gpt2cli.tokenizer import Tokenizer

# windows of several texts run as one batch of at most BATCH_TOKENS positions
BATCH_TOKENS = 1024


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
    steps = scoring_steps(model, texts, stride=stride, bos=bos, top=top, names=names)
    return drain(steps, progress)


def scoring_steps(
    model: GPT2,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    bos: bool = True,
    top: int = 0,
    names: Sequence[str] | None = None,
    encoded: Sequence[Sequence[int]] | None = None,
) -> Generator[tuple[int, int], None, list[TextScore]]:
    """`score_texts` one batch of windows at a time: yields (tokens scored, tokens to score)
    after each block and returns the scores, so a caller can do other work in between (the
    server decodes its streams between a long text's batches). `encoded`, when given, holds
    the texts' token ids, already encoded (off the thread that scores)."""
    names = names or [f"text {i} (counting from 0)" for i in range(len(texts))]
    sequences = [
        scoring_ids(model, text, bos=bos, name=name, ids=None if encoded is None else encoded[i])
        for i, (text, name) in enumerate(zip(texts, names, strict=True))
    ]
    blocks = scored_logits(model, sequences, stride=stride)
    return (yield from _scoring(model, blocks, sequences, texts, top=top, first=1 if bos else 0))


def score_ids(model: GPT2, ids: Sequence[int], *, top: int = 0) -> TextScore:
    """Score token ids as they are, with nothing put before them (the first is not scored):
    `gpt2 score --no-bos` for callers that hold ids rather than text, such as `gpt2 serve`
    scoring a prompt sent as ids for `echo` and `logprobs`. Ids longer than the context are
    scored in windows, as texts are."""
    sequence = scoring_sequence(model, ids, bos=False)
    blocks = scored_logits(model, [sequence])
    text = model.tokenizer.decode(ids)
    return drain(_scoring(model, blocks, [sequence], [text], top=top, first=0))[0]


def score_hidden(model: GPT2, hidden: Array, ids: Sequence[int], *, top: int = 0) -> TextScore:
    """Score token ids from their final hidden states `hidden` [T, D], as a prefill that ran
    them computed them (`GPT2.prefill_into`'s `hidden`): each of ids[1:] given the ids before
    it, from hidden[:-1], with `score_ids`'s numbers (within float noise) for ids that fit the
    context, and no second forward pass. One id has nothing to score: its TextScore holds no
    tokens (n_tokens 0). `top` as in `score_texts`.
    """
    array = np.asarray(ids)
    if array.ndim != 1 or hidden.shape != (len(array), model.config.n_embd):
        raise GPT2Error(
            f"score_hidden needs 1-D ids [T] and their hidden states [T, {model.config.n_embd}], "
            f"got ids {list(array.shape)} and hidden states {list(hidden.shape)}"
        )
    if array.size:
        model.check_ids(array)
    sequence = array.astype(np.intp)
    scored = np.arange(1, len(sequence))  # [T - 1]: positions scored, each from the one before
    blocks = _head_blocks(
        model, hidden[:-1], scored, np.zeros_like(scored), [0], [sequence], model.head_rows
    )
    text = model.tokenizer.decode(sequence.tolist())
    return drain(_scoring(model, blocks, [sequence], [text], top=top, first=0))[0]


def drain(
    steps: Generator[tuple[int, int], None, list[TextScore]],
    progress: Callable[[int, int], None] | None = None,
) -> list[TextScore]:
    """Run scoring steps to their end, calling `progress(done, total)` after each; the scores."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as finished:
            scores: list[TextScore] = finished.value
            return scores
        if progress is not None:
            progress(done, total)


def _scoring(
    model: GPT2,
    blocks: Iterator[ScoredBlock],
    sequences: Sequence[NDArray[np.intp]],
    texts: Sequence[str],
    *,
    top: int,
    first: int,
) -> Generator[tuple[int, int], None, list[TextScore]]:
    """Reduce the scored blocks of checked sequences (`scoring_ids`) to each text's TextScore,
    yielding (tokens scored, tokens to score) after each block; `first` is the position of each
    text's first token in its sequence (1 after `<|endoftext|>`). `top` is checked before the
    first block is drawn."""
    if top < 0:
        raise GPT2Error(f"top must be >= 0, got {top}")
    top = min(top, model.config.n_vocab)
    collected: list[list[_Block]] = [[] for _ in texts]
    total, done = sum(len(s) - 1 for s in sequences), 0
    for block in blocks:
        collected[block.row].append(_reduce(block, top))
        done += len(block.targets)
        yield done, total
    return [
        _text_score(blocks, text, top, first=first)
        for blocks, text in zip(collected, texts, strict=True)
    ]


def score_json(s: TextScore, tokenizer: Tokenizer, *, tokens: bool, first: dict[str, Any]) -> str:
    """One `--json` / `--jsonl` line: `first` (source or index and passed-through fields), the
    totals, and with `tokens` every scored token as {id, text, logprob, rank[, top]}."""
    out = first | s.totals()
    if tokens:
        out["tokens"] = [
            {
                "id": token,
                "text": tokenizer.decode([token]),
                "logprob": round(float(s.logprobs[i]), 6),
                "rank": int(s.ranks[i]),
            }
            | (
                {
                    "top": [
                        {"id": alt, "text": tokenizer.decode([alt]), "logprob": round(float(lp), 6)}
                        for alt, lp in zip(s.top_ids[i].tolist(), s.top_logprobs[i], strict=True)
                    ]
                }
                if s.top_ids.shape[1]
                else {}
            )
            for i, token in enumerate(s.ids.tolist())
        ]
    return json.dumps(out, ensure_ascii=False, allow_nan=False) + "\n"


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


def scoring_ids(
    model: GPT2,
    text: str,
    *,
    bos: bool,
    name: str | None = None,
    ids: Sequence[int] | None = None,
) -> NDArray[np.intp]:
    """The ids a text is scored over (`<|endoftext|>` first with `bos`), checked for length;
    `ids` are the text's tokens when the caller has encoded it already.

    A text with nothing to score (empty, or one token without `bos`) is a GPT2Error, which
    starts with `name` when given.
    """
    try:
        return scoring_sequence(
            model, model.tokenizer.encode(text) if ids is None else ids, bos=bos
        )
    except GPT2Error as e:
        raise GPT2Error(f"{name}: {e}" if name else str(e)) from None


def scoring_sequence(model: GPT2, ids: Ids, *, bos: bool) -> NDArray[np.intp]:
    """The sequence that scores `ids`: checked, `<|endoftext|>` first with `bos`; a GPT2Error
    when there is nothing to score (no ids, or one without `bos`)."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise GPT2Error(f"ids must be a 1-D sequence of token ids, got shape {list(array.shape)}")
    if array.size:
        model.check_ids(array)
    if array.size == 0 or (array.size == 1 and not bos):
        raise GPT2Error(
            "nothing to score: the text is empty"
            if array.size == 0
            else "nothing to score: one token has no context unless <|endoftext|> is put "
            "before it (bos=True, the default, which --no-bos turns off)"
        )
    if bos:
        array = np.concatenate([[model.tokenizer.eot_token], array])
    return array.astype(np.intp)


def token_logprobs(model: GPT2, ids: Ids, *, stride: int | None = None, bos: bool = True) -> Array:
    """Log-probability of each scored token of `ids` given the tokens before it, in order.

    With `bos` (the default) `<|endoftext|>` is put before the text as context, so every
    token is scored; without it the first token has no context and is not. Texts longer than
    the context use Hugging Face's strided windows (`score_windows`; `stride` defaults to
    n_ctx // 2), each token scored once; with stride n_ctx the token at each later window's
    start has no context in it and is not scored either, as in that recipe.
    """
    sequence = scoring_sequence(model, ids, bos=bos)
    logprobs = np.empty(len(sequence), np.float32)  # [T]: token t given 0..t-1
    scored = np.zeros(len(sequence), bool)  # [T]
    for block in scored_logits(model, [sequence], stride=stride):
        logprobs[block.positions] = block.logprobs()
        scored[block.positions] = True
    return logprobs[scored]


def score_windows(n_tokens: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Hugging Face's strided windows ("Perplexity of fixed-length models") over a sequence:
    (begin, end, first) for each window of at most n_ctx positions starting every `stride`.

    Window [begin, end) scores the tokens [first, end): those after the previous window's end
    (`trg_len = end - prev_end`), so each token is scored once, with the most context a window
    gives it. A window's first token has no context in it and is never scored, so with stride
    n_ctx the tokens at window starts go unscored, as in that recipe.
    """
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_ctx, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class ScoredBlock:
    """Scored tokens of one sequence: `targets[i]`, at `positions[i]`, given `logits[i]`.

    `logits` [n, V] are the model's raw next-token logits at position `positions[i] - 1`.
    """

    row: int  # which of the scored sequences
    positions: NDArray[np.intp]  # [n]
    targets: NDArray[np.intp]  # [n]
    logits: Array  # [n, V]

    def chosen(self) -> Array:
        """Each target's own logit [n]."""
        picked: Array = self.logits[np.arange(len(self.targets)), self.targets]
        return picked

    def logsumexp(self) -> Array:
        """log of each row's sum of exp(logits) [n] float32: what a logit minus is a logprob."""
        out: Array = ops.logsumexp(self.logits).astype(np.float32)
        return out

    def logprobs(self) -> Array:
        """log p(target) for each token [n] float32."""
        out: Array = (self.chosen() - self.logsumexp()).astype(np.float32)
        return out


def scored_logits(
    model: GPT2,
    sequences: Sequence[Ids],
    *,
    stride: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
    head_rows: int | None = None,
    pass_tokens: int | None = None,
) -> Iterator[ScoredBlock]:
    """The logits that score every token of each sequence but its first, a block at a time.

    Each token is scored once, in the strided window (`score_windows`) that gives it the
    most context; windows of all sequences are run as padded batches of at most
    `batch_tokens` positions (or one window), longest first, and the output head runs only
    for positions whose next token is scored, `head_rows` (`model.head_rows`) at a time, so
    memory stays flat in the length of the text; `pass_tokens` (`model.pass_tokens`) positions
    of a batch run through the blocks per pass. Where the blocks are cut depends on those two
    alone, given the sequences. Each block's positions ascend, but one sequence's blocks
    need not: windows batched together run a pass at a time, so a later window's first
    positions can come before an earlier window's last (callers sort or index by position).
    """
    n_ctx = model.config.n_ctx
    if n_ctx < 2:
        raise GPT2Error(
            f"the model's context is {n_ctx} token: no token can be scored, since a window "
            "of one token gives it no context"
        )
    stride = n_ctx // 2 if stride is None else stride
    if not 1 <= stride <= n_ctx:
        raise GPT2Error(f"stride must be between 1 and the model's n_ctx ({n_ctx}), got {stride}")
    rows = [scoring_sequence(model, seq, bos=False) for seq in sequences]
    windows = [
        (row, *window)
        for row, seq in enumerate(rows)
        for window in score_windows(len(seq), n_ctx, stride)
    ]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # stable: a row's stay in order
    while windows:
        size = max(1, batch_tokens // (windows[0][2] - windows[0][1]))
        batch, windows = windows[:size], windows[size:]
        yield from _score_batch(
            model, rows, batch, head_rows or model.head_rows, pass_tokens or model.pass_tokens
        )


def _score_batch(
    model: GPT2,
    rows: list[NDArray[np.intp]],
    windows: list[tuple[int, int, int, int]],
    head_rows: int,
    pass_tokens: int,
) -> Iterator[ScoredBlock]:
    """Run windows (row, begin, end, first scored) as one right-padded batch, `pass_tokens`
    positions a pass, and the output head `head_rows` scored positions at a time."""
    width = max(end - begin for _, begin, end, _ in windows)
    batch = np.zeros((len(windows), width), np.intp)  # [B, T]
    for b, (row, begin, end, _) in enumerate(windows):
        batch[b, : end - begin] = rows[row][begin:end]
    state = DecodeState.empty(model.config, len(windows), width, logits=head_rows)
    for start, x in model.run_prompts(state, batch, tokens=pass_tokens):  # x [B, chunk, D]
        # the hidden state at window position p predicts the token at p + 1
        picks = [
            (
                b,
                np.arange(max(start, first - begin - 1), min(start + x.shape[1], end - begin - 1)),
            )
            for b, (_, begin, end, first) in enumerate(windows)
        ]
        picks = [(b, p) for b, p in picks if p.size]
        if not picks:
            continue
        hidden = np.concatenate([x[b, p - start] for b, p in picks])  # [n, D]
        which = np.concatenate([np.full(p.size, b) for b, p in picks])  # [n]: window
        targets = np.concatenate([p + 1 + windows[b][1] for b, p in picks])  # [n]: positions
        picked = [w[0] for w in windows]
        yield from _head_blocks(model, hidden, targets, which, picked, rows, head_rows)


def _head_blocks(
    model: GPT2,
    hidden: Array,
    targets: NDArray[np.intp],
    which: NDArray[np.intp],
    rows: Sequence[int],
    sequences: Sequence[NDArray[np.intp]],
    head_rows: int,
) -> Iterator[ScoredBlock]:
    """Score from final hidden states [n, D], the output head over `head_rows` at a time: state
    i predicts the token at position targets[i] of window which[i] (a window's states are
    contiguous), which is a window of sequence `rows[which[i]]`. One block per window per
    product with the head."""
    for lo in range(0, len(hidden), head_rows):
        logits = model.head(hidden[lo : lo + head_rows], targets[lo : lo + head_rows] - 1)
        part = which[lo : lo + head_rows]
        for b in np.unique(part):  # [V]-wide rows of one window at a time, in order
            here = np.flatnonzero(part == b)
            row, positions = rows[b], targets[lo + here]
            yield ScoredBlock(
                row=row,
                positions=positions,
                targets=sequences[row][positions],
                logits=logits[here[0] : here[-1] + 1],
            )


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


@dataclass(frozen=True)
class KLReport:
    """How far a model's next-token distributions are from a reference model's on one text,
    per scored token (in order), as llama.cpp's `perplexity --kl-divergence` reports it.

    `kld[i]` is KL(p_reference || p_model) in nats at the i-th scored token, `same_top[i]`
    whether both models' most likely token there is the same (ties to the lower id).
    """

    kld: NDArray[np.float64]  # [n]
    same_top: NDArray[np.bool_]  # [n]
    reference_logprobs: NDArray[np.float32]  # [n]: the actual token's, under the reference
    logprobs: NDArray[np.float32]  # [n]: the actual token's, under the model

    @property
    def n_tokens(self) -> int:
        """Tokens scored."""
        return len(self.kld)

    @property
    def mean_kld(self) -> float:
        """Mean KL divergence per token, in nats."""
        return float(self.kld.mean())

    @property
    def kld_stderr(self) -> float | None:
        """Standard error of the mean KLD (std / sqrt(n)); None for fewer than 2 tokens."""
        return _stderr(self.kld)

    @property
    def top1_agreement(self) -> float:
        """The fraction of tokens where both models' most likely token is the same."""
        return float(self.same_top.mean())

    @property
    def top1_stderr(self) -> float | None:
        """Standard error of the agreement, sqrt(p (1 - p) / (n - 1)) as llama.cpp gives it."""
        return _stderr(self.same_top.astype(np.float64))

    def totals(self) -> dict[str, Any]:
        """The report as JSON-ready values: the mean KLD and its standard error, its maximum,
        99th percentile and median, the top-1 agreement and its standard error, and both
        models' perplexities of the text (a float that is not finite becomes None)."""
        values = {
            "n_tokens": self.n_tokens,
            "mean_kld": self.mean_kld,
            "kld_stderr": self.kld_stderr,
            "max_kld": float(self.kld.max()),
            "kld_p99": float(np.percentile(self.kld, 99)),
            "median_kld": float(np.median(self.kld)),
            "top1_agreement": self.top1_agreement,
            "top1_stderr": self.top1_stderr,
            "perplexity": _exp(-float(self.logprobs.mean(dtype=np.float64))),
            "reference_perplexity": _exp(-float(self.reference_logprobs.mean(dtype=np.float64))),
        }
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()
        }


def _stderr(values: NDArray[np.float64]) -> float | None:
    """The standard error of the mean of `values` (sample std / sqrt(n)); None for n < 2."""
    if len(values) < 2:
        return None
    return float(values.std(ddof=1)) / math.sqrt(len(values))


def kl_divergence(
    reference: GPT2,
    model: GPT2,
    ids: Ids,
    *,
    stride: int | None = None,
    bos: bool = True,
    progress: Callable[[int], None] | None = None,
) -> KLReport:
    """Compare `model` with `reference` (the same weights in float32) on token ids `ids`: at
    every token `score_text` scores (the same windows; `stride` and `bos` as there), the KL
    divergence of the model's next-token distribution from the reference's, and whether their
    most likely tokens agree. Both models run window by window, side by side, so no more than
    a block of logits of each is held. `progress(tokens)`, if given, is called after each block
    with the tokens it scored."""
    if reference.config != model.config:
        raise GPT2Error("the reference and the model compared with it differ in shape")
    sequence = scoring_sequence(reference, ids, bos=bos)
    parts: list[tuple[NDArray[np.intp], Array, Array, Array, Array]] = []
    cuts = {  # the same passes and head products, so the same blocks, from both
        "head_rows": min(reference.head_rows, model.head_rows),
        "pass_tokens": min(reference.pass_tokens, model.pass_tokens),
    }
    pairs = zip(
        scored_logits(reference, [sequence], stride=stride, **cuts),
        scored_logits(model, [sequence], stride=stride, **cuts),
        strict=True,
    )
    for ours, theirs in pairs:  # the same windows and blocks: the same positions, in order
        p = ours.logits.astype(np.float64) - ours.logsumexp()[:, None]  # [n, V]: log p
        q = theirs.logits.astype(np.float64) - theirs.logsumexp()[:, None]  # [n, V]: log q
        kld = (np.exp(p) * (p - q)).sum(axis=-1)  # [n]
        same = ours.logits.argmax(axis=-1) == theirs.logits.argmax(axis=-1)  # [n]
        parts.append((ours.positions, kld, same, ours.logprobs(), theirs.logprobs()))
        if progress is not None:
            progress(len(ours.positions))
    parts.sort(key=lambda part: int(part[0][0]))
    return KLReport(*(np.concatenate([part[i] for part in parts]) for i in range(1, 5)))


def kl_texts(
    reference: GPT2,
    model: GPT2,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    bos: bool = True,
    progress: Callable[[int, int], None] | None = None,
    names: Sequence[str] | None = None,
) -> list[KLReport]:
    """`kl_divergence` of several texts, every one checked before any runs (`names` name them
    in errors, as in `score_texts`); `progress(done, total)` counts their tokens."""
    names = names or [f"text {i} (counting from 0)" for i in range(len(texts))]
    encoded = [reference.tokenizer.encode(text) for text in texts]
    for ids, text, name in zip(encoded, texts, names, strict=True):
        scoring_ids(reference, text, bos=bos, name=name, ids=ids)
    n_ctx = reference.config.n_ctx
    total = sum(
        end - first
        for ids in encoded
        for _, end, first in score_windows(len(ids) + bos, n_ctx, stride or n_ctx // 2)
    )
    done = 0

    def advance(tokens: int) -> None:
        nonlocal done
        done += tokens
        if progress is not None:
            progress(done, total)

    return [
        kl_divergence(reference, model, ids, stride=stride, bos=bos, progress=advance)
        for ids in encoded
    ]


def kl_json(report: KLReport, first: dict[str, Any]) -> str:
    """One `--kl-divergence --json` line: `first` (source, dtypes), then the report's totals."""
    return json.dumps(first | report.totals(), ensure_ascii=False, allow_nan=False) + "\n"


KL_COLUMNS = ("source", "tokens", "mean_kld", "kld_stderr", "top1_agreement")


def kl_table(rows: Sequence[tuple[str, KLReport]], *, aligned: bool) -> str:
    """`--kl-divergence`'s default output: a header and one row per input (source, tokens,
    mean KLD, its standard error, top-1 agreement), tab-separated, or `aligned` in columns.
    Each source is shown as it is given (control characters already escaped)."""
    cells = [list(KL_COLUMNS)] + [
        [
            source,
            str(r.n_tokens),
            f"{r.mean_kld:.6g}",
            "nan" if r.kld_stderr is None else f"{r.kld_stderr:.3g}",
            f"{r.top1_agreement:.6g}",
        ]
        for source, r in rows
    ]
    if not aligned:
        return "".join("\t".join(row) + "\n" for row in cells)
    widths = [max(len(row[i]) for row in cells) for i in range(len(KL_COLUMNS))]
    lines = [
        "  ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in cells
    ]
    return "".join(line.rstrip() + "\n" for line in lines)
