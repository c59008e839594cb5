"""model/sources.py: real conversion of the bundled SmolLM2 GGUF, cache reuse, the lock, bad sources.

The conversion (~20 s) runs once per module: two processes race to convert the bundled GGUF into a
fresh cache dir, which both exercises the lock and gives the other tests their converted directory.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model import sources

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each child imports everything first, says it is ready, then waits for "go" so that both call
# resolve_model at the same moment (the conversion takes far longer than the start skew).
CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import transformers  # noqa: F401  (import cost before the barrier)
    from model.sources import resolve_model
    cache, me = Path(sys.argv[1]), sys.argv[2]
    (cache.parent / f"ready-{me}").touch()
    deadline = time.monotonic() + 120
    while not (cache.parent / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.05)
    print("RESULT", resolve_model(None, cache), flush=True)
    """
)


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """Two processes resolve the default model into one empty cache dir at once."""
    base = tmp_path_factory.mktemp("race")
    cache = base / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(cache), str(i)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((base / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "children did not get ready"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.05)
        (base / "go").touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return cache, outputs


@pytest.fixture(scope="module")
def converted(race) -> Path:
    cache, outputs = race
    paths = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("RESULT ")}
    assert len(paths) == 1, outputs
    return Path(paths.pop())


def test_concurrent_resolve_converts_once(race, converted):
    cache, outputs = race
    converting = [out for out in outputs if "to safetensors cache at" in out]
    waiting = [out for out in outputs if "waiting for another process" in out]
    assert len(converting) == 1, outputs
    assert len(waiting) == 1, outputs
    # Only the final entry and the lock file remain: no temp dir, no second copy.
    assert sorted(p.name for p in cache.iterdir()) == sorted([converted.name, f".{converted.name}.lock"])


def test_converted_config_matches_smollm2(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    assert list(converted.glob("*.safetensors"))
    assert (converted / "generation_config.json").is_file()


def test_converted_weights_are_dense_float32(converted):
    from safetensors import safe_open

    (st,) = converted.glob("*.safetensors")
    with safe_open(st, framework="pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight")
        assert emb.get_shape() == [49152, 576]
        assert emb.get_dtype() == "F32"
    assert "model.layers.29.self_attn.k_proj.weight" in keys


def test_converted_tokenizer_loads_with_chat_template(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    text = tok.decode(ids)
    assert "<|im_start|>assistant" in text


def test_second_resolve_reuses_cache(converted, monkeypatch):
    cache = converted.parent
    weights = next(converted.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "convert_gguf", no_conversion)
    assert sources.resolve_model(None, cache) == converted
    assert sources.resolve_model(sources.DEFAULT_MODEL, cache) == converted
    assert sources.resolve_model(str(sources.default_model_path()), cache) == converted
    assert weights.stat().st_mtime_ns == mtime


def test_hf_directory_is_returned_as_is(converted):
    assert sources.resolve_model(converted) == converted.resolve()
    assert sources.resolve_model(str(converted)) == converted.resolve()


def test_default_model_path_points_at_packaged_gguf():
    path = sources.default_model_path()
    assert path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_stale_temp_dir_is_removed_and_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    """A crashed converter's temp dir is cleared; a failing conversion leaves no cache entry."""
    cache = tmp_path / "cache"
    cache.mkdir()
    key = sources.cache_key(sources.default_model_path())
    stale = cache / f".tmp-{key}-crashed"
    stale.mkdir()

    def failing(gguf_path, out_dir):
        (out_dir / "partial.safetensors").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sources, "convert_gguf", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        sources.resolve_model(None, cache)
    assert sorted(p.name for p in cache.iterdir()) == [f".{key}.lock"]


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*config.json"):
        sources.resolve_model(tmp_path / "nope")


def test_directory_without_weights_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no config.json and no \*.safetensors"):
        sources.resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        sources.resolve_model(tmp_path)


def test_non_gguf_file_is_rejected(tmp_path):
    for name in ("weights.bin", "fake.gguf"):
        bad = tmp_path / name
        bad.write_bytes(b"not a model")
        with pytest.raises(ValueError, match="not a GGUF file"):
            sources.resolve_model(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def _hub_cache(root: Path, repo: str, model_dir: Path, commit: str = "0" * 40) -> None:
    """A Hugging Face cache holding `repo` at `commit` as main, laid out as huggingface_hub writes it."""
    entry = root / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def test_a_hub_model_id_resolves_from_the_hugging_face_cache_offline(tiny_llama_dir, tmp_path):
    """`org/name` goes through huggingface_hub with the user's HF_* settings; here offline, from a
    cache built locally, as on a node whose cache was filled before (nothing is downloaded in tests)."""
    _hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_llama_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from model.sources import resolve_model; from model.config import ModelSpec; "
            "p = resolve_model('acme/tiny-llama'); print(p); print(ModelSpec.from_pretrained(p).num_layers)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path, layers = r.stdout.split()
    assert Path(path).is_relative_to(tmp_path / "hub") and int(layers) >= 1
    code = "from model.sources import resolve_model; resolve_model('acme/missing@v2')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not in the Hugging Face cache" in r.stderr
