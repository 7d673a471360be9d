"""GPT-2's byte-level BPE tokenizer: text -> ids -> text, byte-exact with OpenAI's and tiktoken's.

Text is split into pre-tokens by GPT-2's pattern (words with their leading space, digit runs,
punctuation runs, whitespace runs); each pre-token's UTF-8 bytes are merged pairwise by the ranks
in the merges file until no ranked pair is left. Real text repeats words heavily, so each
pre-token's ids are cached (in a bounded dict) and most of the work is one regex scan. A long
pre-token (a run of letters, digits or symbols with no space: minified code, a repeated emoji) is
merged in O(n log n) rather than O(n^2), and a long text can be encoded as a stream of chunks.
"""

from __future__ import annotations

import array
import functools
import hashlib
import heapq
import marshal
import operator
import os
import sys
from collections.abc import Iterable, Iterator
from itertools import chain, islice, pairwise
from pathlib import Path
from typing import Any

from gpt2cli import cache, jsonfile
from gpt2cli.errors import GPT2Error

# GPT-2's pre-tokenizer, as tiktoken writes it (`\s++$` and `\s` are equivalent to OpenAI's
# `\s+`, and the possessive quantifiers only save backtracking). `\Z` is Rust's `$`.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++\Z|\s+(?!\S)|\s"""

# Code points that `regex` (Unicode 17 tables) calls letters or numbers but that tiktoken (Unicode
# 16 tables) leaves unassigned, so treats as punctuation. Text holding one is split by
# EXACT_PATTERN, which moves them back; that pattern is twice as slow, so it is used only then.
# tests/test_tokenizer.py checks both classes against tiktoken for every code point.
NEWER_LETTERS_AND_NUMBERS = (
    "0558 058B-058C 088F 0C5C 0CDC 208F 209D-209F A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D "
    "107BB-107BF 10940-10959 10EC5-10EC7 10ED9-10EEE 11B0A 11DB0-11DDB 11DE0-11DE9 11DF1 1246F "
    "12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18CD6-18CDA "
    "18D09-18D20 18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1D6A6 1DF1F-1DF24 "
    "1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF 1E6C0-1E6DE 1E6E0-1E6E2 1E6E4-1E6E5 1E6E7-1E6ED "
    "1E6F0-1E6F4 1E6FE-1E6FF 2B73A-2B73F 2B81E 2CEA2-2CEAD 323B0-33479 3D000-3FC3F"
)
NEWER = (
    "["
    + "".join(
        "-".join(chr(int(end, 16)) for end in span.split("-"))
        for span in NEWER_LETTERS_AND_NUMBERS.split()
    )
    + "]"
)
LETTERS = rf"[\p{{L}}--{NEWER}]"  # tiktoken's \p{L}
NUMBERS = rf"[\p{{N}}--{NEWER}]"  # tiktoken's \p{N}
OTHERS = rf"[^\s[[\p{{L}}\p{{N}}]--{NEWER}]]"  # tiktoken's [^\s\p{L}\p{N}]
EXACT_PATTERN = (
    rf"(?V1)'(?:[sdmt]|ll|ve|re)| ?{LETTERS}++| ?{NUMBERS}++| ?{OTHERS}++|\s++\Z|\s+(?!\S)|\s"
)
ENDOFTEXT = "<|endoftext|>"
CACHE_SIZE = 100_000  # pre-tokens whose ids are remembered; real text needs ~10k-50k
LONG_PIECE = 64  # bytes from which `_bpe_long` is faster than `_bpe` (even at ~50, 2-3x at 200)
# the longest pre-token (a run with no space or other break: base64, minified code) encoded: its
# merges need about 140 bytes of memory per byte (1.1 GB and ~11 s for 8 MiB), so a longer run
# (or /dev/zero) is one error instead of gigabytes, or a stream that never says anything
MAX_PIECE_BYTES = 8 << 20
# Pre-tokens at the end of a text that more text can still change. The pattern decides each one
# by looking no further than the start of the second pre-token after it (a run looks one
# character past its end, `'ll` two past its start, spaces to the end of their run and one more),
# so all but the last two are final.
UNFINISHED_PIECES = 2

