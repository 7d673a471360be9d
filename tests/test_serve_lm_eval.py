"""lm-evaluation-harness's `local-completions` model pointed at `gpt2 serve` scores a small local
multiple-choice task exactly as lm-evaluation-harness's own `hf` model (transformers) does on the
same random weights. Everything is offline: a task file and its data made here, no hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve_process import ServeProcess, serve_env

TIMEOUT = 600.0  # seconds for the lm-eval process: two models, importing torch and datasets

QUESTIONS = [
    "The capital of France is",
    "Two plus two equals",
    "The sky on a clear day is",
    "A tiny random model scores text over HTTP and",
]
OTHER_CHOICES = [" Paris", " four and a half", " full of emoji 🤖"]

# Both models on the task, in one process (lm_eval's import is the slow part); prints each
# model's accuracy and per-document [loglikelihood, is_greedy] for every choice.
RUN = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

folder, url, tasks = sys.argv[1:4]
models = {
    "hf": {"pretrained": folder, "dtype": "float32", "device": "cpu"},
    "local-completions": {
        "model": folder,
        "base_url": url + "/v1/completions",
        "tokenizer_backend": "huggingface",
        "max_length": 128,
        "num_concurrent": 4,
    },
}
out = {}
for name, args in models.items():
    result = simple_evaluate(
        model=name, model_args=args, tasks=["gpt2cli_tiny_choice"], batch_size=1,
        task_manager=TaskManager(include_path=tasks), log_samples=True,
    )
    samples = sorted(result["samples"]["gpt2cli_tiny_choice"], key=lambda s: s["doc_id"])
    out[name] = {
        "acc": result["results"]["gpt2cli_tiny_choice"]["acc,none"],
        "choices": [s["filtered_resps"] for s in samples],
    }
print(json.dumps(out))
"""

TASK = """
task: gpt2cli_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def server(tiny_model_dir: Path, tmp_path: Path) -> Any:
    with ServeProcess(tiny_model_dir, env=serve_env(tmp_path)) as process:
        yield process


def test_local_completions_against_the_server_agrees_with_lm_evals_hf_model(
    server: ServeProcess, tiny_model_dir: Path, tmp_path: Path
):
    docs = []
    for i, question in enumerate(QUESTIONS):
        greedy = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": question, "max_tokens": 3, "temperature": 0},
            timeout=60,
        ).json()["choices"][0]["text"]
        choices = [*OTHER_CHOICES, greedy]  # the greedy one makes is_greedy true somewhere
        docs.append({"question": question, "choices": choices, "answer": i % len(choices)})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gpt2cli_tiny_choice.yaml").write_text(TASK.format(data=data))
    env = serve_env(tmp_path) | {"HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", RUN, str(tiny_model_dir), server.url, str(tasks)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    hf, ours = results["hf"], results["local-completions"]
    assert ours["acc"] == hf["acc"]
    assert len(ours["choices"]) == len(docs)
    for got, want in zip(ours["choices"], hf["choices"], strict=True):
        assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
        for (ll, _), (expected, _) in zip(got, want, strict=True):
            assert ll == pytest.approx(expected, abs=1e-4)
    assert any(greedy for doc in ours["choices"] for _, greedy in doc)
