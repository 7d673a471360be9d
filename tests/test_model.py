"""The NumPy transformer against transformers' GPT2LMHeadModel on the same random-weight folders."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2cli
from gpt2cli import model as model_module
from gpt2cli import quant, weights
from gpt2cli.errors import GPT2Error
from gpt2cli.generate import generate_ids
from gpt2cli.kvcache import DecodeState
from gpt2cli.model import GPT2
from tests.factory import (
    GPT2_124M,
    TINY,
    reference_model,
    write_save_pretrained_gpt2,
)

TOL = 1e-4  # max |logit difference| allowed against transformers
SELF_TOL = 1e-5  # between two of our own paths (cached vs full, batched vs alone)

transformers.utils.logging.disable_progress_bar()


def _reference_logits(hf: Any, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return hf(torch.from_numpy(np.atleast_2d(ids))).logits.numpy()  # [B, T, V]


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_blas(tiny_model_dir: Path) -> GPT2:
    """The tiny model laid out as without the `fast` extra: transposed copies, on BLAS."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant, "kernels_installed", lambda: False)
        return GPT2.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def reference_tiny(tiny_model_dir: Path) -> Any:
    return reference_model(tiny_model_dir)


def _ids(n: int, seed: int, n_vocab: int = TINY.n_vocab) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


@pytest.mark.parametrize("n_pos", [1, 2, 17, 128, 1024])
def test_logits_match_transformers_on_124m_shaped_weights(
    ours_124m: GPT2, reference_124m: Any, n_pos: int
) -> None:
    ids = np.array(_ids(n_pos, seed=n_pos))
    ours = ours_124m(ids)
    expected = _reference_logits(reference_124m, ids)[0]
    assert ours.shape == expected.shape == (n_pos, GPT2_124M.n_vocab)
    assert ours.dtype == np.float32
    assert expected.std() > 5  # logits spread over tens of units, as a trained model's do
    assert np.abs(ours - expected).max() <= TOL


@settings(max_examples=30, deadline=None)
@given(st.integers(1, TINY.n_ctx), st.integers(0, 2**32 - 1))
def test_logits_match_transformers_on_tiny_model_at_any_length(
    tiny: GPT2, reference_tiny: Any, n_pos: int, seed: int
) -> None:
    ids = np.array(_ids(n_pos, seed))
    np.testing.assert_allclose(
        tiny(ids), _reference_logits(reference_tiny, ids)[0], rtol=0, atol=TOL
    )


def test_2d_ids_give_a_batch_of_logits_matching_transformers(
    tiny: GPT2, reference_tiny: Any
) -> None:
    ids = np.array([_ids(40, seed) for seed in range(3)])  # [3, 40]
    ours = tiny(ids)
    assert ours.shape == (3, 40, TINY.n_vocab)
    np.testing.assert_allclose(ours, _reference_logits(reference_tiny, ids), rtol=0, atol=TOL)


def test_untied_output_head_matches_transformers(tmp_path: Path) -> None:
    folder = write_save_pretrained_gpt2(tmp_path, TINY, seed=3, tied=False)
    ours = GPT2.from_pretrained(folder)
    assert "lm_head" in ours.params
    ids = np.array(_ids(30, seed=3))
    np.testing.assert_allclose(
        ours(ids), _reference_logits(reference_model(folder), ids)[0], atol=TOL
    )


def test_cached_steps_match_the_full_forward_at_every_position(tiny: GPT2) -> None:
    ids = _ids(TINY.n_ctx, seed=5)
    full = tiny(np.array(ids))  # [T, V]
    state, logits = tiny.prefill([ids[:3]], TINY.n_ctx)
    np.testing.assert_allclose(logits[0], full[2], rtol=0, atol=SELF_TOL)
    for pos in range(3, TINY.n_ctx):
        logits = tiny.step(state, [ids[pos]])
        np.testing.assert_allclose(logits[0], full[pos], rtol=0, atol=SELF_TOL)
    assert state.room.tolist() == [0]


