"""`--engine ray` on a local two-node Ray cluster (1 CPU each, 2 in all): the local engine's
output (generate's bytes; score's ids, text and counts exactly and floats within 1e-4, as an
actor's BLAS runs with its own thread count), weights shipped through the object store, and ray
imported by nothing else."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2cli import dataset
from gpt2cli.config import GPT2Config
from gpt2cli.dataset import GenerateTask, OrderedWriter, ScoreTask
from gpt2cli.errors import GPT2Error
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from tests.compare import assert_same_output
from tests.factory import write_random_gpt2

ray = pytest.importorskip("ray")
ray_engine = pytest.importorskip("gpt2cli.ray_engine")
from tests.ray_cluster import two_nodes  # noqa: E402 - after the skip when ray is missing

GPT2_CMD = [sys.executable, "-m", "gpt2cli"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a worker node of 1 CPU each, this process connected; yields its address."""
    with two_nodes() as address:
        yield address


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def mixed_prompts() -> str:
    """Greedy and seeded rows of mixed prompt lengths and budgets, and one invalid row."""
    rows: list[object] = []
    for i in range(22):
        row: dict[str, object] = {"prompt": f"Row {i}" + " then more" * (i % 6), "id": i}
        row["max_tokens"] = 2 + (i * 7) % 15
        if i % 3 == 0:
            row["temperature"] = 0
        rows.append(row)
    rows.insert(9, {"prompt": ["not", "text"]})
    return jsonl(*rows)


def run_with(engine: Any, task: dataset.Task, model: GPT2, content: str) -> bytes:
    rows = dataset.read_rows("input", content, task, model)
    out = io.BytesIO()
    dataset.run(task, model, rows, OrderedWriter(out.write), engine=engine)
    return out.getvalue()


def test_the_cluster_has_two_nodes_and_one_actor_fits_each(cluster: str):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert ray_engine.actor_count(ray, 1) == 2  # one per node: the job spans both
    assert ray_engine.actor_count(ray, 2) == 0


def test_generate_on_ray_is_byte_identical_to_local(cluster: str, model: GPT2):
    task = GenerateTask(GenerationParams(seed=6), batch_size=3)
    local = run_with(dataset.run_local, task, model, mixed_prompts())
    assert run_with(ray_engine.engine(), task, model, mixed_prompts()) == local
    assert len(local.splitlines()) == 23


def test_score_on_ray_matches_local(cluster: str, model: GPT2):
    """An actor's BLAS has 1 thread, this process's as many as the CPUs: floats within 1e-4."""
    texts = jsonl(*[{"text": "A text of some words. " * (1 + i % 9), "k": i} for i in range(17)])
    task = ScoreTask(batch_size=4, tokens=True, top=2)
    local = run_with(dataset.run_local, task, model, texts)
    assert_same_output(run_with(ray_engine.engine(), task, model, texts), local)
    assert len(local.splitlines()) == 17


