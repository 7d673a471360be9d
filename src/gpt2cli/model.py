"""GPT-2 in NumPy: the transformer as small pure functions, and `GPT2`, which loads and runs them.

The functions read like the paper (and picoGPT): `gelu`, `layer_norm`, `linear`,
`attention`, `mha`, `mlp`, `block`, `forward`. Shapes in the comments: B sequences in a batch, T
positions computed in this pass, S positions attended to, D n_embd, H n_head, hd head width,
V n_vocab, C cache capacity, L n_layer.

Everything is float32: constants are Python floats, which NumPy 2 (NEP 50) never lets widen a
float32 array, and no function creates an array with a default (float64) dtype.

Decoding is incremental. `GPT2.prefill` runs the prompts once, caching every position's keys and
values in arrays allocated once for the whole batch, and returns the logits of the next token
only; `GPT2.step` then feeds one token per sequence, costing one position of work.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error
from gpt2cli.ops import logsumexp

if TYPE_CHECKING:
    from gpt2cli.tokenizer import Tokenizer
    from gpt2cli.weights import Params

Array = NDArray[np.floating[Any]]  # float32 throughout (tested); numpy stubs cannot track it
Ids = Sequence[int] | NDArray[np.integer[Any]]  # one sequence of token ids

# prompt tokens per forward pass, over the whole batch: each layer's matrix products take this
# many rows at once, enough for BLAS's full speed (measured: 512 and 1,024 rows run alike, 128
# about 15% slower) while the [B, T, 4D] MLP activations stay small (6.3 MB for 124M)
PREFILL_TOKENS = 512

# queries per attention product, over the whole batch: bounds the [B, H, Q, S] scores (6.3 MB
# for 124M) and computes little that the causal mask throws away
QUERY_ROWS = 128

# weights stored transposed are multiplied as (w.T @ x.T).T below this many rows, where that
# form is faster (0.5-0.75x the time of x @ w for one row), and as x @ w from it on, where the
# transposed form's copy back to row order costs more than it gains
TRANSPOSED_ROWS = 256

# scoring: windows of several texts run as one batch of at most BATCH_TOKENS positions, and the
# output head over at most HEAD_ROWS positions at a time ([HEAD_ROWS, V] logits are 25 MB)
BATCH_TOKENS = 1024
HEAD_ROWS = 128

_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float: it keeps float32 arrays float32


def gelu(x: Array) -> Array:
    """GPT-2's GELU, the tanh approximation (transformers' `gelu_new`):
    0.5 x (1 + tanh(u)) with u = c (x + 0.044715 x^3), computed as x / (1 + exp(-2u)), the same
    function, because exp is much cheaper than tanh in NumPy on AVX2, in one temporary."""
    t = x * x  # [...]
    t *= -2.0 * _GELU_C * 0.044715
    t -= 2.0 * _GELU_C
    t *= x  # -2u
    with np.errstate(over="ignore"):  # inf for very negative x, where GELU is -0.0: x / inf
        np.exp(t, out=t)
    t += 1.0
    return np.divide(x, t, out=t)  # [...]


def layer_norm(x: Array, g: Array, b: Array, eps: float = 1e-5) -> Array:
    """Normalize each vector to mean 0 and variance 1, then scale by g and shift by b.

    In one temporary: the centred vectors, normalized, scaled and shifted in place.
    """
    out: Array = x - x.mean(axis=-1, keepdims=True)  # [..., D]
    variance = np.einsum("...i,...i->...", out, out)[..., None]  # [..., 1]: sum of squares
    variance /= x.shape[-1]
    variance += eps
    out /= np.sqrt(variance, out=variance)
    out *= g  # [D]
    out += b  # [D]
    return out


def linear(x: Array, w: Array, b: Array) -> Array:
    """x @ w + b over the last axis, as one matrix product however many leading axes x has.

    Weights stored transposed (`w.T` contiguous: `weights.transposed_layout`) are multiplied as
    (w.T @ x.T).T when x has fewer than TRANSPOSED_ROWS rows, the product BLAS runs fastest for
    them; the result is the same.
    """
    rows = x.reshape(-1, w.shape[0])  # [..., n_in] -> [m, n_in]: the weights are read once
    out: Array
    if len(rows) < TRANSPOSED_ROWS and w.flags.f_contiguous and not w.flags.c_contiguous:
        out = np.add((w.T @ rows.T).T, b, order="C")  # [n_out, n_in] @ [n_in, m] -> [m, n_out]
    else:
        out = rows @ w  # [m, n_in] @ [n_in, n_out] -> [m, n_out]
        out += b  # [m, n_out] + [n_out]
    return out.reshape(*x.shape[:-1], w.shape[1])  # [..., n_out]


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Scaled dot-product attention: each query's softmax-weighted mix of the values it may see.

    `mask` [B, 1, T, m] is added to the scores' last m columns: 0 where a query may attend,
    -inf where it may not (the columns before them every query may see, so they need none).
    The softmax's division comes last, on the [.., hd] mixes rather than the [.., S] weights.
    """
    scores = (q / math.sqrt(q.shape[-1])) @ k.swapaxes(-1, -2)  # [B, H, T, hd] @ [B, H, hd, S]
    scores[..., scores.shape[-1] - mask.shape[-1] :] += mask  # [B, H, T, m] + [B, 1, T, m]
    scores -= scores.max(axis=-1, keepdims=True)  # so exp never overflows
    weights = np.exp(scores, out=scores)  # [B, H, T, S], unnormalized
    mixed: Array = weights @ v  # [B, H, T, S] @ [B, H, S, hd] -> [B, H, T, hd]
    mixed /= weights.sum(axis=-1, keepdims=True)  # [B, H, T, 1]
    return mixed


