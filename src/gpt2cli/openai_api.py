"""The OpenAI completions API's shapes: request bodies checked field by field, and the response,
stream-chunk and error objects, laid out as OpenAI and vLLM lay them out.

There is no HTTP here (`gpt2cli.serve` reads the bodies and sends what these build), so the
rules can be read and tested on their own. Every bad field is an `APIError` that carries
OpenAI's error body (`message`, `type`, `param`, `code`) and the HTTP status with which the
`openai` client raises the matching exception (400 BadRequestError, 404 NotFoundError, ...).
"""

from __future__ import annotations

import codecs
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpt2cli import jsonfile
from gpt2cli.errors import GPT2Error
from gpt2cli.params import MAX_TOP_LOGPROBS, GenerationParams, ParamError, logit_bias

if TYPE_CHECKING:
    from gpt2cli.score import TextScore
    from gpt2cli.tokenizer import Tokenizer

MAX_BODY = 1 << 20  # bytes: a larger request body is refused with 413
MAX_STOP = 4  # OpenAI's limit on stop strings
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API
ENDOFTEXT = "<|endoftext|>"  # OpenAI's default prompt: generate as from a document's start

_TYPES = {  # OpenAI's error `type` for each status it uses
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request that gets an error response: its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def internal_error() -> APIError:
    """The 500 a client gets for a failure of ours: no detail of it (that goes to the log)."""
    return APIError(500, "The server had an error while processing your request.")


def parse_body(data: bytes) -> Any:
    """A request body's JSON value: NaN, huge integers and deep nesting are refused, as in every
    JSON gpt2cli reads (`gpt2cli.jsonfile`); any failure is a 400."""
    try:
        return jsonfile.parse(data, "the request body")
    except GPT2Error as e:
        raise APIError(400, str(e)) from None


@dataclass(frozen=True)
class CompletionParams:
    """A checked `POST /v1/completions` body: the prompts (not yet tokenized), how each is
    continued, and how the response is laid out."""

    prompts: list[str | list[int]]
    generation: GenerationParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs object in the response
    return_token_ids: bool

    @property
    def n(self) -> int:
        """Samples per prompt."""
        return self.generation.n

    @property
    def max_tokens(self) -> int:
        """New tokens per sample at most (0: the prompt alone, echoed)."""
        return self.generation.max_tokens

    @property
    def echo(self) -> bool:
        """Each choice starts with its prompt."""
        return self.generation.echo


class Fields:
    """A JSON object's fields, read one by one with their checks; `done` refuses the rest.

    A field that is absent or null gets its default, as in OpenAI's API.
    """

    def __init__(self, body: Any, where: str = "the request body") -> None:
        if not isinstance(body, dict):
            raise APIError(400, f"{where} must be a JSON object, not {jsonfile.show(body)}")
        self._body = body
        self._read: set[str] = set()

    def get(self, name: str) -> Any:
        """The raw value of `name` (None when absent)."""
        self._read.add(name)
        return self._body.get(name)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """An integer from `low` to `high` (not a bool, not 1.0)."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise APIError(400, jsonfile.not_an_integer(name, value, low, high), param=name)
        return value

    def number(self, name: str, default: float) -> float:
        """A finite number (NaN, Infinity and 1e400 are not)."""
        value = self.get(name)
        if value is None:
            return default
        try:
            finite = not isinstance(value, bool) and math.isfinite(value)
        except (TypeError, OverflowError):  # not a number, or an integer beyond any float
            finite = False
        if not finite:
            raise APIError(
                400, f"{name} must be a finite number, not {jsonfile.show(value)}", param=name
            )
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        """true or false."""
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise APIError(
                400, f"{name} must be true or false, not {jsonfile.show(value)}", param=name
            )
        return value

    def unsupported(self, name: str, allowed: object, why: str) -> None:
        """A field OpenAI has and gpt2cli does not: accepted only at its no-op value."""
        value = self.get(name)
        if value is not None and (
            isinstance(value, bool) is not isinstance(allowed, bool) or value != allowed
        ):  # false is not the number 0
            raise APIError(400, f"{name} is not supported: {why}", param=name)

    def done(self) -> None:
        """Refuse any field not read, as OpenAI does."""
        unknown = [k for k in self._body if k not in self._read]
        if unknown:
            raise APIError(
                400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
            )


def check_model(value: Any, names: Sequence[str]) -> None:
    """`model`, when given, must be the served model's name or one of its aliases (404)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise APIError(400, f"model must be a string, not {jsonfile.show(value)}", param="model")
    if value not in names:
        raise APIError(
            404,
            f"The model `{value}` does not exist; this server serves {names[0]!r}.",
            param="model",
            code="model_not_found",
        )


def completion_params(body: Any, *, max_batch: int, names: Sequence[str]) -> CompletionParams:
    """Check every field of a completions request; the first bad one is an APIError naming it.

    `names` are the served model's name and aliases; `max_batch` bounds `n`. Types are checked
    here, values by `GenerationParams`' own rules.
    """
    fields = Fields(body)
    check_model(fields.get("model"), names)
    prompts = _prompts(fields.get("prompt"))
    n = fields.integer("n", 1, 1, max_batch)
    temperature = fields.number("temperature", 1.0)
    top_k = max(fields.integer("top_k", 0, -1, jsonfile.MAX_INT), 0)  # -1 is off, as in vLLM
    top_p = fields.number("top_p", 1.0)
    stream = fields.boolean("stream")
    include_usage = _stream_options(fields.get("stream_options"), stream)
    echo = fields.boolean("echo")
    max_tokens = fields.integer("max_tokens", DEFAULT_MAX_TOKENS, 0, jsonfile.MAX_INT)
    logprobs = fields.get("logprobs")
    if logprobs is not None:
        logprobs = fields.integer("logprobs", 0, 0, MAX_TOP_LOGPROBS)
    decoding = _decoding(fields, n, stream, max_batch)
    fields.unsupported("suffix", "", "GPT-2 continues text; it does not insert it")
    user = fields.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, f"user must be a string, not {jsonfile.show(user)}", param="user")
    stop, seed = _stops(fields.get("stop")), _seed(fields.get("seed"))
    ignore_eos = fields.boolean("ignore_eos")
    return_token_ids = fields.boolean("return_token_ids")
    fields.done()
    try:
        generation = GenerationParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            n=n,
            stop=stop,
            ignore_eos=ignore_eos,
            top_logprobs=logprobs or 0,
            echo=echo,
            echo_logprobs=echo and logprobs is not None,
            **decoding,
        )
    except ParamError as e:
        raise param_error(e) from None
    return CompletionParams(
        prompts=prompts,
        generation=generation,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        return_token_ids=return_token_ids,
    )


