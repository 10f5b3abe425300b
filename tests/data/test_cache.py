"""Activation cache: round trip against a direct forward, resume after SIGKILL, corruption, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rsae._io import normalize_url
from rsae.data.cache import (
    MANIFEST,
    ActivationCache,
    CacheError,
    CorruptShardError,
    NonFiniteActivationsError,
    shard_file,
)
from rsae.data.caching import CacheRequest, build_cache

from helpers import tiny_lm

HOOKS = ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out")


def random_corpus(path: Path, n_words: int = 3000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij klmnop"), size=rng.integers(2, 8))) for _ in range(n_words)]
    path.write_text(" ".join(words))
    return str(path)


def request(tmp_path: Path, lm, **overrides) -> CacheRequest:  # type: ignore[no-untyped-def]
    fields = dict(out=str(tmp_path / "cache"), model=lm.name, hooks=HOOKS, corpus=random_corpus(tmp_path / "c.txt"),
                  n_tokens=1024, seq_len=16, sequences_per_shard=16, batch_size=16, progress=False)
    fields.update(overrides)
    return CacheRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return tiny_lm(n_layers=3)


def test_cache_matches_a_direct_forward_and_drops_bos(tmp_path, lm):  # type: ignore[no-untyped-def]
    cache = build_cache(request(tmp_path, lm), lm=lm, log=lambda *a: None)
    assert cache.manifest["complete"] and len(cache.shards) == 4 and cache.hooks == list(HOOKS)
    tokens = torch.from_numpy(np.array(cache.tokens(1))).long()
    assert (tokens[:, 0] == lm.bos_token_id).all()
    _, direct = lm.bridge.run_with_cache(tokens)
    for hook in HOOKS:
        stored = cache.activations(1, hook)
        assert stored.dtype == torch.bfloat16 and stored.shape == (16 * 15, lm.d_model)
        reference = direct[hook][:, 1:].reshape(-1, lm.d_model)  # BOS column dropped
        assert torch.allclose(stored.float(), reference, atol=0.05, rtol=0.02)
    assert (cache.token_ids(1) == tokens[:, 1:].reshape(-1).numpy()).all()
    cache.verify("sha256")
    raw = np.load(Path(cache.store.root) / shard_file(0, HOOKS[0]), mmap_mode="r")
    assert raw.dtype == np.uint16  # bf16 bits, documented


def test_float16_and_file_url(tmp_path, lm):  # type: ignore[no-untyped-def]
    req = request(tmp_path, lm, dtype="float16", hooks=("blocks.0.hook_resid_post",), n_tokens=256)
    req.out = "file://" + req.out
    cache = build_cache(req, lm=lm, log=lambda *a: None)
    assert cache.activations(0, "blocks.0.hook_resid_post").dtype == torch.float16
    assert normalize_url("file:///a/b") == "/a/b" and normalize_url("memory://x") == "memory://x"


def test_rerun_resumes_extends_and_refuses_a_different_request(tmp_path, lm):  # type: ignore[no-untyped-def]
    logs: list[str] = []
    build_cache(request(tmp_path, lm, n_tokens=512), lm=lm, log=logs.append)
    first = json.loads((tmp_path / "cache" / MANIFEST).read_text())["shards"]
    cache = build_cache(request(tmp_path, lm, n_tokens=1024), lm=lm, log=logs.append)
    assert "2 shards already done" in logs[-2] and len(cache.shards) == 4
    assert cache.shards[:2] == first  # finished shards untouched
    for field, value in [("hooks", ("blocks.1.hook_resid_pre",)), ("dtype", "float16"), ("seq_len", 32)]:
        with pytest.raises(CacheError, match=f"(?s)refusing to mix.*{field}"):
            build_cache(request(tmp_path, lm, **{field: value}), lm=lm, log=logs.append)
    with pytest.raises(CacheError, match="model"):
        build_cache(request(tmp_path, lm), lm=tiny_lm(n_layers=3, seed=1), log=logs.append)


def test_unknown_hook_names_the_closest_and_how_to_list_all(tmp_path, lm):  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as error:
        build_cache(request(tmp_path, lm, hooks=("blocks.9.hook_resid_post",)), lm=lm, log=lambda *a: None)
    message = str(error.value)
    assert "unknown hook point(s) blocks.9.hook_resid_post" in message and "\n" not in message
    assert "closest: blocks.2.hook_resid_post, " in message and "`rsae hooks " in message
    assert len(message) < 400  # a few suggestions, not the ~100 hook points of the model


def test_bad_inputs(tmp_path, lm):  # type: ignore[no-untyped-def]
    with pytest.raises(CacheError, match="dtype"):
        build_cache(request(tmp_path, lm, dtype="float32"), lm=lm)
    with pytest.raises(CacheError, match="positive"):
        build_cache(request(tmp_path, lm, n_tokens=0), lm=lm)
    small = tmp_path / "small.txt"
    small.write_text("just a few words " * 20)
    with pytest.raises(CacheError, match="ran out after 22 sequences"):
        build_cache(request(tmp_path, lm, corpus=str(small), out=str(tmp_path / "a")), lm=lm, log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown corpus"):
        build_cache(request(tmp_path, lm, corpus=str(tmp_path / "nope.txt"), out=str(tmp_path / "b")), lm=lm,
                    log=lambda *a: None)
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache(tmp_path / "nowhere")


def test_corrupt_and_truncated_shards_are_named(tmp_path, lm):  # type: ignore[no-untyped-def]
    cache = build_cache(request(tmp_path, lm, n_tokens=512), lm=lm, log=lambda *a: None)
    folder = Path(cache.store.root)
    victim = folder / shard_file(1, HOOKS[0])
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0xFF  # flip one byte: same size, header fine, checksum wrong
    victim.write_bytes(bytes(data))
    fresh = ActivationCache(folder)
    fresh.activations(0, HOOKS[0])  # an intact shard still reads
    with pytest.raises(CorruptShardError, match=r"shard-00001\.blocks\.1\.hook_resid_post\.npy.*SHA-256"):
        fresh.activations(1, HOOKS[0])
    victim.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptShardError, match=r"shard-00001.*truncated"):
        ActivationCache(folder, verify="header").activations(1, HOOKS[0])
    # a rerun of the cache job refuses to extend a cache with a damaged shard
    with pytest.raises(CorruptShardError, match="shard-00001"):
        build_cache(request(tmp_path, lm, n_tokens=1024), lm=lm, log=lambda *a: None)
    (folder / shard_file(0, "tokens")).unlink()
    with pytest.raises(CorruptShardError, match=r"shard-00000\.tokens\.npy.*missing"):
        ActivationCache(folder).tokens(0)


def test_nonfinite_activations_are_rejected_with_a_report(tmp_path, lm):  # type: ignore[no-untyped-def]
    bad = tiny_lm(n_layers=3)
    with torch.no_grad():
        bias = next(p for n, p in bad.bridge.blocks[0].mlp.named_parameters() if n.endswith("bias") and p.numel() == 16)
        bias[0] = float("nan")
    req = request(tmp_path, bad, hooks=("blocks.1.hook_resid_post",), n_tokens=256)
    with pytest.raises(NonFiniteActivationsError, match=r"NaN/Inf activations in \d+ of 240 kept tokens of shard 0"):
        build_cache(req, lm=bad, log=lambda *a: None)
    assert not json.loads((tmp_path / "cache" / MANIFEST).read_text())["shards"]  # nothing recorded
    req.allow_nonfinite = True
    cache = build_cache(req, lm=bad, log=lambda *a: None)
    assert cache.shards[0]["nonfinite"]["blocks.1.hook_resid_post"] > 0


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from rsae.data.caching import CacheRequest, build_cache
    from helpers import tiny_lm
    import rsae.data.caching as cache_module
    slow = float(sys.argv[3])
    original = cache_module.write_shard
    def write_slowly(*args, **kwargs):
        out = original(*args, **kwargs)
        time.sleep(slow)
        return out
    cache_module.write_shard = write_slowly
    lm = tiny_lm(n_layers=3)
    req = CacheRequest(out=sys.argv[1], model=lm.name, hooks=("blocks.1.hook_resid_post",), corpus=sys.argv[2],
                       n_tokens=2048, seq_len=16, sequences_per_shard=16, batch_size=16, progress=False)
    build_cache(req, lm=lm)
    print("FINISHED", flush=True)
""")


