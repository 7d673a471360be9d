"""The web page of `gpt2 serve` and `gpt2 score --html`'s file, in a real Chromium.

In-process (no browser): the routes, their headers and the Host check through Starlette's
TestClient, the Playground's options against the API's, the rank buckets against the terminal's,
and the file `--html` writes. In Debian's Chromium, driven by Playwright's Python API pointed at
the system browser (Playwright's own browser download does not work here): a real `gpt2 serve`
process on 127.0.0.1, the page used as a person would, its answers compared with the API's and
`gpt2 score --json --tokens --top 5`'s. The browser tests skip, saying why, when there is no
Chromium or no Playwright; in CI (CI set) they fail instead: `.ci/run` installs Chromium.

`GPT2_SCREENSHOTS=docs/img pytest tests/test_web.py -k screenshot` writes the manual's
screenshots (docs/web.md); without it they go to a temporary folder.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from starlette.testclient import TestClient

from gpt2cli import openai_api, output, webpage
from gpt2cli.cli import cli
from gpt2cli.config import GPT2Config
from gpt2cli.engine import Engine
from gpt2cli.model import GPT2
from gpt2cli.serve import App
from tests.compare import assert_same_output
from tests.factory import TINY, write_random_gpt2
from tests.serve_process import ServeProcess, serve_env

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("GPT2_CHROMIUM", "/usr/bin/chromium"))
# headless, as root, and nothing of Chromium's own reaching out (this machine's network is closed)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000  # the longest any one browser step may take
TIMEOUT = 60.0  # seconds for an HTTP call
KEY = "sk-test-web"
LOCAL = "http://localhost"
PROMPT = "The quick brown fox jumps over the lazy dog because"
# multi-byte characters (tokens holding part of one), a newline, markup that must stay text,
# and enough words that the text is longer than the served model's context (1024 tokens)
HOSTILE = (
    "Ünïcödé: 日本語 and emoji 😀👍🏽.\n"
    "<script>alert(1)</script> <img src=x onerror=\"document.title='pwned'\"> &amp; done.\n"
)
LONG_TEXT = HOSTILE + "The quick brown fox jumps over the lazy dog, again. " * 110 + HOSTILE


# ---------------------------------------------------------------------------------------------
# in-process: routes, headers, options, buckets, the --html file


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(tiny_model_dir)


def app_client(model: GPT2, *, api_key: str | None = None, web: bool = True) -> TestClient:
    """The server's routes in this process (the page's need no engine worker)."""
    app = App(Engine(model, 1, 1), ["tiny"], "tiny", api_key, web=web)
    return TestClient(app.starlette(), base_url=LOCAL)


def test_the_page_and_its_files_come_with_a_csp_and_no_inline_script_or_style(
    tiny_model: GPT2,
):
    http = app_client(tiny_model)
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == webpage.PAGE_CSP
    assert "default-src 'self'" in webpage.PAGE_CSP and "unsafe" not in webpage.PAGE_CSP
    body = page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", body), "an inline script"
    assert "<style" not in body and not re.search(r"\s(style|on\w+)=", body)
    linked = re.findall(r'(?:src|href)="(/[^"]*)"', body)
    assert sorted(linked) == sorted(
        f"/web/{name}" for name in webpage.FILES if name != "options.json"
    )
    for name, media in webpage.FILES.items():
        got = http.get(f"/web/{name}")
        assert got.status_code == 200, name
        assert got.headers["content-type"] == media
        assert got.headers["content-security-policy"] == webpage.PAGE_CSP
        assert got.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/web/nothing.js", "/web/..%2fserve.py", "/web/", "/index.html"])
def test_only_the_pages_own_files_are_served(tiny_model: GPT2, path: str):
    got = app_client(tiny_model).get(path)
    assert got.status_code == 404
    assert got.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize("path", ["/", "/web/app.js"])
def test_the_page_passes_the_same_host_check_as_the_api(tiny_model: GPT2, path: str):
    got = app_client(tiny_model).get(path, headers={"Host": "attacker.example"})
    assert got.status_code == 403
    assert got.json()["error"]["code"] == "forbidden_host"


def test_with_an_api_key_the_page_loads_without_it_and_the_api_asks_for_it(tiny_model: GPT2):
    http = app_client(tiny_model, api_key=KEY)
    assert http.get("/").status_code == 200
    assert http.get("/web/app.js").status_code == 200
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_web_makes_the_page_a_404_json_error(tiny_model: GPT2):
    http = app_client(tiny_model, web=False)
    for path in ("/", "/web/app.js"):
        got = http.get(path)
        assert got.status_code == 404
        assert got.json()["error"] == {
            "message": f"GET {path}: no such path",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    assert http.get("/health").json() == {"status": "ok"}


def test_the_page_takes_its_rank_buckets_from_gpt2_scores_terminal_colours(tiny_model: GPT2):
    attribute = re.search(r'data-gltr="([^"]*)"', app_client(tiny_model).get("/").text)
    assert attribute is not None
    settings = json.loads(html.unescape(attribute.group(1)))
    assert settings == webpage.gltr_settings()
    limits, colours = settings["limits"], settings["classic"]
    assert limits == [10, 100, 1000]
    for i, limit in enumerate(limits):  # each bucket ends where gltr_style changes colour
        assert output.gltr_style(limit).endswith(colours[i])
        assert output.gltr_style(limit + 1).endswith(colours[i + 1])


class _Recorder(dict):  # type: ignore[type-arg]
    """A request body that records which fields the API reads."""

    def __init__(self, seen: set[str], **fields: Any) -> None:
        super().__init__(fields)
        self.seen = seen

    def get(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return super().get(name, default)


def test_every_option_of_the_completions_api_is_in_the_playground_or_said_why_not():
    seen: set[str] = set()
    openai_api.completion_params(_Recorder(seen, prompt="x"), max_batch=8, names=["m"])
    options = json.loads(webpage.static_file("options.json")[0])  # type: ignore[index]
    shown = {f["name"] for f in options["fields"]}
    assert shown.isdisjoint(options["not_shown"])
    assert seen == shown | set(options["not_shown"]), (
        "a field of /v1/completions the page neither shows nor explains: add it to "
        "src/gpt2cli/web/options.json"
    )


def score_json(model: Path, *args: str) -> dict[str, Any]:
    """`gpt2 score -m MODEL --json --tokens --top 5 ARGS` (in this process)."""
    result = CliRunner().invoke(
        cli, ["score", "-m", str(model), "--json", "--tokens", "--top", "5", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def embedded(page: str) -> dict[str, Any]:
    """The data a `--html` file holds."""
    found = re.search(r'<script type="application/json" id="gltr-data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1))


def test_score_html_holds_what_gpt2_score_json_prints_and_lets_nothing_out(
    tiny_model_dir: Path, tmp_path: Path
):
    source = tmp_path / "text.txt"
    source.write_text(HOSTILE + "</script><script>alert(2)</script>", encoding="utf-8")
    out = tmp_path / "view.html"
    result = CliRunner().invoke(
        cli, ["score", "-m", str(tiny_model_dir), str(source), "--html", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("source\ttokens\tperplexity")  # the usual summary
    page = out.read_text(encoding="utf-8")
    assert_same_output(embedded(page)["score"], score_json(tiny_model_dir, str(source)))
    assert page.count("<script") == 2  # the data and the script; the text's tags are escaped
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp is not None
    assert "default-src 'none'" in csp.group(1) and "connect-src 'none'" in csp.group(1)
    assert "unsafe" not in csp.group(1)


@pytest.mark.parametrize(
    "args",
    [["--json"], ["--tokens"], ["a.txt", "b.txt"], ["--jsonl", "rows.jsonl"]],
    ids=["json", "tokens", "two-files", "jsonl"],
)
def test_score_html_goes_with_one_text_alone(tiny_model_dir: Path, tmp_path: Path, args: list[str]):
    result = CliRunner().invoke(
        cli, ["score", "-m", str(tiny_model_dir), "--html", str(tmp_path / "o.html"), *args]
    )
    assert result.exit_code == 2
    assert "--html writes one text's view" in result.output
    assert not (tmp_path / "o.html").exists()


# ---------------------------------------------------------------------------------------------
# in Chromium, against real servers


def _no_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is missing (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; or set GPT2_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless; the tests skip without it (and fail in CI, which has it)."""
    why = _no_browser()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests: {why}; .ci/run installs it")
        pytest.skip(f"browser tests: {why}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=FLAGS, timeout=WAIT_MS
        )
        yield chromium
        chromium.close()


