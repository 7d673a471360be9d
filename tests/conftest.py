"""Shared fixtures: the real GPT-2 vocabulary, random-weight model folders, an isolated cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from gpt2cli.model import GPT2
from tests.factory import GPT2_124M, TINY, reference_model, write_random_gpt2
from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
# `make test-fast` (-m "not slow") leaves out the tests marked slow here, in one place; `make test`
# (CI) runs them all. A test is slow when it uses one of these fixtures, directly or through
# another ("*": wherever it is defined) ...
SLOW_FIXTURES = {
    ("*", "model_124m_dir"): "the 124M-shaped model: 500 MB written, seconds for each forward",
    ("*", "heavy_tailed_124m_dir"): "the heavy-tailed 124M-shaped model, against float32",
    ("*", "slow_model_dir"): "a model made slow on purpose, for requests seconds in flight",
    ("*", "fake_hub"): "a hub on a port, reached from subprocesses importing huggingface_hub",
    ("test_model", "reference_tiny"): "transformers' model of the tiny folder: 6 s to build",
    ("test_processors", "reference_tiny"): "the same, and 64-token generate() runs on it",
    ("test_beam", "reference_eos"): "transformers' beam searches, 1-3 s each",
    ("test_score", "small_vocab_dir"): "the whole grid of lengths and strides over 1,024 tokens",
    ("test_serve", "server"): "a `gpt2 serve` process for the module",
    ("test_serve_lm_eval", "server"): "a `gpt2 serve` process and lm-eval",
    ("test_ray_engine", "cluster"): "a two-node Ray cluster",
    ("test_ray_serve", "cluster"): "a two-node Ray cluster and its Serve replicas",
    ("test_cli_dtype", "cluster"): "a two-node Ray cluster",
    ("test_web", "browser"): "Chromium, driven by Playwright",
    ("test_readme", "clone"): "a fresh clone and the venv its README's first command builds",
}
# ... when it starts a `gpt2 serve` process itself (tests/serve_process.py) ...
SLOW_NAMES = {"ServeProcess"}
# ... or when it is one of these test functions, the costliest left (all its parameters together,
# from about 1.5 s up) in `pytest -m "not slow" --durations=0` on this 2-core machine: long texts,
# scoring grids, statistical sampling checks, subprocesses that wait on a signal, a deadline or a
# whole generation, and families of `python -m gpt2cli` runs (about 0.5 s each). Whole functions,
# not parameters; a function that is renamed simply runs again in test-fast.
SLOW_TESTS = frozenset(
    {
        "tests/test_cli_decode.py::test_a_real_file_survives_a_pipe_byte_for_byte",
        "tests/test_cli_download.py::test_broken_local_folder_exits_2_with_one_line",
        "tests/test_cli_download.py::test_hub_answering_json_of_another_shape_is_one_line",
        "tests/test_cli_download.py::test_invalid_timeout_variable_is_one_line_naming_it",
        "tests/test_cli_download.py::test_retries_after_hub_errors_are_shown_only_beside_the_progress_bar",
        "tests/test_cli_download.py::test_trickling_hub_is_given_up_at_the_deadline_and_the_next_run_completes",
        "tests/test_cli_encode.py::test_memory_stays_flat_however_large_stdin_is",
        "tests/test_cli_encode.py::test_reader_closing_the_pipe_early_is_quiet",
        "tests/test_cli_encode.py::test_stdin_of_several_chunks_gives_tiktokens_ids_in_every_format",
        "tests/test_cli_generate.py::test_greedy_json_equals_transformers_generate_for_120_tokens",
        "tests/test_cli_generate.py::test_piped_output_is_exactly_the_json_text",
        "tests/test_cli_jsonl.py::test_a_killed_run_resumes_without_losing_or_repeating_a_row",
        "tests/test_cli_jsonl.py::test_a_line_that_is_not_utf8_is_named_or_skipped_like_any_invalid_line",
        "tests/test_cli_jsonl.py::test_an_option_that_changes_results_is_refused_naming_both_values",
        "tests/test_cli_jsonl.py::test_batch_size_one_and_eight_write_the_same_bytes",
        "tests/test_cli_jsonl.py::test_ctrl_c_on_a_terminal_says_how_many_rows_are_kept_and_how_to_continue",
        "tests/test_cli_jsonl.py::test_jsonl_reads_a_path_and_stdin_alike",
        "tests/test_cli_jsonl.py::test_score_jsonl_names_each_bad_line_and_scores_nothing",
        "tests/test_cli_score.py::test_a_progress_bar_on_a_terminal_for_a_long_input",
        "tests/test_cli_score.py::test_bad_input_is_one_error_line_and_nothing_is_scored",
        "tests/test_generate.py::test_truncate_keeps_the_prompts_last_tokens_leaving_room_for_max_tokens",
        "tests/test_httpd.py::test_httpd_run_serves_with_a_deadline_on_headers_and_stops_cleanly",
        "tests/test_hub.py::test_model_we_downloaded_is_found_by_transformers_offline",
        "tests/test_hub.py::test_parameter_counts_of_known_models_match_transformers",
        "tests/test_kernels.py::test_compiled_for_an_avx2_cpu_the_kernels_take_tiles_of_four_rows_and_stay_exact",
        "tests/test_model.py::test_logits_match_transformers_on_tiny_model_at_any_length",
        "tests/test_output.py::test_a_closed_stderr_does_not_stop_the_command",
        "tests/test_output.py::test_a_full_disk_is_one_error_line_and_a_failure_status",
        "tests/test_output.py::test_a_reader_that_stops_early_ends_the_command_quietly_with_141",
        "tests/test_output.py::test_sigterm_and_sighup_stop_like_ctrl_c_keeping_the_output",
        "tests/test_ray_engine.py::test_an_address_nobody_answers_is_one_line_at_once",
        "tests/test_ray_engine.py::test_no_other_command_imports_ray",
        "tests/test_quant.py::test_a_damaged_entry_is_rebuilt",
        "tests/test_quant.py::test_narrow_models_give_logits_close_to_float32",
        "tests/test_quant.py::test_the_first_run_on_a_terminal_says_it_compiles_and_later_runs_do_not",
        "tests/test_quant.py::test_without_numba_int8_is_one_line_naming_the_fast_extra",
        "tests/test_sampling.py::test_a_seeded_draw_survives_the_float_noise_of_another_batch_shape",
        "tests/test_sampling.py::test_draws_never_leave_the_allowed_set",
        "tests/test_sampling.py::test_empirical_frequencies_match_the_filtered_distribution",
        "tests/test_scheduler.py::test_each_request_gets_what_it_gets_alone_whatever_joins_the_batch",
        "tests/test_score.py::test_stride_1_over_5000_tokens_scores_each_with_a_full_window",
        "tests/test_serve.py::test_16_concurrent_streams_each_get_exactly_what_they_get_alone",
        "tests/test_serve.py::test_a_long_score_and_a_stream_run_together",
        "tests/test_serve.py::test_score_endpoint_returns_what_gpt2_score_prints_for_the_text",
        "tests/test_speculative.py::test_a_draft_model_leaves_the_sampled_distribution_unchanged",
        "tests/test_speculative.py::test_each_request_gets_what_it_gets_alone_in_a_batch_with_a_draft_model",
        "tests/test_speculative.py::test_seeded_sampling_is_reproducible",
        "tests/test_tokenizer.py::test_a_cache_entry_of_the_wrong_shape_with_a_valid_checksum_is_a_miss",
        "tests/test_tokenizer.py::test_a_cache_entry_that_is_not_a_plausible_file_is_a_miss",
        "tests/test_tokenizer.py::test_a_megabyte_word_takes_seconds_not_hours",
        "tests/test_tokenizer.py::test_code_points_in_context_encode_like_tiktoken",
        "tests/test_tokenizer.py::test_encode_matches_tiktoken_on_any_text",
        "tests/test_tokenizer.py::test_encode_stream_gives_the_ids_of_encode_however_the_text_is_cut",
        "tests/test_tokenizer.py::test_real_text_files_encode_like_tiktoken_and_round_trip",
        "tests/test_tokenizer.py::test_text_with_a_long_run_without_spaces_matches_tiktoken_and_round_trips",
        "tests/test_weights.py::test_broken_folder_is_one_line_naming_the_problem",
        "tests/test_weights.py::test_fuzzed_config_loads_or_is_one_gpt2error",
        "tests/test_weights.py::test_fuzzed_safetensors_header_loads_or_is_one_gpt2error",
        "tests/test_weights.py::test_fuzzed_shard_index_loads_or_is_one_gpt2error_and_stays_in_the_folder",
        "tests/test_weights.py::test_gpt2_refuses_a_hostile_folder_in_one_line",
    }
)
SHARED_TOKENIZER = Path(
    os.environ.get("GPT2_TOKENIZER_DIR", ROOT.parent / "shared" / "gpt2-tokenizer")
)
# tiktoken_ext/openai_public.py's pattern for gpt2, spelled as tiktoken spells it (not imported
# from gpt2cli, so the reference does not share our code)
TIKTOKEN_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow tests (see SLOW_FIXTURES, SLOW_NAMES and SLOW_TESTS above)."""
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


