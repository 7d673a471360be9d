"""Turn what a user types (`gpt2`, `355M`, `owner/name`, `./folder`) into a local model folder.

Models come from the Hugging Face hub through `huggingface_hub`, into its standard cache
(`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN` all apply), so a model
that transformers downloaded is reused and vice versa. A model already in the cache is used with no
network request; otherwise the repo's file list is read first and only the files we use are
fetched (config, safetensors weights, tokenizer files), one at a time in the calling thread so
that Ctrl-C stops at once. `huggingface_hub` and numpy are imported only on the hub path, so
resolving a local folder stays fast; every import of `huggingface_hub` goes through
`_importing_hub`, which turns its bad settings into one clear error.

A cached model is checked before it is used: the small files against the hash the hub gave for
them (the cache names each file's blob by it), the weights by reading their headers (and, only if
that fails, against their hash). A file that no longer matches is re-fetched by `gpt2 download`
(`refetch_damaged`); anywhere else it is an error naming that command.

A download has an overall deadline, GPT2CLI_DOWNLOAD_TIMEOUT seconds (default one hour, 0 for
none): huggingface_hub's own timeout (HF_HUB_DOWNLOAD_TIMEOUT) bounds each read, so a hub that
trickles a byte every few seconds would otherwise never be given up on. What is fetched before the
deadline is kept, and the next run resumes it. The deadline uses SIGALRM, so it applies in the
main thread on Unix. huggingface_hub's warnings and retry messages are shown only with the
progress bars (`progress`): a failure still ends in one GPT2Error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import re
import shlex
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence


@dataclass(frozen=True)
class KnownModel:
    """A model with a short name: OpenAI's four GPT-2 sizes and DistilGPT2."""

    name: str
    alias: str | None  # picoGPT's name for it
    repo_id: str
    config: GPT2Config


KNOWN_MODELS = (
    KnownModel("gpt2", "124M", "openai-community/gpt2", GPT2Config()),
    KnownModel(
        "gpt2-medium",
        "355M",
        "openai-community/gpt2-medium",
        GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    ),
    KnownModel(
        "gpt2-large",
        "774M",
        "openai-community/gpt2-large",
        GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    ),
    KnownModel(
        "gpt2-xl",
        "1558M",
        "openai-community/gpt2-xl",
        GPT2Config(n_embd=1600, n_head=25, n_layer=48),
    ),
    KnownModel("distilgpt2", None, "distilbert/distilgpt2", GPT2Config(n_layer=6)),
)
_BY_NAME = {key: m for m in KNOWN_MODELS for key in (m.name, m.alias) if key}

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "encoder.json", "vocab.bpe")
# errors of the local file system, which running the command again does not cure
_LOCAL_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC}
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_BLOB = {64: "sha256", 40: "git"}  # length of a cache blob's name -> the hash it is

TIMEOUT_VARIABLE = "GPT2CLI_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 3600.0  # seconds for one download: ends a stalled hub, a slow link resumes
_HUB_TIMEOUTS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")  # whole seconds, 0: default


