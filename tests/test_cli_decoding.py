"""`gpt2 generate`'s decoding options on the command line: each bad value is one line and exit 2,
before any model loads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gpt2cli.cli import cli


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--logit-bias", "abc"], "Invalid value for '--logit-bias': expected ID=BIAS, got 'abc'"),
        (["--logit-bias", "x=1"], "a logit_bias key must be a token id, got 'x'"),
        (["--logit-bias", "5=200"], "must be between -100 and 100, got 200.0"),
        (["--logit-bias", "5=nan"], "must be between -100 and 100, got nan"),
        (["--logit-bias", "5=1", "--logit-bias", "5=2"], "token 5 is given two logit biases"),
        (["--ban", ""], "Invalid value for '--ban': a banned text must not be empty"),
        (["--repetition-penalty", "0"], "repetition_penalty must be between 0.0001 and 10000"),
        (["--repetition-penalty", "1e-45"], "repetition_penalty must be between 0.0001"),
        (["--presence-penalty", "2.5"], "presence_penalty must be between -2 and 2"),
        (["--frequency-penalty", "-inf"], "frequency_penalty must be between -2 and 2"),
        (["--no-repeat-ngram", "-1"], "no_repeat_ngram must be between 0 (off) and 64"),
        (["--no-repeat-ngram", "1000000000"], "no_repeat_ngram must be between 0 (off) and 64"),
        (["--ban", "x" * 1001], "at most 256 banned texts of at most 1000 characters each"),
        (["--min-tokens", "50"], "min_tokens must be between 0 and max_tokens (40)"),
        (["--min-p", "1.5"], "Invalid value for '--min-p': min_p must be in [0, 1]"),
        (["--typical-p", "0"], "typical_p must be in (0, 1]"),
        (["--num-beams", "0"], "num_beams must be at least 1"),
        (["--num-beams", "2", "-n", "3"], "n must be at most num_beams (2), got 3"),
        (["--num-beams", "2", "--top-p", "0.9"], "'--top-p': top_p does not go with num_beams"),
        (["--num-beams", "2", "--top-k", "5"], "'--top-k': top_k does not go with num_beams"),
        (["--num-beams", "2", "--seed", "1"], "'--seed': seed does not go with num_beams"),
        (["--num-beams", "2", "--min-p", "0.1"], "min_p is a sampling option"),
        (["--num-beams", "2", "--prompt-lookup", "3"], "prompt_lookup is a sampling option"),
        (["--length-penalty", "nan"], "length_penalty must be between -10 and 10, got nan"),
        (["--length-penalty", "200"], "length_penalty must be between -10 and 10, got 200"),
        (["--num-beams", "2", "--draft-model", "gpt2"], "a beam search does not use a draft"),
        (["--draft-tokens", "3"], "--draft-tokens goes with --draft-model"),
        (["--early-stopping", "maybe"], "'maybe' is not one of 'true', 'false', 'never'"),
        (["--best-of", "1", "-n", "2"], "best_of must be at least n (2), got 1"),
        (["--prompt-lookup", "65"], "prompt_lookup must be between 0 and 64, got 65"),
        (["--draft-model", "gpt2", "--draft-tokens", "0"], "draft_tokens must be between 1 and 64"),
    ],
)
def test_a_bad_decoding_option_is_one_line_and_exit_2(args: list[str], says: str):
    result = CliRunner().invoke(cli, ["generate", "-m", "/nonexistent/model", *args, "Hi"])
    assert result.exit_code == 2, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("gpt2: error:"))
    assert says in line
    assert "Traceback" not in result.output


def test_the_draft_model_goes_with_one_prompt_not_jsonl():
    result = CliRunner().invoke(
        cli, ["generate", "--jsonl", "-", "--draft-model", "gpt2"], input='{"prompt": "x"}\n'
    )
    assert result.exit_code == 2
    assert "--draft-model goes with one prompt, not with --jsonl" in result.output


def test_beams_that_do_not_fit_the_jsonl_batch_are_a_usage_error():
    result = CliRunner().invoke(
        cli, ["generate", "--jsonl", "-", "--num-beams", "4", "--batch-size", "2"], input=""
    )
    assert result.exit_code == 2
    assert "4 sequences (-n, --num-beams or --best-of) are more than --batch-size 2" in (
        result.output
    )