DATA_DIR = Path(__file__).resolve().parent / "data"
HF_FILES = ("vocab.json", "merges.txt")  # the Hugging Face repo layout
OPENAI_FILES = ("encoder.json", "vocab.bpe")  # OpenAI's released checkpoint layout


def _bytes_to_unicode() -> str:
    """GPT-2's byte -> printable-character table: index b is the character that stands for byte b.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    shifted to U+0100 upwards, so every vocabulary entry is printable (OpenAI's encoder.py).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 256 + 256))
    return "".join(chr(b) if b in printable else chr(next(shifted)) for b in range(256))


BYTE_CHARS = _bytes_to_unicode()
_TO_BYTE_CHARS = {b: c for b, c in enumerate(BYTE_CHARS)}  # str.translate: latin-1 -> GPT-2
_FROM_BYTE_CHARS = {ord(c): b for b, c in enumerate(BYTE_CHARS)}  # str.translate: GPT-2 -> latin-1


class _NewerUnicode(Exception):
    """A pre-token holds a code point that PATTERN, with newer Unicode tables, misclassifies."""


class _PieceCache(dict[str, list[int]]):
    """Pre-token -> ids; a miss computes the ids, and the whole cache is dropped when full.

    A dict subclass with `__missing__` keeps the hit path entirely in C (`map(cache.__getitem__,
    pieces)`), which is what makes pure-Python BPE fast on real text.
    """

    def __init__(self, encode_piece: Any, size: int) -> None:
        super().__init__()
        self._encode_piece = encode_piece
        self._size = size

    def __missing__(self, piece: str) -> list[int]:
        if len(self) >= self._size:
            self.clear()
        ids: list[int] = self._encode_piece(piece)
        self[piece] = ids
        return ids


class Tokenizer:
    """GPT-2's byte-level BPE: `encode(text) -> ids`, `decode(ids) -> text`."""

    def __init__(
        self, encoder: dict[str, int], ranks: dict[tuple[int, int], int], merged: list[int]
    ) -> None:
        """Build from checked tables (`from_dir` makes them; use it or `default`): the vocabulary
        (GPT-2's printable-byte strings -> id), each merge's pair of ids -> its rank, and
        rank -> the merged token's id.
        """
        import regex

        self._encoder = encoder
        self._ranks = ranks
        self._merged = merged
        self._byte_ids = [encoder[c] for c in BYTE_CHARS]
        self._split = regex.compile(PATTERN).findall
        self._newer = regex.compile(NEWER).search
        self._specials = {ENDOFTEXT: encoder[ENDOFTEXT]}
        self._special_pattern = regex.compile("|".join(map(regex.escape, self._specials)))
        self._cache = _PieceCache(self._encode_piece, CACHE_SIZE)
        self._decoder: list[bytes] | None = None  # id -> bytes, built on first decode
        self._pair_keys: tuple[Any, Any] | None = None  # for `_bpe_long`, built on first use

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `vocab.json` + `merges.txt` (Hugging Face) or `encoder.json` + `vocab.bpe`.

        Building the tables from the files takes 0.1-0.3 s, most of `gpt2 encode`'s run time,
        so they are kept in the user's cache (see `_tables`) and loaded from there next time.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise GPT2Error(f"tokenizer folder {folder} does not exist or is not a folder")
        vocab_name, merges_name = _layout(folder)
        return cls(*_tables(folder / vocab_name, folder / merges_name))

    @classmethod
    def default(cls) -> Tokenizer:
        """GPT-2's own vocabulary, shipped with the package; built once per process."""
        return _default_tokenizer()

    @property
    def n_vocab(self) -> int:
        """Number of token ids: valid ids are 0 .. n_vocab - 1."""
        return len(self._encoder)

    @property
    def eot_token(self) -> int:
        """The id of `<|endoftext|>` (50256 in GPT-2), which separates documents."""
        return self._specials[ENDOFTEXT]

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of B bytes is at least B / this many
        tokens, which bounds a text's tokens before it is encoded."""
        return max(map(len, self._decoder or self._build_decoder()))

    def encode(self, text: str, *, allowed_special: bool = True) -> list[int]:
        """Token ids of `text`.

        With `allowed_special` (the default, as in transformers) `<|endoftext|>` in the text is
        the single token `eot_token`; without it, that string is encoded like any other text,
        exactly as tiktoken's `encode_ordinary`.
        """
        return self._encode(text, allowed_special, final=True)[0]

    def encode_stream(
        self, chunks: Iterable[str], *, allowed_special: bool = True
    ) -> Iterator[list[int]]:
        """Token ids of the text that `chunks` spell, list by list as they become certain.

        Together the lists are exactly `encode("".join(chunks))`, however the text is cut, but
        memory stays bounded by the chunk size (and the longest word), not the text's length.
        The end of each chunk is held back until the next one arrives: its last two pre-tokens
        (a word may go on, a space before the end is split differently from one before a word,
        `'l` may become `'ll`) and any start of `<|endoftext|>`.

        When `chunks` fails with a GPT2Error (its input went bad: a byte that is not UTF-8), the
        text before the failure is encoded to its end first, so every id of it is yielded.
        """
        held, offset = "", 0  # offset: characters of the text before `held`
        source = iter(chunks)
        while True:
            try:
                chunk = next(source)
            except StopIteration:
                break
            except GPT2Error:  # the text ends, badly, after `held`
                if held:
                    yield self._encode(held, allowed_special, final=True, offset=offset)[0]
                raise
            text = held + chunk
            ids, held = self._encode(text, allowed_special, final=False, offset=offset)
            offset += len(text) - len(held)
            if ids:
                yield ids
            if len(held) > 2 * MAX_PIECE_BYTES:  # held: two pre-tokens; one is too long already
                raise _too_long(len(held.encode("utf-8")))
        ids = self._encode(held, allowed_special, final=True, offset=offset)[0]
        if ids:
            yield ids

    def _encode(
        self, text: str, allowed_special: bool, *, final: bool, offset: int = 0
    ) -> tuple[list[int], str]:
        """Ids of `text`, and (unless it is `final`) its end that more text could still change,
        held back unencoded. `offset` places `text` in a stream, for error messages."""
        try:
            return self._encode_text(text, allowed_special, final)
        except UnicodeEncodeError:
            position, char = next((p, c) for p, c in enumerate(text) if "\ud800" <= c <= "\udfff")
            raise GPT2Error(
                f"text has a lone surrogate U+{ord(char):04X} at position {offset + position} "
                "(counting from 0), which is not Unicode; a byte that is not UTF-8 in a "
                "command-line argument shows up as U+DC80..U+DCFF"
            ) from None

    def _encode_text(self, text: str, allowed_special: bool, final: bool) -> tuple[list[int], str]:
        ids: list[int] = []
        start = 0
        if allowed_special and any(s in text for s in self._specials):
            for match in self._special_pattern.finditer(text):
                ids += self._encode_ordinary(text[start : match.start()])
                ids.append(self._specials[match.group()])
                start = match.end()
        if final:
            ids += self._encode_ordinary(text[start:])
            return ids, ""
        # a special token that the next chunk may complete, then the unfinished pre-tokens
        end = len(text) - (self._special_start(text[start:]) if allowed_special else 0)
        head, unfinished = self._encode_pieces(text[start:end], UNFINISHED_PIECES)
        return ids + head, unfinished + text[end:]

    def _special_start(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a special token (or 0)."""
        return max(
            (n for s in self._specials for n in range(1, len(s)) if text.endswith(s[:n])),
            default=0,
        )

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not UTF-8 (a split character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of `ids`; GPT2Error names the first id that is not in the vocabulary."""
        ids = list(ids)
        decoder = self._decoder or self._build_decoder()
        try:
            if not ids or (min(ids) >= 0 and max(ids) < len(decoder)):
                return b"".join([decoder[i] for i in ids])
        except TypeError:  # something that is not an integer: found and named below
            pass
        position, bad = next((p, i) for p, i in enumerate(ids) if self._as_id(i) is None)
        raise self._bad_id(bad, position)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (for some ids, part of a UTF-8 character): for streaming."""
        i = self._as_id(token)
        if i is None:
            raise self._bad_id(token)
        return (self._decoder or self._build_decoder())[i]

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens: pre-tokenize, then BPE each (cached) pre-token."""
        return self._encode_pieces(text, 0)[0]

    def _encode_pieces(self, text: str, unfinished: int) -> tuple[list[int], str]:
        """Ids of `text`'s pre-tokens but its last `unfinished` ones, and the text of those."""
        pieces = self._split(text)
        done = max(len(pieces) - unfinished, 0)
        try:
            ids = list(chain.from_iterable(map(self._cache.__getitem__, islice(pieces, done))))
        except _NewerUnicode:  # rare text: split again exactly, and leave such pieces uncached
            newer, cache = self._newer, self._cache
            pieces = self._exact_split(text)
            done = max(len(pieces) - unfinished, 0)
            ids = [i for p in pieces[:done] for i in (self._bpe_piece(p) if newer(p) else cache[p])]
        return ids, "".join(pieces[done:])

    def _encode_piece(self, piece: str) -> list[int]:
        """A cache miss: the pre-token's ids, unless it holds a character `_split` misclassifies."""
        if not piece.isascii() and self._newer(piece):  # isascii: C speed on a 1 MB word
            raise _NewerUnicode
        return self._bpe_piece(piece)

    def _exact_split(self, text: str) -> list[str]:
        import regex

        return regex.findall(EXACT_PATTERN, text)  # type: ignore[no-any-return]

    def _bpe_piece(self, piece: str) -> list[int]:
        """Ids of one pre-token: its own id if it is a vocabulary entry, else its BPE merges."""
        word = piece.encode("utf-8").decode("latin-1").translate(_TO_BYTE_CHARS)
        token = self._encoder.get(word)
        if token is not None and word not in self._specials:
            return [token]
        raw = piece.encode("utf-8")
        if len(raw) > MAX_PIECE_BYTES:
            raise _too_long(len(raw))
        ids = list(map(self._byte_ids.__getitem__, raw))
        return self._bpe(ids) if len(ids) < LONG_PIECE else self._bpe_long(ids)

    def _bpe(self, ids: list[int]) -> list[int]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until no pair has a rank.

        O(n^2) in the pre-token's length n, but each step is a C-speed `min`: the fastest way for
        the short pre-tokens of ordinary text.
        """
        ranks, merged, unranked = self._ranks, self._merged, len(self._merged)
        pair_ranks = [ranks.get(pair, unranked) for pair in pairwise(ids)]  # pair i: ids[i:i+2]
        while pair_ranks:
            rank = min(pair_ranks)
            if rank == unranked:
                break
            i = pair_ranks.index(rank)
            ids[i : i + 2] = [merged[rank]]
            del pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get((ids[i - 1], ids[i]), unranked)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get((ids[i], ids[i + 1]), unranked)
        return ids

    def _initial_pairs(self, ids: list[int]) -> tuple[list[int], dict[int, list[int]]]:
        """For `_bpe_long`: each adjacent pair's rank (unranked for none, and after the last
        part) and the positions of each rank, found with NumPy over the whole pre-token at once:
        a million pairs cost one sorted search instead of a million dict lookups."""
        import numpy as np

        keys, key_ranks = self._pair_keys or self._build_pair_keys()
        unranked = len(self._merged)
        parts = np.array(ids, np.int64)
        pairs = (parts[:-1] << 32) | parts[1:]  # [n - 1]
        where = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
        found = keys[where] == pairs
        pair_ranks = np.where(found, key_ranks[where], unranked)  # [n - 1]
        ranked = np.flatnonzero(found)
        order = ranked[np.argsort(pair_ranks[ranked], kind="stable")]  # by rank, then position
        sorted_ranks = pair_ranks[order]
        cuts = np.flatnonzero(np.diff(sorted_ranks)) + 1
        buckets = {
            int(sorted_ranks[start]): group.tolist()
            for start, group in zip([0, *cuts.tolist()], np.split(order, cuts), strict=True)
            if group.size  # no pair ranked: one empty group
        }
        return [*pair_ranks.tolist(), unranked], buckets

    def _build_pair_keys(self) -> tuple[Any, Any]:
        """Every merge's pair as one sorted int64 key (left << 32 | right), and its rank."""
        import numpy as np

        pairs = np.array(list(self._ranks), np.int64).reshape(-1, 2)  # [m, 2]
        keys = (pairs[:, 0] << 32) | pairs[:, 1]
        order = np.argsort(keys)
        self._pair_keys = keys[order], np.array(list(self._ranks.values()), np.int64)[order]
        return self._pair_keys

    def _bpe_long(self, ids: list[int]) -> list[int]:
        """`_bpe` in O(n log n), for long pre-tokens: the same merges in the same order.

        The parts form a linked list (`after`, `before`: the next and previous live position),
        and each position waits in the bucket of its pair's rank. The lowest rank's bucket is
        merged leftmost first; a position whose pair changed after it was queued is skipped. In a
        merges file learnt in order (GPT-2's) a merge makes only pairs of higher rank, so a bucket
        is emptied in one go; should one make a lower pair, the rest of the bucket waits until that
        pair is merged, exactly as in `_bpe`.
        """
        ranks, merged, unranked = self._ranks, self._merged, len(self._merged)
        n = len(ids)
        # pair_ranks[i]: rank of (ids[i], ids[after[i]]); unranked at the end, -1 once merged away
        pair_ranks, buckets = self._initial_pairs(ids)
        after, before = array.array("q", range(1, n + 1)), array.array("q", range(-1, n - 1))
        lowest = list(buckets)  # a heap of the ranks that have a bucket
        heapq.heapify(lowest)
        while lowest:
            rank = heapq.heappop(lowest)
            positions = sorted(buckets.pop(rank))
            token = merged[rank]
            for done, i in enumerate(positions, start=1):
                if pair_ranks[i] != rank:
                    continue
                j = after[i]
                k = after[i] = after[j]
                ids[i], pair_ranks[j] = token, -1
                if k < n:  # the new part's pair with its right neighbour
                    before[k] = i
                    right = pair_ranks[i] = ranks.get((token, ids[k]), unranked)
                    if right != unranked:
                        if right not in buckets:
                            heapq.heappush(lowest, right)
                        buckets.setdefault(right, []).append(i)
                else:
                    pair_ranks[i] = unranked
                h = before[i]
                if h >= 0:  # and its left neighbour's pair with it
                    left = pair_ranks[h] = ranks.get((ids[h], token), unranked)
                    if left != unranked:
                        if left not in buckets:
                            heapq.heappush(lowest, left)
                        buckets.setdefault(left, []).append(h)
                if lowest and lowest[0] < rank:
                    buckets[rank] = positions[done:]
                    heapq.heappush(lowest, rank)
                    break
        parts, i = [], 0
        while i < n:  # the live parts, along the list
            parts.append(ids[i])
            i = after[i]
        return parts

    def _build_decoder(self) -> list[bytes]:
        """id -> bytes for every id; special tokens (outside GPT-2's byte alphabet) as UTF-8."""
        decoder = [b""] * len(self._encoder)
        for token, i in self._encoder.items():
            text = token.translate(_FROM_BYTE_CHARS)
            try:
                decoder[i] = text.encode("latin-1")
            except UnicodeEncodeError:
                decoder[i] = token.encode("utf-8")
        for token, i in self._specials.items():
            decoder[i] = token.encode("utf-8")
        self._decoder = decoder
        return decoder

    def _as_id(self, value: object) -> int | None:
        """`value` as a token id (any integer type, numpy's included), or None if it is not one."""
        if isinstance(value, bool):
            return None
        try:
            i = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            return None
        return i if 0 <= i < self.n_vocab else None

    def _bad_id(self, value: object, position: int | None = None) -> GPT2Error:
        where = "" if position is None else f" at position {position} (counting from 0)"
        try:
            operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            return GPT2Error(f"{value!r}{where} is not an integer token id")
        return GPT2Error(
            f"{value!r}{where} is not a token id: ids run from 0 to {self.n_vocab - 1}"
        )


