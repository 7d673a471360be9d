"""The web page `gpt2 serve` answers at `/`, and `gpt2 score --html`'s self-contained file.

The page is plain HTML, CSS and JavaScript in `gpt2cli/web/` (shipped in the wheel, no build
step, nothing from another site), using only the server's public API. `gpt2cli.serve` routes
`GET /` to `page()` and `GET /web/NAME` to `static_file(NAME)`, both with `HEADERS` (a
Content-Security-Policy that allows the page's own files only). `score_html` is the page's
Inspect view with its data and script inlined, for a file opened from disk.

The rank buckets (top 10 / 100 / 1,000 / beyond) and GLTR's colours are defined once, in
`gpt2cli.output.GLTR_BUCKETS`; both the page and the file get them from `gltr_settings()`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from gpt2cli.score import TextScore
    from gpt2cli.tokenizer import Tokenizer

TOP = 5  # alternatives per token in the Inspect view (what POST /v1/score gives by default)
# the files GET /web/NAME serves, and their media types: nothing else is served
FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "gltr.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "options.json": "application/json",
    "favicon.svg": "image/svg+xml",
}
# the page's own files only: no inline script or style, no other site, not framed
PAGE_CSP = (
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'"
)
HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("gpt2cli") / "web" / name).read_bytes()


def gltr_settings() -> dict[str, Any]:
    """The rank buckets' upper limits and GLTR's colour for each bucket (the last: beyond)."""
    from gpt2cli.output import GLTR_BEYOND, GLTR_BUCKETS

    def colour(style: str) -> str:
        return style.rpartition(" on ")[2]  # "black on #adff80" -> "#adff80"

    return {
        "limits": [limit for limit, _ in GLTR_BUCKETS],
        "classic": [colour(style) for _, style in GLTR_BUCKETS] + [colour(GLTR_BEYOND)],
    }


def page() -> bytes:
    """`GET /`: the page, with the rank buckets in an attribute (the page has no inline
    script)."""
    settings = html.escape(json.dumps(gltr_settings()), quote=True)
    return _read("index.html").replace(b"{{GLTR}}", settings.encode())


def static_file(name: str) -> tuple[bytes, str] | None:
    """`GET /web/NAME`: one of FILES and its media type, or None."""
    media = FILES.get(name)
    return None if media is None else (_read(name), media)


def piece(raw: bytes) -> str | list[int]:
    """A token's bytes as `POST /tokenize` gives them with `with_pieces`: its text, or a list
    of its bytes when they are not UTF-8 (part of a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _hash(source: str) -> str:
    """A CSP source allowing exactly this inline script or style."""
    digest = hashlib.sha256(source.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def score_html(s: TextScore, tokenizer: Tokenizer, text: str, first: dict[str, Any]) -> str:
    """The Inspect view of one scored text as one HTML file: the style, the script and the
    data inlined, nothing fetched (its CSP allows only those inline parts and no connection).
    `s` must have TOP alternatives per token; `first` is the JSON's first fields (`source`)."""
    from gpt2cli.score import score_json

    score = json.loads(score_json(s, tokenizer, tokens=True, first=first))
    data = {
        "score": score,
        "pieces": [piece(tokenizer.token_bytes(i)) for i in tokenizer.encode(text)],
        "positions": s.positions.tolist(),
        "settings": gltr_settings(),
    }
    # in a <script> element only "</script" could end it early: `<` is written as \u003c
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    style = _read("style.css").decode()
    script = _read("gltr.js").decode()
    csp = (
        f"default-src 'none'; script-src {_hash(script)}; style-src {_hash(style)}; "
        "connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    source = html.escape(str(first.get("source", "text")))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{source}: gpt2 score</title>
<style>{style}</style>
</head>
<body>
<header class="bar"><h1>gpt2 score <span class="muted">{source}</span></h1></header>
<main><section class="view"><div id="inspect-result"></div></section></main>
<script type="application/json" id="gltr-data">{payload}</script>
<script>{script}</script>
</body>
</html>
"""


def write_score_html(
    path: Path, s: TextScore, tokenizer: Tokenizer, text: str, first: dict[str, Any]
) -> None:
    """Write `score_html` to `path`. A path that cannot be opened (no such folder, a folder) is
    the user's GPT2Error; a write that fails once it is open (a full disk) is the system's
    WriteError, as for every other output."""
    from gpt2cli.errors import GPT2Error, WriteError

    page = score_html(s, tokenizer, text, first).encode("utf-8")
    try:
        f = open(path, "wb")  # noqa: SIM115 - closed below, its failures told apart
    except OSError as e:
        raise GPT2Error(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with f:
            f.write(page)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