def test_workers_need_no_copy_of_the_model_folder(
    cluster: str, tiny_model_dir: Path, tmp_path: Path, model: GPT2
):
    """The no-shared-file-system case: the folder is gone once the driver has opened it."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    driver_model = GPT2.from_pretrained(folder)
    driver_model.tokenizer  # noqa: B018 - the driver reads its tokenizer, as a run does
    shutil.rmtree(folder)
    task = GenerateTask(GenerationParams(max_tokens=5, temperature=0), batch_size=2)
    content = jsonl(*[{"prompt": f"p{i}"} for i in range(6)])
    shipped = run_with(ray_engine.engine(), task, driver_model, content)
    assert shipped == run_with(dataset.run_local, task, model, content)


def test_an_actor_larger_than_every_node_is_refused(cluster: str, model: GPT2):
    with pytest.raises(GPT2Error, match="no node of the Ray cluster has 2 CPUs"):
        run_with(ray_engine.engine(threads=2), GenerateTask(), model, jsonl({"prompt": "x"}))


def test_a_failure_inside_an_actor_is_its_one_line_error(cluster: str, tmp_path: Path):
    folder = write_random_gpt2(
        tmp_path / "nan", GPT2Config(n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    )
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["h.1.mlp.c_fc.weight"][:, :5] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))
    broken = GPT2.from_pretrained(folder)
    with pytest.raises(GPT2Error, match=r"^the model's logits at position \d+ are not finite"):
        run_with(ray_engine.engine(), GenerateTask(), broken, jsonl({"prompt": "Hello"}))


def test_the_cli_on_ray_writes_the_local_bytes_and_nothing_else_on_stdout(
    cluster: str, tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "in.jsonl"
    source.write_text(mixed_prompts())
    args = [*GPT2_CMD, "generate", "-m", str(tiny_model_dir), "--jsonl", str(source)]
    args += ["--seed", "3", "--skip-invalid", "--batch-size", "4"]
    local = subprocess.run(args, capture_output=True, timeout=120)
    on_ray = subprocess.run(
        [*args, "--engine", "ray", "--ray-address", cluster], capture_output=True, timeout=300
    )
    assert on_ray.returncode == 0, on_ray.stderr.decode()
    assert on_ray.stdout == local.stdout
    assert b"Traceback" not in on_ray.stderr


def test_the_cli_reaches_the_cluster_through_ray_address(
    cluster: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = tmp_path / "texts.jsonl"
    source.write_text(jsonl(*[{"text": f"Text {i} " * (i + 1)} for i in range(6)]))
    out = tmp_path / "scores.jsonl"
    args = [*GPT2_CMD, "score", "-m", str(tiny_model_dir), "--jsonl", str(source)]
    local = subprocess.run(args, capture_output=True, timeout=120)
    assert local.returncode == 0 and len(local.stdout.splitlines()) == 6, local.stderr.decode()
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    result = subprocess.run([*args, "--engine", "ray", "-o", str(out)], timeout=300)
    assert result.returncode == 0
    assert_same_output(out.read_bytes(), local.stdout)


RAY_CHECK = """
import sys
from gpt2cli.__main__ import main
try:
    main()
finally:
    sys.stderr.write(f"\\nray imported: {'ray' in sys.modules}\\n")
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["encode", "Hello"],
        ["generate", "-t", "2", "--jsonl", "-"],
        ["score", "--jsonl", "-"],
        ["generate", "-t", "2", "Hello"],
    ],
)
def test_no_other_command_imports_ray(tiny_model_dir: Path, args: list[str]):
    model = (
        ["-m", str(tiny_model_dir)] if args[0] in ("generate", "score") and len(args) > 2 else []
    )
    result = subprocess.run(
        [sys.executable, "-c", RAY_CHECK, *args, *model],
        input=b'{"prompt": "a", "text": "a b"}\n',
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().endswith("ray imported: False\n")


def test_an_address_nobody_answers_is_one_line_at_once(tiny_model_dir: Path):
    with socket.socket() as probe:  # a port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = subprocess.run(
        [*GPT2_CMD, "score", "-m", str(tiny_model_dir), "--jsonl", "--engine", "ray",
         "--ray-address", address],
        input=b'{"text": "a b"}\n', capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == (
        f"gpt2: error: cannot reach the Ray cluster at {address} (Connection refused): start one "
        "with `ray start --head`, or check --ray-address / RAY_ADDRESS\n"
    )


def test_without_the_extra_the_ray_engine_is_one_line_naming_it(tiny_model_dir: Path):
    blocked = "import sys\nsys.modules['ray'] = None  # import ray: ImportError\n" + RAY_CHECK
    result = subprocess.run(
        [sys.executable, "-c", blocked, "generate", "--jsonl", "-", "--engine", "ray"],
        input=b'{"prompt": "a"}\n',
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    root = Path(__file__).resolve().parents[1]  # from a clone: its own extra, into this Python
    assert result.stderr.decode().startswith(
        f"gpt2: error: --engine ray needs the ray extra: {sys.executable} -m pip install "
        f"-e '{root}[ray]'\n"
    )


def test_a_cluster_that_wants_a_token_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray 2.60's token authentication: a driver without RAY_AUTH_MODE=token gets a connection
    error naming another address; the message says what is wrong and what to set."""
    from gpt2cli.ray_engine import connect_error

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    refused = ConnectionError("Failed to connect to GCS at 10.0.0.9:6379")
    assert "token authentication" not in connect_error("10.0.0.9:6379", refused)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    message = connect_error("10.0.0.9:6379", refused)
    assert "token authentication" in message and "RAY_AUTH_MODE=token" in message

    class AuthenticationError(Exception):  # Ray's is neither a ConnectionError nor RuntimeError
        pass

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "token authentication" in connect_error("h:1", AuthenticationError("bad token"))
