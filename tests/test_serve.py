"""`gpt2 serve`: the routes run in this process, and a real server process for what only one shows.

In-process: the app `APIServer` builds (an `Engine` over the model, the `App` over it), served
through Starlette's TestClient (httpx over ASGI, on one event loop in a thread) and the official
`openai` client on top of it, checked against `gpt2 generate --json` and `gpt2 score --json` run on
the same model. A real process on 127.0.0.1 only for what needs one: the line it prints, stop
signals, uvicorn's handling of real sockets (clients that go away, malformed requests), the command
line (a port in use, the serve extra missing, no other command importing the HTTP stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from starlette.testclient import TestClient

from gpt2cli import serve
from gpt2cli.cli import cli
from gpt2cli.config import GPT2Config
from gpt2cli.engine import MAX_QUEUE, Engine
from gpt2cli.model import GPT2 as GPT2Model
from gpt2cli.openai_api import token_text
from gpt2cli.serve import App
from gpt2cli.tokenizer import Tokenizer
from tests.compare import assert_same_output
from tests.factory import TINY, write_random_gpt2
from tests.serve_process import ServeProcess, serve_env

GPT2 = [sys.executable, "-m", "gpt2cli"]
TIMEOUT = 60.0  # seconds for any one HTTP call or subprocess
PROMPT = "The quick brown fox jumps over the lazy dog because"
JSON = {"Content-Type": "application/json"}  # what a body sent as bytes must declare
LOCAL = "http://localhost"  # the in-process app's address: a loopback name, as its Host check wants
# the access log's line: client, method, path, status, what the route adds, seconds
ACCESS_LINE = re.compile(r"gpt2 serve: \S+ [A-Z]+ \S* (\d{3}|-) (.* )?\d+\.\d{3} s\n")
SETTLE_S = 0.2  # seconds for a few engine steps


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return serve_env(tmp_path_factory.mktemp("serve-env"))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, env: dict[str, str]) -> Iterator[ServeProcess]:
    """The tiny model served with 8 rows by a real `gpt2 serve` process."""
    with ServeProcess(tiny_model_dir, "--max-batch", "8", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wide enough that a token takes about 10 ms: requests that are still running seconds
    later, for the tests that act while one is in flight."""
    config = GPT2Config(n_ctx=1024, n_embd=256, n_head=4, n_layer=4)
    return write_random_gpt2(tmp_path_factory.mktemp("slow-gpt2"), config, seed=4)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> GPT2Model:
    return GPT2Model.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def slow_model(slow_model_dir: Path) -> GPT2Model:
    return GPT2Model.from_pretrained(slow_model_dir)


@contextlib.contextmanager
def serving(
    model: GPT2Model,
    name: str | Path,
    *,
    max_batch: int = 8,
    max_queue: int = MAX_QUEUE,
    api_key: str | None = None,
) -> Iterator[TestClient]:
    """`gpt2 serve -m NAME`'s app in this process, built as `APIServer` builds it but for the
    socket: an engine with its worker started and the routes over it, reached through a
    TestClient at LOCAL. The engine is closed (open requests end) before the client."""
    engine = Engine(model, max_batch, max_queue)
    model.tokenizer.decode(model.tokenizer.encode("warm"))  # as APIServer: tables built first
    app = App(engine, [str(name)], str(name), api_key)
    with TestClient(app.starlette(), base_url=LOCAL) as http:
        engine.start()
        try:
            yield http
        finally:
            engine.close()
            engine.join()


def openai_client(http: httpx.Client, api_key: str = "unused") -> openai.OpenAI:
    """The `openai` client, sending through `http` (an in-process TestClient)."""
    return openai.OpenAI(
        base_url=f"{http.base_url}/v1", api_key=api_key, max_retries=0, http_client=http
    )


@pytest.fixture(scope="module")
def http(tiny_model: GPT2Model, tiny_model_dir: Path) -> Iterator[TestClient]:
    """The tiny model served in-process with 8 rows."""
    with serving(tiny_model, tiny_model_dir, max_batch=8) as client:
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai_client(http)


@pytest.fixture
def complete(client: openai.OpenAI, tiny_model_dir: Path) -> Any:
    """`client.completions.create` naming the served model (the client needs one)."""
    return functools.partial(client.completions.create, model=str(tiny_model_dir))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def post(to: httpx.Client | str, body: Any, **kwargs: Any) -> httpx.Response:
    """POST /v1/completions, in-process (a client) or to a real server (its URL)."""
    if isinstance(to, str):
        return httpx.post(to + "/v1/completions", json=body, timeout=TIMEOUT, **kwargs)
    return to.post("/v1/completions", json=body, **kwargs)


