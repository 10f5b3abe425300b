import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rsae
from rsae._io import sha256_file
from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
from rsae.zoo.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError

D_IN, D_SAE = 16, 64


def make(architecture: str, **kwargs) -> rsae.SparseAutoencoder:
    torch.manual_seed(0)
    if architecture == "rsae":
        teacher = make(kwargs.pop("family", "topk"))
        model = rsae.RSAE.from_teacher(teacher, **kwargs)
        with torch.no_grad():  # move every gate parameter off its initial value
            for p in model.gate.parameters():
                p.add_(0.01 * torch.randn_like(p)).abs_()
        return model
    k = 4 if architecture == "topk" else None
    return build_model(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=k, model_name="tiny"))


MODELS = {
    "relu": lambda: make("relu"),
    "jumprelu": lambda: make("jumprelu"),
    "topk": lambda: make("topk"),
    "rsae-masked-jumprelu": lambda: make("rsae", family="jumprelu"),
    "rsae-pure-relu": lambda: make("rsae", family="relu", mode="pure", degree=(3, 2)),
    "rsae-group": lambda: make("rsae", family="topk", coefficient_sharing="group", n_coefficient_groups=4),
}


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bit_exact(tmp_path: Path, name: str) -> None:
    model = MODELS[name]()
    rsae.save(model, tmp_path / "ckpt")
    loaded = rsae.load(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(32, D_IN)
    assert torch.equal(loaded(x), model(x))


def test_load_casts_to_another_dtype_as_a_model_built_in_it(tmp_path: Path) -> None:
    """A bf16 checkpoint of an RSAE keeps its gate in fp32 (as `build_model` does in any dtype); load(dtype=...)
    casts a stored checkpoint either way, and refuses an unknown dtype."""
    model = MODELS["rsae-pure-relu"]()
    half = rsae.load(rsae.save(model, tmp_path / "fp32"), dtype="bfloat16")
    assert half.cfg.dtype == "bfloat16" and half.W_enc.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.gate.parameters())
    assert torch.equal(half.W_dec, model.W_dec.to(torch.bfloat16))
    stored = rsae.load(rsae.save(half, tmp_path / "bf16"))
    assert stored.cfg.dtype == "bfloat16" and torch.equal(stored.W_dec, half.W_dec)
    back = rsae.load(tmp_path / "bf16", dtype="float32")
    assert back.W_dec.dtype == torch.float32 and torch.equal(back.W_dec, half.W_dec.float())
    with pytest.raises(ValueError, match="dtype='int8'"):
        rsae.load(tmp_path / "bf16", dtype="int8")


def test_cfg_json_records_what_a_reader_needs(tmp_path: Path) -> None:
    rsae.save(make("rsae", family="jumprelu", degree=(9, 8)), tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    for key in ("format_version", "architecture", "family", "degree", "mode", "d_in", "d_sae", "hook_name",
                "model_name", "dtype", "weights_sha256"):
        assert key in cfg, key
    assert cfg["architecture"] == "rsae" and cfg["degree"] == [9, 8]


def test_save_replaces_an_old_checkpoint_and_leaves_no_staging(tmp_path: Path) -> None:
    rsae.save(make("relu"), tmp_path / "ckpt")
    second = make("topk")
    rsae.save(second, tmp_path / "ckpt")
    assert rsae.load(tmp_path / "ckpt").cfg.architecture == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not an rsae checkpoint"):
        rsae.save(make("relu"), tmp_path / "thesis")
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "precious"


def test_a_failing_save_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make("relu")
    rsae.save(old, tmp_path / "ckpt")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("rsae.zoo.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        rsae.save(make("topk"), tmp_path / "ckpt")
    assert torch.equal(rsae.load(tmp_path / "ckpt").W_enc, old.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILL_SCRIPT = """
import sys, torch, rsae
from rsae.nn.config import SAEConfig
from rsae.nn.registry import build_model
models = [build_model(SAEConfig(d_in=256, d_sae=4096, architecture=a, k=8 if a == "topk" else None))
          for a in ("relu", "topk")]
print("ready", flush=True)
i = 0
while True:
    rsae.save(models[i % 2], sys.argv[1]); i += 1
"""


def test_a_killed_save_leaves_a_loadable_checkpoint_or_none(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    for delay in (0.15, 0.4, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if target.exists():
            assert rsae.load(target).cfg.architecture in ("relu", "topk")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return rsae.save(make("rsae", family="jumprelu"), tmp_path / "ckpt")


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["weights_sha256"] = sha256_file(folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rsae.load(tmp_path / "nowhere")


def test_missing_cfg(saved: Path) -> None:
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"cfg\.json is missing"):
        rsae.load(saved)


def test_corrupt_cfg(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text('{"format_version": 1, "d_in":')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rsae.load(saved)


def test_newer_format_version(saved: Path) -> None:
    edit_cfg(saved, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99 is newer.*upgrade rsae"):
        rsae.load(saved)


def test_unknown_architecture(saved: Path) -> None:
    edit_cfg(saved, architecture="gated")
    with pytest.raises(CheckpointError, match=r"cfg\.json.*architecture='gated'"):
        rsae.load(saved)


def test_missing_weights(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing"):
        rsae.load(saved)


def test_missing_key(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.pop("threshold"))
    with pytest.raises(CheckpointError, match=r"missing \['threshold'\]"):
        rsae.load(saved)


def test_wrong_shape(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.update(b_enc=torch.zeros(D_SAE + 1)))
    with pytest.raises(CheckpointError, match=r"'b_enc' has shape \(65,\), expected \(64,\)"):
        rsae.load(saved)


def test_wrong_dtype(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.update(b_dec=t["b_dec"].half()))
    with pytest.raises(CheckpointError, match=r"'b_dec' has dtype torch.float16, expected torch.float32"):
        rsae.load(saved)


def test_truncated_weights(saved: Path) -> None:
    path = saved / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    edit_cfg(saved, weights_sha256=None)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        rsae.load(saved)


def test_flipped_bit_is_caught_by_the_checksum(saved: Path) -> None:
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        rsae.load(saved)
