"""gpt2cli.tokenizer: tiktoken's GPT-2 ids on any text, exact round trips, clear errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import marshal
import os
import random
import shutil
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.bench_tokenizer import corpus_files
from gpt2cli import tokenizer as tokenizer_module
from gpt2cli.errors import GPT2Error
from gpt2cli.tokenizer import DATA_DIR, LETTERS, NEWER, NUMBERS, OTHERS, Tokenizer, load_tokenizer

# Every code point but the surrogates, which are not text.
ALL_CHARS = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)

# Text that exercises every branch of GPT-2's pattern: any Unicode character, and fragments that
# are common or tricky (whitespace runs before a word or at the end, digits, contractions,
# emoji with modifiers and joiners, CJK, combining marks, the special token's text).
FRAGMENTS = st.sampled_from(
    [
        *[" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \t ", "\u3000", "\xa0", "\u2028"],
        *["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "n't", "'", "\u2019s"],
        *["0", "42", "3.14", "1,000", "\u0663", "\xbd", "\u216b", "\xb2", "\x0b"],
        *["👋", "👩\u200d💻", "👍🏽", "🇫🇷", "❤️", "漢字", "日本語", "한국어", "ไทย", "中文 文本"],
        *["é", "e\u0301", "a\u0308\u0323", "\u0301", "Ω", "ß", "ǅ", "İ"],
        *["<|endoftext|>", "<|", "|>", "def f(x):", "x = [1, 2]", "Hello", " world", "GPT"],
    ]
)
TEXT = st.lists(
    st.one_of(FRAGMENTS, st.text(st.characters(exclude_categories=("Cs",)), max_size=8)),
    max_size=24,
).map("".join)
# Runs with no space, long enough (100-6000 bytes) for `_bpe_long`: one unit repeated, random
# letters, digits or base64, letters of any script, punctuation and symbols.
RUN = st.one_of(
    st.builds(
        str.__mul__,
        st.sampled_from(["a", "ab", "🤗", "👍🏽", "=", "-", "0", "12", "漢", "é", "e\u0301", "'s"]),
        st.integers(100, 1500),
    ),
    *[
        st.text(st.sampled_from(alphabet), min_size=300, max_size=3000)
        for alphabet in (
            string.ascii_lowercase,
            string.digits,
            string.ascii_letters + string.digits + "+/",
            "!#$%&()*+,-./:;<=>?@[]^_`{|}~",
        )
    ],
    st.text(st.characters(categories=("L", "M")), min_size=100, max_size=1000),
)
LONG_TEXT = st.tuples(TEXT, RUN, TEXT).map("".join)  # a long run inside ordinary text


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def letters_numbers_spaces() -> dict[str, str]:
    """tiktoken's own \\p{L}, \\p{N} and \\s, read off its regex engine for every code point.

    tiktoken drops text its pattern does not match, so a pattern of one class over all code
    points keeps exactly the members of that class.
    """
    byte_ranks = {bytes([b]): b for b in range(256)}
    classes = {}
    for name in (r"\p{L}", r"\p{N}", r"\s"):
        probe = tiktoken.Encoding(
            name="probe", pat_str=name, mergeable_ranks=byte_ranks, special_tokens={}
        )
        classes[name] = probe.decode_bytes(probe.encode_ordinary(ALL_CHARS)).decode("utf-8")
    return classes


def test_hello_world_is_the_known_gpt2_encoding(tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding):
    assert tok.encode("Hello world") == tiktoken_gpt2.encode_ordinary("Hello world")
    assert tok.n_vocab == tiktoken_gpt2.n_vocab
    assert tok.eot_token == tiktoken_gpt2.eot_token


def test_package_vocabulary_is_the_shared_gpt2_vocabulary(gpt2_vocab_dir: Path):
    for name in ("vocab.json", "merges.txt"):
        assert (DATA_DIR / name).read_bytes() == (gpt2_vocab_dir / name).read_bytes()


# Hypothesis examples per CI run: 4,000 + 1,500 + 2,500 + 1,000 + 1,000 = 10,000 in the
# tests below that compare with tiktoken, with `encode`, or with the simple merge loop.
@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_encode_matches_tiktoken_on_any_text(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, text: str
):
    assert tok.encode(text, allowed_special=False) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text, allowed_special=False)) == text.encode("utf-8")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=LONG_TEXT)
def test_text_with_a_long_run_without_spaces_matches_tiktoken_and_round_trips(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, text: str
):
    ids = tok.encode(text, allowed_special=False)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def cut(text: str, sizes: list[int]) -> list[str]:
    """`text` in consecutive chunks of `sizes` (cycled); empty chunks included."""
    chunks, start = [], 0
    for size in itertools.cycle(sizes):
        chunks.append(text[start : start + size])
        start += size
        if start >= len(text):
            return chunks
    raise AssertionError("unreachable")


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(TEXT, LONG_TEXT),
    sizes=st.lists(st.integers(0, 40), max_size=8).map(lambda sizes: [*sizes, 1]),
    allowed_special=st.booleans(),
)
def test_encode_stream_gives_the_ids_of_encode_however_the_text_is_cut(
    tok: Tokenizer, text: str, sizes: list[int], allowed_special: bool
):
    batches = list(tok.encode_stream(cut(text, sizes), allowed_special=allowed_special))
    assert all(batches)  # no empty lists
    assert list(itertools.chain(*batches)) == tok.encode(text, allowed_special=allowed_special)


# Runs of about n characters with no space: each is one huge pre-token.
LONG_WORDS: dict[str, Callable[[random.Random, int], str]] = {
    "random letters": lambda rng, n: "".join(rng.choices(string.ascii_lowercase, k=n)),
    "one letter": lambda rng, n: "a" * n,
    "digits": lambda rng, n: "".join(rng.choices(string.digits, k=n)),
    "base64": lambda rng, n: "".join(rng.choices(string.ascii_letters + string.digits + "+/", k=n)),
    "repeated emoji": lambda rng, n: "🤗" * (n // 4),
    "punctuation": lambda rng, n: "".join(rng.choices("!#$%&()*+,-./:;<=>?@[]^_`{|}~", k=n)),
    "CJK": lambda rng, n: "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(n // 3)),
    "Hindi": lambda rng, n: "".join(rng.choices("कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह", k=n // 3)),
}


def long_word(kind: str, n: int) -> str:
    return LONG_WORDS[kind](random.Random(n), n)


@pytest.mark.parametrize("kind", list(LONG_WORDS))
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_long_words_encode_like_tiktoken(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, kind: str, n: int
):
    word = long_word(kind, n)
    for text in (word, f"x {word}\n"):
        assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_a_megabyte_word_takes_seconds_not_hours(tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding):
    """The merge loop was quadratic: 40,000 letters took 25 s, so a megabyte would take hours.
    Now it takes about 1 s (tiktoken: 0.3 s); 60 s leaves room for a slow, busy machine."""
    word = long_word("random letters", 1_000_000)
    start = time.perf_counter()
    ids = tok.encode(word)
    assert time.perf_counter() - start < 60
    assert ids == tiktoken_gpt2.encode_ordinary(word)


BYTES = st.text(st.sampled_from("etaoin shrdlu\n'0123.,-=é漢🤗"), min_size=2, max_size=600).map(
    lambda text: text.encode("utf-8")
)


def merges_both_ways(tok: Tokenizer, data: bytes) -> tuple[list[int], list[int]]:
    ids = [tok._byte_ids[b] for b in data]
    return tok._bpe_long(list(ids)), tok._bpe(list(ids))


@settings(max_examples=1000, deadline=None)
@given(data=BYTES)
def test_long_merge_makes_the_simple_loops_merges(tok: Tokenizer, data: bytes):
    fast, simple = merges_both_ways(tok, data)
    assert fast == simple


@pytest.fixture(scope="module")
def shuffled_merges(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """GPT-2's merges in a random order: a merge often makes a pair of lower rank than its own."""
    lines = (DATA_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    header, merges = lines[:1], lines[1:]
    random.Random(0).shuffle(merges)
    return Tokenizer.from_dir(
        hf_folder(tmp_path_factory.mktemp("shuffled"), merges="\n".join(header + merges))
    )


@settings(max_examples=1000, deadline=None)
@given(data=BYTES)
def test_long_merge_makes_the_simple_loops_merges_whatever_the_rank_order(
    shuffled_merges: Tokenizer, data: bytes
):
    fast, simple = merges_both_ways(shuffled_merges, data)
    assert fast == simple


def test_whitespace_runs_match_tiktoken_wherever_they_end(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
):
    """Every run of up to 3 whitespace characters, then the end or each kind of next character."""
    spaces = [" ", "\n", "\t", "\r\n", "\xa0", "\u3000", "\x0c"]
    after = ["", "a", "1", "!", " a", "\n", "'s", "漢", "\u0301"]
    for n in range(1, 4):
        for run in itertools.product(spaces, repeat=n):
            for before, end in itertools.product(["", "x", "x "], after):
                text = before + "".join(run) + end
                assert tok.encode(text, allowed_special=False) == tiktoken_gpt2.encode_ordinary(
                    text
                ), repr(text)


def test_pattern_classes_match_tiktoken_for_every_code_point(
    letters_numbers_spaces: dict[str, str],
):
    """EXACT_PATTERN's classes are tiktoken's, whatever Unicode version `regex` has."""
    letters, numbers, others = (
        "".join(regex.findall(f"(?V1){c}", ALL_CHARS)) for c in (LETTERS, NUMBERS, OTHERS)
    )
    assert letters == letters_numbers_spaces[r"\p{L}"]
    assert numbers == letters_numbers_spaces[r"\p{N}"]
    assert "".join(regex.findall(r"\s", ALL_CHARS)) == letters_numbers_spaces[r"\s"]
    assert len(others) == len(ALL_CHARS) - sum(map(len, letters_numbers_spaces.values()))


def test_code_points_in_context_encode_like_tiktoken(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
):
    """Code points between letters, after a space, doubled, after a digit and newline, and
    before a contraction, where a character's class decides the pieces and so the merges: every
    one that our `regex` and tiktoken classify differently, and every 29th of the others."""
    newer = regex.findall(NEWER, ALL_CHARS)
    chars = newer + [c for c in ALL_CHARS[::29] if c not in newer]
    for start in range(0, len(chars), 4096):
        text = "".join(f"a{c}b {c}{c} 1{c}\n{c}  {c}'s" for c in chars[start : start + 4096])
        assert tok.encode(text, allowed_special=False) == tiktoken_gpt2.encode_ordinary(text), (
            f"code points from U+{ord(chars[start]):04X}"
        )


def test_real_text_files_encode_like_tiktoken_and_round_trip(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
):
    files = corpus_files(1_500_000, seed=1)
    assert sum(len(t) for _, t in files) > 1_000_000, "too little text found on this machine"
    for path, text in files:
        ids = tok.encode(text, allowed_special=False)
        assert ids == tiktoken_gpt2.encode_ordinary(text), path
        assert tok.decode(ids) == text, path


def test_special_token_is_one_id_by_default_and_plain_text_when_not_allowed(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
):
    text = "a<|endoftext|>b <|endoftext|><|endoftext|>\n <|endoftext|>"
    assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode(text).count(tok.eot_token) == 4
    assert tok.encode(text, allowed_special=False) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.eot_token not in tok.encode(text, allowed_special=False)


def test_special_token_handling_matches_transformers(tok: Tokenizer):
    from transformers import GPT2TokenizerFast

    fast = GPT2TokenizerFast.from_pretrained(str(DATA_DIR))  # `vocab_file=` is ignored in v5
    for text in ["a<|endoftext|>b", " <|endoftext|> x", "<|endoftext|>", "x\n\n<|endoftext|>\n"]:
        assert tok.encode(text) == fast.encode(text), repr(text)


def test_decode_replaces_a_split_character_like_tiktoken(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
):
    ids = tok.encode("🤗 ok")
    assert len(tok.token_bytes(ids[0])) < len("🤗".encode())  # the emoji is split over tokens
    for cut in range(len(ids) + 1):
        assert tok.decode(ids[:cut]) == tiktoken_gpt2.decode(ids[:cut])
        assert tok.decode_bytes(ids[:cut]) == tiktoken_gpt2.decode_bytes(ids[:cut])


def test_token_bytes_of_every_id_match_tiktoken(tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding):
    for i in range(tok.n_vocab):
        assert tok.token_bytes(i) == tiktoken_gpt2.decode_single_token_bytes(i), i


def test_decode_accepts_numpy_integers(tok: Tokenizer):
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "Hello world"
    assert tok.token_bytes(np.int32(ids[0])) == tok.token_bytes(ids[0])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([15496, -1], "-1 at position 1 (counting from 0) is not a token id: ids run from 0 to"),
        ([1, 2, 50257], "50257 at position 2 (counting from 0) is not a token id"),
        ([1, 1.5], "1.5 at position 1 (counting from 0) is not an integer token id"),
        (["7"], "'7' at position 0 (counting from 0) is not an integer token id"),
    ],
)
def test_decode_names_a_bad_id_and_its_position(tok: Tokenizer, ids: list[int], message: str):
    with pytest.raises(GPT2Error, match=regex.escape(message)):
        tok.decode(ids)


