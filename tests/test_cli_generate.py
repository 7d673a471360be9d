"""`gpt2 generate`: against transformers, through pipes, terminals, signals and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import load_file, save_file

from gpt2cli.cli import cli
from gpt2cli.config import GPT2Config
from gpt2cli.tokenizer import Tokenizer
from tests.factory import write_random_gpt2
from tests.hub_server import FakeHub, Repo
from tests.terminal import run_on_terminal

GPT2 = [sys.executable, "-m", "gpt2cli"]


def write_varied_gpt2(folder: Path, config: GPT2Config, seed: int) -> Path:
    """A random GPT-2 with its own output head (not tied to wte).

    A tied head scores each input token highly as its own successor, so a random tied model's
    greedy text collapses into one repeated token within a few steps; with an untied head the
    greedy continuation keeps changing, which makes a long comparison meaningful.
    """
    write_random_gpt2(folder, config, seed=seed)
    tensors = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(seed + 1)
    head = rng.standard_normal((config.n_vocab, config.n_embd), dtype=np.float32) * 0.3
    tensors["lm_head.weight"] = head
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf_config | {"tie_word_embeddings": False}))
    return folder


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 1,024 positions, an untied head: long, non-repeating greedy text."""
    config = GPT2Config(n_ctx=1024, n_embd=32, n_head=4, n_layer=2)
    return write_varied_gpt2(tmp_path_factory.mktemp("varied-gpt2"), config, seed=3)


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wide enough that 1,000 tokens take seconds: time to interrupt it mid-generation."""
    config = GPT2Config(n_ctx=1024, n_embd=256, n_head=4, n_layer=4)
    return write_varied_gpt2(tmp_path_factory.mktemp("slow-gpt2"), config, seed=4)


def run(*args: str | Path, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["generate", *map(str, args)], input=input)


def samples(result: Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_usage_error(result: Result, message: str) -> None:
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("gpt2: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_greedy_json_equals_transformers_generate_for_120_tokens(varied_model_dir: Path):
    import torch
    from transformers import GPT2LMHeadModel

    prompt = "The quick brown fox jumps over the lazy dog because"
    [ours] = samples(
        run("-m", varied_model_dir, "--temperature", 0, "-t", 120, "--ignore-eos", "--json", prompt)
    )
    reference = GPT2LMHeadModel.from_pretrained(varied_model_dir).eval()
    prompt_ids = Tokenizer.default().encode(prompt)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=120,
            min_new_tokens=120,
            pad_token_id=50256,
        )
    expected = out[0, len(prompt_ids) :].tolist()
    assert len(set(expected)) > 50  # a varied continuation, not one token repeated
    assert ours["prompt_ids"] == prompt_ids
    assert ours["ids"] == expected
    assert ours["finish_reason"] == "length"


def test_json_fields_describe_each_sample(tiny_model_dir: Path):
    [sample] = samples(run("-m", tiny_model_dir, "-t", 7, "--seed", 1, "--json", "Hi there"))
    assert set(sample) == {"text", "ids", "prompt_ids", "finish_reason", "logprobs", "timings"}
    assert sample["text"] == Tokenizer.default().decode(sample["ids"])  # type: ignore[arg-type]
    assert len(sample["logprobs"]) == len(sample["ids"]) == 7  # type: ignore[arg-type]
    assert all(lp <= 0 for lp in sample["logprobs"])  # type: ignore[attr-defined]
    timings = sample["timings"]
    assert set(timings) == {"load_s", "prefill_s", "decode_s", "tokens_per_s"}  # type: ignore[arg-type]
    assert all(v >= 0 for v in timings.values())  # type: ignore[attr-defined]


def test_same_seed_same_samples_other_seed_other_samples(tiny_model_dir: Path):
    def ids(seed: int) -> list[object]:
        args = ("-m", tiny_model_dir, "-t", 20, "-n", 2, "--top-k", 0, "--seed", seed, "--json")
        return [s["ids"] for s in samples(run(*args, "Hello"))]

    assert ids(5) == ids(5)
    assert ids(5) != ids(6)


def test_top_k_one_equals_greedy(varied_model_dir: Path):
    base = ("-m", varied_model_dir, "-t", 40, "--ignore-eos", "--json", "Hello world")
    [greedy] = samples(run(*base, "--temperature", 0))
    [top1] = samples(run(*base, "--top-k", 1, "--temperature", 1.5, "--seed", 9))
    assert top1["ids"] == greedy["ids"]


@pytest.mark.parametrize(
    "options",
    [("--seed", "1"), ("--seed", "2", "--top-k", "0", "--top-p", "0.9"), ("--temperature", "0")],
)
def test_piped_output_is_exactly_the_json_text(tiny_model_dir: Path, options: tuple[str, ...]):
    args = ("-m", tiny_model_dir, "-t", 30, *options, "Hello")
    [sample] = samples(run(*args, "--json"))
    assert run(*args).stdout == sample["text"]
    assert run(*args, "--no-stream").stdout == sample["text"]


def test_three_samples_are_printed_in_order_separated_by_a_dashes_line(tiny_model_dir: Path):
    args = ("-m", tiny_model_dir, "-t", 12, "-n", 3, "--seed", 4, "--top-k", 50, "Hello")
    texts = [s["text"] for s in samples(run(*args, "--json"))]
    assert len(texts) == 3 and len(set(texts)) == 3
    for extra in ((), ("--no-stream",)):
        result = run(*args, *extra)
        assert result.exit_code == 0
        assert result.stdout == "\n---\n".join(texts)  # type: ignore[arg-type]


def test_stop_strings_end_samples_and_are_not_printed(varied_model_dir: Path):
    base = ("-m", varied_model_dir, "--temperature", 0, "-t", 40, "--ignore-eos", "Hello")
    [full] = samples(run(*base, "--json"))
    text = str(full["text"])
    stop = text[10:14]
    [cut] = samples(run(*base, "--json", "--stop", "no such text", "--stop", stop))
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]
    assert run(*base, "--stop", stop).stdout == cut["text"]


def test_prompt_from_stdin_and_empty_prompt(tiny_model_dir: Path):
    [piped] = samples(run("-m", tiny_model_dir, "-t", 3, "--json", input="Dear diary,\n"))
    assert piped["prompt_ids"] == Tokenizer.default().encode("Dear diary,\n")
    [dash] = samples(run("-m", tiny_model_dir, "-t", 3, "--json", "-", input="Dear diary,\n"))
    assert dash["prompt_ids"] == piped["prompt_ids"]
    [empty] = samples(run("-m", tiny_model_dir, "-t", 3, "--json", input=""))
    assert empty["prompt_ids"] == [50256]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--top-p", "1.5"), "Invalid value for '--top-p': top_p must be in (0, 1]"),
        (("--top-p", "0"), "Invalid value for '--top-p'"),
        (("--temperature", "-1"), "Invalid value for '--temperature': temperature must be a"),
        (("--temperature", "nan"), "temperature must be a number from 0 (greedy)"),
        (("--max-tokens", "0"), "Invalid value for '-t' / '--max-tokens'"),
        (("-n", "0"), "Invalid value for '-n' / '--num-samples'"),
        (("--top-k", "-1"), "Invalid value for '--top-k'"),
        (("--seed", "x"), "Invalid value for '--seed'"),
        (("--stop", ""), "a stop string must not be empty"),
        (("--bogus",), "No such option"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    tiny_model_dir: Path, args: tuple[str, ...], message: str
):
    assert_usage_error(run("-m", tiny_model_dir, *args, "Hello"), message)


def test_prompt_over_the_context_names_both_lengths(tiny_model_dir: Path):
    prompt = " word" * 200
    n = len(Tokenizer.default().encode(prompt))
    assert_usage_error(
        run("-m", tiny_model_dir, prompt), f"prompt is {n} tokens but the model's context is 128"
    )


def test_truncate_keeps_the_prompts_last_tokens(tiny_model_dir: Path):
    prompt = " word" * 200
    ids = Tokenizer.default().encode(prompt)
    args = ("-m", tiny_model_dir, "-t", 20, "--seed", 3, "--json")
    [truncated] = samples(run(*args, "--truncate", prompt))
    kept = ids[-(128 - 20) :]
    assert truncated["prompt_ids"] == kept
    [same] = samples(run(*args, Tokenizer.default().decode(kept)))
    assert truncated["ids"] == same["ids"] and len(same["ids"]) == 20  # type: ignore[arg-type]


def test_non_utf8_stdin_is_a_usage_error(tiny_model_dir: Path):
    result = run("-m", tiny_model_dir, input=b"caf\xe9")
    assert_usage_error(result, "prompt on stdin is not valid UTF-8: byte 0xe9 at offset 3")


def test_unknown_models_are_usage_errors(tmp_path: Path):
    assert_usage_error(run("-m", "not a model", "Hi"), "not a model")
    assert_usage_error(run("-m", tmp_path / "missing" / "folder", "Hi"), "missing")


def test_help_states_the_defaults():
    result = CliRunner().invoke(cli, ["generate", "--help"])
    assert result.exit_code == 0
    for default in ("default: 40", "default: 1.0", "default: 5", "default: gpt2"):
        assert default in result.stdout


def test_model_from_the_hub_by_repo_id(fake_hub: FakeHub, tiny_model_dir: Path):
    fake_hub.add("someone/tiny-gpt2", Repo.from_folder(tiny_model_dir))
    args = ["-m", "someone/tiny-gpt2", "-t", "5", "--seed", "0", "--json", "Hi"]
    proc = subprocess.run([*GPT2, "generate", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [local] = samples(run("-m", tiny_model_dir, *args[2:]))
    assert json.loads(proc.stdout)["ids"] == local["ids"]

    missing = [*GPT2, "generate", "-m", "someone/missing", "Hi"]
    proc = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gpt2: error: ") and proc.stderr.count("\n") == 1
    assert "someone/missing" in proc.stderr


def test_a_real_pipe_gets_exactly_the_continuation(tiny_model_dir: Path):
    args = [*GPT2, "generate", "-m", str(tiny_model_dir), "-t", "40", "--seed", "8", "Hello"]
    piped = subprocess.run(args, capture_output=True, timeout=120)
    as_json = subprocess.run([*args, "--json"], capture_output=True, timeout=120)
    assert piped.returncode == as_json.returncode == 0
    assert piped.stderr == b""
    assert piped.stdout == json.loads(as_json.stdout)["text"].encode()


@pytest.mark.parametrize("num_samples", [1, 2])
def test_ctrl_c_keeps_what_was_printed_and_exits_130(slow_model_dir: Path, num_samples: int):
    args = ["-m", str(slow_model_dir), "--temperature", "0", "--ignore-eos", "Hi"]
    proc = subprocess.Popen(
        [*GPT2, "generate", *args, "-t", "1000", "-n", str(num_samples)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    printed = os.read(proc.stdout.fileno(), 4096)  # the first piece: generation is under way
    proc.send_signal(signal.SIGINT)
    printed += proc.stdout.read()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert stderr.strip() == b""  # only the newline Click writes after the terminal's ^C
    [full] = samples(run(*args, "-t", "300", "--json"))
    parts = printed.decode().split("\n---\n")  # greedy: every sample is the same text
    assert len(parts) == num_samples and parts[0]  # a later sample may be one token behind
    for part in parts:  # each sample's text so far, printed once, cut before 300 tokens
        assert len(part) < len(str(full["text"]))
        assert str(full["text"]).startswith(part)


def test_a_closed_pipe_ends_quietly(varied_model_dir: Path):
    args = ["-m", str(varied_model_dir), "-t", "900", "--ignore-eos", "Hello"]
    proc = subprocess.Popen(
        [*GPT2, "generate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(20)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert len(head) == 20
    assert stderr == b""

    shell = f'{" ".join(GPT2)} generate {" ".join(args)} | head -c 20; echo " ${{PIPESTATUS[0]}}"'
    out = subprocess.run(["bash", "-c", shell], capture_output=True, timeout=60)
    assert out.stderr == b""
    assert out.stdout.endswith(b" 141\n")


def test_on_a_terminal_control_characters_are_shown_escaped_not_obeyed(tiny_model_dir: Path):
    prompt = "set \x1b]0;pwned\x07 title\n\tand \x1b[2J clear"
    args = ["generate", "-m", str(tiny_model_dir), "-t", "3", "--seed", "1", prompt]
    status, shown, _ = run_on_terminal(args, env=os.environ | {"NO_COLOR": "1"})
    assert status == 0
    assert "\x1b]0;" not in shown and "\x1b[2J" not in shown
    assert "set \\x1b]0;pwned\\x07 title" in shown and "\\x1b[2J clear" in shown
    assert "title\r\n" in shown  # a line break stays one (the terminal adds the \r)


def test_a_terminal_that_is_not_utf8_shows_what_it_cannot_print_escaped(tiny_model_dir: Path):
    args = ["generate", "-m", str(tiny_model_dir), "-t", "3", "--seed", "1", "h\u00e9llo"]
    env = os.environ | {"NO_COLOR": "1", "PYTHONIOENCODING": "ascii"}
    status, shown, stderr = run_on_terminal(args, env=env)
    assert status == 0, stderr
    assert "h\\xe9llo" in shown and "Traceback" not in shown + stderr


def test_on_a_terminal_the_prompt_is_dimmed_and_a_summary_goes_to_stderr(tiny_model_dir: Path):
    args = ["generate", "-m", str(tiny_model_dir), "-t", "10", "--seed", "2", "-n", "2"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    status, shown, stderr = run_on_terminal([*args, "Hello there"], env=env)
    assert status == 0
    assert "\x1b[2mHello there\x1b[0m" in shown
    assert "sample 1 of 2" in shown and "sample 2 of 2" in shown
    assert "20 tokens" in stderr and "tokens/s" in stderr and "first token" in stderr

    status, plain, _ = run_on_terminal([*args, "Hello there"], env=env | {"NO_COLOR": "1"})
    assert status == 0
    assert "\x1b[" not in plain
    assert "Hello there" in plain


def _process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GPT2, "generate", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_nan_weights_are_one_error_line_naming_the_position(tmp_path: Path):
    folder = write_random_gpt2(
        tmp_path / "nan", GPT2Config(n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    )
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["h.1.mlp.c_fc.weight"][:, :5] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))
    result = _process("-m", folder, "Hello world")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("gpt2: error: the model's logits at position 1 are not finite")
    assert result.stderr.count("\n") == 1 and "Warning" not in result.stderr


@pytest.mark.parametrize("temperature", ["1e-45", "1e-300"])
def test_a_vanishing_temperature_is_greedy_with_nothing_on_stderr(
    varied_model_dir: Path, temperature: str
):
    tiny = _process("-m", varied_model_dir, "--temperature", temperature, "-t", "20", "Hi there")
    greedy = _process("-m", varied_model_dir, "--temperature", "0", "-t", "20", "Hi there")
    assert (tiny.returncode, tiny.stderr) == (0, "")
    assert tiny.stdout == greedy.stdout


def test_more_samples_than_memory_holds_are_refused_at_once(tiny_model_dir: Path):
    result = _process("-m", tiny_model_dir, "-n", "100000000", "Hello")
    assert result.returncode == 2 and result.stdout == ""
    assert "100000000 sequence(s)" in result.stderr and "use fewer samples" in result.stderr
    assert result.stderr.count("\n") == 1
