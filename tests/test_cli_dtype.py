"""`--dtype` and `--threads` on the commands that run a model, through the real process:
choices and bad values, int8 and bfloat16 on generate, score, serve and --jsonl (locally and on
Ray), the extra missing (numba blocked), the -o record, and `gpt2 score --kl-divergence`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2cli import cli, quant

GPT2 = [sys.executable, "-m", "gpt2cli"]
NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(
    not NUMBA, reason="int8 and bfloat16 weights need numba (pip install 'gpt2cli[fast]')"
)
TEXT = "The quick brown fox jumps over the lazy dog, and then over the lazy dog again."
AGAIN = "; write to another file, or add --overwrite to start it again\n"


def gpt2(
    *args: object, env: dict[str, str] | None = None, input: bytes = b""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*GPT2, *map(str, args)], input=input, capture_output=True, timeout=300, env=env
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def env_with(**variables: str) -> dict[str, str]:
    import os

    return {**os.environ, **variables}


@pytest.fixture(scope="module")
def no_numba(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which `import numba` fails, as where the fast extra is not installed."""
    folder = tmp_path_factory.mktemp("no_numba")
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules['numba'] = None\n")
    return env_with(PYTHONPATH=str(folder))


def test_the_choices_are_the_librarys_dtypes():
    assert cli.DTYPES == quant.DTYPES


@pytest.mark.parametrize("command", ["generate", "score", "serve"])
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--dtype", "int4"],
            {},
            "Invalid value for '--dtype': 'int4' is not one of 'float32', 'bfloat16', 'int8'.",
        ),
        (
            ["--threads", "0"],
            {},
            "Invalid value for '--threads' (env var: 'GPT2CLI_THREADS'): 0 is not in the range "
            "x>=1.",
        ),
        (
            [],
            {"GPT2CLI_THREADS": "many"},
            "Invalid value for '--threads' (env var: 'GPT2CLI_THREADS'): 'many' is not a valid "
            "integer range.",
        ),
    ],
)
def test_a_bad_dtype_or_thread_count_is_one_line_and_exit_2(
    tiny_model_dir: Path, command: str, args: list[str], env: dict[str, str], message: str
):
    result = gpt2(command, "-m", tiny_model_dir, *args, env=env_with(**env), input=b"hi")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"gpt2: error: {message}\n"


@pytest.mark.parametrize("command", ["generate", "score"])
def test_without_numba_int8_is_one_line_naming_the_extra_and_float32_still_runs(
    tiny_model_dir: Path, no_numba: dict[str, str], command: str
):
    for dtype in ("int8", "bfloat16"):
        result = gpt2(command, "-m", tiny_model_dir, "--dtype", dtype, input=b"Hello", env=no_numba)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr.startswith(f"gpt2: error: dtype {dtype} needs the fast extra: ")
        assert result.stderr.endswith("[fast]'\n") and result.stderr.count("\n") == 1
    fine = gpt2(command, "-m", tiny_model_dir, "-t" if command == "generate" else "--stride", 3,
                input=b"Hello", env=no_numba)  # fmt: skip
    assert fine.returncode == 0, fine.stderr


def test_without_numba_serve_refuses_int8_before_listening(
    tiny_model_dir: Path, no_numba: dict[str, str]
):
    result = gpt2("serve", "-m", tiny_model_dir, "--port", 0, "--dtype", "int8", env=no_numba)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("gpt2: error: dtype int8 needs the fast extra: ")