@pytest.mark.parametrize("bad", [-1, 50257, 10**30])
def test_token_bytes_rejects_an_id_outside_the_vocabulary(tok: Tokenizer, bad: int):
    with pytest.raises(GPT2Error, match=f"{bad} is not a token id: ids run from 0 to 50256"):
        tok.token_bytes(bad)


def test_encode_names_a_lone_surrogate(tok: Tokenizer):
    with pytest.raises(GPT2Error, match="lone surrogate U\\+DCFF at position 3"):
        tok.encode("abc\udcffdef")
    with pytest.raises(GPT2Error, match="lone surrogate U\\+DCFF at position 9"):
        list(tok.encode_stream(["abc def ", "g\udcff"]))  # counted from the stream's start


def test_openai_layout_loads_the_same_tokenizer(tmp_path: Path, tok: Tokenizer):
    shutil.copy(DATA_DIR / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(DATA_DIR / "merges.txt", tmp_path / "vocab.bpe")
    openai = Tokenizer.from_dir(tmp_path)
    text = "OpenAI's layout: encoder.json + vocab.bpe 🤗"
    assert openai.encode(text) == tok.encode(text)
    assert openai.n_vocab == tok.n_vocab


def test_default_is_built_once(tok: Tokenizer):
    assert Tokenizer.default() is tok


def tables(tok: Tokenizer) -> tuple[object, ...]:
    return tok._encoder, tok._ranks, tok._merged


def cache_files(cache_home: Path) -> list[Path]:
    return sorted((cache_home / "gpt2cli").iterdir())


def test_tables_are_cached_by_content_and_a_hit_parses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = Tokenizer.from_dir(hf_folder(tmp_path / "a"))
    (cached,) = cache_files(tmp_path / "cache")

    def parse(*args: object) -> None:
        raise AssertionError("a cache hit parsed the tokenizer files")

    monkeypatch.setattr(tokenizer_module, "_parse_vocab", parse)
    loaded = Tokenizer.from_dir(hf_folder(tmp_path / "b"))  # other folder, same contents
    assert tables(loaded) == tables(built) == tables(tok)
    assert cache_files(tmp_path / "cache") == [cached]


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "empty"])
def test_a_damaged_cache_file_is_rebuilt_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer, damage: str
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = hf_folder(tmp_path / "tok")
    Tokenizer.from_dir(folder)
    (cached,) = cache_files(tmp_path / "cache")
    good = cached.read_bytes()
    damaged = {
        "flip a byte": good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:],
        "truncate": good[: len(good) // 2],
        "empty": b"",
    }[damage]
    cached.write_bytes(damaged)
    assert tables(Tokenizer.from_dir(folder)) == tables(tok)
    assert cached.read_bytes() == good  # rewritten