def _is_slow(item: pytest.Item) -> bool:
    module = item.nodeid.partition("::")[0].rpartition("/")[2].removesuffix(".py")
    fixtures = getattr(item, "fixturenames", ())
    function = getattr(item, "function", None)
    names = getattr(getattr(function, "__code__", None), "co_names", ())
    return (
        any(f in fixtures for m, f in SLOW_FIXTURES if m in ("*", module))
        or not SLOW_NAMES.isdisjoint(names)
        or item.nodeid.partition("[")[0] in SLOW_TESTS
    )


@pytest.fixture(autouse=True)
def _blas_threads_as_they_were() -> Iterator[None]:
    """A test that runs a command in this process (Click's runner, an in-process server) may fit
    OpenBLAS's threads to the machine's load then (gpt2cli.threads): the next starts with the
    count this one found, so a run's thread counts do not depend on the load."""
    from gpt2cli import threads

    before = threads.blas_threads()
    yield
    if before is not None and threads.blas_threads() != before:
        threads.set_blas_threads(before)


@pytest.fixture(autouse=True)
def _isolated_hub_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep every test away from the user's Hugging Face cache and from the real hub."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no real hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the session's cached files (tokenizer tables, transposed weights) out of the user's
    ~/.cache, and its hub files out of theirs, from before the first fixture of any scope runs:
    session- and module-scoped models load before `_isolated_hub_cache` applies. One cache
    folder for the whole session, as one user's runs share theirs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home_session")))
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no real hub
        yield