class QueryBlock(NamedTuple):
    """Queries `queries` of a pass, which attend to the first `span` cached positions, the last
    m of them under `mask` [B, 1, Q, m] (see `attention`)."""

    queries: slice
    span: int
    mask: Array


def query_blocks(positions: NDArray[np.intp]) -> list[QueryBlock]:
    """Split the queries at `positions` [B, T] into blocks of about QUERY_ROWS over the batch:
    causal attention one block at a time computes little that the mask throws away, in
    products whose scores stay small."""
    n_batch, n_pos = positions.shape
    size = max(1, QUERY_ROWS // n_batch)
    blocks = []
    for lo in range(0, n_pos, size):
        at = positions[:, lo : lo + size]  # [B, Q]
        span = int(at.max()) + 1  # S: positions attended to
        seen = int(at.min()) + 1  # every query may see these first positions: no mask there
        future = np.arange(seen, span) > at[:, None, :, None]  # [B, 1, Q, S - seen]
        mask = np.where(future, np.float32(-np.inf), np.float32(0.0))
        blocks.append(QueryBlock(slice(lo, lo + size), span, mask))
    return blocks


def mha(
    x: Array,
    c_attn: dict[str, Array],
    c_proj: dict[str, Array],
    *,
    n_head: int,
    keys: Array,
    values: Array,
    at: tuple[NDArray[np.intp], ...],
    blocks: Sequence[QueryBlock],
) -> Array:
    """Causal multi-head self-attention of T new positions over everything cached before them.

    The new keys and values are first written into this layer's cache `keys`/`values`
    [B, H, C, hd] at index `at` (shaped [B, H, T]); each block of queries then attends to the
    cached positions it may see (`query_blocks`).
    """
    n_batch, n_pos, d = x.shape  # [B, T, D]
    qkv = linear(x, **c_attn).reshape(n_batch, n_pos, 3, n_head, d // n_head)  # [B, T, 3, H, hd]
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
    keys[at], values[at] = k, v  # [B, H, C, hd] <- [B, H, T, hd]
    merged = np.empty(x.shape, np.float32)  # [B, T, D], seen as [B, T, H, hd] below
    heads = merged.reshape(n_batch, n_pos, n_head, -1).transpose(0, 2, 1, 3)  # [B, H, T, hd]
    for queries, span, mask in blocks:
        heads[:, :, queries] = attention(
            q[:, :, queries], keys[:, :, :span], values[:, :, :span], mask
        )
    return linear(merged, **c_proj)  # [B, T, D]


def mlp(x: Array, c_fc: dict[str, Array], c_proj: dict[str, Array]) -> Array:
    """The position-wise feed-forward network: widen 4x, GELU, project back."""
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # [B, T, D] -> [B, T, 4D] -> [B, T, D]


def block(
    x: Array,
    layer: dict[str, Any],
    *,
    n_head: int,
    eps: float,
    keys: Array,
    values: Array,
    at: tuple[NDArray[np.intp], ...],
    blocks: Sequence[QueryBlock],
) -> Array:
    """One pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""
    attn_in = layer_norm(x, **layer["ln_1"], eps=eps)  # [B, T, D]
    cache: dict[str, Any] = {"keys": keys, "values": values, "at": at, "blocks": blocks}
    x = x + mha(attn_in, **layer["attn"], n_head=n_head, **cache)
    return x + mlp(layer_norm(x, **layer["ln_2"], eps=eps), **layer["mlp"])  # [B, T, D]


def forward(
    ids: NDArray[np.intp],
    positions: NDArray[np.intp],
    params: Params,
    config: GPT2Config,
    keys: Array,
    values: Array,
) -> Array:
    """Final hidden states [B, T, D] of tokens `ids` [B, T] at `positions` [B, T].

    Their keys and values are cached in `keys`/`values` [L, B, H, C, hd] at those positions, and
    each attends to every cached position up to its own (earlier positions must already be there).
    """
    n_batch = ids.shape[0]
    blocks = query_blocks(positions)
    at = (  # where the new positions go in a [B, H, C, hd] cache: broadcasts to [B, H, T]
        np.arange(n_batch)[:, None, None],
        np.arange(config.n_head)[None, :, None],
        positions[:, None, :],
    )
    x = params["wte"][ids] + params["wpe"][positions]  # [B, T, D]
    for i, layer in enumerate(params["blocks"]):
        x = block(
            x,
            layer,
            n_head=config.n_head,
            eps=config.layer_norm_epsilon,
            keys=keys[i],
            values=values[i],
            at=at,
            blocks=blocks,
        )
    return layer_norm(x, **params["ln_f"], eps=config.layer_norm_epsilon)  # [B, T, D]


def output_head(x: Array, params: Params) -> Array:
    """Logits over the vocabulary: each hidden state against every token's embedding (the head
    is wte itself unless the checkpoint has an untied lm_head)."""
    head: Array = params["lm_head"] if "lm_head" in params else params["wte"]  # [V, D]
    logits: Array = x @ head.T  # [..., D] @ [D, V] -> [..., V]
    return logits


def lazy_zeros(shape: tuple[int, ...]) -> Array:
    """float32 zeros in anonymous memory that becomes resident 4 KiB page by page as it is
    written: for a KV cache, whose rows use only the first positions of their capacity, and for
    the logits of every position (filling 206 MB of them took 0.13 s instead of 0.37-0.55 s).

    Why not np.zeros: NumPy asks the kernel for huge pages on large arrays (MADV_HUGEPAGE), so
    writing a row's first positions faults in whole 2 MiB pages across the cache. Measured with
    8 rows of short prompts at capacity 1,024 (124M): admitting them made 574-603 MiB resident,
    and took up to 4.7 s while the kernel compacted memory; in 4 KiB pages, 26 MiB and 0.7 s.
    """
    count = math.prod(shape)
    size = max(4 * count, 1)  # mmap refuses 0 bytes
    if hasattr(mmap, "MAP_PRIVATE"):  # Unix: private, as malloc's memory is (not shared memory)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # zero pages, made on first write
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
    else:
        buffer = mmap.mmap(-1, size)
    return np.frombuffer(buffer, np.float32, count).reshape(shape)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's <malloc.h>


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB for reuse rather than give them
    back to the system: a forward pass frees and reallocates tens of MB of activations per
    layer, and memory given back must be faulted in again page by page. Measured on a 1,024-token
    prefill (124M): about 100,000 page faults, 18,400 of them the KV cache's own, fell to 18,400.
    Process-wide, and up to 128 MB of freed memory stays with the process; nothing happens
    where the C library has no mallopt (not glibc: macOS, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows loads no library None
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks below this come from the heap, reused
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)  # free heap kept before any is given back


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
        out: Array = logsumexp(self.logits).astype(np.float32)
        return out

    def logprobs(self) -> Array:
        """log p(target) for each token [n] float32."""
        out: Array = (self.chosen() - self.logsumexp()).astype(np.float32)
        return out


@dataclass
class DecodeState:
    """The KV cache of a batch being decoded, allocated once with room for `capacity` positions.

    Row b holds `lengths[b]` positions. `room[b]` is how many more tokens its sequence may grow
    by: the logits `prefill`/`step` just returned may be sampled while it is at least 1, and a
    row whose room is 0 has reached its capacity, which is finish reason "length" (a capacity is
    never more than the model's n_ctx).
    """

    keys: Array  # [L, B, H, C, hd]
    values: Array  # [L, B, H, C, hd]
    lengths: NDArray[np.intp]  # [B]

    @property
    def capacity(self) -> int:
        """Positions each row can hold (prompt plus generated tokens)."""
        return int(self.keys.shape[3])

    @property
    def room(self) -> NDArray[np.intp]:
        """Tokens each row may still be extended by: capacity - lengths, [B]."""
        return self.capacity - self.lengths

    def rows(self, start: int, stop: int) -> DecodeState:
        """Rows start..stop-1 as a cache of their own that shares this one's memory: running it
        (`GPT2.step`) writes straight into these rows, lengths included."""
        return DecodeState(
            self.keys[:, start:stop], self.values[:, start:stop], self.lengths[start:stop]
        )


class GPT2:
    """A GPT-2 model: its config, its float32 parameters and (lazily) its tokenizer.

    `model(ids)` gives logits for every position; `prefill` and `step` decode incrementally
    with a KV cache (`prefill_into` adds prompts to one already decoding); `score` gives each
    token's logprob. Generation loops live above it, in `gpt2cli.scheduler` and `generate`.
    """

    def __init__(
        self,
        config: GPT2Config,
        params: Params,
        folder: Path | None = None,
    ) -> None:
        self.config = config
        self.params = params
        self.folder = folder  # where the tokenizer files are looked for
        keep_freed_memory()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None) -> GPT2:
        """Load a model by hub name ("gpt2", "124M", "owner/name") or from a local folder."""
        from gpt2cli import hub, weights

        folder = hub.resolve(str(name_or_path), revision)
        config, params = weights.load(folder)
        return cls(config, weights.transposed_layout(params, weights.weight_files(folder)), folder)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The folder's tokenizer files, or the built-in GPT-2 vocabulary; built on first use."""
        from gpt2cli.tokenizer import load_tokenizer

        return load_tokenizer(self.folder)

    def __call__(self, ids: ArrayLike, *, truncate: bool = False) -> Array:
        """Logits for every position: [T, V] for ids [T], [B, T, V] for ids [B, T].

        A sequence longer than n_ctx is an error, or with `truncate=True` keeps its last n_ctx
        tokens (and so gets logits for those).
        """
        array = np.asarray(ids)
        if array.ndim not in (1, 2):
            raise GPT2Error(f"ids must be 1-D [T] or 2-D [B, T], got shape {list(array.shape)}")
        rows = [self._checked(row, truncate) for row in np.atleast_2d(array)]
        batch = np.array(rows)  # [B, T]
        n_batch, n_pos = batch.shape
        state = self.empty_state(n_batch, n_pos, logits=n_batch * n_pos)
        out = lazy_zeros((n_batch, n_pos, self.config.n_vocab))  # [B, T, V]: 206 MB for 1,024
        size = max(1, HEAD_ROWS // n_batch)  # positions per product with the head
        for start, x in self._run_prompts(state, batch):  # x [B, chunk, D]
            for lo in range(start, start + x.shape[1], size):
                piece = x[:, lo - start : lo - start + size]  # [B, n, D]
                positions = np.broadcast_to(lo + np.arange(piece.shape[1]), piece.shape[:2])
                out[:, lo : lo + piece.shape[1]] = self._head(piece, positions)
        return out if array.ndim == 2 else out[0]

    def prefill(
        self, prompts: Sequence[Ids], capacity: int | None = None, *, truncate: bool = False
    ) -> tuple[DecodeState, Array]:
        """Run a batch of prompts once: their KV cache, and the logits [B, V] of each next token.

        Prompts may differ in length (they are right-padded and masked; each row's logits are
        those it gets alone). The cache holds `capacity` positions per row (n_ctx by default);
        it must fit the longest prompt, and sets how far `step` can go. A prompt longer than
        n_ctx is an error, or with `truncate=True` keeps its last n_ctx tokens.
        """
        n_ctx = self.config.n_ctx
        rows = [self._checked(p, truncate) for p in prompts]
        if not rows:
            raise GPT2Error("prefill needs at least one prompt")
        lengths = np.array([len(r) for r in rows], np.intp)  # [B]
        capacity = n_ctx if capacity is None else capacity
        if not int(lengths.max()) <= capacity <= n_ctx:
            raise GPT2Error(
                f"cache capacity {capacity} must be between the longest prompt "
                f"({int(lengths.max())} tokens) and the model's n_ctx ({n_ctx})"
            )
        batch = np.zeros((len(rows), int(lengths.max())), np.intp)  # [B, T], right-padded
        for b, row in enumerate(rows):
            batch[b, : len(row)] = row
        state = self.empty_state(len(rows), capacity, logits=len(rows))
        last = np.empty((len(rows), self.config.n_embd), np.float32)  # [B, D]
        for start, x in self._run_prompts(state, batch):  # x [B, chunk, D]
            ends = (start <= lengths - 1) & (lengths - 1 < start + x.shape[1])  # rows ending here
            last[ends] = x[ends, lengths[ends] - 1 - start]
        state.lengths[:] = lengths
        return state, self._head(last, lengths - 1)  # [B, V]

    def prefill_into(
        self, state: DecodeState, prompts: Sequence[Ids], rows: Sequence[Sequence[int]]
    ) -> Array:
        """Run prompts into rows of an existing cache, replacing what those rows held, and
        return the logits [B, V] of each prompt's next token: how requests join a batch that is
        already decoding. The prompts run once, as one padded batch (`prefill`); prompt i's keys
        and values then fill each of its rows `rows[i]` (one per sample drawn from it).
        """
        longest = max(len(p) for p in prompts)
        if longest > state.capacity:
            raise GPT2Error(
                f"prompt is {longest} tokens but the cache holds {state.capacity} positions a row"
            )
        fresh, logits = self.prefill(prompts, longest)
        for i, targets in enumerate(rows):
            n = int(fresh.lengths[i])
            for row in targets:
                state.keys[:, row, :, :n] = fresh.keys[:, i, :, :n]
                state.values[:, row, :, :n] = fresh.values[:, i, :, :n]
                state.lengths[row] = n
        return logits

    def step(self, state: DecodeState, next_ids: ArrayLike) -> Array:
        """Feed one token per row (`next_ids` [B]) and return the logits [B, V] of the next ones.

        Every row needs room (`state.room >= 1`); rows the caller has finished with may be fed
        any valid id, their logits ignored.
        """
        ids = np.asarray(next_ids)
        if ids.shape != state.lengths.shape:
            raise GPT2Error(
                f"step needs one id per row: {state.lengths.shape[0]} ids, got {ids.shape}"
            )
        full = np.flatnonzero(state.room < 1)
        if full.size:
            raise GPT2Error(
                f"row {full[0]} already holds {state.capacity} positions, the cache's capacity; "
                "it has finished (finish reason 'length')"
            )
        self.check_ids(ids)
        x = self._extend(state, ids[:, None])  # [B, 1, D]
        return self._head(x[:, 0], state.lengths - 1)  # [B, V]

    def score(self, ids: Ids, *, stride: int | None = None, bos: bool = True) -> Array:
        """Log-probability of each scored token of `ids` given the tokens before it, in order.

        With `bos` (the default) `<|endoftext|>` is put before the text as context, so every
        token is scored; without it the first token has no context and is not. Texts longer than
        the context use Hugging Face's strided windows (`score_windows`; `stride` defaults to
        n_ctx // 2), each token scored once; with stride n_ctx the token at each later window's
        start has no context in it and is not scored either, as in that recipe.
        """
        sequence = self.scoring_sequence(ids, bos=bos)
        logprobs = np.empty(len(sequence), np.float32)  # [T]: token t given 0..t-1
        scored = np.zeros(len(sequence), bool)  # [T]
        for block in self.scored_logits([sequence], stride=stride):
            logprobs[block.positions] = block.logprobs()
            scored[block.positions] = True
        return logprobs[scored]

    def scored_logits(
        self,
        sequences: Sequence[Ids],
        *,
        stride: int | None = None,
        batch_tokens: int = BATCH_TOKENS,
    ) -> Iterator[ScoredBlock]:
        """The logits that score every token of each sequence but its first, a block at a time.

        Each token is scored once, in the strided window (`score_windows`) that gives it the
        most context; windows of all sequences are run as padded batches of at most
        `batch_tokens` positions (or one window), longest first, and the output head runs only
        for positions whose next token is scored, HEAD_ROWS of them at a time, so memory stays
        flat in the length of the text. Blocks of one sequence come in position order.
        """
        n_ctx = self.config.n_ctx
        if n_ctx < 2:
            raise GPT2Error(
                f"the model's context is {n_ctx} token: no token can be scored, since a window "
                "of one token gives it no context"
            )
        stride = n_ctx // 2 if stride is None else stride
        if not 1 <= stride <= n_ctx:
            raise GPT2Error(
                f"stride must be between 1 and the model's n_ctx ({n_ctx}), got {stride}"
            )
        rows = [self.scoring_sequence(seq, bos=False) for seq in sequences]
        windows = [
            (row, *window)
            for row, seq in enumerate(rows)
            for window in score_windows(len(seq), n_ctx, stride)
        ]
        windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # stable: a row's stay in order
        while windows:
            size = max(1, batch_tokens // (windows[0][2] - windows[0][1]))
            batch, windows = windows[:size], windows[size:]
            yield from self._score_batch(rows, batch)

    def _score_batch(
        self, rows: list[NDArray[np.intp]], windows: list[tuple[int, int, int, int]]
    ) -> Iterator[ScoredBlock]:
        """Run windows (row, begin, end, first scored) as one right-padded batch, and the output
        head HEAD_ROWS scored positions at a time."""
        width = max(end - begin for _, begin, end, _ in windows)
        batch = np.zeros((len(windows), width), np.intp)  # [B, T]
        for b, (row, begin, end, _) in enumerate(windows):
            batch[b, : end - begin] = rows[row][begin:end]
        state = self.empty_state(len(windows), width, logits=HEAD_ROWS)
        for start, x in self._run_prompts(state, batch):  # x [B, chunk, D]
            # the hidden state at window position p predicts the token at p + 1
            picks = [
                (
                    b,
                    np.arange(
                        max(start, first - begin - 1), min(start + x.shape[1], end - begin - 1)
                    ),
                )
                for b, (_, begin, end, first) in enumerate(windows)
            ]
            picks = [(b, p) for b, p in picks if p.size]
            if not picks:
                continue
            hidden = np.concatenate([x[b, p - start] for b, p in picks])  # [n, D]
            which = np.concatenate([np.full(p.size, b) for b, p in picks])  # [n]: window
            targets = np.concatenate([p + 1 + windows[b][1] for b, p in picks])  # [n]: positions
            for lo in range(0, len(hidden), HEAD_ROWS):
                logits = self._head(hidden[lo : lo + HEAD_ROWS], targets[lo : lo + HEAD_ROWS] - 1)
                part = which[lo : lo + HEAD_ROWS]
                for b in np.unique(part):  # [V]-wide rows of one window at a time, in order
                    rows_here = np.flatnonzero(part == b)
                    row, positions = windows[b][0], targets[lo + rows_here]
                    yield ScoredBlock(
                        row=row,
                        positions=positions,
                        targets=rows[row][positions],
                        logits=logits[rows_here[0] : rows_here[-1] + 1],
                    )

    def scoring_sequence(self, ids: Ids, *, bos: bool) -> NDArray[np.intp]:
        """The sequence that scores `ids`: checked, `<|endoftext|>` first with `bos`; a GPT2Error
        when there is nothing to score (no ids, or one without `bos`)."""
        array = np.asarray(ids)
        if array.ndim != 1:
            raise GPT2Error(
                f"ids must be a 1-D sequence of token ids, got shape {list(array.shape)}"
            )
        if array.size:
            self.check_ids(array)
        if array.size == 0 or (array.size == 1 and not bos):
            raise GPT2Error(
                "nothing to score: the text is empty"
                if array.size == 0
                else "nothing to score: one token has no context unless <|endoftext|> is put "
                "before it (bos=True, the default, which --no-bos turns off)"
            )
        if bos:
            array = np.concatenate([[self.tokenizer.eot_token], array])
        return array.astype(np.intp)

    def _run_prompts(
        self, state: DecodeState, batch: NDArray[np.intp]
    ) -> Iterator[tuple[int, Array]]:
        """Run prompts [B, T] into an empty cache a chunk of positions at a time (about
        PREFILL_TOKENS in all per pass): yield each chunk's first position and hidden states
        [B, chunk, D].
        """
        chunk = max(1, PREFILL_TOKENS // batch.shape[0])
        for start in range(0, batch.shape[1], chunk):
            yield start, self._extend(state, batch[:, start : start + chunk])

    def _extend(self, state: DecodeState, ids: NDArray[np.intp]) -> Array:
        """Run ids [B, T] at each row's next T positions; return their final hidden states."""
        positions = state.lengths[:, None] + np.arange(ids.shape[1])  # [B, T]
        with np.errstate(all="ignore"):  # weights that overflow float32 are caught in _head
            x = forward(ids, positions, self.params, self.config, state.keys, state.values)
        state.lengths += ids.shape[1]  # in place: a `rows` view updates the whole cache's lengths
        return x

    def _head(self, x: Array, positions: NDArray[np.intp]) -> Array:
        """Logits of final hidden states x [..., D] at `positions` [...], all finite or an error.

        NaN or Inf logits cannot be sampled or scored; they come from weights that hold NaN or
        Inf, or values so large that float32 overflows, so the error names the first position.
        """
        with np.errstate(all="ignore"):
            logits = output_head(x, self.params)  # [..., V]
        finite = np.isfinite(logits).all(axis=-1)  # [...]
        if not finite.all():
            first = tuple(np.argwhere(~finite)[0])
            row = f" of row {first[0]}" if finite.shape[0] > 1 else ""
            raise GPT2Error(
                f"the model's logits at position {int(positions[first])}{row} are not finite "
                "(NaN or Inf): its weights hold NaN or Inf, or values too large for float32"
            )
        return logits

    def check_fits(self, n_batch: int, capacity: int, *, logits: int) -> None:
        """Raise GPT2Error unless a KV cache of n_batch rows x `capacity` positions and `logits`
        rows of logits (with room for two working copies) fit in the memory available now.

        The cache comes from calloc and is paged in as it is written, so without this check a
        batch too large for the machine would fail late, as an out-of-memory kill.
        """
        c = self.config
        cache = 2 * c.n_layer * n_batch * c.n_head * capacity * c.head_dim * 4  # K and V
        needed = cache + 3 * logits * c.n_vocab * 4
        available = available_memory()
        if available is not None and needed > available:
            raise GPT2Error(
                f"{n_batch} sequence(s) of {capacity} positions need about {needed / 2**30:.1f} "
                f"GiB (KV cache and logits), but {available / 2**30:.1f} GiB of memory is "
                "available; use fewer samples or shorter inputs"
            )

    def empty_state(self, n_batch: int, capacity: int, *, logits: int) -> DecodeState:
        """A zeroed cache for n_batch rows of `capacity` positions, all rows empty, once
        `check_fits` agrees that it and `logits` rows of logits fit in memory.

        Zeros, not np.empty: in a batch, a short row's attention spans positions it never wrote
        (the longest row's), masked to weight 0, and 0 * a stray NaN would still be NaN. The
        zeros cost nothing up front: `lazy_zeros` pages them in 4 KiB at a time as rows are
        written.
        """
        self.check_fits(n_batch, capacity, logits=logits)
        c = self.config
        shape = (c.n_layer, n_batch, c.n_head, capacity, c.head_dim)  # [L, B, H, C, hd]
        return DecodeState(
            keys=lazy_zeros(shape),
            values=lazy_zeros(shape),
            lengths=np.zeros(n_batch, np.intp),
        )

    def _checked(self, ids: ArrayLike, truncate: bool) -> NDArray[np.intp]:
        """One prompt as valid ids, at most n_ctx long (its last n_ctx tokens with `truncate`)."""
        array = np.asarray(ids)
        n_ctx = self.config.n_ctx
        if array.ndim != 1 or array.size == 0:
            raise GPT2Error(
                f"a prompt must be a non-empty sequence of token ids, got shape {list(array.shape)}"
            )
        if len(array) > n_ctx:
            if not truncate:
                raise GPT2Error(
                    f"prompt is {len(array)} tokens but the model's context is {n_ctx} tokens; "
                    f"shorten it, or truncate it to its last {n_ctx} tokens"
                )
            array = array[-n_ctx:]
        self.check_ids(array)
        return array.astype(np.intp)

    def check_ids(self, ids: NDArray[Any]) -> None:
        """Reject ids that are not integers in [0, n_vocab), naming the first bad one."""
        n_vocab = self.config.n_vocab
        if not np.issubdtype(ids.dtype, np.integer):
            raise GPT2Error(f"token ids must be integers, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= n_vocab))
        if bad.size:
            raise GPT2Error(
                f"token id {int(ids.flat[bad[0]])} at position {int(bad[0])} is outside "
                f"the vocabulary [0, {n_vocab})"
            )