def test_an_unwritable_cache_only_costs_speed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer
):
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tables(Tokenizer.from_dir(hf_folder(tmp_path / "tok"))) == tables(tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tok"]


def test_a_relative_cache_folder_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer
):
    """A relative XDG_CACHE_HOME (or no home) would scatter caches over working directories."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert tables(Tokenizer.from_dir(hf_folder(tmp_path / "tok"))) == tables(tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_changed_files_are_checked_again_not_served_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = hf_folder(tmp_path / "tok")
    Tokenizer.from_dir(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t x\n", encoding="utf-8")
    with pytest.raises(GPT2Error, match=r"merges.txt line 2 is not a merge of two tokens"):
        Tokenizer.from_dir(folder)


def test_word_cache_stays_bounded(
    monkeypatch: pytest.MonkeyPatch, tiktoken_gpt2: tiktoken.Encoding
):
    monkeypatch.setattr(tokenizer_module, "CACHE_SIZE", 100)
    small = Tokenizer.from_dir(DATA_DIR)
    text = " ".join(f"w{n}x" for n in range(1000))
    assert small.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert 0 < len(small._cache) <= 100


def hf_folder(folder: Path, vocab: str | None = None, merges: str | None = None) -> Path:
    """A Hugging Face layout tokenizer folder, with either file replaced by `vocab`/`merges`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("vocab.json", vocab), ("merges.txt", merges)):
        if text is None:
            shutil.copy(DATA_DIR / name, folder / name)
        else:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def real_vocab() -> dict[str, int]:
    vocab: dict[str, int] = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    return vocab