def events(response: httpx.Response) -> list[Any]:
    """A Server-Sent Events body's data: JSON values, and the final "[DONE]"."""
    data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def json_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """A stream's JSON events as they arrive (not `[DONE]`)."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def stream(http: httpx.Client, body: dict[str, Any]) -> list[Any]:
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response)


class ASGIStream:
    """A streamed completion driven as uvicorn drives the app, on the TestClient's event loop:
    its sends never wait (uvicorn's buffers take them), and `disconnect` is the client going away
    (uvicorn's `http.disconnect`). A TestClient stream cannot stand for a client that goes away:
    its sends wait for the reader, so closing one cancels the response inside `send` (see
    test_a_stream_cancelled_while_sending_frees_its_row_before_any_garbage_collection)."""

    def __init__(self, http: TestClient, body: dict[str, Any]) -> None:
        assert http.portal is not None, "use the TestClient as a context manager"
        self.portal = http.portal
        self.lines: queue.Queue[str] = queue.Queue()
        self.started: Future[int] = Future()
        self.gone = self.portal.call(asyncio.Event)
        data = json.dumps(body | {"stream": True}).encode()
        self.done = self.portal.start_task_soon(self._run, http.app, data)

    async def _run(self, app: Any, data: bytes) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's, over h11
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"localhost"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        read = False

        async def receive() -> dict[str, Any]:
            nonlocal read
            if not read:
                read = True
                return {"type": "http.request", "body": data, "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.started.set_result(message["status"])
            elif message["type"] == "http.response.body":
                for line in message.get("body", b"").decode().splitlines():
                    if line.startswith("data: "):
                        self.lines.put(line[6:])

        await app(scope, receive, send)

    def status(self) -> int:
        return self.started.result(TIMEOUT)

    def next_event(self) -> Any:
        return json.loads(self.lines.get(timeout=TIMEOUT))

    def disconnect(self) -> None:
        """The client goes away; return once the app has answered it."""
        self.portal.call(self.gone.set)
        self.done.result(TIMEOUT)


def post_when_room(http: httpx.Client, body: Any, within: float = 2.0) -> httpx.Response:
    """POST, again while the answer is 429 (the engine counts a cancelled job until its
    worker's next step), for at most `within` seconds."""
    deadline = time.monotonic() + within
    while (response := post(http, body)).status_code == 429:
        assert time.monotonic() < deadline, "the requests that went away still hold the queue"
        time.sleep(0.05)
    return response


def gpt2(*args: str | Path) -> str:
    """Run a `gpt2` command (in this process, as Click runs it); its stdout."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def generate_json(model: Path, prompt: str, *args: str) -> list[dict[str, Any]]:
    out = gpt2("generate", "-m", model, "--json", *args, prompt)
    return [json.loads(line) for line in out.splitlines()]


def openai_reason(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}[reason]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    """The response is OpenAI's error body with this status (and param); return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    return str(error["message"])


# --- start, models, health ---------------------------------------------------------------------


def test_prints_one_line_with_its_url_and_health_needs_nothing(
    server: ServeProcess, tiny_model_dir: Path
):
    assert server.line == f"Serving {tiny_model_dir} at {server.url}\n"
    assert server.url.startswith("http://127.0.0.1:")
    response = httpx.get(server.url + "/health", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_each_request_is_one_access_log_line_on_stderr(server: ServeProcess):
    before = len(server.stderr)
    assert post(server.url, {"prompt": "Hi", "max_tokens": 3, "temperature": 0}).status_code == 200
    assert httpx.get(server.url + "/v1/nothing%1b%5b2J", timeout=TIMEOUT).status_code == 404
    for _ in range(50):  # bounded: the lines follow the responses at once
        if len(server.stderr) >= before + 2:
            break
        time.sleep(0.05)
    forged = httpx.get(
        server.url + "/health", headers={"X-Forwarded-For": "9.9.9.9"}, timeout=TIMEOUT
    )
    assert forged.status_code == 200
    for _ in range(50):
        if len(server.stderr) >= before + 3:
            break
        time.sleep(0.05)
    completion, missing, health = server.stderr[before : before + 3]
    assert health.startswith("gpt2 serve: 127.0.0.1 GET /health 200 ")  # the peer, not the header
    assert ACCESS_LINE.fullmatch(completion) and ACCESS_LINE.fullmatch(missing)
    assert completion.startswith(
        "gpt2 serve: 127.0.0.1 POST /v1/completions 200 1+3 tokens "
    )  # "Hi", 3 new
    assert "GET /v1/nothing\\x1b[2J 404 " in missing  # a control in the path is escaped


def test_quiet_serves_without_an_access_log(tiny_model_dir: Path, env: dict[str, str]):
    with ServeProcess(tiny_model_dir, "--quiet", env=env) as quiet:
        assert httpx.get(quiet.url + "/health", timeout=TIMEOUT).status_code == 200
        time.sleep(0.3)
        assert quiet.stderr == []


def test_models_lists_the_one_model_and_accepts_its_folder_as_alias(
    client: openai.OpenAI, tiny_model_dir: Path
):
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_model_dir)]
    assert models[0].object == "model" and models[0].to_dict()["max_model_len"] == TINY.n_ctx
    assert client.models.retrieve(str(tiny_model_dir)).id == str(tiny_model_dir)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# --- generation against `gpt2 generate` -------------------------------------------------------


def test_greedy_completion_equals_gpt2_generate_whole_and_streamed(
    complete: Any, tiny_model_dir: Path
):
    [expected] = generate_json(tiny_model_dir, PROMPT, "--temperature", "0", "-t", "24")
    whole = complete(
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    [choice] = whole.choices
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert choice.text == expected["text"]
    assert choice.to_dict()["token_ids"] == expected["ids"]
    assert choice.to_dict()["prompt_token_ids"] == expected["prompt_ids"]
    assert choice.finish_reason == openai_reason(expected["finish_reason"])
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(expected["prompt_ids"])
    assert whole.usage.completion_tokens == len(expected["ids"])

    chunks = list(
        complete(
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    tokens, usage = chunks[:-1], chunks[-1]
    assert [c.choices[0].to_dict()["token_ids"][0] for c in tokens] == expected["ids"]
    assert "".join(c.choices[0].text for c in tokens) == expected["text"]
    assert [c.choices[0].finish_reason for c in tokens[:-1]] == [None] * (len(tokens) - 1)
    assert tokens[-1].choices[0].finish_reason == choice.finish_reason
    assert usage.choices == [] and usage.usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_a_stop_string_across_tokens_is_never_streamed_in_part(
    complete: Any, http: TestClient, tiny_model_dir: Path
):
    whole = complete(prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.text_offset is not None
    text, offsets = whole.choices[0].text, logprobs.text_offset

    def straddles(stop: str) -> bool:  # its first place in the text spans two tokens
        start = text.find(stop)
        return len(stop) == 4 and any(start < offset < start + 4 for offset in offsets)

    stop = next(text[b - 2 : b + 2] for b in offsets[1:] if straddles(text[b - 2 : b + 2]))
    [expected] = generate_json(
        tiny_model_dir, PROMPT, "--temperature", "0", "-t", "12", "--stop", stop
    )
    data = stream(http, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": stop})
    assert data[-1] == "[DONE]"
    pieces = [d["choices"][0]["text"] for d in data[:-1]]
    assert "".join(pieces) == expected["text"] == text[: text.index(stop)]
    assert (
        data[-2]["choices"][0]["finish_reason"]
        == "stop"
        == openai_reason(expected["finish_reason"])
    )


def test_n3_seeded_samples_of_a_list_of_prompts_equal_gpt2_generate(
    complete: Any, tiny_model_dir: Path, tokenizer: Tokenizer
):
    prompts = ["Once upon a time", "In the beginning"]
    options = {"max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3}
    result = complete(prompt=prompts, **options, extra_body={"top_k": 0, "return_token_ids": True})
    assert [c.index for c in result.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        expected = generate_json(
            tiny_model_dir, prompt, "-n", "3", "--seed", "7", "--top-k", "0", "-t", "10"
        )
        got = result.choices[3 * i : 3 * i + 3]
        assert [c.to_dict()["token_ids"] for c in got] == [e["ids"] for e in expected]
        assert [c.text for c in got] == [e["text"] for e in expected]
    as_ids = complete(
        prompt=[tokenizer.encode(p) for p in prompts], **options, extra_body={"top_k": 0}
    )
    assert [c.text for c in as_ids.choices] == [c.text for c in result.choices]
    one = complete(prompt=tokenizer.encode(prompts[1]), **options, extra_body={"top_k": 0})
    assert [c.text for c in one.choices] == [c.text for c in result.choices[3:]]


def test_logprobs_of_generated_tokens_equal_gpt2_generates_with_top_alternatives(
    complete: Any, tiny_model_dir: Path, tokenizer: Tokenizer
):
    [expected] = generate_json(tiny_model_dir, PROMPT, "--temperature", "0", "-t", "8")
    result = complete(prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == [token_text(tokenizer, i) for i in expected["ids"]]
    np.testing.assert_allclose(logprobs.token_logprobs, expected["logprobs"], atol=1e-4)
    assert logprobs.top_logprobs is not None
    for token, chosen, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) == 3 and top[token] == chosen == max(top.values())  # greedy: the best


# --- scoring: echo + logprobs + max_tokens 0 ---------------------------------------------------


def test_echo_logprobs_of_the_prompt_equal_gpt2_score_no_bos(
    complete: Any, tiny_model_dir: Path, tokenizer: Tokenizer
):
    text = "Scoring text over HTTP, the way lm-evaluation-harness does: 🤖 ok."
    out = gpt2(
        "score",
        "-m",
        tiny_model_dir,
        "--tokens",
        "--no-bos",
        "--json",
        "--top",
        "5",
        "--text",
        text,
    )
    expected = json.loads(out)["tokens"]
    ids = tokenizer.encode(text)
    for prompt in (text, ids):
        result = complete(prompt=prompt, max_tokens=0, echo=True, logprobs=5, temperature=0)
        [choice] = result.choices
        assert choice.text == text and choice.finish_reason == "length"
        assert result.usage is not None and result.usage.completion_tokens == 0
        lp = choice.logprobs
        assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
        assert lp.tokens == [token_text(tokenizer, i) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        # within BLAS's float noise: the server scores the prompt in its own prefill batch
        assert_same_output(lp.token_logprobs[1:], [t["logprob"] for t in expected])
        for top, want in zip(lp.top_logprobs[1:], expected, strict=True):
            alternatives = {token_text(tokenizer, a["id"]): a["logprob"] for a in want["top"]}
            assert set(alternatives) <= set(top) and len(top) <= 6  # top 5 and the actual token
            for token, logprob in alternatives.items():
                assert_same_output(top[token], logprob)
        assert lp.text_offset is not None
        # each token's offset: the characters complete before it (a token that ends a
        # character split across tokens starts where that character does)
        before = [
            tokenizer.decode_bytes(ids[:i]).decode("utf-8", "ignore") for i in range(len(ids))
        ]
        assert lp.text_offset == [len(b) for b in before]


@pytest.mark.parametrize("extra", [(), ("--stride", "16"), ("--no-bos",)], ids=str)
def test_score_endpoint_returns_what_gpt2_score_prints_for_the_text(
    http: TestClient, tiny_model_dir: Path, extra: tuple[str, ...]
):
    # multi-byte characters, a newline, markup, and longer than the 128-token context
    text = "Scores 🤖 日本語 <script>alert(1)</script>\nover windows. " * 12
    out = gpt2("score", "-m", tiny_model_dir, "--json", "--tokens", "--top", "5", *extra,
               "--text", text)  # fmt: skip
    body: dict[str, Any] = {"text": text}
    if "--stride" in extra:
        body["stride"] = 16
    if "--no-bos" in extra:
        body["bos"] = False
    response = http.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    assert json.loads(out)["n_tokens"] > TINY.n_ctx
    assert_same_output(response.json(), json.loads(out))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": 5}, "text"),
        ({"text": ""}, "text"),
        ({"text": "x", "top": 6}, "top"),
        ({"text": "x", "stride": 0}, "stride"),
        ({"text": "x", "bos": "yes"}, "bos"),
        ({"text": "x", "frobnicate": 1}, "frobnicate"),
        ({"text": "word " * 5000}, "text"),  # past the 32 contexts /v1/score takes
        ({"text": "word " * 2000, "stride": 1}, "stride"),  # a window per token: a day's work
    ],
)
def test_score_endpoint_refuses_bad_fields_naming_them(
    http: TestClient, body: dict[str, Any], param: str
):
    assert_error(http.post("/v1/score", json=body), 400, param)


def test_a_long_score_and_a_stream_run_together(http: TestClient, tokenizer: Tokenizer):
    long = {"prompt": "A stream", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    results: list[httpx.Response] = []
    streaming = threading.Thread(target=lambda: results.append(post(http, long)))
    streaming.start()
    text = "word " * 3000
    scored = http.post("/v1/score", json={"text": text})
    streaming.join(TIMEOUT)
    assert scored.status_code == 200 and results[0].status_code == 200
    assert scored.json()["n_tokens"] == len(tokenizer.encode(text))


def test_echo_with_one_generated_token_is_the_prompt_scored_then_the_token(
    complete: Any, tokenizer: Tokenizer
):
    ids = tokenizer.encode(PROMPT)
    alone = complete(prompt=ids, max_tokens=0, echo=True, logprobs=1)
    both = complete(
        prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )  # what lm-evaluation-harness's local-completions sends for loglikelihood
    first, then = alone.choices[0].logprobs, both.choices[0].logprobs
    assert first is not None and then is not None and then.token_logprobs is not None
    assert_same_output(then.token_logprobs[:-1], first.token_logprobs)
    assert len(then.tokens or []) == len(ids) + 1 and then.token_logprobs[-1] is not None
    greedy = complete(prompt=ids, max_tokens=1, temperature=0)
    assert both.choices[0].text == PROMPT + greedy.choices[0].text


@pytest.mark.parametrize(
    ("ids", "text", "offsets"),
    [
        ([12520, 3225], " \ufffdrol", [0, 2]),  # " \xf0\x9f" never completed, then "rol"
        ([30325, 222, 12876], " \U0001f600 ok", [0, 1, 2]),  # the emoji's last byte alone
        ("", "<|endoftext|>", [0]),  # an empty prompt runs as <|endoftext|>, and echoes it
    ],
)
def test_text_offset_is_where_each_tokens_first_byte_character_starts(
    http: TestClient, ids: list[int] | str, text: str, offsets: list[int]
):
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = post(http, body).json()["choices"][0]
    assert choice["text"] == text
    assert choice["logprobs"]["text_offset"] == offsets


# --- concurrency -------------------------------------------------------------------------------


def test_16_concurrent_streams_each_get_exactly_what_they_get_alone(http: TestClient):
    bodies = [
        {
            "prompt": f"Request {i}: " + "word " * (i % 7) + "and so",
            "max_tokens": 8 + 2 * i,  # different lengths: rows free and fill as others run
            "return_token_ids": True,
        }
        | ({"temperature": 0} if i % 3 == 0 else {"temperature": 0.9, "top_k": 50, "seed": i})
        | ({"n": 2} if i % 4 == 1 else {})
        for i in range(16)
    ]
    alone = [post(http, body).json()["choices"] for body in bodies]

    def streamed(body: dict[str, Any]) -> list[dict[str, Any]]:
        data = stream(http, body)
        assert data[-1] == "[DONE]"
        choices: dict[int, dict[str, Any]] = {}
        for chunk in data[:-1]:
            [c] = chunk["choices"]
            got = choices.setdefault(c["index"], {"text": "", "token_ids": []})
            got["text"] += c["text"]
            got["token_ids"] += c["token_ids"]
            got["finish_reason"] = c["finish_reason"]
        return [choices[i] for i in sorted(choices)]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, bodies))
    for want, got in zip(alone, together, strict=True):
        assert [{k: c[k] for k in ("text", "token_ids", "finish_reason")} for c in want] == got


DECODING_BODIES = [
    {"temperature": 0, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    {"temperature": 0.9, "seed": 3, "presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"temperature": 0, "logit_bias": {"11": 5, "13": -100}, "bad_words": [" the"]},
    {"temperature": 0.8, "seed": 4, "min_p": 0.05, "typical_p": 0.9, "min_tokens": 5},
    {"use_beam_search": True, "best_of": 3, "n": 2, "length_penalty": 0.5},
    {"temperature": 1.0, "seed": 5, "best_of": 3, "n": 2, "top_k": 40},
    {"temperature": 0, "prompt_lookup": 4},
]


def test_requests_with_different_decoding_options_share_the_batch_as_if_alone(
    http: TestClient,
):
    bodies = [
        {"prompt": f"Request {i}: a b a b a b", "max_tokens": 12, "return_token_ids": True} | d
        for i, d in enumerate(DECODING_BODIES)
    ]
    alone = [post(http, body).json()["choices"] for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = [r.json()["choices"] for r in pool.map(lambda b: post(http, b), bodies)]
    keys = ("text", "token_ids", "finish_reason")
    for want, got in zip(alone, together, strict=True):
        assert [{k: c[k] for k in keys} for c in want] == [{k: c[k] for k in keys} for c in got]
    assert [len(c) for c in alone] == [1, 1, 1, 1, 2, 2, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": {"50257": 1}}, "logit_bias"),  # one past the vocabulary
        ({"use_beam_search": True, "best_of": 9}, "best_of"),  # more beams than the batch
    ],
)
def test_an_option_the_model_refuses_is_a_400_naming_it(
    http: TestClient, body: dict[str, Any], param: str
):
    response = post(http, {"prompt": "Hi"} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_killed_client_frees_its_row_for_the_next_request_and_disturbs_no_one(
    slow_model: GPT2Model, slow_model_dir: Path
):
    body = {"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with serving(slow_model, slow_model_dir, max_batch=2) as http:
        alone = post(http, body).json()["choices"][0]["text"]
        first_token, finished = threading.Event(), threading.Event()
        pieces: list[str] = []

        def long_stream() -> None:
            with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
                for chunk in json_events(response):
                    pieces.append(chunk["choices"][0]["text"])
                    first_token.set()
            finished.set()

        runner = threading.Thread(target=long_stream)
        runner.start()
        assert first_token.wait(TIMEOUT)
        gone = {"prompt": "A client that goes away", "max_tokens": 900, "ignore_eos": True}
        killed = ASGIStream(http, gone)
        received = len([killed.next_event() for _ in range(3)])
        killed.disconnect()  # its request is cancelled
        assert received == 3  # it was decoding in the second row when it went away
        # both rows were taken (the long stream and the gone one): this short request runs
        # only once the gone client's row is free, and must end while the long stream still runs
        short = post(http, {"prompt": "short", "max_tokens": 3, "temperature": 0})
        assert short.status_code == 200 and not finished.is_set()
        runner.join(TIMEOUT)
        assert finished.is_set()
        assert "".join(pieces) == alone


def test_a_stream_cancelled_while_sending_frees_its_row_before_any_garbage_collection(
    slow_model: GPT2Model, slow_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    made: list[Any] = []  # the streams' generators, held as a collection not yet run holds them
    stream_of = serve.App._stream

    def recording(self: App, job: Any, completion: Any) -> Any:
        made.append(stream_of(self, job, completion))
        return made[-1]

    monkeypatch.setattr(serve.App, "_stream", recording)
    long = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with serving(slow_model, slow_model_dir, max_batch=1, max_queue=0) as http:
        with http.stream("POST", "/v1/completions", json=long) as response:
            tokens = json_events(response)  # kept: dropping it would close the response
            next(tokens)
            time.sleep(SETTLE_S)  # tokens: the app now waits in `send` for this client to read
        # leaving the block cancelled the response in `send`: the job must go with it
        try:
            after = post_when_room(http, {"prompt": "Hi", "max_tokens": 2}, within=1.0)
            assert after.status_code == 200
        finally:
            made.clear()


KILLED_CLIENT = """
import sys, httpx
body = {"prompt": "A client that goes away", "max_tokens": 900, "temperature": 0,
        "ignore_eos": True, "stream": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=60) as r:
    for line in r.iter_lines():
        print(line, flush=True)
"""


def test_a_killed_streaming_client_frees_its_row_over_a_real_socket(
    slow_model_dir: Path, env: dict[str, str]
):
    """uvicorn tells the app a peer is gone; the stream is cancelled and its row freed."""
    with ServeProcess(slow_model_dir, "--max-batch", "1", "--max-queue", "0", env=env) as server:
        killed = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, server.url], stdout=subprocess.PIPE, text=True
        )
        assert killed.stdout is not None
        received = 0
        for line in killed.stdout:
            received += line.startswith("data: ")
            if received == 3:
                break
        killed.kill()
        killed.wait(TIMEOUT)
        assert received == 3  # it held the only row when it died (900 tokens: seconds more)
        deadline = time.monotonic() + 2
        while (status := post(server.url, {"prompt": "Hi", "max_tokens": 2}).status_code) == 429:
            assert time.monotonic() < deadline, "the killed client's request still holds the row"
            time.sleep(0.05)
        assert status == 200
    assert "Traceback" not in "".join(server.stderr)


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(
    slow_model_dir: Path, env: dict[str, str]
):
    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}  # 5-10 s of decoding
    with ServeProcess(slow_model_dir, "--max-batch", "1", "--max-queue", "0", env=env) as server:
        with pytest.raises(httpx.ReadTimeout):  # gives up after 0.5 s, closing the connection
            httpx.post(server.url + "/v1/completions", json=long, timeout=0.5)
        # no queue: a request gets in only while the row is free (429 while the long one holds it)
        deadline = time.monotonic() + 2  # the long one would hold the row for seconds more
        while (status := post(server.url, {"prompt": "Hi", "max_tokens": 2}).status_code) == 429:
            assert time.monotonic() < deadline, "the abandoned request still holds the row"
            time.sleep(0.05)
        assert status == 200


def test_a_full_queue_is_429_with_retry_after_and_the_server_recovers(
    slow_model: GPT2Model, slow_model_dir: Path
):
    long = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}
    with serving(slow_model, slow_model_dir, max_batch=1, max_queue=1) as http:
        running = ASGIStream(http, long)
        running.next_event()  # it has the only row
        waiting = ASGIStream(http, long)
        assert waiting.status() == 200  # queued behind it
        full = post(http, {"prompt": "one more"})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai_client(http).completions.create(model=str(slow_model_dir), prompt="and more")
        waiting.disconnect()
        running.disconnect()
        # both clients went away: their rows and queue place are free again
        after = post_when_room(http, {"prompt": "after", "max_tokens": 2})
        assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"]


def test_the_queue_counts_sequences_so_one_request_of_many_prompts_cannot_starve_others(
    slow_model: GPT2Model, slow_model_dir: Path, capsys: pytest.CaptureFixture[str]
):
    long = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}
    with serving(slow_model, slow_model_dir, max_batch=1, max_queue=3) as http:
        too_many = post(http, {"prompt": ["a"] * 5, "max_tokens": 1})
        assert "5 sequences" in assert_error(too_many, 400, "prompt")
        # checked before the prompts are tokenized and measured (one here is past the context),
        # so a request of very many prompts is refused at once, building nothing for them
        huge = post(http, {"prompt": [[1]] * 20_000 + [[1] * 5000], "n": 1, "max_tokens": 1})
        assert "20001 sequences" in assert_error(huge, 400, "prompt")
        running = ASGIStream(http, long)
        running.next_event()  # it holds the only row
        many = {"prompt": ["x", "y"], "n": 1, "max_tokens": 900, "ignore_eos": True}
        waiting = ASGIStream(http, many)
        assert waiting.status() == 200  # 2 of the queue's 3 places
        busy = post(http, {"prompt": ["p", "q"], "max_tokens": 1})
        assert busy.status_code == 429  # 2 more would not fit beside 2 waiting
        waiting.disconnect()
        running.disconnect()
    assert "Traceback" not in capsys.readouterr().err


def test_a_client_that_hangs_up_while_sending_its_body_is_not_an_error(server: ServeProcess):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    before = len(server.stderr)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'
        )
    assert post(server.url, {"prompt": "still here", "max_tokens": 1}).status_code == 200
    assert not any("Traceback" in line or "internal" in line for line in server.stderr[before:])


def test_a_stop_signal_cuts_off_a_body_still_arriving_with_a_503(
    tiny_model_dir: Path, env: dict[str, str]
):
    server = ServeProcess(tiny_model_dir, env=env)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"'
        )
        time.sleep(0.5)  # the body read has begun
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert server.stop() == 0
    assert time.monotonic() - started < 5  # not the 10 s grace period
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert json.loads(body)["error"]["code"] == "server_shutdown"
    assert "Traceback" not in "".join(server.stderr)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [  # one of each way a field is checked; tests/test_openai_api.py checks every field
        ({"prompt": 5}, "prompt"),  # its type
        ({"prompt": [50257]}, "prompt"),  # against the vocabulary, once tokenized
        ({"max_tokens": 0}, "max_tokens"),  # by GenerationParams
        ({"temperature": "hot"}, "temperature"),
        ({"n": 9}, "n"),  # against the engine's rows
        ({"stream": True, "stream_options": {"other": True}}, "stream_options"),
        ({"logprobs": 6}, "logprobs"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": 5}, "model"),
    ],
)
def test_each_invalid_field_is_400_naming_it(http: TestClient, fields: dict[str, Any], param: str):
    assert_error(post(http, {"prompt": "Hi"} | fields), 400, param)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"prompt": "Hi",', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not UTF-8"),
        (b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
        (b"[" * 100 + b"]" * 100, "levels deep"),
        (b'["Hi"]', "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(http: TestClient, body: bytes, says: str):
    response = http.post("/v1/completions", content=body, headers=JSON)
    assert says in assert_error(response, 400)


def test_a_lone_surrogate_escape_in_a_prompt_is_400(http: TestClient):
    body = b'{"prompt": "lone \\ud800 surrogate"}'
    response = http.post("/v1/completions", content=body, headers=JSON)
    assert "surrogate" in assert_error(response, 400, "prompt")


def test_nan_and_infinity_are_refused_where_they_stand(http: TestClient):
    for value in (b"NaN", b"Infinity", b"1e400"):
        body = b'{"prompt": "Hi", "temperature": ' + value + b"}"
        response = http.post("/v1/completions", content=body, headers=JSON)
        assert_error(response, 400, "temperature")


def test_a_prompt_beyond_the_context_and_max_tokens_beyond_its_rest_are_400_with_lengths(
    http: TestClient,
):
    message = assert_error(post(http, {"prompt": [1] * 200}), 400, "prompt")
    assert "128" in message and "200" in message
    response = post(http, {"prompt": [1] * 100, "max_tokens": 50})
    message = assert_error(response, 400, "max_tokens")
    assert "128" in message and "150" in message and "100" in message and "50" in message
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert post(http, {"prompt": [1] * 100, "max_tokens": 28}).status_code == 200


def test_unknown_model_path_and_method_and_the_chat_endpoint_are_openai_errors(http: TestClient):
    assert "nope" in assert_error(post(http, {"prompt": "Hi", "model": "nope"}), 404, "model")
    assert_error(http.get("/v2/nothing"), 404)
    response = http.get("/v1/completions")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert "/v1/completions" in assert_error(chat, 404)


def test_an_unknown_path_is_repeated_in_its_404_cut_short(http: TestClient):
    message = assert_error(http.get("/x" * 20_000), 404)  # 40 KB: under httpx's URL limit
    assert message.startswith("GET /x/x") and message.endswith("...: no such path")
    assert len(message) < 300


def test_models_with_no_name_after_the_slash_is_a_404_pointing_to_the_list(http: TestClient):
    message = assert_error(http.get("/v1/models/"), 404)
    assert "names no model" in message and "/v1/models for the list" in message


def test_a_trailing_slash_is_a_404_not_a_redirect(http: TestClient):
    for method, path in (("POST", "/v1/completions/"), ("POST", "/tokenize/"), ("GET", "/health/")):
        response = http.request(method, path, json={}, follow_redirects=False)
        assert_error(response, 404)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_a_body_not_declared_as_json_is_415_so_web_pages_cannot_post_to_it(
    http: TestClient, content_type: str | None
):
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/v1/completions", "/tokenize"):
        response = http.post(path, content=body, headers=headers)
        assert "application/json" in assert_error(response, 415)
    for declared in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = http.post("/v1/completions", content=body, headers={"Content-Type": declared})
        assert response.status_code == 200, response.text


def test_a_request_addressed_to_another_name_is_403_against_dns_rebinding(http: TestClient):
    port = 8000
    for host in (
        f"attacker.example:{port}",
        "attacker.example",
        "10.0.0.1",
        "[2001:db8::1]:80",
        f"localhost:{port}@attacker.example",
    ):
        response = http.get("/health", headers={"Host": host})
        assert "not to this computer" in assert_error(response, 403)
    for host in (
        f"localhost:{port}",
        f"127.0.0.1:{port}",
        "127.0.0.2",
        "app.localhost",
        "[::1]",
        f"[::ffff:127.0.0.1]:{port}",
        "LOCALHOST.",
    ):
        response = http.get("/health", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)


def test_a_malformed_chunked_body_is_uvicorns_400_and_one_warning_not_a_traceback(
    server: ServeProcess,
):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    before = len(server.stderr)
    for request in (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    assert post(server.url, {"prompt": "still here", "max_tokens": 1}).status_code == 200
    time.sleep(0.5)  # uvicorn logs from its own loop
    logged = [line for line in server.stderr[before:] if not ACCESS_LINE.fullmatch(line)]
    assert logged and all(line.startswith("WARNING:  Invalid HTTP request") for line in logged)


# the deadline on a connection's headers (slowloris): tests/test_httpd.py, against httpd.run


def test_the_openai_client_raises_the_matching_exception(client: openai.OpenAI, complete: Any):
    with pytest.raises(openai.BadRequestError) as bad:
        complete(prompt="Hi", max_tokens=-1)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt="Hi")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.APIStatusError) as too_large:
        complete(prompt="x" * (1 << 20))
    assert too_large.value.status_code == 413


def test_a_body_over_1_mb_is_413_even_without_content_length(http: TestClient):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert_error(http.post("/v1/completions", content=big, headers=JSON), 413)

    def chunks() -> Iterator[bytes]:  # sent chunked: no Content-Length to go by
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    response = http.post("/v1/completions", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert_error(response, 413)


def test_with_an_api_key_every_endpoint_but_health_needs_it(
    tiny_model: GPT2Model, tiny_model_dir: Path
):
    with serving(tiny_model, tiny_model_dir, api_key="s3cret") as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", "/v1/models/gpt2"),
                ("POST", "/v1/completions"),
                ("POST", "/tokenize"),
                ("POST", "/detokenize"),
            ):
                response = http.request(method, path, headers=headers, json={})
                assert_error(response, 401)
                assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai_client(http, "wrong").completions.create(model=str(tiny_model_dir), prompt="Hi")
        right = openai_client(http, "s3cret")
        assert right.completions.create(model=str(tiny_model_dir), prompt="Hi", max_tokens=2)


@pytest.mark.parametrize(
    ("how", "key"), [("option", "s3cret"), ("environment", "s3cret"), ("neither", None)]
)
def test_the_api_key_is_the_option_or_the_environment_variable(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str, key: str | None
):
    served: list[str | None] = []

    def run(self: serve.APIServer) -> None:  # instead of serving: the key its routes check
        served.append(self.app.api_key)
        self.engine.close()
        self.socket.close()

    monkeypatch.setattr(serve.APIServer, "run", run)
    args = ["--api-key", "s3cret"] if how == "option" else []
    env = {"GPT2_API_KEY": "s3cret" if how == "environment" else None}
    result = CliRunner().invoke(
        cli, ["serve", "-m", str(tiny_model_dir), "--port", "0", *args], env=env
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Serving {tiny_model_dir} at http://127.0.0.1:")
    assert served == [key]


# --- failures of the model, shutdown -----------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with NaN in position 6's embedding: prompts of 7+ tokens fail at once,
    shorter ones when generation reaches position 6."""
    folder = write_random_gpt2(tmp_path_factory.mktemp("nan-gpt2"), TINY, seed=0)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["wpe.weight"][6] = np.nan
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_model_failure_is_500_or_a_final_error_event_and_never_a_traceback(
    nan_model_dir: Path, capsys: pytest.CaptureFixture[str]
):
    with serving(GPT2Model.from_pretrained(nan_model_dir), nan_model_dir) as http:
        client = openai_client(http, "x")
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=str(nan_model_dir), prompt=PROMPT)
        assert "not finite" in str(failed.value) and "Traceback" not in str(failed.value)
        data = stream(http, {"prompt": "Hi", "max_tokens": 20, "temperature": 0})
        assert data[-1] == "[DONE]" and "not finite" in data[-2]["error"]["message"]
        # "Hi" is position 0; the tokens fed at positions 1-5 give 5 more, feeding 6 fails
        assert [len(d["choices"]) for d in data[:-2]] == [1] * 6
        assert post(http, {"prompt": "Hi", "max_tokens": 4}).status_code == 200
    log = capsys.readouterr().err
    assert "not finite" in log and "Traceback" not in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_open_streams_cleanly_and_exits_0(
    slow_model_dir: Path, env: dict[str, str], signum: int
):
    body = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    server = ServeProcess(slow_model_dir, env=env)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        next(lines)
        server.proc.send_signal(signum)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["code"] == "server_shutdown"
    assert server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=TIMEOUT)
    assert "Traceback" not in "".join(server.stderr)


# --- the extra, the command line, tokenize -----------------------------------------------------


def test_without_the_serve_extra_it_is_one_line_naming_it(tiny_model_dir: Path):
    code = (
        "import sys; sys.modules['uvicorn'] = None; from gpt2cli.cli import main; "
        f"sys.argv = ['gpt2', 'serve', '-m', {str(tiny_model_dir)!r}]; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2 and result.stdout == ""
    # the command that works from this clone, into the Python that runs gpt2 (an index has no
    # gpt2cli to install from here)
    root = Path(__file__).resolve().parents[1]
    assert result.stderr == (
        "gpt2: error: gpt2 serve needs the serve extra: "
        f"{sys.executable} -m pip install -e '{root}[serve]'\n"
    )


def test_no_other_command_imports_the_http_stack(tiny_model_dir: Path):
    code = f"""
import sys
from gpt2cli.cli import cli
for args in (["--help"], ["encode", "hi"], ["score", "-m", {str(tiny_model_dir)!r}, "--text", "hi"],
             ["generate", "-m", {str(tiny_model_dir)!r}, "-t", "2", "hi"], ["serve", "--help"]):
    cli.main(args, standalone_mode=False)
stack = ("starlette", "uvicorn", "gpt2cli.serve")
print(sorted(m for m in sys.modules if m.startswith(stack)), file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == "[]"


def test_a_port_in_use_is_one_line_and_exit_2(tiny_model_dir: Path, env: dict[str, str]):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*GPT2, "serve", "-m", str(tiny_model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env,
        )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"gpt2: error: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("how", "key", "says"),
    [
        ("option", "", "the API key is empty"),
        ("environment", "", "the API key is empty"),
        ("option", "secret ", "the API key has spaces at an end or control"),
        ("environment", "secret\r", "the API key has spaces at an end or control"),
    ],
)
def test_an_api_key_no_client_could_send_is_refused_not_taken_as_no_key(
    tiny_model_dir: Path, how: str, key: str, says: str
):
    args, env = (["--api-key", key], {}) if how == "option" else ([], {"GPT2_API_KEY": key})
    result = CliRunner().invoke(
        cli, ["serve", "-m", str(tiny_model_dir), "--port", "0", *args], env=env
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"gpt2: error: {says}")
    assert result.stderr.count("\n") == 1


def test_tokenize_and_detokenize_round_trip_in_llama_cpp_shapes(
    http: TestClient, tokenizer: Tokenizer
):
    text = "Hello <|endoftext|> 🤖"
    tokens = http.post("/tokenize", json={"content": text}).json()
    assert tokens == {"tokens": tokenizer.encode(text)}
    plain = http.post(
        "/tokenize", json={"content": text, "parse_special": False, "with_pieces": True}
    ).json()["tokens"]
    assert [p["id"] for p in plain] == tokenizer.encode(text, allowed_special=False)
    assert any(isinstance(p["piece"], list) for p in plain)  # the emoji's bytes, split
    back = http.post("/detokenize", json={"tokens": tokens["tokens"]})
    assert back.json() == {"content": text}
    bad = http.post("/detokenize", json={"tokens": [-1]})
    assert_error(bad, 400, "tokens")
    missing = http.post("/tokenize", json={"text": text})
    assert_error(missing, 400, "content")
