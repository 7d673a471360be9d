"""README's commands as written, run from a fresh clone of this repository: the line that sets up
and generates (against a fake hub serving a random-weight `gpt2`, since the real hub is out of
reach), the extras line, and a command of each kind with the `gpt2` that line installed.

The clone is of the committed tree (`git clone` of this checkout): in CI, which runs from a clean
clone, that is what is being tested.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.factory import TINY, write_random_gpt2
from tests.hub_server import FakeHub, Repo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL_S = 900  # seconds for a fresh venv and its packages (from pip's cache when warm)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to clone")


def _shell_blocks(text: str) -> list[str]:
    """The ```sh blocks of a Markdown text, in order."""
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)]


def _clone_command(extra: str) -> str:
    """The extras table's command for installing `extra` from a clone (its first one)."""
    row = next(line for line in README.splitlines() if line.startswith(f"| `{extra}` |"))
    cell = row.split("|")[4]  # | extra | for | adds | from a clone | from a package index |
    return re.findall(r"`([^`]+)`", cell)[0]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of this repository's committed tree."""
    dest = tmp_path_factory.mktemp("fresh") / "gpt2cli"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, timeout=120)
    return dest


def _run(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_commands_work_as_written_from_a_fresh_clone(
    clone: Path, fake_hub: FakeHub, tmp_path: Path
):
    setup, test = _shell_blocks(README)[:2]
    assert setup.startswith("make install && .venv/bin/gpt2 generate ")
    assert test == "make test"  # what .ci/run runs
    model = write_random_gpt2(tmp_path / "gpt2", TINY, seed=3)
    fake_hub.add("openai-community/gpt2", Repo.from_folder(model))

    # the first command: a venv, gpt2cli in it, the model downloaded, text generated
    first = _run(setup, clone, timeout=INSTALL_S)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() and "Traceback" not in first.stderr
    gpt2 = clone / ".venv" / "bin" / "gpt2"
    venv_packages = next((clone / ".venv" / "lib").glob("python*/site-packages"))
    assert not (venv_packages / "torch").exists()  # make install never brings torch

    # a command of each kind, with that gpt2
    assert _run(f"{gpt2} encode 'Hello world'", clone).stdout == "15496 995\n"
    assert _run(f"{gpt2} decode 15496 995", clone).stdout == "Hello world"
    scored = _run(f"{gpt2} score --json --text 'Hello world'", clone)
    assert scored.returncode == 0 and '"n_tokens": 2' in scored.stdout, scored.stderr
    rows = _run(f"printf '%s\\n' '{{\"prompt\": \"a\"}}' | {gpt2} generate --jsonl - -t 3", clone)
    assert rows.returncode == 0 and rows.stdout.count("\n") == 1, rows.stderr
    missing = _run(f"{gpt2} serve", clone)
    assert missing.returncode == 2 and "needs the serve extra" in missing.stderr

    # the extras line as the README gives it for a clone, then the server it brings
    extra = _run(_clone_command("serve"), clone, timeout=INSTALL_S)
    assert extra.returncode == 0, extra.stderr[-2000:]
    server = subprocess.Popen(
        [str(gpt2), "serve", "--port", "0", "--quiet"],
        cwd=clone,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving gpt2 at http://127.0.0.1:PORT"
        assert line.startswith("Serving gpt2 at http://127.0.0.1:"), line
        url = line.split()[-1]
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