def test_cached_steps_match_transformers_on_124m_shaped_weights(
    ours_124m: GPT2, reference_124m: Any
) -> None:
    ids = _ids(48, seed=7, n_vocab=GPT2_124M.n_vocab)
    expected = _reference_logits(reference_124m, np.array(ids))[0]  # [T, V]
    state, logits = ours_124m.prefill([ids[:16]], 48)
    steps = [logits[0]] + [ours_124m.step(state, [i])[0] for i in ids[16:]]
    np.testing.assert_allclose(np.array(steps), expected[15:], rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "settings",
    [
        {"PREFILL_TOKENS": 12},  # 3 prompts: 4 positions a pass
        {"QUERY_ROWS": 6},  # 3 prompts: attention in blocks of 2 queries
        {"TRANSPOSED_ROWS": 10**9},  # transposed weights as w.T @ x.T at every size
        {"TRANSPOSED_ROWS": 0},  # and as x @ w at every size
    ],
    ids=["chunks", "query-blocks", "transposed-form", "plain-form"],
)
def test_how_a_pass_is_split_or_multiplied_leaves_cache_and_logits_unchanged(
    tiny: GPT2, tiny_blas: GPT2, monkeypatch: pytest.MonkeyPatch, settings: dict[str, int]
) -> None:
    if "TRANSPOSED_ROWS" in settings:  # the layout without the fast extra's panels
        tiny = tiny_blas
        assert tiny.params["blocks"][0]["mlp"]["c_proj"]["w"].flags.f_contiguous  # transposed
    prompts = [_ids(n, seed=n) for n in (23, 9, 17)]
    whole_state, whole = tiny.prefill(prompts, 40)
    whole_logits = tiny(np.array(prompts[0]))
    whole_step = tiny.step(whole_state, [1, 2, 3])
    for name, value in settings.items():
        monkeypatch.setattr(model_module, name, value)
    state, logits = tiny.prefill(prompts, 40)
    np.testing.assert_allclose(logits, whole, rtol=0, atol=SELF_TOL)
    np.testing.assert_allclose(tiny(np.array(prompts[0])), whole_logits, rtol=0, atol=SELF_TOL)
    for b, n in enumerate((23, 9, 17)):
        cached = np.s_[:, b, :, :n]
        np.testing.assert_allclose(state.keys[cached], whole_state.keys[cached], atol=SELF_TOL)
        np.testing.assert_allclose(state.values[cached], whole_state.values[cached], atol=SELF_TOL)
    np.testing.assert_allclose(tiny.step(state, [1, 2, 3]), whole_step, rtol=0, atol=SELF_TOL)


def test_a_batch_of_prompts_of_different_lengths_decodes_as_each_alone(tiny: GPT2) -> None:
    prompts = [_ids(n, seed=n) for n in (5, 17, 1, 40)]
    new_tokens = 20
    state, logits = tiny.prefill(prompts, 40 + new_tokens)
    batched = [logits]
    for _ in range(new_tokens):
        batched.append(tiny.step(state, batched[-1].argmax(axis=-1)))
    for b, prompt in enumerate(prompts):
        alone_state, alone = tiny.prefill([prompt], len(prompt) + new_tokens)
        for n in range(new_tokens + 1):
            np.testing.assert_allclose(batched[n][b], alone[0], rtol=0, atol=SELF_TOL)
            if n < new_tokens:
                alone = tiny.step(alone_state, [int(alone[0].argmax())])
    assert state.lengths.tolist() == [len(p) + new_tokens for p in prompts]


def test_prefill_into_fills_rows_as_each_prompt_alone_and_returns_hidden_states(
    tiny: GPT2,
) -> None:
    """Prompts join a cache already decoding: each prompt's rows then step as it does alone, and
    the hidden states asked for are the ones `model(ids)` turns into logits."""
    prompts, rows, next_ids = [_ids(n, seed=n) for n in (7, 30, 1)], [[0, 3], [1], [2]], [5, 6, 7]
    state, _ = tiny.prefill([_ids(12, seed=0)] * 4, 40)  # rows busy with something else
    logits, hidden = tiny.prefill_into(state, prompts, rows, hidden=[True, False, True])
    assert state.lengths.tolist() == [7, 30, 1, 7]
    assert hidden[1] is None
    after = tiny.step(state, [5, 6, 7, 5])  # [4, V]
    for prompt, targets, first, states, next_id in zip(
        prompts, rows, logits, hidden, next_ids, strict=True
    ):
        alone_state, alone = tiny.prefill([prompt], 40)
        np.testing.assert_allclose(first, alone[0], rtol=0, atol=SELF_TOL)
        alone_after = tiny.step(alone_state, [next_id])[0]  # [V]
        for row in targets:
            np.testing.assert_allclose(after[row], alone_after, rtol=0, atol=SELF_TOL)
        if states is not None:
            assert states.shape == (len(prompt), TINY.n_embd) and states.dtype == np.float32
            full = tiny.head(states, np.arange(len(prompt)))  # [T, V]
            np.testing.assert_allclose(full, tiny(np.array(prompt)), rtol=0, atol=SELF_TOL)
    assert tiny.prefill_into(state, prompts, [[0], [1], [2]])[1] == [None, None, None]
    with pytest.raises(GPT2Error, match=r"one flag per prompt \(3\), got 2"):
        tiny.prefill_into(state, prompts, [[0], [1], [2]], hidden=[True, True])


