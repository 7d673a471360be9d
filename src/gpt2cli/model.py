"""GPT-2 in NumPy: the transformer as small pure functions, and `GPT2`, which loads and runs them.

The functions read like the paper (and picoGPT): `gelu`, `layer_norm`, `linear`,
`attention`, `mha`, `mlp`, `block`, `forward`. Shapes in the comments: B sequences in a batch, T
positions computed in this pass, S positions attended to, D n_embd, H n_head, hd head width,
V n_vocab, C cache capacity, L n_layer.

Everything is float32: constants are Python floats, which NumPy 2 (NEP 50) never lets widen a
float32 array, and no function creates an array with a default (float64) dtype.

Decoding is incremental. `GPT2.prefill` runs the prompts once, caching every position's keys and
values in arrays allocated once for the whole batch, and returns the logits of the next token
only; `GPT2.step` then feeds one token per sequence, costing one position of work. The cache
and the memory it lives in are `gpt2cli.kvcache`'s; scoring text (Hugging Face's strided
windows) is `gpt2cli.score`'s, on `GPT2.run_prompts` and `GPT2.head`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gpt2cli import quant
from gpt2cli.config import GPT2Config, too_long
from gpt2cli.errors import GPT2Error
from gpt2cli.kvcache import DecodeState, keep_freed_memory, lazy_zeros

if TYPE_CHECKING:
    from gpt2cli.quant import Packed
    from gpt2cli.tokenizer import Tokenizer
    from gpt2cli.weights import Params

Array = NDArray[np.floating[Any]]  # float32 throughout (tested); numpy stubs cannot track it
Ids = Sequence[int] | NDArray[np.integer[Any]]  # one sequence of token ids

# prompt tokens per forward pass, over the whole batch: each layer's matrix products take this
# many rows at once, enough for BLAS's full speed (measured: 512 and 1,024 rows run alike, 128
# about 15% slower) while the [B, T, 4D] MLP activations stay small (6.3 MB for 124M)
PREFILL_TOKENS = 512
# narrow weights (bfloat16, int8) widen each matrix for BLAS once per pass (`quant.Packed`), so
# they take longer passes: half the widening of 512 (measured, a 1,024-token int8 prefill: 0.155
# s of widening down to 0.06-0.08 s, 2-5% of the whole)
NARROW_PREFILL_TOKENS = 1024

# queries per attention product, over the whole batch: bounds the [B, H, Q, S] scores (6.3 MB
# for 124M) and computes little that the causal mask throws away
QUERY_ROWS = 128

# weights stored transposed are multiplied as (w.T @ x.T).T below this many rows, where that
# form is faster (0.5-0.75x the time of x @ w for one row), and as x @ w from it on, where the
# transposed form's copy back to row order costs more than it gains
TRANSPOSED_ROWS = 256

# positions per product with the output head, in `model(ids)` and in scoring: [HEAD_ROWS, V]
# logits are 25 MB (narrow weights: `GPT2.head_rows`)
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


def linear(x: Array, w: Array | Packed, b: Array) -> Array:
    """x @ w + b over the last axis, as one matrix product however many leading axes x has.

    Weights stored transposed (`w.T` contiguous: `weights.transposed_layout`) are multiplied as
    (w.T @ x.T).T when x has fewer than TRANSPOSED_ROWS rows, the product BLAS runs fastest for
    them; the result is the same. Weights in panels (`quant.Packed`: float32 with the `fast`
    extra, bfloat16, int8) multiply themselves, on the compiled kernels.
    """
    if not isinstance(w, np.ndarray):
        return w.linear(x, b)
    rows = x.reshape(-1, w.shape[0])  # [..., n_in] -> [m, n_in]: the weights are read once
    out: Array
    transposed = w.flags.f_contiguous and not w.flags.c_contiguous
    if len(rows) < TRANSPOSED_ROWS and transposed:
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
    head: Array | Packed = params["lm_head"] if "lm_head" in params else params["wte"]  # [V, D]
    if not isinstance(head, np.ndarray):  # panels (quant.Packed)
        return head.linear(x)
    logits: Array = x @ head.T  # [..., D] @ [D, V] -> [..., V]
    return logits


class GPT2:
    """A GPT-2 model: its config, its float32 parameters and (lazily) its tokenizer.

    `model(ids)` gives logits for every position; `prefill` and `step` decode incrementally
    with a KV cache (`prefill_into` adds prompts to one already decoding). Generation loops
    live above it, in `gpt2cli.scheduler` and `generate`, and scoring in `gpt2cli.score`.
    """

    def __init__(
        self,
        config: GPT2Config,
        params: Params,
        folder: Path | None = None,
        *,
        dtype: str = "float32",
    ) -> None:
        self.config = config
        self.params = params
        self.folder = folder  # where the tokenizer files are looked for
        self.dtype = dtype  # of the weight matrices (gpt2cli.quant.DTYPES); activations: float32
        keep_freed_memory()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, revision: str | None = None, *, dtype: str = "float32"
    ) -> GPT2:
        """Load a model by hub name ("gpt2", "124M", "owner/name") or from a local folder.

        `dtype` "bfloat16" or "int8" narrows the weight matrices (`gpt2cli.quant`; they need the
        `fast` extra, numba), converted once into the user's cache; "float32" keeps the
        checkpoint's values (widened from float16 or bfloat16 checkpoints), in the layout
        `weights.transposed_layout` caches: panels for the kernels with the `fast` extra."""
        from gpt2cli import hub, weights

        quant.check_dtype(dtype)
        if dtype != "float32":
            quant.load_kernels(dtype)  # before any download: a missing extra fails at once
        folder = hub.resolve(str(name_or_path), revision)
        config, params = weights.load(folder)
        files = weights.weight_files(folder)
        if dtype == "float32":
            params = weights.transposed_layout(params, files)
        else:
            params = quant.pack(params, dtype, files)
        return cls(config, params, folder, dtype=dtype)

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
        state = DecodeState.empty(self.config, n_batch, n_pos, logits=n_batch * n_pos)
        out = lazy_zeros((n_batch, n_pos, self.config.n_vocab))  # [B, T, V]: 206 MB for 1,024
        size = max(1, self.head_rows // n_batch)  # positions per product with the head
        for start, x in self.run_prompts(state, batch):  # x [B, chunk, D]
            for lo in range(start, start + x.shape[1], size):
                piece = x[:, lo - start : lo - start + size]  # [B, n, D]
                positions = np.broadcast_to(lo + np.arange(piece.shape[1]), piece.shape[:2])
                out[:, lo : lo + piece.shape[1]] = self.head(piece, positions)
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
        state, logits, _ = self._prefill(prompts, capacity, truncate=truncate)
        return state, logits

    def prefill_into(
        self,
        state: DecodeState,
        prompts: Sequence[Ids],
        rows: Sequence[Sequence[int]],
        *,
        hidden: Sequence[bool] = (),
    ) -> tuple[Array, list[Array | None]]:
        """Run prompts into rows of an existing cache, replacing what those rows held, and
        return the logits [B, V] of each prompt's next token: how requests join a batch that is
        already decoding. The prompts run once, as one padded batch (`prefill`); prompt i's keys
        and values then fill each of its rows `rows[i]` (one per sample drawn from it).

        Returned with the logits, one entry per prompt: where `hidden[i]` is true, prompt i's
        final hidden states [T_i, D] (after ln_f: what `head` turns into the logits at each of
        its positions, which `score.score_hidden` scores, so a prompt's own logprobs cost no
        second pass), else None.
        """
        longest = max(len(p) for p in prompts)
        if longest > state.capacity:
            raise GPT2Error(
                f"prompt is {longest} tokens but the cache holds {state.capacity} positions a row"
            )
        fresh, logits, states = self._prefill(prompts, longest, hidden=hidden)
        for i, targets in enumerate(rows):
            n = int(fresh.lengths[i])
            for row in targets:
                state.keys[:, row, :, :n] = fresh.keys[:, i, :, :n]
                state.values[:, row, :, :n] = fresh.values[:, i, :, :n]
                state.lengths[row] = n
        return logits, states

    def _prefill(
        self,
        prompts: Sequence[Ids],
        capacity: int | None,
        *,
        truncate: bool = False,
        hidden: Sequence[bool] = (),
    ) -> tuple[DecodeState, Array, list[Array | None]]:
        """`prefill`, and the final hidden states [T_i, D] of each prompt i whose `hidden[i]` is
        true (None for the others, and for all when `hidden` is empty)."""
        n_ctx = self.config.n_ctx
        rows = [self._checked(p, truncate) for p in prompts]
        if not rows:
            raise GPT2Error("prefill needs at least one prompt")
        if len(hidden) not in (0, len(rows)):
            raise GPT2Error(f"hidden needs one flag per prompt ({len(rows)}), got {len(hidden)}")
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
        state = DecodeState.empty(self.config, len(rows), capacity, logits=len(rows))
        last = np.empty((len(rows), self.config.n_embd), np.float32)  # [B, D]
        kept: list[Array | None] = [  # [T_i, D] each
            np.empty((len(row), self.config.n_embd), np.float32) if wanted else None
            for row, wanted in zip(rows, list(hidden) or [False] * len(rows), strict=True)
        ]
        for start, x in self.run_prompts(state, batch):  # x [B, chunk, D]
            ends = (start <= lengths - 1) & (lengths - 1 < start + x.shape[1])  # rows ending here
            last[ends] = x[ends, lengths[ends] - 1 - start]
            for b, out in enumerate(kept):
                if out is not None and start < len(out):
                    out[start : start + x.shape[1]] = x[b, : len(out) - start]
        state.lengths[:] = lengths
        return state, self.head(last, lengths - 1), kept  # [B, V]

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
        return self.step_many(state, ids[:, None])[:, 0]  # [B, V]

    def step_many(self, state: DecodeState, ids: ArrayLike) -> Array:
        """Feed T tokens per row (`ids` [B, T]) at each row's next positions and return the
        logits [B, T, V] after each: a `step` over several positions per row in one pass, how
        drafted tokens are verified.

        Every row needs room (`state.room >= 1`). A row may be right-padded (its logits there
        ignored): padding that would run past the capacity is computed at the last position,
        which the row's own tokens must then leave free. Each row's length grows by T, at most
        to the capacity; setting `state.lengths[row]` back rolls the rest back (what lies past a
        row's length is never attended to, and is overwritten as it grows).
        """
        array = np.asarray(ids)
        if array.ndim != 2 or array.shape[0] != state.lengths.shape[0] or not array.shape[1]:
            raise GPT2Error(
                f"step_many needs ids [B, T] with B = {state.lengths.shape[0]} rows and T >= 1, "
                f"got shape {list(array.shape)}"
            )
        full = np.flatnonzero(state.room < 1)
        if full.size:
            raise GPT2Error(
                f"row {full[0]} already holds {state.capacity} positions, the cache's capacity; "
                "it has finished (finish reason 'length')"
            )
        self.check_ids(array)
        positions = self._positions(state, array.shape[1])  # [B, T]
        logits = self.head(self._extend(state, array), positions)
        return logits  # [B, T, V]

    def run_prompts(
        self,
        state: DecodeState,
        batch: NDArray[np.intp],
        *,
        tokens: int | None = None,
    ) -> Iterator[tuple[int, Array]]:
        """Run prompts [B, T] (checked ids, right-padded) into an empty cache a chunk of
        positions at a time (about `tokens` in all per pass, `pass_tokens` by default): yield
        each chunk's first position and final hidden states [B, chunk, D], for `head` to turn
        into logits.
        """
        chunk = max(1, (tokens or self.pass_tokens) // batch.shape[0])
        for start in range(0, batch.shape[1], chunk):
            yield start, self._extend(state, batch[:, start : start + chunk])

    def _extend(self, state: DecodeState, ids: NDArray[np.intp]) -> Array:
        """Run ids [B, T] at each row's next T positions; return their final hidden states."""
        positions = self._positions(state, ids.shape[1])  # [B, T]
        with np.errstate(all="ignore"):  # weights that overflow float32 are caught in head
            x = forward(ids, positions, self.params, self.config, state.keys, state.values)
        # in place: a `rows` view updates the whole cache's lengths
        np.minimum(state.lengths + ids.shape[1], state.capacity, out=state.lengths)
        return x

    @staticmethod
    def _positions(state: DecodeState, n: int) -> NDArray[np.intp]:
        """Each row's next n positions [B, n]; any past the capacity (a padded row's tail in
        `step_many`) are the last one."""
        positions: NDArray[np.intp] = np.minimum(
            state.lengths[:, None] + np.arange(n), state.capacity - 1
        )
        return positions

    @property
    def pass_tokens(self) -> int:
        """Prompt tokens per forward pass over a batch: PREFILL_TOKENS, or for narrow weights,
        which are widened for BLAS once per pass, NARROW_PREFILL_TOKENS."""
        return PREFILL_TOKENS if self.dtype == "float32" else NARROW_PREFILL_TOKENS

    @property
    def head_rows(self) -> int:
        """Positions per product with the output head where all positions' logits are wanted:
        HEAD_ROWS, or for narrow weights as many as their kernels take (`quant.NARROW_ROWS`),
        which beats widening the head for BLAS at every product."""
        return HEAD_ROWS if self.dtype == "float32" else quant.NARROW_ROWS

    def head(self, x: Array, positions: NDArray[np.intp]) -> Array:
        """Logits of final hidden states x [..., D] at `positions` [...], all finite or an error.

        NaN or Inf logits cannot be sampled or scored; they come from weights that hold NaN or
        Inf, or values so large that float32 overflows, so the error names the first position.
        """
        rows = x.reshape(-1, x.shape[-1])  # [m, D]: one product (3x faster than 8 of [1, D])
        with np.errstate(all="ignore"):
            logits = output_head(rows, self.params).reshape(*x.shape[:-1], -1)  # [..., V]
        finite = np.isfinite(logits).all(axis=-1)  # [...]
        if not finite.all():
            first = tuple(np.argwhere(~finite)[0])
            row = f" of row {first[0]}" if finite.shape[0] > 1 else ""
            raise GPT2Error(
                f"the model's logits at position {int(positions[first])}{row} are not finite "
                "(NaN or Inf): its weights hold NaN or Inf, or values too large for float32"
            )
        return logits

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
                raise GPT2Error(too_long(len(array), n_ctx, room=False))
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
