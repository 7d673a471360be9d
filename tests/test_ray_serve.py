"""`gpt2 serve --engine ray` on a local two-node Ray cluster (1 CPU each) with 2 replicas, one per
node: the local server's answers (greedy and seeded, streamed and not), 16 concurrent clients
over both replicas, a disconnected client cancelled on its replica, a replica killed under load
(its streams end with an error event, the others finish, Ray Serve brings it back), and Ctrl-C
on a server that started its own Ray instance leaving no Ray process behind. Every server is a
subprocess on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.serve_process import ServeProcess, serve_env

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
from ray import serve  # noqa: E402 - after the skip when ray is missing

from tests.ray_cluster import two_nodes  # noqa: E402

WAIT_S = 90.0  # the longest any condition is waited for (a busy two-core machine)
LONG: dict[str, Any] = {
    "prompt": [f"Long {i}" for i in range(4)],
    "n": 8,
    "max_tokens": 120,
    "stream": True,
}


def until(condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    """Poll `condition` until it returns something true, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_the_local_ray_instance_it_started(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without an address: a local instance, the URL once the replica is ready, and on Ctrl-C
    exit 0 with no Ray process of its own left; no Ray log line on the terminal."""
    env = serve_env(tmp_path)
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    server = ServeProcess(tiny_model_dir, "--engine", "ray", env=env)
    ready_s = time.monotonic() - started
    try:
        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
            timeout=WAIT_S,
        )
        assert answer.status_code == 200, answer.text
        ours = descendants(server.proc.pid)
        assert ours  # the local instance's processes run under it
    finally:
        status = server.stop(signal.SIGINT)
    assert status == 0, "".join(server.stderr)
    until(lambda: not any(alive(p) for p in ours), "the Ray processes it started to end", 30)
    text = "".join(server.stderr)
    assert "ERROR" not in text and "INFO" not in text and "core_worker" not in text, text
    print(f"local Ray instance ready in {ready_s:.1f} s")


def test_ray_options_need_engine_ray(tiny_model_dir: Path) -> None:
    command = [sys.executable, "-m", "gpt2cli", "serve", "-m", str(tiny_model_dir)]
    for extra in (["--replicas", "2"], ["--engine", "ray", "--autoscale", "3:1"]):
        done = subprocess.run(command + extra, capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and lines, done.stderr
        assert "--engine ray" in done.stderr or "MIN" in done.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a worker node of 1 CPU each, this process connected; yields its address."""
    with two_nodes() as address:
        logging.getLogger("ray.serve").setLevel(logging.ERROR)  # this process's handles' INFO
        yield address


@pytest.fixture(scope="module")
def servers(
    cluster: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """`gpt2 serve --engine ray --replicas 2` on the cluster, and the local server."""
    env = serve_env(tmp_path_factory.mktemp("ray-serve"))
    args = ["--engine", "ray", "--ray-address", cluster, "--replicas", "2", "-q"]
    with (
        ServeProcess(tiny_model_dir, *args, env=env) as remote,
        ServeProcess(tiny_model_dir, "-q", env=env) as local,
    ):
        yield remote, local
    assert remote.proc.returncode == 0, "".join(remote.stderr)


def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def model_name(server: ServeProcess) -> str:
    return client(server).models.list().data[0].id


def replica_stats(server: ServeProcess) -> dict[int, dict[str, int]]:
    """Each replica's stats by pid, asked through a handle until both answered (bounded)."""
    handle = serve.get_deployment_handle("gpt2", app_name=f"gpt2cli-{server.proc.pid}")
    found: dict[int, dict[str, int]] = {}
    for _ in range(60):
        stats = handle.stats.remote().result(timeout_s=WAIT_S)
        found[stats["pid"]] = stats
        if len(found) == 2:
            break
    return found


def stream(url: str, body: dict[str, Any], first: Any = None) -> tuple[int, list[Any]]:
    """POST a streamed completion; its status and events (JSON, or "[DONE]"); `first` is
    called once the first event is in."""
    events: list[Any] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=WAIT_S) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == 1 and first is not None:
                    first()
        return r.status_code, events


def test_answers_equal_the_local_servers(servers: tuple[ServeProcess, ServeProcess]) -> None:
    remote, local = servers
    name = model_name(remote)
    asks: list[dict[str, Any]] = [
        {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0},
        {"prompt": ["Seeded", "twice"], "max_tokens": 10, "n": 3, "seed": 7, "logprobs": 2},
        {"prompt": "Echo me", "max_tokens": 4, "echo": True, "logprobs": 1, "seed": 1},
    ]
    for ask in asks:
        for _ in range(3):  # more than once: whichever replica serves it
            got = client(remote).completions.create(model=name, **ask)
            want = client(local).completions.create(model=name, **ask)
            assert [c.model_dump() for c in got.choices] == [c.model_dump() for c in want.choices]
            assert got.usage == want.usage
        text: dict[int, str] = {}
        for chunk in client(remote).completions.create(model=name, stream=True, **ask):
            for c in chunk.choices:
                text[c.index] = text.get(c.index, "") + c.text
        assert [text[i] for i in sorted(text)] == [c.text for c in want.choices]


def test_16_clients_are_spread_over_both_replicas(
    servers: tuple[ServeProcess, ServeProcess],
) -> None:
    remote, _ = servers
    name = model_name(remote)
    before = replica_stats(remote)
    assert len(before) == 2

    def ask(i: int) -> str:
        got = client(remote).completions.create(
            model=name, prompt=f"Client {i}", max_tokens=24, seed=i
        )
        return got.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, range(16), timeout=WAIT_S))
    assert len(texts) == 16
    after = replica_stats(remote)
    served = {pid: after[pid]["jobs"] - before[pid]["jobs"] for pid in before if pid in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served


def test_a_client_that_disconnects_is_cancelled_on_its_replica(
    servers: tuple[ServeProcess, ServeProcess],
) -> None:
    remote, _ = servers
    before = sum(s["cancelled"] for s in replica_stats(remote).values())
    with httpx.stream("POST", f"{remote.url}/v1/completions", json=LONG, timeout=WAIT_S) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # it has started; then the client goes away
    until(
        lambda: sum(s["cancelled"] for s in replica_stats(remote).values()) == before + 1,
        "the stream to be cancelled on its replica",
    )
    until(lambda: all(s["active"] == 0 for s in replica_stats(remote).values()), "no open job")


def test_a_killed_replica_fails_its_requests_and_comes_back(
    servers: tuple[ServeProcess, ServeProcess],
) -> None:
    remote, _ = servers
    pids = sorted(replica_stats(remote))
    assert len(pids) == 2
    victim = pids[0]
    clients = 4  # 32 sequences each: 128 in all, within the 2 x 72 the server takes
    started = 0

    def on_first() -> None:
        nonlocal started
        started += 1

    def one(i: int) -> tuple[int, list[Any]]:
        return stream(remote.url, {**LONG, "seed": i}, on_first)

    def whole() -> httpx.Response:  # 16 sequences: 144 in flight, all the server takes
        body = {**LONG, "prompt": LONG["prompt"][:2], "stream": False}
        return httpx.post(f"{remote.url}/v1/completions", json=body, timeout=WAIT_S)

    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        until(lambda: started, "a stream to start")
        until(
            lambda: sum(s["active"] for s in replica_stats(remote).values()) == clients,
            "every stream to be on a replica",
        )
        full = httpx.post(f"{remote.url}/v1/completions", json=LONG, timeout=WAIT_S)
        not_streamed = pool.submit(whole)
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=WAIT_S) for f in futures]
        answer = not_streamed.result(timeout=WAIT_S)
    # beyond every replica's room (128 + 32 > 2 x 72): 429 with Retry-After, as locally
    assert full.status_code == 429 and full.headers["retry-after"] == "1", full.text
    assert full.json()["error"]["code"] == "queue_full"
    # a non-streamed request: whole (on the other replica, or sent again before it began) or a
    # 500 with OpenAI's error body naming the replica's death
    if answer.status_code != 200:
        assert answer.status_code == 500 and "replica" in answer.json()["error"]["message"]
    failed = [events for status, events in results if any("error" in e for e in events[:-1])]
    ok = [events for status, events in results if not any("error" in e for e in events[:-1])]
    assert all(status == 200 and events[-1] == "[DONE]" for status, events in results)
    assert failed and ok, (len(failed), len(ok))
    for events in failed:
        error = next(e for e in events if isinstance(e, dict) and "error" in e)["error"]
        assert "replica" in error["message"], error
    for events in ok:  # the other replica's streams ran to the end: every choice finished
        finished = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert len(finished) == len(LONG["prompt"]) * LONG["n"]

    def healthy() -> bool:
        try:
            now = replica_stats(remote)
        except Exception:  # a call routed to the dead replica before Serve noticed
            return False
        return len(now) == 2 and victim not in now

    until(healthy, "two healthy replicas again, the killed one replaced")
    got = client(remote).completions.create(model=model_name(remote), prompt="Back", max_tokens=3)
    assert got.choices[0].finish_reason == "length"