def test_sigkill_then_rerun_resumes_without_redoing_finished_shards(tmp_path):  # type: ignore[no-untyped-def]
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    corpus = random_corpus(tmp_path / "c.txt")
    out = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(out), corpus, "0.3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    manifest = out / MANIFEST
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads(manifest.read_text())
    assert not killed["complete"] and 3 <= len(killed["shards"]) < 8
    stamps = {s["index"]: os.stat(out / s["files"]["tokens"]["path"]).st_mtime_ns for s in killed["shards"]}

    rerun = subprocess.run([sys.executable, str(script), str(out), corpus, "0"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0 and "FINISHED" in rerun.stdout, rerun.stdout + rerun.stderr
    assert f"{len(killed['shards'])} shards already done" in rerun.stdout
    cache = ActivationCache(out)
    assert cache.manifest["complete"] and len(cache.shards) == 8
    assert cache.shards[: len(killed["shards"])] == killed["shards"]
    for index, stamp in stamps.items():  # finished shards were not rewritten
        assert os.stat(out / cache.shards[index]["files"]["tokens"]["path"]).st_mtime_ns == stamp
    cache.verify("sha256")
    # the resumed cache equals one built in a single run (in this process: same seeded tiny model)
    lm = tiny_lm(n_layers=3)
    single = build_cache(CacheRequest(out=str(tmp_path / "whole"), model=lm.name, hooks=("blocks.1.hook_resid_post",),
                                      corpus=corpus, n_tokens=2048, seq_len=16, sequences_per_shard=16, batch_size=16,
                                      progress=False), lm=lm, log=lambda *a: None)
    for i in range(8):
        assert (np.asarray(single.tokens(i)) == np.asarray(cache.tokens(i))).all()
        assert torch.equal(single.activations(i, "blocks.1.hook_resid_post"),
                           cache.activations(i, "blocks.1.hook_resid_post"))


def test_processed_and_unprocessed_activations_are_never_mixed(tmp_path, lm):  # type: ignore[no-untyped-def]
    from rsae.data.lm import apply_processing

    processing = {"fold_ln": True, "center_writing_weights": True}
    centred = apply_processing(tiny_lm(n_layers=3), processing)
    cache = build_cache(request(tmp_path, centred, n_tokens=256), lm=centred, log=lambda *a: None)
    assert cache.manifest["lm_processing"] == centred.processing
    with pytest.raises(CacheError, match="lm_processing"):
        build_cache(request(tmp_path, lm, n_tokens=512), lm=lm, log=lambda *a: None)