@pytest.fixture(scope="session")
def gpt2_vocab_dir() -> Path:
    """The real GPT-2 vocabulary in `../shared/gpt2-tokenizer/`: the tiktoken reference's source."""
    if not (SHARED_TOKENIZER / "vocab.json").is_file():
        pytest.skip(
            f"real GPT-2 vocabulary not found at {SHARED_TOKENIZER} "
            "(set GPT2_TOKENIZER_DIR to a folder with vocab.json and merges.txt)"
        )
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def model_124m_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 124M-shaped random-weight folder, written once per session (about 500 MB)."""
    return write_random_gpt2(tmp_path_factory.mktemp("gpt2-124m"), GPT2_124M, seed=0)


@pytest.fixture(scope="session")
def heavy_tailed_124m_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 124M-shaped folder of heavy-tailed weights with outlier channels (about 500 MB), for
    int8 and bfloat16 against float32."""
    folder = tmp_path_factory.mktemp("gpt2-124m-heavy")
    return write_random_gpt2(folder, GPT2_124M, seed=0, heavy_tailed=True)


@pytest.fixture(scope="session")
def ours_124m(model_124m_dir: Path) -> GPT2:
    """gpt2cli's model on the 124M-shaped random weights."""
    return GPT2.from_pretrained(model_124m_dir)


@pytest.fixture(scope="session")
def reference_124m(model_124m_dir: Path) -> Any:
    """transformers' GPT2LMHeadModel on the same weights."""
    return reference_model(model_124m_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight GPT-2 folder with the real vocabulary and tokenizer files."""
    return write_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), TINY, seed=0)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hugging Face hub on a free port (tests/hub_server.py), set as HF_ENDPOINT.

    Add repos with `fake_hub.add("owner/name", Repo.from_folder(folder))`. huggingface_hub reads
    HF_ENDPOINT when it is imported, so run what talks to it in a subprocess.
    """
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_vocab_dir: Path) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built from the shared vocabulary (its ranks file is offline).

    The byte table is OpenAI's `bytes_to_unicode` from GPT-2's encoder.py, written out here so
    that the reference shares no code with gpt2cli.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    vocab = json.loads((gpt2_vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t != "<|endoftext|>"}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=TIKTOKEN_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]},
    )