@needs_numba
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_generate_and_score_run_in_each_dtype(tiny_model_dir: Path, dtype: str):
    generated = gpt2(
        "generate", "-m", tiny_model_dir, "--dtype", dtype, "--threads", 1, "--json",
        "-t", 4, "--temperature", 0, "Hello",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert len(json.loads(generated.stdout)["ids"]) == 4
    scored = gpt2("score", "-m", tiny_model_dir, "--dtype", dtype, "--json", "--text", TEXT)
    assert scored.returncode == 0, scored.stderr
    reference = gpt2("score", "-m", tiny_model_dir, "--json", "--text", TEXT)
    ours, theirs = json.loads(scored.stdout), json.loads(reference.stdout)
    assert ours["n_tokens"] == theirs["n_tokens"]
    assert ours["mean_nll"] == pytest.approx(theirs["mean_nll"], rel=0.05)


@needs_numba
def test_threads_from_the_environment_are_taken(tiny_model_dir: Path):
    result = gpt2(
        "generate", "-m", tiny_model_dir, "--dtype", "int8", "-t", 2, "--temperature", 0, "Hi",
        env=env_with(GPT2CLI_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Row {i}", "text": TEXT[i:]}) + "\n"
                            for i in range(3)))  # fmt: skip
    return path


@needs_numba
@pytest.mark.parametrize("command", ["generate", "score"])
def test_jsonl_runs_in_int8_and_a_resume_in_another_dtype_is_refused(
    tiny_model_dir: Path, rows: Path, tmp_path: Path, command: str
):
    out = tmp_path / "out.jsonl"
    args = [command, "-m", tiny_model_dir, "--jsonl", rows, "-o", out]
    args += ["-t", 3, "--seed", 1] if command == "generate" else []
    first = gpt2(*args, "--dtype", "int8")
    assert first.returncode == 0, first.stderr
    assert len(out.read_text().splitlines()) == 3
    record = json.loads(Path(f"{out}.gpt2cli.json").read_text())
    assert record["options"]["dtype"] == "int8"
    made = out.read_bytes()
    result = gpt2(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert (
        result.stderr
        == f"gpt2: error: {out} was made with --dtype int8, not --dtype float32{AGAIN}"
    )
    assert out.read_bytes() == made
    assert gpt2(*args, "--dtype", "int8").returncode == 0  # the same dtype: nothing left to run
    assert out.read_bytes() == made


def test_a_record_without_a_dtype_was_float32(tiny_model_dir: Path, rows: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    args = ["score", "-m", tiny_model_dir, "--jsonl", rows, "-o", out]
    assert gpt2(*args).returncode == 0
    record = Path(f"{out}.gpt2cli.json")
    older = json.loads(record.read_text())
    del older["options"]["dtype"]  # as a gpt2cli before --dtype wrote it
    record.write_text(json.dumps(older))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0])  # as if stopped after a row
    resumed = gpt2(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_text().count("\n") == 3


@needs_numba
def test_kl_divergence_prints_a_row_per_input_and_json(tiny_model_dir: Path, tmp_path: Path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text("Hello world")
    result = gpt2("score", "-m", tiny_model_dir, "--dtype", "int8", "--kl-divergence", a, b)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header == "source\ttokens\tmean_kld\tkld_stderr\ttop1_agreement"
    assert [line.split("\t")[:2] for line in lines] == [[str(a), "18"], [str(b), "2"]]
    assert all(0 <= float(line.split("\t")[2]) < 0.1 for line in lines)
    as_json = gpt2(
        "score", "-m", tiny_model_dir, "--dtype", "bfloat16", "--kl-divergence", "--json",
        "--text", TEXT,
    )  # fmt: skip
    report = json.loads(as_json.stdout)
    assert list(report)[:4] == ["source", "dtype", "reference_dtype", "n_tokens"]
    assert (report["dtype"], report["reference_dtype"], report["n_tokens"]) == (
        "bfloat16", "float32", 18,
    )  # fmt: skip
    assert 0 <= report["mean_kld"] < 0.01 and 0 <= report["top1_agreement"] <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--kl-divergence compares --dtype bfloat16 or int8 with float32: give one of them"),
        (
            ["--dtype", "int8", "--tokens"],
            "--kl-divergence goes with FILE or --text, not with --tokens, --html or --jsonl",
        ),
        (
            ["--dtype", "int8", "--jsonl"],
            "--kl-divergence goes with FILE or --text, not with --tokens, --html or --jsonl",
        ),
    ],
)
def test_kl_divergence_out_of_place_is_one_line_and_exit_2(
    tiny_model_dir: Path, args: list[str], message: str
):
    result = gpt2("score", "-m", tiny_model_dir, "--kl-divergence", *args, input=b'{"text": "a"}')
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"gpt2: error: {message}\n"


def prompt_logprobs(url: str) -> list[float]:
    """The served model's logprobs of TEXT's tokens after the first (echo, no new token)."""
    body = {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        logprobs: list[float] = json.load(response)["choices"][0]["logprobs"]["token_logprobs"]
    return logprobs[1:]


def model_logprobs(folder: Path, dtype: str) -> list[float]:
    """`gpt2 score --no-bos`'s logprobs of TEXT's tokens, in `dtype`, in this process."""
    from gpt2cli.model import GPT2
    from gpt2cli.score import token_logprobs

    model = GPT2.from_pretrained(folder, dtype=dtype)
    return token_logprobs(model, model.tokenizer.encode(TEXT), bos=False).tolist()


@needs_numba
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_serve_lists_its_dtype_and_answers_in_it(tiny_model_dir: Path, engine: str):
    from tests.serve_process import ServeProcess

    if engine == "ray":
        pytest.importorskip("ray")
    with ServeProcess(tiny_model_dir, "--dtype", "int8", "--engine", engine) as server:
        with urllib.request.urlopen(f"{server.url}/v1/models", timeout=30) as response:
            assert json.load(response)["data"][0]["dtype"] == "int8"
        served = prompt_logprobs(server.url)  # on a replica with --engine ray
    int8, float32 = (model_logprobs(tiny_model_dir, d) for d in ("int8", "float32"))
    assert served == pytest.approx(int8, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(served, float32, strict=True)) > 1e-3


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    pytest.importorskip("ray")
    from tests.ray_cluster import two_nodes

    with two_nodes() as address:
        yield address


@needs_numba
def test_ray_actors_run_the_drivers_dtype(cluster: str, tiny_model_dir: Path, rows: Path):
    args = ["score", "-m", tiny_model_dir, "--jsonl", rows]
    local, float32 = gpt2(*args, "--dtype", "int8"), gpt2(*args)
    on_ray = gpt2(*args, "--dtype", "int8", "--engine", "ray", "--ray-address", cluster)
    assert local.returncode == 0 and on_ray.returncode == 0, on_ray.stderr
    nll = [[json.loads(line)["nll"] for line in r.stdout.splitlines()] for r in (local, on_ray)]
    assert nll[1] == pytest.approx(nll[0], abs=1e-4)
    apart = [json.loads(line)["nll"] for line in float32.stdout.splitlines()]
    assert max(abs(a - b) for a, b in zip(apart, nll[0], strict=True)) > 1e-3  # int8's own