# GenerationParams' names for the body's fields where they differ
_PARAMS = {
    "top_logprobs": "logprobs",
    "no_repeat_ngram": "no_repeat_ngram_size",
    "ban": "bad_words",
    "num_beams": "best_of",
}


def param_error(error: ParamError) -> APIError:
    """A bad option as a 400 naming the request body's field."""
    return APIError(400, str(error), param=_PARAMS.get(error.param, error.param))


def _decoding(fields: Fields, n: int, stream: bool, max_batch: int) -> dict[str, Any]:
    """The decoding fields (OpenAI's, and vLLM's extensions) as `GenerationParams`' keyword
    options. `best_of` is the beam width under `use_beam_search` (vLLM), else the samples drawn
    to return the `n` likeliest (OpenAI), which cannot be streamed."""
    options: dict[str, Any] = {
        name: fields.number(name, default)
        for name, default in [
            ("repetition_penalty", 1.0),
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("min_p", 0.0),
            ("typical_p", 1.0),
            ("length_penalty", 1.0),
        ]
    }
    options["no_repeat_ngram"] = fields.integer("no_repeat_ngram_size", 0, 0, jsonfile.MAX_INT)
    options["min_tokens"] = fields.integer("min_tokens", 0, 0, jsonfile.MAX_INT)
    options["prompt_lookup"] = fields.integer("prompt_lookup", 0, 0, jsonfile.MAX_INT)
    bias = fields.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise APIError(
            400, f"logit_bias must be an object, not {jsonfile.show(bias)}", param="logit_bias"
        )
    try:
        options["logit_bias"] = logit_bias((bias or {}).items())
    except ParamError as e:
        raise APIError(400, str(e), param="logit_bias") from None
    words = fields.get("bad_words")
    words = [words] if isinstance(words, str) else [] if words is None else words
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise APIError(400, "bad_words must be a string or a list of strings", param="bad_words")
    options["ban"] = tuple(text(w, "bad_words") for w in words)
    early = fields.get("early_stopping")
    if early is not None and not (isinstance(early, bool) or early == "never"):
        raise APIError(
            400,
            f'early_stopping must be true, false or "never", not {jsonfile.show(early)}',
            param="early_stopping",
        )
    options["early_stopping"] = bool(early) if early != "never" else early
    best_of = fields.integer("best_of", n, 1, max_batch)
    if fields.boolean("use_beam_search"):
        options["num_beams"] = best_of
        if best_of < 2:
            raise APIError(
                400, "best_of (the beam width) must be at least 2 with use_beam_search", "best_of"
            )
    elif best_of != n:
        options["best_of"] = best_of
        if stream:
            raise APIError(
                400, "best_of cannot be streamed: its n best are known at the end", "best_of"
            )
    return options