@dataclass
class Visit:
    """A page in its own browser context, with what it did: console errors and warnings,
    uncaught exceptions, requests (those to anywhere but `origin` are aborted) and dialogs."""

    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "#tokens .tok", "spans => spans.map(s => s.textContent)"
        )

    def token_data(self) -> list[list[int | float]]:
        rows = self.page.eval_on_selector_all(
            "#tokens .tok", "spans => spans.map(s => [s.dataset.rank, s.dataset.logprob])"
        )
        return [[int(rank), float(logprob)] for rank, logprob in rows]


@pytest.fixture
def visit(browser: Browser) -> Iterator[Callable[..., Visit]]:
    """Open a URL in a fresh context (its own sessionStorage), at a width and colour scheme."""
    contexts = []

    def open_url(url: str, *, width: int = 1280, height: int = 900, dark: bool = False) -> Visit:
        context = browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
        )
        contexts.append(context)
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        origin = url if url.startswith("file:") else re.sub(r"(//[^/]+).*", r"\1", url)
        seen = Visit(page, origin)

        def on_console(message: Any) -> None:
            if message.type in ("error", "warning"):
                seen.errors.append(f"{message.type}: {message.text}")

        def on_dialog(dialog: Any) -> None:
            seen.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
        page.on("dialog", on_dialog)
        page.on("request", lambda request: seen.requests.append(request.url))
        context.route(
            "**/*",
            lambda route: (
                route.continue_() if route.request.url.startswith(origin) else route.abort()
            ),
        )
        page.goto(url)
        return seen

    yield open_url
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return serve_env(tmp_path_factory.mktemp("web-env"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's context (1024) and wide enough that a token takes milliseconds: a generation of
    1,000 tokens runs for seconds, long enough to be stopped midway."""
    config = GPT2Config(n_ctx=1024, n_embd=256, n_head=4, n_layer=4)
    return write_random_gpt2(tmp_path_factory.mktemp("web") / "gpt2-random", config, seed=4)


@pytest.fixture(scope="module")
def long_text_score(model_dir: Path) -> dict[str, Any]:
    """`gpt2 score --json --tokens --top 5 --text LONG_TEXT` on that model."""
    return score_json(model_dir, "--text", LONG_TEXT)


@pytest.fixture(scope="module")
def server(model_dir: Path, env: dict[str, str]) -> Iterator[ServeProcess]:
    """That model served with 2 rows by a real `gpt2 serve` process on 127.0.0.1."""
    with ServeProcess(model_dir, "--max-batch", "2", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def key_server(tiny_model_dir: Path, env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess(tiny_model_dir, "--api-key", KEY, env=env) as process:
        yield process


def completion(url: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def generate(page: Page, options: dict[str, str | bool], prompt: str = PROMPT) -> None:
    """Fill the Playground's prompt and options, press Generate, wait for the end."""
    from playwright.sync_api import expect

    page.fill("#prompt", prompt)
    for name, value in options.items():
        if isinstance(value, bool):
            page.set_checked(f"#opt-{name}", value)
        else:
            page.fill(f"#opt-{name}", value)
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("done")


def test_the_page_loads_with_no_console_error_and_no_request_elsewhere(
    visit: Callable[..., Visit], server: ServeProcess
):
    from playwright.sync_api import expect

    seen = visit(server.url)
    expect(seen.page.locator("#model")).to_contain_text("1024 tokens of context")
    expect(seen.page.locator("#opt-max_tokens")).to_be_visible()
    assert seen.page.title() == "gpt2 serve"
    assert seen.errors == []
    assert seen.requests and all(url.startswith(server.url + "/") for url in seen.requests)


@pytest.mark.parametrize(
    ("options", "body"),
    [
        ({"temperature": "0", "max_tokens": "40", "ignore_eos": True}, {"temperature": 0}),
        (
            {"temperature": "1", "top_k": "40", "seed": "7", "n": "2", "max_tokens": "30"},
            {"temperature": 1, "top_k": 40, "seed": 7, "n": 2},
        ),
    ],
    ids=["greedy", "two-seeded-samples"],
)
def test_the_playground_shows_exactly_the_text_the_api_returns(
    visit: Callable[..., Visit], server: ServeProcess, options: dict[str, Any], body: dict[str, Any]
):
    request = {"prompt": PROMPT, "max_tokens": int(options["max_tokens"])} | body
    request |= {"ignore_eos": True} if options.get("ignore_eos") else {}
    expected = [c["text"] for c in completion(server.url, request)["choices"]]
    seen = visit(server.url)
    generate(seen.page, options)
    shown = seen.page.eval_on_selector_all("#output .sample-text", "s => s.map(e => e.textContent)")
    assert shown == expected
    assert seen.page.locator("#stats").text_content().startswith("first token ")  # type: ignore[union-attr]
    assert seen.errors == []


def test_stop_ends_the_stream_and_the_server_serves_the_next_request_at_once(
    visit: Callable[..., Visit], server: ServeProcess
):
    from playwright.sync_api import expect

    seen = visit(server.url)
    page = seen.page
    page.fill("#opt-max_tokens", "1000")
    page.fill("#opt-n", "2")  # both of the server's rows
    page.check("#opt-ignore_eos")
    page.click("#generate")
    expect(page.locator("#stats")).to_contain_text("tokens/s")  # streaming
    page.click("#stop")
    expect(page.locator("#stats")).to_contain_text("stopped")
    texts = page.eval_on_selector_all("#output .sample-text", "s => s.map(e => e.textContent)")
    # "first token 80 ms · 30.0 tokens/s · 57 tokens · stopped": the count, not the rate's
    # decimals (a rate of 30.0 tokens/s read as "0 tokens" once)
    stats = page.locator("#stats").text_content() or ""
    found = re.search(r"(?:^|· )(\d+) tokens? · stopped$", stats)
    assert found is not None and 0 < int(found.group(1)) < 2000, stats  # stopped midway
    # both rows free at once: the whole run takes about 20 s on 2 cores, the next request
    # would wait for it
    start = time.monotonic()
    completion(server.url, {"prompt": "Hello", "max_tokens": 1})
    took = time.monotonic() - start
    assert took < 5.0, f"the next request waited {took:.1f} s: the stopped stream kept its rows"
    page.wait_for_timeout(300)
    assert (
        page.eval_on_selector_all("#output .sample-text", "s => s.map(e => e.textContent)") == texts
    )
    assert seen.errors == []


def test_inspect_spans_spell_the_text_and_carry_gpt2_scores_ranks_and_logprobs(
    visit: Callable[..., Visit], server: ServeProcess, long_text_score: dict[str, Any]
):
    from playwright.sync_api import expect

    expected = long_text_score
    assert expected["n_tokens"] > 1024  # longer than the context: strided windows
    assert any("\ufffd" in t["text"] for t in expected["tokens"])  # tokens holding part of a char
    seen = visit(server.url + "/#inspect-view")
    page = seen.page
    page.fill("#inspect-text", LONG_TEXT)
    with page.expect_response(lambda r: r.url.endswith("/v1/score")) as answer:
        page.click("#inspect")
    expect(page.locator("#summary")).to_contain_text(f"{expected['n_tokens']:,} tokens")
    assert "".join(seen.texts()) == LONG_TEXT
    # the spans hold the server's numbers exactly, and those are gpt2 score's (another
    # process, other batch shapes: the same but for float noise in the last digits)
    served = answer.value.json()
    assert seen.token_data() == [[t["rank"], t["logprob"]] for t in served["tokens"]]
    assert_same_output(served, expected)
    page.locator("#tokens .tok").nth(3).hover()
    expect(page.locator("#details")).to_contain_text(f"rank {expected['tokens'][3]['rank']:,}")
    expect(page.locator("#details tr")).to_have_count(5)
    # the markup in the text stayed text: nothing ran, nothing was added to the page
    assert page.locator("#tokens script, #tokens img").count() == 0
    assert seen.dialogs == [] and page.title() == "gpt2 serve"
    assert seen.errors == []
    assert all(url.startswith(server.url + "/") for url in seen.requests)


def test_score_html_opened_from_disk_shows_the_same_spans_with_no_network(
    visit: Callable[..., Visit], model_dir: Path, long_text_score: dict[str, Any], tmp_path: Path
):
    from playwright.sync_api import expect

    source = tmp_path / "long.txt"
    source.write_text(LONG_TEXT, encoding="utf-8")
    out = tmp_path / "long.html"
    result = CliRunner().invoke(
        cli, ["score", "-m", str(model_dir), str(source), "--html", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = embedded(out.read_text(encoding="utf-8"))["score"]
    assert_same_output(data | {"source": "<text>"}, long_text_score)
    seen = visit(out.as_uri())
    expect(seen.page.locator("#summary")).to_contain_text(f"{data['n_tokens']:,} tokens")
    assert "".join(seen.texts()) == LONG_TEXT
    assert seen.token_data() == [[t["rank"], t["logprob"]] for t in data["tokens"]]
    assert seen.requests == [out.as_uri()]
    assert seen.errors == [] and seen.dialogs == []


def test_keyboard_alone_reaches_generate_stop_and_the_first_tokens_details(
    visit: Callable[..., Visit], server: ServeProcess
):
    from playwright.sync_api import expect

    seen = visit(server.url)
    page = seen.page
    expect(page.locator("#opt-max_tokens")).to_be_visible()

    def tab_to(test: str, most: int = 40) -> list[str]:
        """Press Tab until the focused element passes `test` (a JS expression on `e`)."""
        passed = []
        for _ in range(most):
            page.keyboard.press("Tab")
            passed.append(page.evaluate("document.activeElement.id"))
            if page.evaluate(f"(e => {test})(document.activeElement)"):
                return passed
        raise AssertionError(f"Tab never reached {test}: {passed}")

    tab_to("e.id === 'generate'")
    tab_to("e.id === 'stop'", most=1)
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")  # Generate
    expect(page.locator("#stats")).to_contain_text("done")
    tab_to("e.id === 'tab-inspect'", most=60)  # on past the page's end, round to its start
    page.keyboard.press("Enter")
    expect(page.locator("#inspect-text")).to_be_visible()
    tab_to("e.id === 'inspect-text'")
    page.keyboard.type("Keys only: é\n<b>bold</b>")
    tab_to("e.id === 'inspect'")
    page.keyboard.press("Enter")
    expect(page.locator("#tokens .tok").first).to_be_visible()
    tab_to("e.classList.contains('tok')")
    assert page.evaluate("document.activeElement.dataset.i") == "0"
    expect(page.locator("#details")).to_contain_text("rank ")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == "1"
    assert seen.errors == []


def test_with_an_api_key_the_page_asks_for_it_then_works(
    visit: Callable[..., Visit], key_server: ServeProcess
):
    from playwright.sync_api import expect

    seen = visit(key_server.url)
    page = seen.page
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text("This server needs an API key")
    page.fill("#api-key", "sk-wrong")
    page.click("#save-key")
    expect(page.locator("#key-message")).to_contain_text("did not accept that API key")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#model")).to_contain_text("tokens of context")
    generate(page, {"temperature": "0", "max_tokens": "8"})
    expected = completion(
        key_server.url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}, KEY
    )
    assert page.locator("#output .sample-text").text_content() == expected["choices"][0]["text"]
    # kept for the tab only, never in the address
    assert page.evaluate("sessionStorage.getItem('gpt2cli-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    assert all(KEY not in url for url in seen.requests)
    page.reload()
    expect(page.locator("#model")).to_contain_text("tokens of context")
    expect(page.locator("#key-panel")).to_be_hidden()
    # the only errors: the browser's own lines for the two 401 answers
    assert all("401" in error for error in seen.errors), seen.errors


def write_demo_model(folder: Path) -> Path:
    """A tiny model for the screenshots that ranks tokens roughly by id (GPT-2's earlier merges
    are its commoner tokens), so a text shows every colour: its final layer norm puts a constant
    in one dimension, where each token's embedding holds -1.5 log(id + 1). A random model ranks
    nearly every token beyond 1,000."""
    write_random_gpt2(folder, TINY, seed=0)
    weights = load_file(str(folder / "model.safetensors"))
    ids = np.arange(TINY.n_vocab, dtype=np.float32)
    weights["wte.weight"][:, 0] = -1.5 * np.log1p(ids)
    weights["ln_f.weight"][0] = 0.0
    weights["ln_f.bias"][0] = 1.0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


SCREENSHOT_TEXT = (
    "It was the best of times, it was the worst of times; it was the age of wisdom, it was "
    "the age of foolishness. Café au lait, naïve façade 😀.\n<script>alert(1)</script>\n"
)


def test_screenshots_of_each_view_at_desktop_and_phone_widths(
    visit: Callable[..., Visit],
    server: ServeProcess,
    env: dict[str, str],
    tmp_path: Path,
):
    """The manual's screenshots (docs/img with GPT2_SCREENSHOTS=docs/img); at a phone's width
    nothing is wider than the screen."""
    from playwright.sync_api import expect

    folder = Path(os.environ.get("GPT2_SCREENSHOTS", tmp_path))
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    for width, suffix in [(1280, ""), (390, "-phone")]:
        seen = visit(server.url, width=width)
        generate(seen.page, {"temperature": "0.8", "seed": "3", "n": "2", "max_tokens": "40"})
        assert seen.page.evaluate("document.documentElement.scrollWidth") <= width
        seen.page.screenshot(path=str(folder / f"web-playground{suffix}.png"), full_page=True)
    with ServeProcess(write_demo_model(tmp_path / "gpt2-demo"), env=env) as demo:
        for width, suffix in [(1280, ""), (390, "-phone")]:
            seen = visit(demo.url + "/#inspect-view", width=width)
            seen.page.fill("#inspect-text", SCREENSHOT_TEXT)
            seen.page.click("#inspect")
            expect(seen.page.locator("#summary")).to_be_visible()
            seen.page.locator("#tokens .tok").nth(9).hover()
            assert seen.page.evaluate("document.documentElement.scrollWidth") <= width
            seen.page.screenshot(path=str(folder / f"web-inspect{suffix}.png"), full_page=True)
            assert seen.errors == []