@pytest.mark.parametrize(
    ("vocab", "merges", "message"),
    [
        ("{not json", None, r"vocab.json is not valid JSON: Expecting property name"),
        ("", None, r"vocab.json is not valid JSON: Expecting value at line 1"),
        ("[1, 2]", None, r"vocab.json must be a non-empty JSON object mapping tokens to ids"),
        ("{}", None, r"vocab.json must be a non-empty JSON object mapping tokens to ids"),
        ('{"a": 0, "b": 5}', None, r"vocab.json must map its 2 tokens to the ids 0..1"),
        ('{"a": 0, "b": "1"}', None, r"vocab.json must map its 2 tokens to the ids 0..1"),
        ('{"a": 0, "b": 1}', None, r"vocab.json is not a GPT-2 byte-level vocabulary: it lacks"),
        (None, "#version: 0.2\nĠ t\nĠt hisisnotatoken\n", r"merges.txt line 3 is not a merge"),
        (None, "#version: 0.2\nĠ t x\n", r"merges.txt line 2 is not a merge of two tokens"),
    ],
)
def test_malformed_tokenizer_files_are_named(
    tmp_path: Path, vocab: str | None, merges: str | None, message: str
):
    with pytest.raises(GPT2Error, match=message):
        Tokenizer.from_dir(hf_folder(tmp_path / "tok", vocab, merges))