def _too_long(n_bytes: int) -> GPT2Error:
    return GPT2Error(
        f"the text holds a run of {n_bytes / 2**20:.1f} MiB with no space or other break, more "
        f"than gpt2 encodes at once ({MAX_PIECE_BYTES >> 20} MiB); break it up"
    )


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DATA_DIR)


def load_tokenizer(folder: Path | None) -> Tokenizer:
    """The tokenizer for a model folder: its own files when it has them, else GPT-2's default.

    Every GPT-2 checkpoint shares one vocabulary, so a model folder without tokenizer files
    (config and weights only) uses the built-in one. A folder with neither tokenizer files nor
    config.json is not a model, and one whose tokenizer files are broken: both are errors.
    """
    if folder is None:
        return Tokenizer.default()
    if not any((folder / name).exists() for name in (*HF_FILES, *OPENAI_FILES)):
        if not folder.is_dir():
            raise GPT2Error(f"model folder {folder} does not exist or is not a folder")
        if not (folder / "config.json").is_file():
            raise GPT2Error(
                f"{folder} is not a model folder: it has neither tokenizer files (vocab.json + "
                "merges.txt, or encoder.json + vocab.bpe) nor config.json"
            )
        return Tokenizer.default()
    return Tokenizer.from_dir(folder)


