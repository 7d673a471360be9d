"""Turn what a user types (`gpt2`, `355M`, `owner/name`, `./folder`) into a local model folder.

Models come from the Hugging Face hub through `huggingface_hub`, into its standard cache
(`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN` all apply), so a model
that transformers downloaded is reused and vice versa. A model already in the cache is used with no
network request; otherwise the repo's file list is read first and only the files we use are
fetched (config, safetensors weights, tokenizer files), one at a time in the calling thread so
that Ctrl-C stops at once. `huggingface_hub` and numpy are imported only on the hub path, so
resolving a local folder stays fast.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error

if TYPE_CHECKING:
    from collections.abc import Sequence


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
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def resolve(
    name: str,
    revision: str | None = None,
    *,
    progress: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """The local folder holding model `name`, downloading it into the hub cache if needed.

    `name` is a folder (used as is, never sent to the hub), a known name or alias (`gpt2`,
    `124M`, ... see KNOWN_MODELS) or a hub repo id `owner/name`. `revision` is a branch, tag or
    commit of the hub repo. `progress` shows huggingface_hub's progress bars on stderr;
    `cache_dir` overrides the hub cache (`HF_HUB_CACHE`). `tokenizer_only` is for commands that
    only tokenize: a cached config is enough, and a download fetches no weights.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise GPT2Error(f"--revision applies to hub models, not to the local folder {name}")
        return folder
    repo_id = repo_id_for(name)
    cache = Path(cache_dir) if cache_dir is not None else None
    return cached(repo_id, revision, cache, tokenizer_only=tokenizer_only) or _download(
        repo_id, revision, progress, cache, tokenizer_only=tokenizer_only
    )


def repo_id_for(name: str) -> str:
    """The hub repo id for a known name, alias or `owner/name`; anything else is an error."""
    if name in _BY_NAME:
        return _BY_NAME[name].repo_id
    if Path(name).expanduser().exists():
        raise GPT2Error(f"{name}: is a file; pass the folder holding config.json and the weights")
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise GPT2Error(f"{name}: no such folder")
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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from gpt2cli import weights

    try:
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


def _download(
    repo_id: str,
    revision: str | None,
    progress: bool,
    cache_dir: Path | None,
    *,
    tokenizer_only: bool = False,
) -> Path:
    """Fetch the files we use from `repo_id` at `revision` into the cache; return the snapshot."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        if info.sha is None or info.siblings is None:
            raise GPT2Error(f"{constants.ENDPOINT} did not list the files of {repo_id}")
        paths = [
            hf_hub_download(
                repo_id,
                filename,
                revision=info.sha,
                cache_dir=cache_dir,
                tqdm_class=_progress_bar(filename, progress),
            )
            for filename in files_to_fetch(
                repo_id, [s.rfilename for s in info.siblings], tokenizer_only=tokenizer_only
            )
        ]
    except GPT2Error:
        raise
    except Exception as e:
        raise _explain(e, repo_id, revision) from None
    if revision is None or not REGEX_COMMIT_HASH.fullmatch(revision):
        # what snapshot_download does: remember the commit a branch or tag pointed to, so the
        # next resolve finds the snapshot in the cache without asking the hub
        root = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(
            repo_id=repo_id, repo_type="model"
        )
        ref = root / "refs" / (revision or constants.DEFAULT_REVISION)
        with contextlib.suppress(OSError):  # best effort, as in huggingface_hub: a read-only
            ref.parent.mkdir(parents=True, exist_ok=True)  # cache still works, just online
            ref.write_text(info.sha)
    return Path(paths[0]).parent


def _progress_bar(filename: str, show: bool) -> Any:
    """huggingface_hub's progress bar labelled with the file name (it shows a URL's tail)."""
    from huggingface_hub.utils.tqdm import silent_tqdm, tqdm

    if not show:
        return silent_tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **(kwargs | {"desc": filename}))  # type: ignore[no-untyped-call]

    return Bar


def _explain(error: Exception, repo_id: str, revision: str | None) -> Exception:
    """One line naming what went wrong on the hub and the next step; unknown errors pass through."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    endpoint = constants.ENDPOINT
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
    if isinstance(error, (httpx2.TransportError, hf.LocalEntryNotFoundError)):
        return GPT2Error(
            f"cannot reach the hub at {endpoint} ({_reason(error)}); check the network or set "
            "HF_ENDPOINT to a reachable hub, pass a local model folder, or set HF_HUB_OFFLINE=1 "
            "to use a model already in the cache"
        )
    if isinstance(error, OSError):
        return GPT2Error(f"downloading {repo_id} failed: {_reason(error)}; run the command again")
    if isinstance(error, (ValueError, KeyError)):  # a body that is not the JSON a hub sends
        return GPT2Error(
            f"{endpoint} did not answer like a Hugging Face hub ({_reason(error)}); "
            "check HF_ENDPOINT"
        )
    return error


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def known_models(cache_dir: Path | None = None) -> list[tuple[KnownModel, Path | None]]:
    """Every known model with its cached snapshot folder, or None when it is not cached."""
    return [(m, cached(m.repo_id, cache_dir=cache_dir)) for m in KNOWN_MODELS]
