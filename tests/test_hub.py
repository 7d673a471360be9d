"""gpt2cli.hub: names to repo ids, what is fetched, and the cache shared with huggingface_hub.

Whatever reaches the fake hub runs in a subprocess (huggingface_hub reads HF_ENDPOINT and the
cache location when imported); cache look-ups in this process pass `cache_dir` explicitly.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpt2cli import hub, picogpt, weights
from gpt2cli.errors import GPT2Error
from gpt2cli.tokenizer import load_tokenizer
from tests.factory import TINY, hf_config, random_params, write_random_gpt2
from tests.hub_server import FakeHub, Repo


def python(code: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with the test's environment plus `env`."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=os.environ | env,
    )


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        ("gpt2", "openai-community/gpt2"),
        ("124M", "openai-community/gpt2"),
        ("gpt2-medium", "openai-community/gpt2-medium"),
        ("355M", "openai-community/gpt2-medium"),
        ("gpt2-large", "openai-community/gpt2-large"),
        ("774M", "openai-community/gpt2-large"),
        ("gpt2-xl", "openai-community/gpt2-xl"),
        ("1558M", "openai-community/gpt2-xl"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("someone/my-gpt2.v2", "someone/my-gpt2.v2"),
    ],
)
def test_names_and_aliases_map_to_hub_repos(name: str, repo_id: str) -> None:
    assert hub.repo_id_for(name) == repo_id


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpt3", "unknown model 'gpt3'; use one of gpt2, 124M"),
        ("a/b/c", "a/b/c: no such folder"),
        ("./models/gpt2", "./models/gpt2: no such folder"),
        ("/nonexistent/gpt2", "/nonexistent/gpt2: no such folder"),
        ("owner/bad name", "unknown model 'owner/bad name'"),
        ("owner/two..dots", "unknown model 'owner/two..dots'"),
        ("owner/name.git", "unknown model 'owner/name.git'"),
    ],
)
def test_names_that_are_neither_repo_nor_folder_are_refused(name: str, message: str) -> None:
    with pytest.raises(GPT2Error, match="^" + message.replace(".", r"\.")):
        hub.resolve(name)


def test_a_file_is_not_a_model_folder(tiny_model_dir: Path) -> None:
    with pytest.raises(GPT2Error, match="is a file; pass the folder"):
        hub.resolve(str(tiny_model_dir / "model.safetensors"))


def test_local_folder_wins_over_a_known_name_and_never_loads_the_hub_client(
    tmp_path: Path,
) -> None:
    write_random_gpt2(tmp_path / "gpt2", TINY, tokenizer=False)
    result = python(
        """
        import sys
        from gpt2cli import hub
        print(hub.resolve("gpt2"))
        print("huggingface_hub" in sys.modules)
        """,
        cwd=tmp_path,
    )
    assert result.stdout.splitlines() == ["gpt2", "False"], result.stderr


def test_only_the_files_we_use_are_fetched() -> None:
    listing = [
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "rust_model.ot",
        "onnx/decoder_model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "64-8bits.tflite",
    ]
    assert hub.files_to_fetch("o/n", listing) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
    ]


def test_shards_are_fetched_with_their_index_and_openai_vocab_names_are_kept() -> None:
    listing = [
        "config.json",
        "model-00002-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "encoder.json",
        "vocab.bpe",
    ]
    assert hub.files_to_fetch("o/n", listing) == [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "encoder.json",
        "vocab.bpe",
    ]


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        (
            ["config.json", "pytorch_model.bin"],
            "o/n: has PyTorch/TF weights but no model.safetensors",
        ),
        (["config.json", "tf_model.h5"], "never unpickles"),
        (["config.json", "README.md"], "o/n: has no model.safetensors"),
        (["model.safetensors"], "o/n: has no config.json"),
    ],
)
def test_repos_without_usable_weights_are_refused(listing: list[str], message: str) -> None:
    with pytest.raises(GPT2Error, match=message):
        hub.files_to_fetch("o/n", listing)


def test_parameter_counts_of_known_models_match_transformers() -> None:
    import torch
    import transformers

    for model in hub.KNOWN_MODELS:
        config = transformers.GPT2Config(**hf_config(model.config))
        with torch.device("meta"):
            reference = transformers.GPT2LMHeadModel(config).num_parameters()
        assert model.config.n_params == reference, model.name


def test_count_matches_the_tensors_of_a_checkpoint() -> None:
    assert TINY.n_params == sum(v.size for v in random_params(TINY).values())


@pytest.fixture
def tiny_on_hub(fake_hub: FakeHub, tiny_model_dir: Path) -> Repo:
    repo = Repo.from_folder(tiny_model_dir)
    repo.files["pytorch_model.bin"] = b"a pickle we never fetch"
    return fake_hub.add("someone/tiny", repo)


def test_snapshot_fetched_by_huggingface_hub_itself_is_reused(
    tiny_on_hub: Repo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = python(f"""
        from huggingface_hub import snapshot_download
        print(snapshot_download("someone/tiny", cache_dir={str(cache)!r}))
        """)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert hub.cached("someone/tiny", cache_dir=cache) == folder
    assert hub.cached("someone/tiny", revision=tiny_on_hub.sha, cache_dir=cache) == folder
    assert hub.resolve("someone/tiny", cache_dir=cache) == folder  # no hub: found in the cache
    assert hub.cached("someone/other", cache_dir=cache) is None


def test_snapshot_without_weights_is_not_taken_for_a_cached_model(
    tiny_on_hub: Repo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = python(f"""
        from huggingface_hub import hf_hub_download
        hf_hub_download("someone/tiny", "config.json", cache_dir={str(cache)!r})
        """)
    assert result.returncode == 0, result.stderr
    assert hub.cached("someone/tiny", cache_dir=cache) is None


def test_model_we_downloaded_is_found_by_transformers_offline(tiny_on_hub: Repo) -> None:
    assert python("from gpt2cli import hub; hub.resolve('someone/tiny')").returncode == 0
    result = python(
        """
        import transformers
        model = transformers.GPT2LMHeadModel.from_pretrained("someone/tiny")
        print(model.transformer.wte.weight.shape[0])
        """,
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(TINY.n_vocab)


def test_picogpt_loader_gives_tokenizer_hparams_and_params(tiny_model_dir: Path) -> None:
    tokenizer, hparams, params = picogpt.load_encoder_hparams_and_params(str(tiny_model_dir))
    config, expected = weights.load(tiny_model_dir)
    assert hparams == {
        "n_vocab": config.n_vocab,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
    }
    text = "Hello world, GPT-2!"
    assert tokenizer.encode(text) == load_tokenizer(tiny_model_dir).encode(text)
    np.testing.assert_array_equal(
        params["blocks"][1]["attn"]["c_attn"]["w"], expected["blocks"][1]["attn"]["c_attn"]["w"]
    )


def test_picogpt_models_dir_is_the_cache_to_download_into(
    tiny_on_hub: Repo, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    result = python(f"""
        from gpt2cli.picogpt import load_encoder_hparams_and_params
        _, hparams, params = load_encoder_hparams_and_params("someone/tiny", {str(models)!r})
        print(hparams["n_layer"], len(params["blocks"]))
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(TINY.n_layer)] * 2
    assert (models / "models--someone--tiny" / "snapshots" / tiny_on_hub.sha).is_dir()