def resolve(
    name: str,
    revision: str | None = None,
    *,
    progress: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer_only: bool = False,
    refetch_damaged: bool = False,
) -> Path:
    """The local folder holding model `name`, downloading it into the hub cache if needed.

    `name` is a folder (used as is, never sent to the hub), a known name or alias (`gpt2`,
    `124M`, ... see KNOWN_MODELS) or a hub repo id `owner/name`. `revision` is a branch, tag or
    commit of the hub repo. `progress` shows huggingface_hub's progress bars on stderr;
    `cache_dir` overrides the hub cache (`HF_HUB_CACHE`). `tokenizer_only` is for commands that
    only tokenize: a cached config is enough, and a download fetches no weights. A cached file
    that fails its check (see `damaged_files`) is fetched again with `refetch_damaged`, and is
    otherwise an error naming the `gpt2 download` command that does it.
    """
    if not name:
        raise GPT2Error("a model name or folder must not be empty")
    folder = Path(name).expanduser()
    if _holds(folder, Path.is_dir):
        if revision is not None:
            raise GPT2Error(f"--revision applies to hub models, not to the local folder {name}")
        return folder
    repo_id = repo_id_for(name)
    cache = Path(cache_dir) if cache_dir is not None else None
    snapshot = cached(repo_id, revision, cache, tokenizer_only=tokenizer_only)
    if snapshot is None:
        return _download(repo_id, revision, progress, cache, tokenizer_only=tokenizer_only)
    damaged = damaged_files(snapshot, tokenizer_only=tokenizer_only, hash_weights=refetch_damaged)
    if not damaged:
        return snapshot
    with _importing_hub():
        from huggingface_hub import constants

    offline = constants.is_offline_mode()
    if not refetch_damaged or offline:
        command = shlex.join(
            ["gpt2", "download", name, *(["--revision", revision] if revision else [])]
        )
        raise GPT2Error(
            f"{damaged[0]}: damaged in the hub cache (it no longer matches the hub's checksum); "
            f"{'unset HF_HUB_OFFLINE and ' if offline else ''}run `{command}` to fetch it again"
        )
    try:
        return _download(
            repo_id,
            snapshot.name,  # the cached commit, so the damaged files are replaced in place
            progress,
            cache,
            tokenizer_only=tokenizer_only,
            refetch={p.name for p in damaged},
        )
    except GPT2Error as e:
        raise GPT2Error(
            f"{damaged[0]}: damaged in the hub cache, and fetching it again failed: {e}"
        ) from None


def repo_id_for(name: str) -> str:
    """The hub repo id for a known name, alias or `owner/name`; anything else is an error."""
    if name in _BY_NAME:
        return _BY_NAME[name].repo_id
    if _holds(Path(name).expanduser(), Path.exists):
        raise GPT2Error(f"{name}: is a file; pass the folder holding config.json and the weights")
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise GPT2Error(f"{name}: no such folder")
    with _importing_hub():
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(name)
        valid = "/" in name
    except HFValidationError:
        valid = False
    if not valid:
        known = ", ".join(_BY_NAME)
        raise GPT2Error(
            f"unknown model {name!r}; use one of {known}, a hub repo id owner/name, or a folder"
        )
    return name


def cached(
    repo_id: str,
    revision: str | None = None,
    cache_dir: Path | None = None,
    *,
    tokenizer_only: bool = False,
) -> Path | None:
    """The cached snapshot of `repo_id` at `revision` if it holds a config and all weights.

    With `tokenizer_only`, a config is enough (the tokenizer files, when the repo has them, come
    with it). Reads only the local cache: no network request, whatever HF_HUB_OFFLINE says.
    """
    with _importing_hub():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

    from gpt2cli import weights

    try:
        with _hub_output(progress=False):
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=[CONFIG_FILE],
                    local_files_only=True,
                )
            )
        if not tokenizer_only:
            weights.weight_files(folder)
    except (LocalEntryNotFoundError, GPT2Error):
        return None
    return folder if (folder / CONFIG_FILE).is_file() else None


def files_to_fetch(
    repo_id: str, files: Sequence[str], *, tokenizer_only: bool = False
) -> list[str]:
    """The files of a repo listing that we use; a repo without safetensors weights is refused.

    With `tokenizer_only`, the weights are left out (and not required).
    """
    from gpt2cli import weights

    listed = set(files)
    if CONFIG_FILE not in listed:
        raise GPT2Error(f"{repo_id}: has no config.json, so it is not a transformers GPT-2 model")
    tokenizer = [f for f in TOKENIZER_FILES if f in listed]
    if tokenizer_only:
        return [CONFIG_FILE, *tokenizer]
    if weights.SINGLE_FILE in listed:
        model = [weights.SINGLE_FILE]
    elif weights.INDEX_FILE in listed:
        model = [weights.INDEX_FILE, *sorted(f for f in listed if _SHARD.fullmatch(f))]
    elif listed.intersection(weights.PICKLE_FILES):
        raise GPT2Error(
            f"{repo_id}: has PyTorch/TF weights but no {weights.SINGLE_FILE}; {weights.NO_PICKLE}"
        )
    else:
        raise GPT2Error(f"{repo_id}: has no {weights.SINGLE_FILE}, so there are no weights to load")
    return [CONFIG_FILE, *model, *tokenizer]