def _prompts(value: Any) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of lists of them."""
    if value is None:
        return [ENDOFTEXT]
    if isinstance(value, str):
        return [text(value, "prompt")]
    shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if not isinstance(value, list) or not value:
        raise APIError(400, f"prompt must be {shape}, not {jsonfile.show(value)}", "prompt")
    if all(isinstance(p, str) for p in value):
        return [text(p, "prompt") for p in value]
    if all(isinstance(p, list) for p in value):
        return [_ids(p, "prompt") for p in value]
    return [_ids(value, "prompt")]


def _ids(value: list[Any], param: str) -> list[int]:
    """A non-empty list of non-negative integers (checked against the vocabulary later)."""
    bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if not value or bad is not None:
        what = "an empty list" if not value else jsonfile.show(bad)
        raise APIError(
            400, f"{param} token ids must be non-empty lists of integers >= 0, not {what}", param
        )
    return value


def text(value: str, param: str) -> str:
    """A string that is Unicode (JSON's `\\ud800` escapes can make one that is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"{param} holds a lone surrogate at position {e.start}, which is not Unicode",
            param,
        ) from None
    return value


def _stream_options(value: Any, stream: bool) -> bool:
    """`stream_options.include_usage`; stream_options goes only with stream, as OpenAI says."""
    if value is None:
        return False
    if not stream:
        raise APIError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )
    try:
        options = Fields(value, "stream_options")
        include_usage = options.boolean("include_usage")
        options.done()
    except APIError as e:
        raise APIError(400, f"stream_options: {e.message}", param="stream_options") from None
    return include_usage


