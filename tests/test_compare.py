"""tests/compare.py: non-floats exactly, floats within 1e-4, the first difference named."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from tests.compare import assert_same_output, first_difference


def row(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "index": 3,
        "id": "r3",
        "n_tokens": 4,
        "nll": 0.5,
        "perplexity": 212345.6,
        "tokens": [{"id": 17, "text": " a", "rank": 2, "logprob": -0.25, "flag": True}],
    }
    return base | changes


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_noise_of_1e6_passes_in_values_jsonl_and_bytes():
    noisy = row(nll=0.5 + 1e-6, perplexity=212345.6 * (1 + 1e-6))
    noisy["tokens"] = [{"id": 17, "text": " a", "rank": 2, "logprob": -0.25 - 1e-6, "flag": True}]
    assert_same_output(noisy, row())
    assert_same_output(jsonl(row(), noisy), jsonl(row(), row()))
    assert_same_output(jsonl(noisy).encode(), jsonl(row()).encode())
    assert first_difference(jsonl(noisy), jsonl(row())) is None


@pytest.mark.parametrize(
    ("changed", "where"),
    [
        (row(id="r4"), "line 2: $['id']: 'r4' != 'r3'"),
        (row(index=4), "line 2: $['index']: 4 != 3"),
        (row(nll=0.5 + 1e-3), "line 2: $['nll']: 0.501 != 0.5 (off by 0.001"),
        (row(perplexity=212345.6 * 1.001), "line 2: $['perplexity']: "),
        (row(n_tokens=4.0), "line 2: $['n_tokens']: 4.0 (float) != 4 (int)"),
        ({k: v for k, v in row().items() if k != "nll"}, "line 2: $: keys ['index', 'id', 'n_t"),
        (row(nll=0.5) | {"extra": 1}, "line 2: $: keys "),
        (row(tokens=[]), "line 2: $['tokens']: length 0 != 1"),
    ],
)
def test_a_difference_beyond_noise_fails_naming_its_line_and_path(changed: object, where: str):
    with pytest.raises(AssertionError, match="^outputs differ at " + re.escape(where)):
        assert_same_output(jsonl(row(), changed), jsonl(row(), row()))


def test_a_differing_id_in_a_nested_list_or_key_order_fails():
    token = {"id": 18, "text": " a", "rank": 2, "logprob": -0.25, "flag": True}
    assert first_difference(row(tokens=[token]), row()) == "$['tokens'][0]['id']: 18 != 17"
    flipped = {**token, "id": 17, "flag": False}
    assert first_difference(row(tokens=[flipped]), row()) == (
        "$['tokens'][0]['flag']: False != True"
    )
    reordered = dict(reversed(list(row().items())))
    assert first_difference(reordered, row()).startswith("$: keys ['tokens', ")  # type: ignore[union-attr]


def test_bools_ints_and_floats_are_not_interchangeable():
    assert first_difference(True, 1) == "$: True (bool) != 1 (int)"
    assert first_difference(1, 1.0) == "$: 1 (int) != 1.0 (float)"
    assert first_difference(2**60 + 1, 2**60) is not None  # ints exactly, however large


def test_nan_equals_only_nan_and_inf_only_the_same_inf():
    assert first_difference([math.nan], [math.nan]) is None
    assert first_difference([math.nan], [0.0]) == "$[0]: nan != 0.0"
    assert first_difference(math.inf, math.inf) is None
    assert first_difference(math.inf, -math.inf) is not None
    assert first_difference(math.inf, 1e308) is not None


def test_lines_and_a_trailing_newline_must_match():
    assert first_difference(jsonl(row()), jsonl(row(), row())) == (
        "the line count: 2 != 3 (counting a last empty line)"
    )
    assert first_difference(json.dumps(row()), jsonl(row())) is not None


def test_plain_text_numbers_are_compared_as_numbers():
    table = "source\ttokens\tperplexity\na.txt\t12\t3456.7\n"
    assert_same_output(table, "source\ttokens\tperplexity\na.txt\t12\t3456.7001\n")
    assert first_difference("source\ttokens\tperplexity\na.txt\t13\t3456.7\n", table) == (
        "line 2: number 1: 13 != 12 in 'a.txt\\t13\\t3456.7' != 'a.txt\\t12\\t3456.7'"
    )
    assert first_difference(table, table.replace("3456.7", "3466.7")) is not None
    assert first_difference(table, table.replace("a.txt", "b.txt")) is not None


def test_numpy_values_are_walked_as_their_python_values():
    assert_same_output(np.array([0.5, -1.0], np.float32), [0.5 + 1e-7, -1.0])
    assert first_difference(np.int64(3), 3) is None
    assert first_difference(np.array([1, 2]), [1, 3]) == "$[1]: 2 != 3"


def test_bytes_that_are_not_utf8_compare_as_bytes():
    assert first_difference(b"\xff1.0", b"\xff1.0") is None
    assert first_difference(b"\xff1.0", b"\xff1.00001") == "the raw bytes (not UTF-8 text)"
