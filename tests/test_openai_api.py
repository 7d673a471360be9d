"""The OpenAI completions API's shapes on their own, without HTTP or a model: request bodies
checked field by field, prompts measured and tokenized (GPT-2's real tokenizer), and the
response, stream-chunk and error objects built from hand-made events."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpt2cli import openai_api
from gpt2cli.openai_api import (
    DEFAULT_MAX_TOKENS,
    ENDOFTEXT,
    APIError,
    Choice,
    Completion,
    CompletionParams,
    check_lengths,
    check_model,
    check_text_lengths,
    completion_params,
    echo_logprobs,
    prompt_ids,
    token_text,
)
from gpt2cli.params import GenerationParams
from gpt2cli.score import TextScore
from gpt2cli.tokenizer import Tokenizer

NAMES = ["gpt2", "/models/gpt2", "openai-community/gpt2"]  # the served name, then its aliases
MAX_BATCH = 8
N_CTX = 128
HELLO, WORLD, EOT = 15496, 995, 50256  # "Hello", " world", "<|endoftext|>"
ROBOT = [8582, 97, 244]  # "🤖" as GPT-2 splits its four bytes: \xf0\x9f, \xa4, \x96


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


def params_of(**fields: Any) -> CompletionParams:
    return completion_params(fields, max_batch=MAX_BATCH, names=NAMES)


def refused(body: Any) -> APIError:
    with pytest.raises(APIError) as error:
        completion_params(body, max_batch=MAX_BATCH, names=NAMES)
    return error.value


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "invalid_request_error"),
        (403, "invalid_request_error"),  # any other status too
        (404, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_an_error_body_is_openais_four_fields_with_the_type_of_its_status(status: int, kind: str):
    error = APIError(status, "What went wrong.", "prompt", code="some_code", headers={"A": "1"})
    assert error.body() == {
        "error": {
            "message": "What went wrong.",
            "type": kind,
            "param": "prompt",
            "code": "some_code",
        }
    }
    assert error.status == status and error.headers == {"A": "1"} and str(error) == error.message
    assert APIError(status, "m").body() == {
        "error": {"message": "m", "type": kind, "param": None, "code": None}
    }


def test_an_internal_error_says_nothing_of_what_failed():
    error = openai_api.internal_error()
    assert error.status == 500 and error.param is None and error.code is None
    assert error.message == "The server had an error while processing your request."


# --- completion_params: every field --------------------------------------------------------------


def test_an_empty_body_gets_openais_defaults():
    params = params_of()
    assert params.prompts == [ENDOFTEXT]  # as from a document's start
    assert params.generation == GenerationParams(
        max_tokens=DEFAULT_MAX_TOKENS, temperature=1.0, top_k=0, top_p=1.0, n=1
    )
    assert params.generation.seed is None and params.generation.stop == ()
    assert not params.generation.ignore_eos and not params.generation.echo
    assert (params.stream, params.include_usage, params.logprobs) == (False, False, None)
    assert not params.return_token_ids
    assert (params.n, params.max_tokens, params.echo) == (1, DEFAULT_MAX_TOKENS, False)


def test_a_null_field_is_its_default():
    fields = [
        "model", "prompt", "n", "temperature", "top_k", "top_p", "stream", "stream_options",
        "echo", "max_tokens", "logprobs", "best_of", "presence_penalty", "frequency_penalty",
        "logit_bias", "suffix", "user", "stop", "seed", "ignore_eos", "return_token_ids",
    ]  # fmt: skip
    assert params_of(**dict.fromkeys(fields)) == params_of()


def test_every_field_is_read_into_its_place():
    params = params_of(
        model="openai-community/gpt2",  # an alias
        prompt="Hi",
        n=3,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=7,
        logprobs=2,
        best_of=3,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        suffix="",
        user="someone",
        stop="\n",
        seed=2**63 - 1,
        ignore_eos=True,
        return_token_ids=True,
    )
    assert params.prompts == ["Hi"]
    assert params.generation == GenerationParams(
        max_tokens=7,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        seed=2**63 - 1,
        n=3,
        stop=("\n",),
        ignore_eos=True,
        top_logprobs=2,
    )
    assert params.stream and params.include_usage and params.return_token_ids
    assert params.logprobs == 2


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("Hi", ["Hi"]),
        ("", [""]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_a_prompt_is_a_string_strings_ids_or_lists_of_ids(prompt: Any, prompts: list[Any]):
    assert params_of(prompt=prompt).prompts == prompts


def test_top_k_minus_1_is_off_as_in_vllm():
    assert params_of(top_k=-1).generation.top_k == 0 == params_of(top_k=0).generation.top_k


def test_max_tokens_0_is_the_prompt_alone_only_with_echo():
    assert params_of(max_tokens=0, echo=True).max_tokens == 0
    error = refused({"max_tokens": 0})
    assert error.param == "max_tokens" and "0 with echo" not in error.message
    assert "at least 1" in error.message


def test_logprobs_asks_for_up_to_5_alternatives_and_scores_an_echoed_prompt():
    assert params_of(logprobs=5).generation.top_logprobs == 5
    none = params_of()
    assert none.logprobs is None and none.generation.top_logprobs == 0
    zero = params_of(logprobs=0)  # the logprobs object, with no alternatives
    assert zero.logprobs == 0 and zero.generation.top_logprobs == 0
    assert params_of(echo=True, logprobs=0).generation.echo_logprobs
    assert not params_of(echo=True).generation.echo_logprobs
    assert refused({"logprobs": 6}).param == "logprobs"


def test_best_of_draws_that_many_samples_to_return_the_n_likeliest():
    assert params_of(best_of=1).generation.best_of is None
    assert params_of(n=2, best_of=2).generation.best_of is None  # equal to n: nothing more
    assert params_of(n=2, best_of=5).generation.draws == 5
    for best_of, why in ((True, "integer"), (1.0, "integer"), (MAX_BATCH + 1, "integer")):
        error = refused({"best_of": best_of})
        assert error.param == "best_of" and why in error.message
    error = refused({"n": 3, "best_of": 2})
    assert error.param == "best_of" and "at least n" in error.message
    error = refused({"best_of": 3, "stream": True})
    assert error.param == "best_of" and "cannot be streamed" in error.message


def test_use_beam_search_makes_best_of_the_beam_width():
    generation = params_of(use_beam_search=True, best_of=4, n=2, length_penalty=0.5).generation
    assert (generation.num_beams, generation.n, generation.best_of) == (4, 2, None)
    assert generation.length_penalty == 0.5
    assert (
        params_of(use_beam_search=True, best_of=2, early_stopping="never").generation.early_stopping
        == "never"
    )
    assert refused({"use_beam_search": True}).param == "best_of"  # a width of 1 is no search
    assert refused({"use_beam_search": True, "best_of": 2, "top_p": 0.5}).param == "top_p"
    assert refused({"use_beam_search": True, "best_of": 2, "early_stopping": 1}).param == (
        "early_stopping"
    )


def test_the_decoding_fields_reach_generation_params_under_their_own_names():
    generation = params_of(
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        no_repeat_ngram_size=3,
        logit_bias={"50256": -100, "11": 2.5},
        bad_words=["Hello world", "foo"],
        min_tokens=4,
        min_p=0.05,
        typical_p=0.9,
        prompt_lookup=10,
    ).generation
    assert generation == GenerationParams(
        max_tokens=16,
        top_k=0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        no_repeat_ngram=3,
        logit_bias=((11, 2.5), (50256, -100.0)),
        ban=("Hello world", "foo"),
        min_tokens=4,
        min_p=0.05,
        typical_p=0.9,
        prompt_lookup=10,
    )
    assert params_of(bad_words="foo").generation.ban == ("foo",)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"presence_penalty": False}, "presence_penalty", "finite number"),  # not the number 0
        ({"frequency_penalty": 2.5}, "frequency_penalty", "between -2 and 2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "between 0.0001 and 10000"),
        ({"logit_bias": [1, 2]}, "logit_bias", "must be an object"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token id"),
        ({"logit_bias": {"5": "1"}}, "logit_bias", "must be a number"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", "integer"),
        ({"bad_words": [""]}, "bad_words", "must not be empty"),
        ({"bad_words": [1]}, "bad_words", "list of strings"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "between 0 and max_tokens"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"typical_p": 0}, "typical_p", "(0, 1]"),
        ({"prompt_lookup": 65}, "prompt_lookup", "between 0 and 64"),
        ({"suffix": "the end"}, "suffix", "suffix is not supported"),
    ],
)
def test_a_bad_decoding_field_is_a_400_naming_it(body: dict[str, Any], param: str, says: str):
    error = refused(body)
    assert (error.status, error.param) == (400, param) and says in error.message


def test_an_unknown_field_is_refused_by_its_name():
    error = refused({"prompt": "Hi", "frobnicate": 1, "other": 2})
    assert error.status == 400 and error.param == "frobnicate"
    assert error.message == "Unrecognized request argument supplied: frobnicate"


@pytest.mark.parametrize("body", [["Hi"], "Hi", 5, None])
def test_a_body_that_is_not_an_object_is_400_without_a_param(body: Any):
    error = refused(body)
    assert error.status == 400 and error.param is None
    assert "must be a JSON object" in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": "lone \ud800 surrogate"}, "prompt"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1e39}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.0}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": MAX_BATCH + 1}, "n"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": "\udc00"}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": True}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
        ({"stream": True, "stream_options": {"other": True}}, "stream_options"),
        ({"stream": True, "stream_options": [True]}, "stream_options"),
        ({"echo": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"best_of": True}, "best_of"),
        ({"best_of": 1.0}, "best_of"),
        ({"presence_penalty": False}, "presence_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"50256": -101}}, "logit_bias"),
        ({"suffix": "the end"}, "suffix"),
        ({"user": 5}, "user"),
        ({"ignore_eos": "no"}, "ignore_eos"),
        ({"return_token_ids": 1}, "return_token_ids"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": 5}, "model"),
    ],
)
def test_each_invalid_field_is_400_naming_it(fields: dict[str, Any], param: str):
    error = refused({"prompt": "Hi"} | fields)
    assert error.status == 400 and error.param == param, error.message
    assert error.message and error.code is None


def test_the_model_is_the_served_name_or_an_alias_or_a_404():
    for name in [*NAMES, None]:
        check_model(name, NAMES)
    with pytest.raises(APIError) as unknown:
        check_model("gpt-4", NAMES)
    assert unknown.value.status == 404 and unknown.value.param == "model"
    assert unknown.value.code == "model_not_found" and "'gpt2'" in unknown.value.message
    assert refused({"model": "davinci-002"}).status == 404


# --- prompts: lengths and tokens ---------------------------------------------------------------


def test_a_text_that_cannot_fit_by_its_bytes_alone_is_refused_before_it_is_tokenized(
    tokenizer: Tokenizer,
):
    most = tokenizer.max_token_bytes
    longest = N_CTX * most  # bytes: at least N_CTX tokens, which may still fit
    check_text_lengths(["x" * longest, [1] * 10 * longest], N_CTX, most)  # ids are not measured
    check_text_lengths(["é" * (longest // 2)], N_CTX, most)  # bytes, not characters
    for too_long in ("x" * (longest + 1), "é" * (longest // 2 + 1)):
        with pytest.raises(APIError) as error:
            check_text_lengths(["fine", too_long], N_CTX, most)
        assert error.value.status == 400 and error.value.param == "prompt"
        assert error.value.code == "context_length_exceeded"
        assert f"at least {N_CTX + 1} input tokens" in error.value.message


def test_each_prompt_and_max_tokens_must_fit_the_context():
    check_lengths([[1] * 100, [1] * 28], 28, N_CTX)
    check_lengths([[1] * N_CTX], 0, N_CTX)  # the prompt alone, scored
    with pytest.raises(APIError) as prompt:
        check_lengths([[1], [1] * (N_CTX + 1)], 0, N_CTX)
    assert prompt.value.param == "prompt" and prompt.value.code == "context_length_exceeded"
    assert (
        f"{N_CTX} tokens" in prompt.value.message and f"{N_CTX + 1} input" in prompt.value.message
    )
    with pytest.raises(APIError) as both:
        check_lengths([[1] * 100], 29, N_CTX)
    assert both.value.param == "max_tokens" and both.value.code == "context_length_exceeded"
    assert "129 tokens (100 in your prompt; 29 for the completion)" in both.value.message


def test_prompt_ids_encodes_texts_and_checks_ids_against_the_vocabulary(tokenizer: Tokenizer):
    assert prompt_ids(["Hello world", "", ENDOFTEXT, [1, 2]], tokenizer) == [
        [HELLO, WORLD],
        [EOT],  # an empty text starts from <|endoftext|>, as `gpt2 generate` does
        [EOT],  # the special token, not its characters
        [1, 2],
    ]
    with pytest.raises(APIError) as error:
        prompt_ids([[1], [EOT + 1]], tokenizer)
    assert error.value.status == 400 and error.value.param == "prompt"
    assert f"token id {EOT + 1} is outside the vocabulary [0, {EOT + 1})" in error.value.message


def test_a_token_is_its_text_or_the_bytes_of_a_split_character(tokenizer: Tokenizer):
    assert token_text(tokenizer, HELLO) == "Hello"
    assert token_text(tokenizer, EOT) == ENDOFTEXT
    assert token_text(tokenizer, ROBOT[0]) == "bytes:\\xf0\\x9f"
    assert token_text(tokenizer, 12520) == "bytes:\\x20\\xf0\\x9f"  # " \xf0\x9f": all its bytes
    assert token_text(tokenizer, 222) == "bytes:\\x80"


def test_echo_logprobs_put_null_first_for_the_token_without_context():
    assert echo_logprobs(None) == (None, None)
    score = TextScore(
        positions=np.array([1, 2]),
        ids=np.array([WORLD, 11]),
        logprobs=np.array([-1.5, -0.25], np.float32),
        ranks=np.array([1, 3]),
        top_ids=np.array([[WORLD, 5], [7, 11]]),
        top_logprobs=np.array([[-1.5, -2.0], [-0.125, -0.25]], np.float32),
        n_bytes=13,
        n_words=2,
    )
    logprobs, tops = echo_logprobs(score)
    assert logprobs == [None, -1.5, -0.25]
    assert tops == [None, [(WORLD, -1.5), (5, -2.0)], [(7, -0.125), (11, -0.25)]]
    assert all(type(i) is int and type(lp) is float for top in tops[1:] for i, lp in top or [])


# --- choices: text offsets ---------------------------------------------------------------------


def test_a_tokens_offset_is_where_its_first_bytes_character_starts_as_tokens_arrive(
    tokenizer: Tokenizer,
):
    choice = Choice(index=0)
    layouts = [
        choice.add(tokenizer, [HELLO], [-1.0], [[(HELLO, -1.0)]], "Hello"),
        choice.add(tokenizer, [ROBOT[0]], [-2.0], [[]], ""),  # the emoji's first two bytes
        choice.add(tokenizer, [ROBOT[1]], [-3.0], [[]], ""),
        choice.add(tokenizer, [ROBOT[2]], [-4.0], [[]], "🤖"),  # its last byte: now printable
        choice.add(tokenizer, [WORLD], [-5.0], [[(WORLD, -5.0)]], " world"),
    ]
    assert choice.text == "Hello🤖 world" and choice.ids == [HELLO, *ROBOT, WORLD]
    # the emoji is one character from offset 5: each of its tokens starts there
    assert choice.text_offset == [0, 5, 5, 5, 6]
    assert [layout["text_offset"] for layout in layouts] == [[0], [5], [5], [5], [6]]
    assert layouts[1]["tokens"] == ["bytes:\\xf0\\x9f"] and layouts[1]["token_logprobs"] == [-2.0]
    assert choice.logprobs()["tokens"] == [
        "Hello", "bytes:\\xf0\\x9f", "bytes:\\xa4", "bytes:\\x96", " world"
    ]  # fmt: skip
    assert choice.logprobs(start=4)["text_offset"] == [6]


def test_tokens_added_at_once_get_the_same_offsets_and_a_character_never_completed_counts_one(
    tokenizer: Tokenizer,
):
    together = Choice(index=0)
    together.add(tokenizer, [HELLO, *ROBOT, WORLD], [None] * 5, [None] * 5, "Hello🤖 world")
    assert together.text_offset == [0, 5, 5, 5, 6]
    assert together.top_logprobs == [None] * 5  # no logprob: no alternatives either
    cut = Choice(index=0)
    cut.add(tokenizer, [12520, 3225], [None, None], [None, None], " \ufffdrol")
    assert cut.text_offset == [0, 2]  # " " then the replacement character, then "rol"


def test_top_logprobs_hold_the_alternatives_and_the_chosen_token(tokenizer: Tokenizer):
    choice = Choice(index=0)
    layout = choice.add(tokenizer, [WORLD], [-3.0], [[(HELLO, -0.5), (EOT, -1.0)]], " world")
    assert layout["top_logprobs"] == [{"Hello": -0.5, ENDOFTEXT: -1.0, " world": -3.0}]


# --- the completion object: response, chunks, usage --------------------------------------------


def feed(completion: Completion, tokenizer: Tokenizer, per_sample: int) -> list[dict[str, Any]]:
    """`per_sample` tokens for every choice, HELLO then WORLDs, the last ending on length;
    returns their chunks in the order sent."""
    chunks = []
    params = completion.params
    for step in range(per_sample):
        for prompt in range(len(completion.prompt_ids)):
            for sample in range(params.n):
                id = HELLO if step == 0 else WORLD
                last = step == per_sample - 1
                reason = ("eos" if sample == 0 else "length") if last else None
                chunks.append(
                    completion.token(
                        prompt,
                        sample,
                        id,
                        tokenizer.decode([id]),
                        -float(step + 1),
                        [(id, -float(step + 1))],
                        reason,
                    )
                )
    return chunks


def test_choices_are_prompt_major_and_usage_counts_each_prompt_once_whatever_n(
    tokenizer: Tokenizer,
):
    params = params_of(prompt=["Hello world", "Hi"], n=2, max_tokens=2, return_token_ids=True)
    ids = prompt_ids(params.prompts, tokenizer)
    completion = Completion(params, ids, tokenizer, "gpt2")
    assert not completion.finished
    chunks = feed(completion, tokenizer, per_sample=2)
    assert completion.finished
    response = completion.response()
    assert list(response) == ["id", "object", "created", "model", "choices", "usage"]
    assert response["id"].startswith("cmpl-") and response["object"] == "text_completion"
    assert response["model"] == "gpt2" and isinstance(response["created"], int)
    assert [c["index"] for c in response["choices"]] == [0, 1, 2, 3]  # prompt i, sample j: 2i+j
    assert [c["prompt_token_ids"] for c in response["choices"]] == [ids[0], ids[0], ids[1], ids[1]]
    for c in response["choices"]:
        assert list(c) == [
            "index", "text", "logprobs", "finish_reason", "prompt_token_ids", "token_ids"
        ]  # fmt: skip
        assert c["text"] == "Hello world" and c["token_ids"] == [HELLO, WORLD]
        assert c["logprobs"] is None  # not asked for
    assert [c["finish_reason"] for c in response["choices"]] == ["stop", "length"] * 2
    assert response["usage"] == {
        "prompt_tokens": len(ids[0]) + len(ids[1]),
        "completion_tokens": 8,
        "total_tokens": len(ids[0]) + len(ids[1]) + 8,
    }
    # one chunk per token, each with its own choice and generated id, all under one id
    assert {c["id"] for c in chunks} == {response["id"]}
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1, 2, 3] * 2
    assert all(c["choices"][0]["token_ids"] == [HELLO] for c in chunks[:4])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop", "length"] * 2
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_with_include_usage_each_chunk_has_null_usage_and_a_last_chunk_holds_it(
    tokenizer: Tokenizer,
):
    params = params_of(prompt="Hi", stream=True, stream_options={"include_usage": True}, logprobs=1)
    completion = Completion(params, prompt_ids(params.prompts, tokenizer), tokenizer, "gpt2")
    chunks = feed(completion, tokenizer, per_sample=3)
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks] == [
        ["Hello"],
        [" world"],
        [" world"],
    ]
    assert chunks[1]["choices"][0]["logprobs"]["top_logprobs"] == [{" world": -2.0}]
    assert "token_ids" not in chunks[0]["choices"][0]  # not asked for
    last = completion.usage_chunk()
    assert last["choices"] == [] and last["id"] == chunks[0]["id"]
    assert last["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


def test_echo_starts_each_choice_with_its_prompt_and_max_tokens_0_is_the_prompt_alone(
    tokenizer: Tokenizer,
):
    params = params_of(prompt=["Hello world", ""], n=2, max_tokens=0, echo=True, logprobs=0)
    ids = prompt_ids(params.prompts, tokenizer)
    completion = Completion(params, ids, tokenizer, "gpt2")
    chunks = completion.echo(0, [None, -1.25], [None, [(WORLD, -1.25)]])
    chunks += completion.echo(1, None, None)  # an empty prompt ran as <|endoftext|>
    assert completion.finished
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1, 2, 3]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello world"] * 2 + [ENDOFTEXT] * 2
    assert chunks[2]["choices"][0]["logprobs"] is None  # no scores were given for it
    response = completion.response()
    first = response["choices"][0]
    assert first["text"] == "Hello world" and first["finish_reason"] == "length"
    assert first["logprobs"] == {
        "tokens": ["Hello", " world"],
        "token_logprobs": [None, -1.25],
        "top_logprobs": [None, {" world": -1.25}],
        "text_offset": [0, 5],
    }
    assert response["choices"][2]["text"] == ENDOFTEXT
    assert response["usage"]["completion_tokens"] == 0


def test_echo_then_generated_tokens_continue_the_text_and_its_offsets(tokenizer: Tokenizer):
    params = params_of(prompt=[HELLO], max_tokens=1, echo=True, logprobs=0, return_token_ids=True)
    completion = Completion(params, [[HELLO]], tokenizer, "gpt2")
    completion.echo(0, [None], [None])
    completion.token(0, 0, WORLD, " world", -0.5, [], "length")
    [choice] = completion.response()["choices"]
    assert choice["text"] == "Hello world"  # an id prompt is echoed as its decoded text
    assert choice["logprobs"]["text_offset"] == [0, 5]
    assert choice["logprobs"]["token_logprobs"] == [None, -0.5]
    assert choice["token_ids"] == [WORLD] and choice["prompt_token_ids"] == [HELLO]
    assert completion.usage() == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