def test_hidden_states_are_whole_however_the_prefill_is_chunked(
    tiny: GPT2, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [_ids(n, seed=n) for n in (23, 9, 17)]
    state = DecodeState.empty(TINY, 3, 40, logits=3)
    _, whole = tiny.prefill_into(state, prompts, [[0], [1], [2]], hidden=[True] * 3)
    monkeypatch.setattr(model_module, "PREFILL_TOKENS", 12)  # 3 prompts: 4 positions a pass
    _, chunked = tiny.prefill_into(state, prompts, [[0], [1], [2]], hidden=[True] * 3)
    for a, b in zip(whole, chunked, strict=True):
        assert a is not None and b is not None
        np.testing.assert_allclose(a, b, rtol=0, atol=SELF_TOL)


def test_greedy_continuation_matches_transformers_generate(
    ours_124m: GPT2, reference_124m: Any
) -> None:
    prompt = _ids(12, seed=11, n_vocab=GPT2_124M.n_vocab)
    ours = list(generate_ids(ours_124m, prompt, max_new_tokens=100))
    ids = torch.tensor([prompt])
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=100,
        eos_token_id=[],  # never stop at <|endoftext|>: ours yields it like any other id
        pad_token_id=50256,
    )
    with torch.inference_mode():
        out = reference_124m.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    expected = out[0, len(prompt) :].tolist()
    assert len(expected) == 100
    assert ours == expected


def test_every_intermediate_array_stays_float32(tiny: GPT2, tiny_model_dir: Path) -> None:
    """Followed through NumPy, on the weights as loaded (the compiled kernels, which multiply
    the laid-out panels, write float32 arrays of their own making: tests/test_kernels.py),
    every array derived from the weights stays float32."""

    class Float32Only(np.ndarray):
        """An array type that fails the moment any array derived from it is wider than float32."""

        def __array_finalize__(self, obj: Any) -> None:
            if self.dtype.kind == "f" and self.dtype != np.float32:
                raise AssertionError(f"a {self.dtype} intermediate appeared")

    def watched(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: watched(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [watched(v) for v in tree]
        return np.asarray(tree).view(Float32Only)

    probe = GPT2(tiny.config, watched(weights.load(tiny_model_dir)[1]))
    with pytest.raises(AssertionError, match="float64"):
        probe.params["wte"] * np.float64(2.0)  # the probe catches a widening when there is one
    ids = _ids(20, seed=2)
    logits = probe(np.array(ids))
    state, first = probe.prefill([ids[:10], ids[:4]], 30)
    after = probe.step(state, [1, 2])
    assert type(first) is type(after) is Float32Only  # the probe followed arrays to the end
    assert logits.dtype == first.dtype == after.dtype == np.float32


def test_python_float_constants_keep_float32(tiny: GPT2) -> None:
    x = np.linspace(-4, 4, 64, dtype=np.float32).reshape(2, 32)
    g, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    assert model_module.gelu(x).dtype == np.float32
    assert model_module.layer_norm(x, g, b, eps=1e-5).dtype == np.float32


def test_prompt_longer_than_n_ctx_is_an_error_naming_both_lengths(tiny: GPT2) -> None:
    ids = _ids(TINY.n_ctx + 1, seed=1)
    calls = [
        lambda: tiny(np.array(ids)),
        lambda: tiny.prefill([ids[:5], ids]),
        lambda: list(generate_ids(tiny, ids, max_new_tokens=5)),
    ]
    for call in calls:
        with pytest.raises(GPT2Error, match=f"{TINY.n_ctx + 1} tokens.*context is {TINY.n_ctx}"):
            call()


def test_truncate_keeps_the_last_n_ctx_tokens(tiny: GPT2) -> None:
    ids = _ids(TINY.n_ctx + 30, seed=4)
    last = ids[-TINY.n_ctx :]
    np.testing.assert_array_equal(tiny(np.array(ids), truncate=True), tiny(np.array(last)))
    state, logits = tiny.prefill([ids], truncate=True)
    np.testing.assert_array_equal(logits, tiny.prefill([last])[1])
    assert state.room.tolist() == [0]


def test_generation_stops_when_the_sequence_reaches_n_ctx(tiny: GPT2) -> None:
    prompt = _ids(TINY.n_ctx - 6, seed=9)
    continuation = list(generate_ids(tiny, prompt, max_new_tokens=50))
    assert len(continuation) == 6
    full = tiny(np.array(prompt + continuation[:-1]))  # the greedy choice at every position
    assert continuation == full[len(prompt) - 1 :].argmax(axis=-1).tolist()
    assert list(generate_ids(tiny, _ids(TINY.n_ctx, seed=9), max_new_tokens=5)) == []


def test_generate_with_truncate_keeps_room_for_the_new_tokens(tiny: GPT2) -> None:
    ids = _ids(TINY.n_ctx + 40, seed=6)
    continuation = list(generate_ids(tiny, ids, max_new_tokens=8, truncate=True))
    assert continuation == list(generate_ids(tiny, ids[-(TINY.n_ctx - 8) :], max_new_tokens=8))
    assert len(continuation) == 8


def test_step_on_a_full_row_is_an_error_not_a_numpy_failure(tiny: GPT2) -> None:
    state, _ = tiny.prefill([_ids(4, seed=0), _ids(6, seed=1)], 6)
    assert state.capacity == 6 and state.room.tolist() == [2, 0]
    with pytest.raises(GPT2Error, match=r"row 1 already holds 6 positions.*'length'"):
        tiny.step(state, [1, 2])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([5, 50257, 7], "token id 50257 at position 1 is outside the vocabulary"),
        ([-1], "token id -1 at position 0 is outside the vocabulary"),
        ([], "non-empty"),
        ([1.5, 2.0], "must be integers"),
    ],
)
def test_bad_ids_are_errors_naming_the_id(tiny: GPT2, ids: list[Any], message: str) -> None:
    with pytest.raises(GPT2Error, match=message):
        tiny(np.array(ids))
    with pytest.raises(GPT2Error, match=message):
        tiny.prefill([[1, 2], ids])