def _layout(folder: Path) -> tuple[str, str]:
    """The (vocabulary, merges) file names present in `folder`: HF layout first, then OpenAI's."""
    for names in (HF_FILES, OPENAI_FILES):
        present = [n for n in names if os.path.lexists(folder / n)]
        for name in present:  # a FIFO, folder or broken link there is named, never opened
            jsonfile.check_file(folder / name)
        if len(present) == 2:
            return names
        if present:
            (missing,) = set(names) - set(present)
            raise GPT2Error(
                f"{folder / present[0]} has no {missing} beside it: "
                f"a GPT-2 tokenizer needs both {names[0]} and {names[1]}"
            )
    raise GPT2Error(
        f"no tokenizer files in {folder}: expected vocab.json + merges.txt (Hugging Face layout) "
        "or encoder.json + vocab.bpe (OpenAI layout)"
    )


Tables = tuple[dict[str, int], dict[tuple[int, int], int], list[int]]  # Tokenizer's arguments
TABLES_FORMAT = 1  # change it when the tables change, so older cached ones are not used
MAX_CACHED = 64 << 20  # bytes of a cache file: GPT-2's tables take 1.9 MB


def _tables(vocab_path: Path, merges_path: Path) -> Tables:
    """The tokenizer tables of these two files: built and checked, or loaded from the cache.

    The cache holds them marshalled (a fast, data-only format) in `$XDG_CACHE_HOME/gpt2cli`
    (`~/.cache/gpt2cli`), named by a hash of both files' contents and of the Python version, and
    checked against a hash of its payload, so a stale or damaged file is rebuilt, never used.
    """
    vocab, merges = _read_bytes(vocab_path), _read_bytes(merges_path)
    key = hashlib.sha256(f"{TABLES_FORMAT} {sys.implementation.cache_tag}".encode())
    key.update(hashlib.sha256(vocab).digest() + hashlib.sha256(merges).digest())
    folder = cache.folder()
    cached = folder / f"tokenizer-{key.hexdigest()[:32]}.marshal" if folder else None
    tables = _load_cached(cached) if cached else None
    if tables is None:
        encoder = _parse_vocab(vocab_path, _utf8(vocab_path, vocab))
        pairs = _parse_merges(merges_path, _utf8(merges_path, merges), encoder)
        ranks = {(encoder[a], encoder[b]): rank for rank, (a, b) in enumerate(pairs)}
        tables = (encoder, ranks, [encoder[a + b] for a, b in pairs])
        if cached:
            _store_cached(cached, tables)
    return tables


