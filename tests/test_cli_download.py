"""`gpt2 download`: against a fake hub on 127.0.0.1, run as users run it (a subprocess).

huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so every
test that reaches the hub runs `python -m gpt2cli` in a subprocess with the test's environment.
Local folders need no hub and go through CliRunner.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpt2cli.cli import cli
from gpt2cli.config import GPT2Config
from tests.factory import TINY, write_random_gpt2, write_sharded_gpt2
from tests.hub_server import FakeHub, Repo
from tests.terminal import run_on_terminal
from tests.test_weights import BROKEN, broken

# 13 MB of weights: more than huggingface_hub's 10 MiB download chunk, so a cut can be resumed
WIDE = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=1)
OTHER_FORMATS = {  # what a hub repo holds besides what we use; none of it may be fetched
    "pytorch_model.bin": b"pickle" * 100,
    "tf_model.h5": b"h5" * 100,
    "flax_model.msgpack": b"msgpack" * 100,
    "rust_model.ot": b"ot" * 100,
    "onnx/decoder_model.onnx": b"onnx" * 100,
    "tokenizer.json": b"{}",
    "README.md": b"# tiny",
}


def gpt2(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `gpt2 ARGS` in a fresh interpreter with the test's environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "gpt2cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | env,
    )


def assert_fails(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 2, nothing on stdout, one `gpt2: error:` line holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("gpt2: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The tiny model as a hub repo, with the other formats a real GPT-2 repo carries."""
    folder = write_random_gpt2(tmp_path_factory.mktemp("repo"), TINY, seed=1)
    repo = Repo.from_folder(folder)
    repo.files |= OTHER_FORMATS
    repo.branches = ("main", "v1")
    return repo


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return Repo.from_folder(write_random_gpt2(tmp_path_factory.mktemp("wide"), WIDE, seed=2))