def _stops(value: Any) -> tuple[str, ...]:
    """`stop`: a string or a list of up to MAX_STOP non-empty strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise APIError(
            400,
            f"stop must be a non-empty string or a list of up to {MAX_STOP} of them, "
            f"not {jsonfile.show(value)}",
            param="stop",
        )
    return tuple(text(s, "stop") for s in stops)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= jsonfile.MAX_INT:
        raise APIError(400, jsonfile.not_an_integer("seed", value, 0), param="seed")
    return value


def prompt_ids(prompts: Sequence[str | list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """Each prompt's token ids: strings encoded (`<|endoftext|>` is the special token; an empty
    string is that token alone, as `gpt2 generate` starts), id lists checked against the
    vocabulary."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(tokenizer.encode(prompt) or [tokenizer.eot_token])
            continue
        bad = next((i for i in prompt if i >= tokenizer.n_vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary [0, {tokenizer.n_vocab})", "prompt"
            )
        out.append(prompt)
    return out


def check_text_lengths(
    prompts: Sequence[str | list[int]], n_ctx: int, max_token_bytes: int
) -> None:
    """A text prompt whose length alone shows that it cannot fit the context is refused before it
    is tokenized (an 800 KB word took a second of CPU and 100 MB to tokenize): no token stands
    for more than `max_token_bytes` bytes, so a text of B bytes has at least B / that tokens."""
    for prompt in prompts:
        if isinstance(prompt, str):
            least = -(-len(prompt.encode("utf-8")) // max_token_bytes)
            if least > n_ctx:
                raise APIError(
                    400,
                    f"This model's maximum context length is {n_ctx} tokens. However, your "
                    f"request has at least {least} input tokens. Please reduce the length of "
                    "the prompt.",
                    param="prompt",
                    code="context_length_exceeded",
                )


def check_lengths(ids: Sequence[Sequence[int]], max_tokens: int, n_ctx: int) -> None:
    """Each prompt and its `max_tokens` must fit the context: 400 with both lengths, as vLLM
    says it."""
    for prompt in ids:
        if len(prompt) > n_ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {n_ctx} tokens. However, your request "
                f"has {len(prompt)} input tokens. Please reduce the length of the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(prompt) + max_tokens > n_ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in your prompt; {max_tokens} "
                "for the completion). Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )


def token_text(tokenizer: Tokenizer, id: int) -> str:
    """A token as OpenAI names it in logprobs: its text, or `bytes:\\xe2\\x80` for bytes that are
    part of a UTF-8 character."""
    raw = tokenizer.token_bytes(id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


Top = Sequence[tuple[int, float]]  # (id, logprob) alternatives, most likely first


def echo_logprobs(
    score: TextScore | None,
) -> tuple[list[float | None] | None, list[Top | None] | None]:
    """A prompt's scores as echo's logprobs and alternatives per token (None: not asked for);
    the first token has no context, so its entries are null."""
    if score is None:
        return None, None
    tops: list[Top | None] = [
        list(zip(t.tolist(), lp.tolist(), strict=True))
        for t, lp in zip(score.top_ids, score.top_logprobs, strict=True)
    ]
    return [None, *score.logprobs.tolist()], [None, *tops]


@dataclass
class Choice:
    """One choice as it grows: its text, its tokens with their logprobs, and how it ended.

    Offsets count characters of the choice's text (prompt included with echo), each token's
    from where its first byte's character starts.
    """

    index: int
    text: str = ""
    ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    generated: int = 0  # completion tokens
    finish_reason: str | None = None
    _chars: int = 0
    _utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def add(
        self,
        tokenizer: Tokenizer,
        ids: Sequence[int],
        logprobs: Sequence[float | None],
        tops: Sequence[Top | None],
        text: str,
    ) -> dict[str, Any]:
        """Append tokens and the text they made printable; return their logprobs layout."""
        start = len(self.tokens)
        for id, logprob, top in zip(ids, logprobs, tops, strict=True):
            self.ids.append(id)
            self.tokens.append(token_text(tokenizer, id))
            self.token_logprobs.append(logprob)
            self.top_logprobs.append(_top_dict(tokenizer, id, logprob, top))
            data = tokenizer.token_bytes(id)
            first = self._utf8.decode(data[:1])  # may end a character begun before, or not
            # the first byte's character: still pending, or else the last one decoded
            inside = bool(first) and not self._utf8.getstate()[0]
            self.text_offset.append(self._chars + len(first) - inside)
            self._chars += len(first) + len(self._utf8.decode(data[1:]))
        self.text += text
        return self.logprobs(start)

    def logprobs(self, start: int = 0) -> dict[str, Any]:
        """OpenAI's logprobs object for the tokens from `start` on."""
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }


def _top_dict(
    tokenizer: Tokenizer, id: int, logprob: float | None, top: Top | None
) -> dict[str, float] | None:
    """{token: logprob} of the alternatives and the chosen token (OpenAI's up to logprobs + 1)."""
    if logprob is None or top is None:
        return None
    alternatives = {token_text(tokenizer, i): lp for i, lp in top}
    return alternatives | {token_text(tokenizer, id): logprob}


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # gpt2cli's -> OpenAI's


class Completion:
    """A completions request's choices, built as the worker's results come: the whole response
    object, or one stream chunk per token.

    Choice `i * n + j` is sample j of prompt i, as OpenAI orders them.
    """

    def __init__(
        self,
        params: CompletionParams,
        ids: list[list[int]],
        tokenizer: Tokenizer,
        model: str,
    ) -> None:
        self.params = params
        self.prompt_ids = ids
        self.tokenizer = tokenizer
        self.model = model
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [Choice(index=i) for i in range(len(ids) * params.n)]

    def echo(
        self,
        prompt: int,
        logprobs: Sequence[float | None] | None,
        tops: Sequence[Top | None] | None,
    ) -> list[dict[str, Any]]:
        """The prompt's own text (and, when asked, its tokens' logprobs: the first is null)
        starts each of its choices; with max_tokens 0 that is all of them. Returns their
        stream chunks."""
        ids = self.prompt_ids[prompt]
        given = self.params.prompts[prompt]
        # what the model saw: an empty prompt ran as <|endoftext|>, and offsets count its text
        text = given if isinstance(given, str) and given else self.tokenizer.decode(ids)
        chunks, none = [], [None] * len(ids)
        for sample in range(self.params.n):
            choice = self.choices[prompt * self.params.n + sample]
            layout = choice.add(self.tokenizer, ids, logprobs or none, tops or none, text)
            if self.params.max_tokens == 0:
                choice.finish_reason = "length"
            chunks.append(self._chunk(choice, text, layout if logprobs is not None else None))
        return chunks

    def token(
        self,
        prompt: int,
        sample: int,
        id: int,
        text: str,
        logprob: float,
        top: Top,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        """One generated token of a choice; returns its stream chunk."""
        choice = self.choices[prompt * self.params.n + sample]
        layout = choice.add(self.tokenizer, [id], [logprob], [top], text)
        choice.generated += 1
        if finish_reason is not None:
            choice.finish_reason = FINISH_REASONS[finish_reason]
        return self._chunk(choice, text, layout if self.params.logprobs is not None else None)

    @property
    def finished(self) -> bool:
        """Every choice has its finish reason."""
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        """Tokens in the prompts (each counted once, whatever n is) and in all choices."""
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(c.generated for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def tokens_line(self) -> str:
        """The tokens so far, as the access log shows them: "7+16 tokens" (prompt + generated)."""
        usage = self.usage()
        return f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens"

    def response(self) -> dict[str, Any]:
        """The whole `text_completion` object."""
        choices = []
        for c in self.choices:
            generated = c.ids[len(c.ids) - c.generated :]
            choices.append(
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": c.logprobs() if self.params.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                | self._token_ids(c.index, generated)
            )
        return self._object(choices) | {"usage": self.usage()}

    def usage_chunk(self) -> dict[str, Any]:
        """The stream's last chunk with `stream_options.include_usage`: no choices, the usage."""
        return self._object([]) | {"usage": self.usage()}

    def _chunk(self, choice: Choice, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        out = {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }
        if self.params.return_token_ids:  # the chunk's own generated id
            out["token_ids"] = choice.ids[-1:] if choice.generated else []
        usage = {"usage": None} if self.params.include_usage else {}
        return self._object([out]) | usage

    def _token_ids(self, index: int, ids: list[int]) -> dict[str, Any]:
        """vLLM's `return_token_ids` extension: the choice's prompt and generated ids."""
        if not self.params.return_token_ids:
            return {}
        return {"prompt_token_ids": self.prompt_ids[index // self.params.n], "token_ids": ids}

    def _object(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