def _load_cached(path: Path) -> Tables | None:
    """Tables stored by `_store_cached`, or None (a miss, so they are rebuilt) for anything else.

    The file is read only if it is a regular file of a plausible size; its checksum, then the
    shape of what it holds, are checked, and any surprise is a miss.
    """
    f = cache.open_entry(path, MAX_CACHED)
    if f is None:
        return None
    try:
        with f:
            data = f.read(MAX_CACHED + 1)
    except OSError:
        return None
    digest, payload = data[:32], data[32:]
    if len(data) > MAX_CACHED or hashlib.sha256(payload).digest() != digest:
        return None
    try:
        tables = marshal.loads(payload)
    except Exception:  # marshal data of any kind of damage
        return None
    return tables if _well_formed(tables) else None


def _well_formed(tables: object) -> bool:
    """Whether unmarshalled data has the shape of Tables, checked cheaply (checking every entry
    would cost most of what the cache saves): the three tables' types, the types of their first
    and last entries, and the entries `Tokenizer` looks up on creation."""
    if type(tables) is not tuple or len(tables) != 3:
        return False
    encoder, ranks, merged = tables
    if type(encoder) is not dict or type(ranks) is not dict or type(merged) is not list:
        return False
    if not all(type(encoder.get(c)) is int for c in (*BYTE_CHARS, ENDOFTEXT)):
        return False
    tokens = [next(iter(encoder)), next(reversed(encoder))]
    pairs = [next(iter(ranks)), next(reversed(ranks))] if ranks else []
    if not all(type(t) is str for t in tokens):
        return False
    if not all(type(p) is tuple and len(p) == 2 for p in pairs):
        return False
    ids = [*merged[:1], *merged[-1:], *(ranks[p] for p in pairs), *chain.from_iterable(pairs)]
    return all(type(i) is int for i in ids)