def downloaded(result: subprocess.CompletedProcess[str]) -> Path:
    """The folder a successful download printed, checked to be the only thing on stdout."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and Path(lines[0]).is_dir()
    return Path(lines[0])


def test_download_fetches_only_config_weights_and_tokenizer(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    result = gpt2("download", "someone/tiny")
    assert result.stderr == ""  # no progress bar: stderr is not a terminal
    folder = downloaded(result)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "vocab.json",
    ]
    assert folder.parts[-2:] == ("snapshots", tiny_repo.sha)
    assert Path(os.environ["HF_HUB_CACHE"]) in folder.parents
    for name in OTHER_FORMATS:
        assert not fake_hub.downloads(name.split("/")[-1]), name
    for name in ("config.json", "model.safetensors", "vocab.json"):
        assert (folder / name).read_bytes() == tiny_repo.files[name]


def test_progress_bar_on_a_terminal_unless_quiet(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    fake_hub.add("someone/other", Repo(dict(tiny_repo.files)))
    status, stderr, stdout = run_on_terminal(["download", "someone/tiny"], stream="stderr")
    assert status == 0 and stdout.strip().endswith(tiny_repo.sha)
    assert "model.safetensors" in stderr and "100%" in stderr
    status, stderr, stdout = run_on_terminal(
        ["download", "--quiet", "someone/other"], stream="stderr"
    )
    assert status == 0 and stdout.strip().endswith(tiny_repo.sha)
    assert stderr == ""


def test_cached_model_is_used_without_any_request(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    first = downloaded(gpt2("download", "someone/tiny"))
    fake_hub.requests.clear()
    assert downloaded(gpt2("download", "someone/tiny")) == first
    assert fake_hub.requests == []
    fake_hub.stop()  # no hub at all: still there, online or offline
    assert downloaded(gpt2("download", "someone/tiny")) == first
    assert downloaded(gpt2("download", "someone/tiny", HF_HUB_OFFLINE="1")) == first


def test_revision_branch_and_commit_are_cached_by_name(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    by_branch = downloaded(gpt2("download", "someone/tiny", "--revision", "v1"))
    by_commit = downloaded(gpt2("download", "someone/tiny", "--revision", tiny_repo.sha))
    assert by_branch == by_commit
    offline = gpt2("download", "someone/tiny", "--revision", "v1", HF_HUB_OFFLINE="1")
    assert downloaded(offline) == by_branch
    # main was never asked for, so it is not in the cache
    assert_fails(gpt2("download", "someone/tiny", HF_HUB_OFFLINE="1"), "HF_HUB_OFFLINE")


def test_known_name_maps_to_its_hub_repo_and_is_listed_as_cached(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    listing = gpt2("download")
    assert listing.returncode == 0 and listing.stderr == ""
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ALIAS", "PARAMS", "FLOAT32", "HUB", "REPO", "CACHED"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"]
    assert all(line.endswith("not cached") for line in lines[1:])

    fake_hub.add("openai-community/gpt2", tiny_repo)
    folder = downloaded(gpt2("download", "124M"))
    assert "models--openai-community--gpt2" in str(folder)
    lines = gpt2("download").stdout.splitlines()
    assert lines[1].split()[0] == "gpt2" and lines[1].endswith(str(folder))
    assert all(line.endswith("not cached") for line in lines[2:])


def test_sharded_repo_fetches_the_index_and_every_shard(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = write_sharded_gpt2(tmp_path / "sharded", TINY, shards=3)
    fake_hub.add("someone/sharded", Repo.from_folder(source))
    folder = downloaded(gpt2("download", "someone/sharded"))
    assert sorted(p.name for p in folder.glob("*.safetensors*")) == sorted(
        p.name for p in source.glob("*.safetensors*")
    )


def test_connection_cut_mid_file_is_resumed_with_a_range_request(
    fake_hub: FakeHub, wide_repo: Repo
) -> None:
    fake_hub.add("someone/wide", wide_repo)
    size = len(wide_repo.files["model.safetensors"])
    fake_hub.cut_once["model.safetensors"] = size - 1_000_000
    folder = downloaded(gpt2("download", "someone/wide"))
    assert (folder / "model.safetensors").read_bytes() == wide_repo.files["model.safetensors"]
    ranges = [h.get("range") for h in fake_hub.downloads("model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size - 1_000_000  # the bytes already received are not fetched again


def test_ctrl_c_stops_a_download_at_once_and_the_next_run_completes_it(
    fake_hub: FakeHub, wide_repo: Repo
) -> None:
    fake_hub.add("someone/wide", wide_repo)
    fake_hub.slow = 0.05  # 64 kB every 50 ms: the weights take ~10 s
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2cli", "download", "someone/wide"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not fake_hub.downloads("model.safetensors") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=5)  # no waiting for the download to finish
    assert process.returncode == 130
    assert stdout == "" and "Traceback" not in stderr
    fetched = len(fake_hub.downloads("config.json"))
    fake_hub.slow = 0
    folder = downloaded(gpt2("download", "someone/wide"))
    assert (folder / "model.safetensors").read_bytes() == wide_repo.files["model.safetensors"]
    assert len(fake_hub.downloads("config.json")) == fetched  # finished files are kept


def test_unreachable_hub_is_one_line_with_the_ways_out() -> None:
    # HF_ENDPOINT is a port where nothing listens (conftest): refused at once, no retry loop
    assert_fails(
        gpt2("download", "someone/tiny", timeout=30),
        "cannot reach the hub at http://127.0.0.1:9",
        "HF_ENDPOINT",
        "local model folder",
        "HF_HUB_OFFLINE=1",
    )


def test_a_malformed_hub_address_is_one_line_and_nothing_on_stdout() -> None:
    # huggingface_hub's lazy importer prints its failure on stdout unless kept from it
    result = gpt2("download", "someone/x", HF_ENDPOINT="http://[::1")
    assert_fails(result, "huggingface_hub cannot start (Invalid IPv6 URL)")


def test_a_name_too_long_for_a_file_is_an_unknown_model_not_a_system_failure() -> None:
    assert_fails(gpt2("download", "a" * 300), "unknown model 'aaaa")


def test_offline_without_the_model_in_the_cache_says_so() -> None:
    assert_fails(
        gpt2("download", "gpt2", HF_HUB_OFFLINE="1"),
        "openai-community/gpt2 is not in the cache",
        "HF_HUB_OFFLINE",
    )


def test_hub_errors_each_get_their_own_line(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    fake_hub.add("someone/gated", Repo(dict(tiny_repo.files), gated=True))
    assert_fails(gpt2("download", "someone/nope"), "someone/nope: no such model on", "HF_TOKEN")
    assert_fails(
        gpt2("download", "someone/tiny", "--revision", "v9"), "someone/tiny has no revision 'v9'"
    )
    assert_fails(gpt2("download", "someone/gated"), "someone/gated is gated", "HF_TOKEN")


def test_endpoint_that_is_not_a_hub_is_named(tmp_path: Path) -> None:
    (tmp_path / "api" / "models" / "some").mkdir(parents=True)
    (tmp_path / "api" / "models" / "some" / "page").write_text("<html>a web site</html>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        assert_fails(
            gpt2("download", "some/page", HF_ENDPOINT=endpoint),
            f"{endpoint} did not answer like a Hugging Face hub",
        )
        assert_fails(
            gpt2("download", "some/other", HF_ENDPOINT=endpoint),
            f"{endpoint} has no some/other (HTTP 404)",
        )
    finally:
        server.shutdown()
        server.server_close()


def test_pickle_only_repo_is_refused_before_downloading_anything(fake_hub: FakeHub) -> None:
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle" * 1000, "vocab.json": b"{}"}
    fake_hub.add("someone/old", Repo(files))
    assert_fails(gpt2("download", "someone/old"), "someone/old", "never unpickles")
    assert [p for _, p, _ in fake_hub.requests if "/resolve/" in p or "/cdn/" in p] == []


def test_repo_without_config_is_refused(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    files = {k: v for k, v in tiny_repo.files.items() if k != "config.json"}
    fake_hub.add("someone/noconfig", Repo(files))
    assert_fails(gpt2("download", "someone/noconfig"), "has no config.json")


def test_broken_weights_from_the_hub_are_reported_and_not_fetched_again_each_run(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    files = dict(tiny_repo.files)
    files["model.safetensors"] = files["model.safetensors"][:-100]
    fake_hub.add("someone/truncated", Repo(files))
    for _ in range(2):  # the cached copy is what the hub serves: fetching it again cannot help
        assert_fails(gpt2("download", "someone/truncated"), "model.safetensors: truncated")
    assert len(fake_hub.downloads("model.safetensors")) == 1


def cut(path: Path, size: int) -> None:
    """Cut the cached blob behind `path` to its first `size` bytes, as a crash mid-write would."""
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes()[:size])


def test_download_fetches_again_the_cached_files_that_fail_their_check(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    folder = downloaded(gpt2("download", "someone/tiny"))
    cut(folder / "model.safetensors", 1000)
    assert_fails(
        gpt2("download", "someone/tiny", HF_HUB_OFFLINE="1"),
        "model.safetensors: damaged in the hub cache",
        "unset HF_HUB_OFFLINE and run `gpt2 download someone/tiny` to fetch it again",
    )
    fake_hub.requests.clear()
    result = gpt2("download", "-q", "someone/tiny")
    assert downloaded(result) == folder and result.stderr == ""
    assert (folder / "model.safetensors").read_bytes() == tiny_repo.files["model.safetensors"]
    assert len(fake_hub.downloads("model.safetensors")) == 1
    assert not fake_hub.downloads("config.json")  # the intact files are kept


def test_download_hashes_the_weights_so_a_flipped_byte_is_fetched_again(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    folder = downloaded(gpt2("download", "someone/tiny"))
    blob = (folder / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1  # same size, still loads: only its checksum tells
    blob.write_bytes(bytes(data))
    result = gpt2("download", "-q", "someone/tiny")
    assert downloaded(result) == folder and result.stderr == ""
    assert (folder / "model.safetensors").read_bytes() == tiny_repo.files["model.safetensors"]


def test_other_commands_name_the_command_that_fetches_a_damaged_file_again(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    folder = downloaded(gpt2("download", "someone/tiny"))
    fake_hub.stop()  # the pre-filled cache only, offline
    advice = "damaged in the hub cache", "run `gpt2 download someone/tiny` to fetch it again"
    cut(folder / "model.safetensors", 1000)
    generate = gpt2("generate", "-m", "someone/tiny", "-t", "2", "Hi", HF_HUB_OFFLINE="1")
    assert_fails(generate, str(folder / "model.safetensors"), *advice)
    encode = gpt2("encode", "-m", "someone/tiny", "Hi", HF_HUB_OFFLINE="1")
    assert encode.returncode == 0, encode.stderr  # tokenizing needs no weights
    (folder / "vocab.json").resolve().write_text('{"!": 0}')  # still JSON, but not the hub's
    encode = gpt2("encode", "-m", "someone/tiny", "Hi", HF_HUB_OFFLINE="1")
    assert_fails(encode, str(folder / "vocab.json"), *advice)


def test_retries_after_hub_errors_are_shown_only_beside_the_progress_bar(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    for name in ("someone/piped", "someone/quiet", "someone/shown"):
        fake_hub.add(name, Repo(dict(tiny_repo.files)))
    fake_hub.fail["config.json"] = 2  # HTTP 503 twice: retried at once, then after 1 s
    piped = gpt2("download", "someone/piped")
    assert downloaded(piped) and piped.stderr == ""
    fake_hub.fail["config.json"] = 2
    status, stderr, _ = run_on_terminal(["download", "-q", "someone/quiet"], stream="stderr")
    assert (status, stderr) == (0, "")
    fake_hub.fail["config.json"] = 2
    status, stderr, _ = run_on_terminal(["download", "someone/shown"], stream="stderr")
    assert status == 0 and "HTTP Error 503" in stderr and "100%" in stderr


def test_huggingface_hub_warnings_do_not_reach_stderr(fake_hub: FakeHub, tiny_repo: Repo) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    result = gpt2("download", "someone/tiny", HF_HUB_ENABLE_HF_TRANSFER="1")  # deprecated
    assert downloaded(result) and result.stderr == ""


@pytest.mark.parametrize(
    "info",
    [
        {"siblings": 5},
        {"sha": 1, "siblings": [{"rfilename": "config.json"}]},
        {"sha": "0" * 40},
        {"sha": "0" * 40, "siblings": [{"name": "config.json"}]},
        {"sha": "0" * 40, "siblings": [{"rfilename": 7}]},
        {"sha": "0" * 40, "siblings": "config.json"},
        ["config.json"],
        "a string",
    ],
    ids=repr,
)
def test_hub_answering_json_of_another_shape_is_one_line(
    fake_hub: FakeHub, tiny_repo: Repo, info: object
) -> None:
    fake_hub.add("someone/odd", Repo(dict(tiny_repo.files), info=info))
    assert_fails(
        gpt2("download", "someone/odd"), f"{fake_hub.url} did not answer like a Hugging Face hub"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HF_HUB_ETAG_TIMEOUT", "abc"),
        ("HF_HUB_ETAG_TIMEOUT", "-1"),
        ("HF_HUB_ETAG_TIMEOUT", "nan"),
        ("HF_HUB_DOWNLOAD_TIMEOUT", "1.5"),
        ("HF_HUB_DOWNLOAD_TIMEOUT", "-5"),
        ("GPT2CLI_DOWNLOAD_TIMEOUT", "soon"),
        ("GPT2CLI_DOWNLOAD_TIMEOUT", "-1"),
        ("GPT2CLI_DOWNLOAD_TIMEOUT", "inf"),
    ],
)
def test_invalid_timeout_variable_is_one_line_naming_it(
    fake_hub: FakeHub, tiny_repo: Repo, variable: str, value: str
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    assert_fails(gpt2("download", "someone/tiny", **{variable: value}), f"{variable}={value!r}")


def test_trickling_hub_is_given_up_at_the_deadline_and_the_next_run_completes(
    fake_hub: FakeHub, tiny_repo: Repo
) -> None:
    fake_hub.add("someone/tiny", tiny_repo)
    fake_hub.trickle = 0.2  # one byte of weights every 0.2 s: each read is well within its timeout
    start = time.monotonic()
    result = gpt2("download", "someone/tiny", timeout=30, GPT2CLI_DOWNLOAD_TIMEOUT="2")
    assert time.monotonic() - start < 15
    assert_fails(result, "took longer than 2 s (GPT2CLI_DOWNLOAD_TIMEOUT)", "run the command again")
    fake_hub.trickle = 0
    folder = downloaded(gpt2("download", "someone/tiny", GPT2CLI_DOWNLOAD_TIMEOUT="0"))
    assert (folder / "model.safetensors").read_bytes() == tiny_repo.files["model.safetensors"]


def test_empty_model_name_is_refused() -> None:
    assert_fails(gpt2("download", ""), "a model name or folder must not be empty")


def test_local_folder_is_checked_and_printed(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["download", str(tiny_model_dir)])
    assert result.exit_code == 0
    assert result.stdout == f"{tiny_model_dir}\n"


@pytest.mark.parametrize(("damage", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_local_folder_exits_2_with_one_line(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    folder = broken(tmp_path, damage)
    result = CliRunner().invoke(cli, ["download", str(folder)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("gpt2: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--revision", "v1"], "--revision needs a MODEL"),
        (["nonsense"], "unknown model 'nonsense'"),
        (["./no/such/folder"], "./no/such/folder: no such folder"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["download", *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_revision_of_a_local_folder_is_refused(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["download", str(tiny_model_dir), "--revision", "v1"])
    assert result.exit_code == 2
    assert "--revision applies to hub models" in result.stderr


def test_a_cache_that_cannot_be_written_names_the_cache_not_a_retry(
    fake_hub: FakeHub, tiny_repo: Repo, tmp_path: Path
):
    """HF_HOME set to a file: running the command again cannot help, so it is not advised."""
    fake_hub.add("someone/tiny", tiny_repo)
    (tmp_path / "a-file").write_text("not a folder")
    home = str(tmp_path / "a-file")
    result = gpt2("download", "someone/tiny", HF_HOME=home, HF_HUB_CACHE=f"{home}/hub")
    assert_fails(result, "cannot write the model into the cache", "is a writable folder")
    assert "run the command again" not in result.stderr