def test_vocabulary_without_endoftext_is_refused(tmp_path: Path):
    vocab = real_vocab()
    del vocab["<|endoftext|>"]
    with pytest.raises(GPT2Error, match=r"lacks 1 of the 256 byte tokens and <\|endoftext\|>"):
        Tokenizer.from_dir(hf_folder(tmp_path / "tok", vocab=json.dumps(vocab)))


def test_file_that_is_not_utf8_is_named(tmp_path: Path):
    folder = hf_folder(tmp_path / "tok")
    (folder / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    with pytest.raises(GPT2Error, match=r"merges.txt is not UTF-8 text \(byte offset 14\)"):
        Tokenizer.from_dir(folder)


def test_half_a_layout_names_the_missing_file(tmp_path: Path):
    shutil.copy(DATA_DIR / "vocab.json", tmp_path / "encoder.json")
    with pytest.raises(GPT2Error, match=r"encoder.json has no vocab.bpe beside it"):
        Tokenizer.from_dir(tmp_path)


def test_folder_without_tokenizer_files_is_an_error_for_from_dir(tmp_path: Path):
    with pytest.raises(GPT2Error, match=r"no tokenizer files in .*: expected vocab.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_folder_is_an_error(tmp_path: Path):
    with pytest.raises(GPT2Error, match=r"tokenizer folder .*nope does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(GPT2Error, match=r"model folder .*nope does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_uses_the_folder_files_else_the_default(tmp_path: Path, tok: Tokenizer):
    assert load_tokenizer(None) is tok
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is tok  # weights only: GPT-2 models share one vocabulary
    own = load_tokenizer(hf_folder(tmp_path / "with-files"))
    assert own is not tok
    assert own.encode("same vocabulary") == tok.encode("same vocabulary")
    with pytest.raises(GPT2Error, match=r"broken.vocab.json is not valid JSON"):
        load_tokenizer(hf_folder(tmp_path / "broken", vocab="{"))


# --- The tokenizer-table cache against hostile entries (appended; the tests above are separate) ---
# Anything in the cache folder that is not a table file written by gpt2cli must be a miss: the
# tables are rebuilt from the tokenizer files and the entry replaced, never a hang or an error.


def cached_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A tokenizer folder and the cache entry its tables are stored in (written once)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = hf_folder(tmp_path / "tok")
    Tokenizer.from_dir(folder)
    (entry,) = cache_files(tmp_path / "cache")
    return folder, entry


def within_seconds(seconds: float, work: Callable[[], object]) -> object:
    """`work()`'s result, failing the test if it takes longer than `seconds` (a hang)."""
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return results[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_the_cache_is_a_miss_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer
):
    folder, entry = cached_entry(tmp_path, monkeypatch)
    entry.unlink()
    os.mkfifo(entry)
    loaded = within_seconds(30, lambda: Tokenizer.from_dir(folder))
    assert isinstance(loaded, Tokenizer) and tables(loaded) == tables(tok)
    assert entry.is_file()  # replaced by the rebuilt tables


@pytest.mark.parametrize("kind", ["folder", "huge", "device"])
def test_a_cache_entry_that_is_not_a_plausible_file_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer, kind: str
):
    folder, entry = cached_entry(tmp_path, monkeypatch)
    entry.unlink()
    if kind == "folder":
        entry.mkdir()
    elif kind == "huge":
        with entry.open("wb") as f:
            f.truncate(tokenizer_module.MAX_CACHED + 1)  # sparse: no disk space used
    else:
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        entry.symlink_to("/dev/zero")
    assert tables(within_seconds(30, lambda: Tokenizer.from_dir(folder))) == tables(tok)


def _crafted(tok: Tokenizer) -> dict[str, object]:
    encoder, ranks, merged = tables(tok)
    assert isinstance(encoder, dict)
    return {
        "not a tuple": [encoder, ranks, merged],
        "two tables": (encoder, ranks),
        "empty tables": ({}, {}, []),
        "no byte tokens": ({"<|endoftext|>": 0}, {}, []),
        "no endoftext": ({k: v for k, v in encoder.items() if k != "<|endoftext|>"}, ranks, merged),
        "ids as text": ({k: str(v) for k, v in encoder.items()}, ranks, merged),
        "tokens as bytes": ({**encoder, b"x": 1}, ranks, merged),
        "ranks by list": (encoder, {str(k): v for k, v in list(ranks.items())[:5]}, merged),
        "merged as text": (encoder, ranks, [str(i) for i in merged]),
        "a number": 42,
        "none": None,
    }


@pytest.mark.parametrize(
    "shape",
    [
        "not a tuple",
        "two tables",
        "empty tables",
        "no byte tokens",
        "no endoftext",
        "ids as text",
        "tokens as bytes",
        "ranks by list",
        "merged as text",
        "a number",
        "none",
    ],
)
def test_a_cache_entry_of_the_wrong_shape_with_a_valid_checksum_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer, shape: str
):
    folder, entry = cached_entry(tmp_path, monkeypatch)
    good = entry.read_bytes()
    payload = marshal.dumps(_crafted(tok)[shape])
    entry.write_bytes(hashlib.sha256(payload).digest() + payload)
    assert tables(Tokenizer.from_dir(folder)) == tables(tok)
    assert entry.read_bytes() == good  # rewritten


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_storing_never_writes_through_something_already_at_the_partial_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: Tokenizer
):
    folder, entry = cached_entry(tmp_path, monkeypatch)
    entry.unlink()
    partial = entry.with_name(f"{entry.name}.{os.getpid()}.partial")
    os.mkfifo(partial)  # opening it to write would wait for a reader forever
    assert tables(within_seconds(30, lambda: Tokenizer.from_dir(folder))) == tables(tok)
    assert not partial.exists() and not entry.exists()  # cleared away; stored next time
    Tokenizer.from_dir(folder)
    assert entry.is_file()


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json"])
def test_a_fifo_or_folder_in_place_of_a_tokenizer_file_is_named_not_opened(
    tmp_path: Path, name: str
):
    for kind, make in [("a FIFO", os.mkfifo), ("a directory", os.mkdir)]:
        folder = tmp_path / kind.replace(" ", "-")
        folder.mkdir()
        for other in ("vocab.json", "merges.txt"):
            if other != name:
                shutil.copy(DATA_DIR / other, folder / other)
        make(folder / name)
        with pytest.raises(GPT2Error, match=f"{name}: is {kind}"):
            Tokenizer.from_dir(folder)


@pytest.mark.parametrize("run", ["x" * 5000, " " * 5000, "\0" * 5000, "7" * 5000])
def test_a_run_without_a_break_longer_than_the_limit_is_one_error_whole_or_streamed(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch, run: str
):
    """The limit stands for 8 MiB (1.1 GB of merges); streamed, an endless run (/dev/zero)
    must end in the error too, not grow and rescan its held-back text for ever."""
    monkeypatch.setattr(tokenizer_module, "MAX_PIECE_BYTES", 1000)
    assert tok.encode("ok " + run[:900]) == tiktoken_gpt2.encode("ok " + run[:900])
    with pytest.raises(GPT2Error, match=r"no space or other break, more than gpt2 encodes"):
        tok.encode("ok " + run)
    chunks = itertools.repeat(run[:100])  # endless
    with pytest.raises(GPT2Error, match=r"no space or other break"):
        for _ in tok.encode_stream(itertools.islice(chunks, 10_000)):  # bounded all the same
            pass