def _store_cached(path: Path, tables: Tables) -> None:
    """Store the tables with a checksum (`gpt2cli.cache.store`: atomic, failures ignored)."""
    payload = marshal.dumps(tables)
    if 32 + len(payload) <= MAX_CACHED:  # else it would never be loaded
        cache.store(path, lambda f: f.write(hashlib.sha256(payload).digest() + payload))


def _read_bytes(path: Path) -> bytes:
    try:
        with jsonfile.open_file(path) as f:  # a regular file, opened without blocking
            return f.read()
    except OSError as e:
        raise GPT2Error(f"cannot read {path}: {e.strerror}") from None


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GPT2Error(f"{path} is not UTF-8 text (byte offset {e.start})") from None


def _parse_vocab(path: Path, text: str) -> dict[str, int]:
    """The vocabulary: a JSON object of distinct ids 0..n-1 with all 256 byte tokens and EOT."""
    encoder = jsonfile.parse(text, str(path))
    if not isinstance(encoder, dict) or not encoder:
        raise GPT2Error(f"{path} must be a non-empty JSON object mapping tokens to ids")
    ids = encoder.values()
    if not all(type(i) is int for i in ids) or set(ids) != set(range(len(encoder))):
        raise GPT2Error(
            f"{path} must map its {len(encoder)} tokens to the ids 0..{len(encoder) - 1}"
        )
    missing = [c for c in (*BYTE_CHARS, ENDOFTEXT) if c not in encoder]
    if missing:
        raise GPT2Error(
            f"{path} is not a GPT-2 byte-level vocabulary: it lacks {len(missing)} of the 256 "
            f"byte tokens and {ENDOFTEXT}, e.g. {missing[0]!r}"
        )
    return encoder


def _parse_merges(path: Path, text: str, encoder: dict[str, int]) -> list[tuple[str, str]]:
    """The merges in rank order: lines `a b` (after an optional `#version` line) of known tokens."""
    lines = text.split("\n")
    first = 1 if lines and lines[0].startswith("#version") else 0
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines[first:], start=first + 1):
        pair = line.split(" ")
        if (
            len(pair) == 2
            and pair[0] in encoder
            and pair[1] in encoder
            and "".join(pair) in encoder
        ):
            merges.append((pair[0], pair[1]))
        elif line.strip():
            raise GPT2Error(
                f"{path} line {number} is not a merge of two tokens in the vocabulary: {line!r:.60}"
            )
    return merges
