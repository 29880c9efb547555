"""Shared fixtures: an isolated QUANTMILL_HOME, a tiny random Llama with a real (tiny, trained)
tokenizer saved as a Hugging Face directory, and the WikiText-2 files shipped in the repo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports quantmill.flows (which reads these): every test session gets its own
# quantmill home, so tests never touch ~/.quantmill.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="quantmill-tests-"))
os.environ["QUANTMILL_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("QUANTMILL_DATABASE_URL", None)

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    return WIKITEXT


@pytest.fixture()
def quantmill_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh QUANTMILL_HOME (registry, storage, work dirs) for one test."""
    home = tmp_path / "qm-home"
    home.mkdir()
    monkeypatch.setenv("QUANTMILL_HOME", str(home))
    monkeypatch.delenv("QUANTMILL_DATABASE_URL", raising=False)
    return home


def make_tiny_tokenizer(text: str, vocab_size: int = 512):
    """A real byte-level BPE tokenizer trained on ``text`` (a second or so)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_llama_config(vocab_size: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as safetensors with its tokenizer (session-wide, read-only)."""
    import torch
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tiny_tokenizer((WIKITEXT / "valid.txt").read_text()[:200_000])
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _merge(recipe: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


@pytest.fixture()
def tiny_recipe(tiny_model_dir: Path, tmp_path: Path):
    """``make(**overrides) -> path``: writes a small RTN recipe for the tiny model (sections in
    ``overrides`` are merged key by key, other values replace)."""
    import yaml

    def make(name: str = "recipe.yaml", **overrides) -> Path:
        recipe = {
            "name": "tiny-rtn",
            "model": {"path": str(tiny_model_dir), "source": "hf"},
            "calibration": {"source": "text", "path": str(WIKITEXT / "valid.txt"),
                            "num_samples": 4, "seq_len": 32, "seed": 0},
            "quantization": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
            "evaluation": [
                {"evaluator": "perplexity", "dataset": str(WIKITEXT / "test.txt"),
                 "seq_len": 64, "max_windows": 4, "batch_size": 2},
                {"evaluator": "size"},
            ],
            "export": {"format": "gptq"},
            "device": "cpu",
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(_merge(recipe, overrides), sort_keys=False))
        return path

    return make


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny random LlamaForCausalLM (vocab 256) in memory, eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(256)).eval()


def _load_support(name: str):
    """Load ``tests/support/<name>.py`` (tests are not a package: --import-mode=importlib)."""
    import importlib.util
    import sys

    module_name = f"quantmill_test_support_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "tests" / "support"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def run_quantmill():
    """``run_quantmill(recipe, home, failpoint=None)``: ``quantmill run`` as a real process."""
    return _load_support("quantmill_process").run_quantmill


@pytest.fixture(scope="session")
def prefect_service():
    """``tests/support/prefect_service.py``: the Prefect server and worker processes."""
    return _load_support("prefect_service")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, prefect_service):
    """A real Prefect server (``prefect server start``, SQLite) on a free loopback port for the
    whole test session; stopped at the end."""
    server = prefect_service.PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def prefect_api(prefect_server, monkeypatch: pytest.MonkeyPatch):
    """This test talks to the session's Prefect server (``PREFECT_API_URL``, in the
    environment for subprocesses and in Prefect's settings, read once at import, for this
    process)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on free loopback ports for the whole test session, with
    one bucket; stopped at the end."""
    seaweedfs = _load_support("seaweedfs")
    server = seaweedfs.SeaweedS3(tmp_path_factory.mktemp("seaweedfs"),
                                 buckets=("quantmill-tests",))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The server's credentials in the environment (boto3's standard chain), as a user sets
    them; returns the server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return s3_server


@pytest.fixture()
def s3_storage(s3_env, tmp_path: Path):
    """``make(**options) -> S3Storage`` on the test server, under a prefix of its own and with
    a cache of its own."""
    import uuid

    from quantmill.storage.cache import ContentCache
    from quantmill.storage.s3 import S3Storage, S3StorageConfig

    def make(cache_dir: Path | None = None, **options):
        config = S3StorageConfig.model_validate({
            "bucket": "quantmill-tests", "prefix": f"t-{uuid.uuid4().hex[:12]}",
            "endpoint_url": s3_env.endpoint, "max_attempts": 2, "connect_timeout": 2,
            **options})
        return S3Storage(config, cache=ContentCache(cache_dir or tmp_path / "cache"))

    return make