def damaged_files(
    snapshot: Path, *, tokenizer_only: bool = False, hash_weights: bool = False
) -> list[Path]:
    """The files we use in a cached snapshot that no longer match the hub's checksum.

    The config and tokenizer files (small) are always hashed. The weights are hashed with
    `hash_weights` (`gpt2 download`, asked to make the model whole), and otherwise only when
    they fail to load, since hashing gigabytes takes seconds (about 1 s per GB); a file that
    fails to load but matches its checksum is what the hub serves, and is left for the loader
    to report.
    """
    from gpt2cli import weights

    small = [CONFIG_FILE, weights.INDEX_FILE, *TOKENIZER_FILES]
    damaged = [snapshot / n for n in small if (snapshot / n).exists() and not _intact(snapshot / n)]
    if damaged or tokenizer_only:
        return damaged
    if not hash_weights:
        try:
            weights.load(snapshot)
            return []
        except GPT2Error:
            pass
    return [p for p in weights.weight_files(snapshot) if not _intact(p)]


def _intact(path: Path) -> bool:
    """Whether a cached file matches the hash its blob is named by: the sha256 of a weights (LFS)
    file, the git blob sha1 of the others. A file that is not such a blob cannot be checked, and
    counts as intact; one that cannot be read does not."""
    blob = path.resolve()
    kind = _BLOB.get(len(blob.name)) if blob.parent.name == "blobs" else None
    if kind is None or not re.fullmatch(r"[0-9a-f]+", blob.name):
        return True
    try:
        with open(blob, "rb") as f:
            if kind == "git":
                digest = hashlib.sha1(b"blob %d\0" % os.fstat(f.fileno()).st_size)
            else:
                digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == blob.name


def _download(
    repo_id: str,
    revision: str | None,
    progress: bool,
    cache_dir: Path | None,
    *,
    tokenizer_only: bool = False,
    refetch: set[str] | frozenset[str] = frozenset(),
) -> Path:
    """Fetch the files we use from `repo_id` at `revision` into the cache; return the snapshot.

    Files named in `refetch` are fetched even when the cache has them.
    """
    with _importing_hub():
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.file_download import repo_folder_name

    timeout = download_timeout()
    try:
        with _hub_output(progress), _deadline(timeout):
            sha, listing = _listing(repo_id, revision)
            paths = [
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=sha,
                    cache_dir=cache_dir,
                    force_download=filename in refetch,
                    tqdm_class=_progress_bar(filename, progress),
                )
                for filename in files_to_fetch(repo_id, listing, tokenizer_only=tokenizer_only)
            ]
    except _OutOfTime:
        raise GPT2Error(
            f"downloading {repo_id} took longer than {timeout:g} s ({TIMEOUT_VARIABLE}); run the "
            f"command again to resume it, or set {TIMEOUT_VARIABLE} to more seconds (0: no limit)"
        ) from None
    except GPT2Error:
        raise
    except Exception as e:
        raise _explain(e, repo_id, revision) from None
    if revision is None or not _COMMIT.fullmatch(revision):
        # what snapshot_download does: remember the commit a branch or tag pointed to, so the
        # next resolve finds the snapshot in the cache without asking the hub
        root = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(
            repo_id=repo_id, repo_type="model"
        )
        ref = root / "refs" / (revision or constants.DEFAULT_REVISION)
        with contextlib.suppress(OSError):  # best effort, as in huggingface_hub: a read-only
            ref.parent.mkdir(parents=True, exist_ok=True)  # cache still works, just online
            ref.write_text(sha)
    return Path(paths[0]).parent