def test_prefill_capacity_must_fit_the_prompts_and_the_context(tiny: GPT2) -> None:
    with pytest.raises(GPT2Error, match=r"capacity 3 .*longest prompt \(5 tokens\)"):
        tiny.prefill([_ids(5, seed=0)], 3)
    with pytest.raises(GPT2Error, match=f"n_ctx \\({TINY.n_ctx}\\)"):
        tiny.prefill([_ids(5, seed=0)], TINY.n_ctx + 1)


def test_from_pretrained_loads_without_building_the_tokenizer(tiny_model_dir: Path) -> None:
    model = GPT2.from_pretrained(tiny_model_dir)
    assert model.config == weights.load(tiny_model_dir)[0]
    assert "tokenizer" not in vars(model)  # the tokenizer is built on first use only
    assert model.tokenizer.decode(model.tokenizer.encode("Hello world")) == "Hello world"
    assert gpt2cli.GPT2 is GPT2


def _with_weights(tiny: GPT2, change: Any) -> GPT2:
    """The tiny model with a copy of its parameters changed by `change(params)`."""
    params = {**tiny.params, "blocks": [dict(b) for b in tiny.params["blocks"]]}
    change(params)
    return GPT2(tiny.config, params, tiny.folder)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.update(wte=np.full(p["wte"].shape, np.nan, np.float32)),
        lambda p: p["blocks"][1].update(ln_2={"g": np.full(32, np.inf, np.float32), "b": 0}),
        lambda p: p.update(ln_f={"g": np.full(32, 3e38, np.float32), "b": p["ln_f"]["b"]}),
    ],
    ids=["nan-embedding", "inf-gain", "overflowing-gain"],
)
def test_logits_that_are_not_finite_are_an_error_naming_the_position_without_warnings(
    tiny: GPT2, change: Any
) -> None:
    broken = _with_weights(tiny, change)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NumPy RuntimeWarning would fail the test
        with pytest.raises(GPT2Error, match="logits at position 2 are not finite"):
            broken.prefill([[1, 2, 3]])
        with pytest.raises(GPT2Error, match="logits at position 0 are not finite"):
            broken([5, 6])


def test_a_step_whose_logits_are_not_finite_names_its_position_and_row(tiny: GPT2) -> None:
    state, _ = tiny.prefill([[1, 2], [3, 4, 5]])
    broken = _with_weights(tiny, lambda p: p.update(wpe=p["wpe"].copy()))
    broken.params["wpe"][3] = np.nan  # only row 1 steps to position 3 (row 0 to 2)
    with pytest.raises(GPT2Error, match="logits at position 3 of row 1 are not finite"):
        broken.step(state, np.array([1, 7]))
