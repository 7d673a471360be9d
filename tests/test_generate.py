"""The generation loop and its text assembly: stops, batches, seeds, UTF-8 and stop strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from gpt2cli.errors import GPT2Error
from gpt2cli.generate import Generation, generate_ids, generate_text
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from gpt2cli.sampling import SamplingOptions, sample
from gpt2cli.scheduler import TextStream
from gpt2cli.tokenizer import Tokenizer
from tests.factory import TINY, write_random_gpt2

MULTIBYTE = "Robots 🤖🦾 say 日本語 and ﷽ or Ǆ̈́ — naïve café"


def _params(sampling: SamplingOptions | None = None, **fields: object) -> GenerationParams:
    """`GenerationParams` with the sampling options given as one object."""
    s = sampling or SamplingOptions()
    return GenerationParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory: pytest.TempPathFactory) -> GPT2:
    """A real model whose every next token is <|endoftext|> by a wide margin.

    The final layer norm is made to output the same vector everywhere (gain 0, bias along the
    end-of-text embedding, which is scaled up), so the tied head scores <|endoftext|> far above
    any other token.
    """
    folder = write_random_gpt2(tmp_path_factory.mktemp("eot-gpt2"), TINY, seed=1)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["wte.weight"][50256] *= 3
    tensors["ln_f.weight"][:] = 0
    tensors["ln_f.bias"][:] = tensors["wte.weight"][50256]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return GPT2.from_pretrained(folder)


def stream_pieces(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    """Every piece a TextStream hands out for ids, its final flush last."""
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return [*pieces, stream.finish()]


def test_multibyte_characters_split_across_tokens_are_held_until_complete(tokenizer: Tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    incomplete = [i for i in ids if not _is_utf8(tokenizer.token_bytes(i))]
    assert len(incomplete) >= 4  # the text really splits characters across tokens
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == MULTIBYTE
    assert all(_is_utf8(p.encode()) and "\ufffd" not in p for p in pieces)
    assert pieces.count("") >= len(incomplete) // 2  # bytes were held back, not emitted


def test_stop_string_split_across_tokens_is_never_printed(tokenizer: Tokenizer):
    text = "The answer is forty-two. END OF STORY and then more text"
    stop = "forty-two. END"
    ids = tokenizer.encode(text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # it spans several tokens
    stream = TextStream(tokenizer, [stop])
    printed = ""
    for i in ids:
        printed += stream.push(i)
        if stream.stopped:
            break
    assert stream.stopped
    assert printed + stream.finish() == "The answer is "


def test_text_that_only_starts_like_a_stop_string_is_released(tokenizer: Tokenizer):
    text = "one END two ENDING three"
    pieces = stream_pieces(tokenizer, tokenizer.encode(text), stop=("END!",))
    assert "".join(pieces) == text
    assert pieces[-1] == ""  # nothing was left held at the end


def test_a_held_stop_prefix_at_the_end_of_a_sample_is_printed(tokenizer: Tokenizer):
    pieces = stream_pieces(tokenizer, tokenizer.encode("the end is E"), stop=("END",))
    assert "".join(pieces) == "the end is E"
    assert pieces[-1] == "E"


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=60), data=st.data())
def test_printed_text_is_everything_before_the_stop_string(text: str, data: st.DataObject):
    tokenizer = Tokenizer.default()
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : data.draw(st.integers(start + 1, len(text)))]
    pieces = stream_pieces(tokenizer, tokenizer.encode(text, allowed_special=False), (stop,))
    assert "".join(pieces) == text[: text.find(stop)]


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 50255), max_size=40))
def test_pieces_join_to_the_decoded_text_for_any_ids(ids: list[int]):
    tokenizer = Tokenizer.default()
    pieces = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_greedy_generation_follows_the_full_forward_argmax(tiny: GPT2):
    prompt = tiny.tokenizer.encode("Once upon a time")
    generation = Generation(
        tiny,
        prompt,
        _params(max_tokens=30, sampling=SamplingOptions(temperature=0), ignore_eos=True),
    )
    list(generation)
    ids = generation.samples[0].ids
    logits = tiny(prompt + ids)  # [T, V], no cache
    assert ids == logits[len(prompt) - 1 : -1].argmax(axis=-1).tolist()


def test_a_sampled_batch_equals_recomputing_each_step_with_the_same_random_stream(tiny: GPT2):
    prompt = tiny.tokenizer.encode("Hello")
    options = SamplingOptions(temperature=0.9, top_k=40, top_p=0.95)
    generation = Generation(
        tiny, prompt, _params(max_tokens=12, sampling=options, seed=7, n=3, ignore_eos=True)
    )
    list(generation)
    rng = np.random.default_rng(7)
    rows = [list(prompt) for _ in range(3)]
    for _ in range(12):
        last = np.stack([tiny(row)[-1] for row in rows])  # [3, V], full forward each time
        for row, id in zip(rows, sample(last, rng, options), strict=True):
            row.append(int(id))
    assert [c.ids for c in generation.samples] == [row[len(prompt) :] for row in rows]
    assert len({tuple(c.ids) for c in generation.samples}) > 1


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token(tiny: GPT2):
    prompt = tiny.tokenizer.encode("Hello there")
    generation = Generation(tiny, prompt, _params(max_tokens=8, seed=3, ignore_eos=True))
    list(generation)
    c = generation.samples[0]
    logits = tiny(prompt + c.ids)[len(prompt) - 1 : -1].astype(np.float64)  # [8, V]
    expected = logits[np.arange(8), c.ids] - np.log(np.exp(logits).sum(axis=-1))
    np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)


def test_end_of_text_ends_a_sample_unless_ignored(eot_model: GPT2):
    prompt = eot_model.tokenizer.encode("Hi")
    stopped = Generation(eot_model, prompt, _params(max_tokens=5))
    assert [e[:4] for e in stopped] == [(0, 50256, "", "eos")]
    assert stopped.samples[0].ids == [50256]
    assert stopped.samples[0].finish_reason == "eos"

    ignored = Generation(eot_model, prompt, _params(max_tokens=5, ignore_eos=True))
    assert "".join(t.text for t in ignored) == "<|endoftext|>" * 5
    assert ignored.samples[0].finish_reason == "length"


def test_stop_string_ends_a_sample_and_is_cut_from_its_text(tiny: GPT2):
    prompt = tiny.tokenizer.encode("The")
    greedy = SamplingOptions(temperature=0)
    full = Generation(tiny, prompt, _params(max_tokens=20, sampling=greedy, ignore_eos=True))
    list(full)
    whole = full.samples[0]
    starts = np.cumsum([len(tiny.tokenizer.decode([i])) for i in whole.ids])
    stop = whole.text[starts[3] - 2 : starts[3] + 2]  # straddles the 4th/5th token boundary
    cut = Generation(
        tiny, prompt, _params(max_tokens=20, sampling=greedy, stop=[stop], ignore_eos=True)
    )
    printed = "".join(t.text for t in cut)
    c = cut.samples[0]
    assert c.finish_reason == "stop"
    assert printed == c.text == whole.text[: whole.text.find(stop)]
    assert c.ids == whole.ids[: len(c.ids)] and len(c.ids) < 20


def test_generation_stops_at_the_context_limit(tiny: GPT2):
    prompt = [464] * (TINY.n_ctx - 5)
    generation = Generation(tiny, prompt, _params(max_tokens=40, ignore_eos=True))
    list(generation)
    assert len(generation.samples[0].ids) == 5
    assert generation.samples[0].finish_reason == "length"


def test_prompt_that_fills_the_context_is_an_error_naming_both_lengths(tiny: GPT2):
    with pytest.raises(GPT2Error, match=r"prompt is 128 tokens but the model's context is 128"):
        Generation(tiny, [464] * 128)


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "kept"), [(300, 10, 118), (50, 10, 50), (300, 500, 1)]
)
def test_truncate_keeps_the_prompts_last_tokens_leaving_room_for_max_tokens(
    tiny: GPT2, n_prompt: int, max_tokens: int, kept: int
):
    prompt = np.random.default_rng(n_prompt).integers(0, 50257, n_prompt).tolist()
    options = {"max_tokens": max_tokens, "ignore_eos": True, "seed": 0}
    generation = Generation(tiny, prompt, _params(truncate=True, **options))
    ids = [token.id for token in generation]
    [completion] = generation.samples
    assert completion.prompt_ids == prompt[-kept:]
    assert len(ids) == min(max_tokens, 128 - kept)
    expected = Generation(tiny, prompt[-kept:], _params(**options))
    assert ids == [token.id for token in expected]


def test_empty_prompt_starts_from_end_of_text(tiny: GPT2):
    generation = Generation(tiny, [], _params(max_tokens=3))
    assert generation.samples[0].prompt_ids == [tiny.tokenizer.eot_token]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"n": 0}, r"n \(samples\) must be at least 1"),
        ({"stop": ["ok", ""]}, "a stop string must not be empty"),
    ],
)
def test_bad_generation_options_are_errors(tiny: GPT2, kwargs: dict[str, object], message: str):
    with pytest.raises(GPT2Error, match=message):
        Generation(tiny, [464], _params(**kwargs))  # type: ignore[arg-type]


def test_timings_add_up(tiny: GPT2):
    generation = Generation(tiny, [464], _params(max_tokens=10, ignore_eos=True), load_s=0.5)
    list(generation)
    t = generation.samples[0].timings
    assert t.load_s == 0.5 and t.prefill_s > 0 and t.decode_s > 0
    assert t.tokens_per_s == pytest.approx(9 / t.decode_s)


def test_generate_text_yields_the_continuation_in_pieces(tiny: GPT2):
    kwargs = {"max_tokens": 25, "seed": 11, "top_k": 50, "ignore_eos": True}
    pieces = list(generate_text(tiny, "Hello", **kwargs))  # type: ignore[arg-type]
    generation = Generation(
        tiny,
        tiny.tokenizer.encode("Hello"),
        _params(max_tokens=25, sampling=SamplingOptions(top_k=50), seed=11, ignore_eos=True),
    )
    list(generation)
    assert len(pieces) > 1
    assert "".join(pieces) == generation.samples[0].text


def test_model_generate_takes_the_sampling_options(tiny: GPT2):
    prompt = tiny.tokenizer.encode("Hello")
    options = SamplingOptions(temperature=0.8, top_k=20, top_p=0.9)
    generation = Generation(
        tiny, prompt, _params(max_tokens=15, sampling=options, seed=2, ignore_eos=True)
    )
    list(generation)
    sampled = generate_ids(tiny, prompt, 15, temperature=0.8, top_k=20, top_p=0.9, seed=2)
    assert list(sampled) == generation.samples[0].ids


def test_model_generate_ends_at_end_of_text_only_when_asked(eot_model: GPT2):
    prompt = eot_model.tokenizer.encode("Hi")
    assert list(generate_ids(eot_model, prompt, 4)) == [50256] * 4
    assert list(generate_ids(eot_model, prompt, 4, ignore_eos=False)) == [50256]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