def test_empty_model_name_is_an_error_not_the_current_folder() -> None:
    with pytest.raises(GPT2Error, match=r"^a model name or folder must not be empty$"):
        hub.resolve("")
    for args in (
        ["encode", "-m", "", "x"],
        ["decode", "-m", "", "1"],
        ["generate", "-m", "", "Hi"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "gpt2cli", *args], capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stdout) == (2, ""), args
        assert result.stderr == "gpt2: error: a model name or folder must not be empty\n", args


def test_folder_with_neither_tokenizer_nor_config_is_not_a_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpt2cli", "encode", "-m", str(tmp_path), "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"gpt2: error: {tmp_path} is not a model folder: it has ")
    assert result.stderr.count("\n") == 1


def test_damaged_cached_files_are_found_by_their_checksum(
    tiny_on_hub: Repo, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fetched = python(
        f"from gpt2cli import hub; print(hub.resolve('someone/tiny', cache_dir={str(cache)!r}))"
    )
    folder = Path(fetched.stdout.strip())
    assert hub.damaged_files(folder) == []
    weights_blob = (folder / "model.safetensors").resolve()
    good = weights_blob.read_bytes()
    weights_blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # still loads: not hashed
    assert hub.damaged_files(folder) == []
    assert hub.damaged_files(folder, hash_weights=True) == [folder / "model.safetensors"]
    weights_blob.write_bytes(good[:-1])  # fails to load: hashed, and found
    assert hub.damaged_files(folder) == [folder / "model.safetensors"]
    assert hub.damaged_files(folder, tokenizer_only=True) == []
    (folder / "merges.txt").resolve().write_text("#version: 0.2\n")  # small files: always hashed
    assert hub.damaged_files(folder, tokenizer_only=True) == [folder / "merges.txt"]
    with pytest.raises(
        GPT2Error, match=r"merges.txt: damaged in the hub cache .* run `gpt2 download someone/tiny`"
    ):
        hub.resolve("someone/tiny", cache_dir=cache, tokenizer_only=True)
    copy = tmp_path / "copy"  # a local folder: nothing to check it against
    shutil.copytree(folder, copy)
    assert hub.damaged_files(copy) == []


def test_every_import_of_huggingface_hub_goes_through_importing_hub() -> None:
    """A bad HF_* variable is a ValueError at huggingface_hub's import: caught in one place."""
    package = Path(hub.__file__).parent
    for source in sorted(package.glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        guarded = {
            id(node)
            for w in ast.walk(tree)
            if isinstance(w, ast.With)
            and any("_importing_hub" in ast.unparse(item.context_expr) for item in w.items)
            for node in w.body
        }
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "huggingface_hub" for n in names):
                assert id(node) in guarded, f"{source.name}:{node.lineno}"


def test_the_package_imports_only_what_it_declares() -> None:
    """Every import in gpt2cli is the standard library, gpt2cli itself, or a dependency that
    pyproject.toml declares (extras included): huggingface_hub's own HTTP client is not one."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(hub.__file__).parents[2] / "pyproject.toml").read_text())
    requirements = [
        *project["project"]["dependencies"],
        *(
            requirement
            for extra in ("serve", "ray", "fast")  # the test extra is not the package's
            for requirement in project["project"]["optional-dependencies"][extra]
        ),
    ]
    declared = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}
    allowed = declared | set(sys.stdlib_module_names) | {"gpt2cli"}
    for source in sorted(Path(hub.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{source.name}:{node.lineno}: {name}"


@pytest.mark.parametrize("client", ["httpx", "httpx2"])
def test_a_network_failure_is_named_whichever_http_client_huggingface_hub_uses(
    client: str,
) -> None:
    http = pytest.importorskip(client)
    for error in (http.ConnectError("refused"), http.ReadTimeout("timed out")):
        explained = hub._explain(error, "someone/tiny", None)
        assert isinstance(explained, GPT2Error)
        assert str(explained).startswith("cannot reach the hub at "), explained
    other = http.InvalidURL("not a network failure")
    assert hub._explain(other, "someone/tiny", None) is other