def _listing(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """The commit hash `revision` points to and the files of the repo there, from the hub.

    An answer of the wrong shape (not the JSON a hub sends) is a GPT2Error naming the endpoint.
    """
    with _importing_hub():
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        raise  # an HTTP error status: _explain names it
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # JSON of another shape
        raise _not_a_hub(_reason(e)) from None
    sha, siblings = getattr(info, "sha", None), getattr(info, "siblings", None)
    names = [getattr(s, "rfilename", None) for s in siblings or ()]
    if not isinstance(sha, str) or not _COMMIT.fullmatch(sha) or not siblings:
        raise _not_a_hub(f"no commit hash and file list for {repo_id}")
    if not all(isinstance(n, str) for n in names):
        raise _not_a_hub(f"a file of {repo_id} has no name")
    return sha, [n for n in names if isinstance(n, str)]


def _not_a_hub(reason: str) -> GPT2Error:
    with _importing_hub():
        from huggingface_hub import constants

    return GPT2Error(
        f"{constants.ENDPOINT} did not answer like a Hugging Face hub ({reason}); check HF_ENDPOINT"
    )


def _holds(path: Path, test: Callable[[Path], bool]) -> bool:
    """`test(path)` (Path.is_dir, Path.exists), False for a name the system cannot even look up
    (longer than a file name may be), as for one that is not there."""
    try:
        return test(path)
    except OSError:
        return False


@contextlib.contextmanager
def _importing_hub() -> Iterator[None]:
    """Wrap every import of huggingface_hub: a bad setting it reads at import is one GPT2Error
    naming the variable, and its import-time warnings (deprecated variables) are not shown."""
    for variable in _HUB_TIMEOUTS:
        value = os.environ.get(variable)
        try:
            valid = value is None or int(value) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise GPT2Error(
                f"{variable}={value!r} is not a whole number of seconds; set it to one such as "
                "10 (0: huggingface_hub's default), or unset it"
            )
    try:
        # huggingface_hub's lazy importer prints its own failures on stdout, which is ours
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except ValueError as e:  # another setting huggingface_hub cannot parse
        raise GPT2Error(
            f"huggingface_hub cannot start ({_reason(e)}); check the HF_ environment variables"
        ) from None


def download_timeout() -> float:
    """The seconds one download may take: GPT2CLI_DOWNLOAD_TIMEOUT, else one hour; 0 is no limit."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise GPT2Error(
            f"{TIMEOUT_VARIABLE}={value!r} is not a number of seconds; set it to one such as "
            "600 (0: no limit), or unset it"
        )
    return seconds


class _OutOfTime(BaseException):
    """The download deadline passed. A BaseException, as Ctrl-C's KeyboardInterrupt is, so that no
    `except Exception` in huggingface_hub mistakes it for a network error and retries."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _OutOfTime in the block after `seconds` (0: never), interrupting even a blocked read.

    Uses SIGALRM, so there is no deadline where that is not ours to use: off Unix, outside the
    main thread, or while the program has a timer of its own running.
    """
    usable = (
        seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def ring(signum: int, frame: object) -> None:
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _hub_output(progress: bool) -> Iterator[None]:
    """No Python warnings from huggingface_hub, and its log (retries, resumed downloads) only
    beside the progress bars: quiet or piped, a failure ends in one line, a success in none."""
    import logging

    log = logging.getLogger("huggingface_hub")
    level = log.level
    if not progress:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _progress_bar(filename: str, show: bool) -> Any:
    """huggingface_hub's progress bar labelled with the file name (it shows a URL's tail)."""
    with _importing_hub():
        from huggingface_hub.utils.tqdm import silent_tqdm, tqdm

    if not show:
        return silent_tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **(kwargs | {"desc": filename}))  # type: ignore[no-untyped-call]

    return Bar


def _explain(error: Exception, repo_id: str, revision: str | None) -> Exception:
    """One line naming what went wrong on the hub and the next step; unknown errors pass through."""
    with _importing_hub():
        from huggingface_hub import constants
        from huggingface_hub import errors as hf

    endpoint = constants.ENDPOINT
    cause = error.__cause__
    if isinstance(error, hf.LocalEntryNotFoundError) and isinstance(cause, Exception):
        explained = _explain(cause, repo_id, revision)  # what the hub answered, if it did
        if isinstance(explained, GPT2Error):
            return explained
    if isinstance(error, hf.GatedRepoError):
        return GPT2Error(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} and set HF_TOKEN "
            "to an access token of that account"
        )
    if isinstance(error, hf.RepositoryNotFoundError):
        return GPT2Error(
            f"{repo_id}: no such model on {endpoint}; check the name (`gpt2 download` lists the "
            "known ones), or set HF_TOKEN if the repo is private"
        )
    if isinstance(error, hf.RevisionNotFoundError):
        return GPT2Error(
            f"{repo_id} has no revision {revision!r}; pass a branch, tag or commit hash that exists"
        )
    if isinstance(error, hf.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return GPT2Error(
                f"{endpoint} refused access to {repo_id} (HTTP {status}); "
                "set HF_TOKEN to a valid access token"
            )
        if status == 404:
            return GPT2Error(
                f"{endpoint} has no {repo_id} (HTTP 404); check the name, and that HF_ENDPOINT "
                "is a Hugging Face hub"
            )
        return GPT2Error(
            f"{endpoint} answered HTTP {status} for {repo_id}; try again later, "
            "or set HF_HUB_OFFLINE=1 to use a model already in the cache"
        )
    if isinstance(error, hf.OfflineModeIsEnabled) or (
        isinstance(error, hf.LocalEntryNotFoundError) and constants.is_offline_mode()
    ):
        return GPT2Error(
            f"{repo_id} is not in the cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
            "set; unset it to download the model, or pass a local model folder"
        )
    if _network_failure(error) or isinstance(error, hf.LocalEntryNotFoundError):
        return GPT2Error(
            f"cannot reach the hub at {endpoint} ({_reason(error)}); check the network or set "
            "HF_ENDPOINT to a reachable hub, pass a local model folder, or set HF_HUB_OFFLINE=1 "
            "to use a model already in the cache"
        )
    if isinstance(error, OSError) and error.errno in _LOCAL_ERRNOS:  # the disk, not the network
        return GPT2Error(
            f"cannot write the model into the cache ({_reason(error)}); check that HF_HOME / "
            f"HF_HUB_CACHE ({constants.HF_HUB_CACHE}) is a writable folder with room"
        )
    if isinstance(error, OSError):
        return GPT2Error(f"downloading {repo_id} failed: {_reason(error)}; run the command again")
    if isinstance(error, (ValueError, KeyError)):  # a body that is not the JSON a hub sends
        return GPT2Error(
            f"{endpoint} did not answer like a Hugging Face hub ({_reason(error)}); "
            "check HF_ENDPOINT"
        )
    return error


# huggingface_hub's HTTP client, whose TransportError is a request that got no answer (refused,
# unresolved, timed out, cut off): httpx in huggingface_hub 1.x, httpx2 from 2.0. Matched by
# name in the error's classes, not imported: neither is our dependency, and each huggingface_hub
# release brings only its own.
_HTTP_CLIENTS = ("httpx", "httpx2")


def _network_failure(error: BaseException) -> bool:
    """Whether `error` is the HTTP client's report of a network failure, whichever client it is."""
    return any(
        cls.__name__ == "TransportError" and cls.__module__.partition(".")[0] in _HTTP_CLIENTS
        for cls in type(error).__mro__
    )


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def known_models(cache_dir: Path | None = None) -> list[tuple[KnownModel, Path | None]]:
    """Every known model with its cached snapshot folder, or None when it is not cached."""
    return [(m, cached(m.repo_id, cache_dir=cache_dir)) for m in KNOWN_MODELS]
