"""`rsae test` on a tiny LM: streamed metrics, the spliced CE, sparse probing and the report in one run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

import rsae
from rsae.data.caching import CacheRequest, build_cache
from rsae.data.datamodule import ActivationDataModule
from rsae.eval import test_run as evaluation
from rsae.eval.downstream import downstream_cross_entropy
from rsae.eval.test_run import EvalConfig, held_out_sequences
from rsae.train.modules import Evaluation

from helpers import make_sae, tiny_lm

HOOK = "blocks.0.hook_resid_post"

pytestmark = pytest.mark.usefixtures("small_cpu_settings")


def test_rsae_test_writes_metrics_ce_probing_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = tiny_lm(n_ctx=128)  # probing contexts are 128 tokens
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)))
    build_cache(CacheRequest(out=str(tmp_path / "cache"), model=lm.name, hooks=(HOOK,), corpus=str(corpus),
                             n_tokens=32 * 64, seq_len=32, sequences_per_shard=16, progress=False), lm=lm,
                log=lambda *_: None)
    monkeypatch.setattr(evaluation, "_load_lm", lambda datamodule: lm)
    teacher = make_sae("topk", d_in=lm.d_model, hook_name=HOOK, model_name=lm.name)
    rsae.save(teacher, tmp_path / "teacher")
    model = rsae.RSAE.from_teacher(teacher)
    model.cfg.extra["teacher"] = str(tmp_path / "teacher")
    rsae.save(model, tmp_path / "rsae")
    dm = ActivationDataModule(str(tmp_path / "cache"), batch_size=64, val_shards=1, test_shards=1)

    config = EvalConfig(report_dir=str(tmp_path / "report"), ce_sequences=8, probing=True,
                        probing_dir=str(tmp_path / "probing"), autocast_bf16=False)
    module = Evaluation(checkpoint=str(tmp_path / "rsae"), evaluation=config, d_in=dm.d_in, hook_name=dm.hook_name)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    printed = trainer.test(module, datamodule=dm, verbose=False)[0]

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    metrics = report["metrics"]
    # The CE is that of the held-out shard's own token sequences, with this SAE spliced in.
    expected = downstream_cross_entropy(lm, model, held_out_sequences(dm, 8), autocast_bf16=False)
    for key in ("ce_clean", "ce_sae", "ce_zero", "ce_degradation", "loss_recovered"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5)
        assert printed[f"test/{key}"] == pytest.approx(metrics[key])
    assert metrics["l0"] == pytest.approx(4.0) and report["data"]["n_tokens"] == 16 * 31
    assert set(report["probing"]) == {"sae", "lm"} and "language_id" in report["probing"]["sae"]
    tasks = {task["name"]: task for task in report["data"]["probing_tasks"]}  # each task's content hash and sources
    assert set(tasks) == set(report["probing"]["sae"]) - {"mean"}
    assert all(len(task["fingerprint"]) == 64 and task["sources"] for task in tasks.values())
    assert "test/probing_lm_full" in printed and 0 <= printed["test/probing_sae_k=1"] <= 1
    assert report["gate_curves"]["teacher"] is not None and report["density_histogram"]["dead"] >= 0
    for plot in ("density.png", "gate_shapes.png", "report.md"):
        assert (tmp_path / "report" / plot).stat().st_size > 0


def test_held_out_sequences_need_a_cache_with_held_out_shards(tmp_path: Path) -> None:
    class NoCache:
        cache, test_shard_ids, val_shard_ids = None, [], []

    with pytest.raises(ValueError, match="ce_sequences: 0"):
        held_out_sequences(NoCache(), 4)
