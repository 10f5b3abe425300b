"""What `rsae test` measures beyond the streamed metrics, and the report it writes.

A test epoch streams the held-out activation shards through `SAEMetrics` (in raw activation units, merged
across ranks). At its end, rank 0 adds what needs the language model: next-token cross-entropy with the SAE
spliced into its hook point (clean / SAE / zero-ablated, on the token sequences of the same held-out shards),
and optionally sparse probing. It then writes the report folder (`report.json`, `report.md` and plots).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsae._io import cache_dir
from rsae.eval.metrics import SAEMetrics
from rsae.nn.sae import SparseAutoencoder


@dataclass
class EvalConfig:
    report_dir: str | None = None
    """Folder of the test report (default: `<trainer.default_root_dir>/reports/<run name>`)."""

    ce_sequences: int = 64
    """Held-out token sequences for the spliced cross-entropy (0 skips it and the LM)."""

    ce_batch_size: int = 8
    """Sequences per LM forward in the spliced cross-entropy."""

    autocast_bf16: bool = True
    """Run the LM under bf16 autocast for the cross-entropy and probing (the SAE stays in its own dtype)."""

    probing: bool = False
    """Run sparse probing (SAEBench protocol) on the built-in tasks; its activations are cached once."""

    probing_dir: str | None = None
    """Cache folder of the probing tasks' activations (default: the rsae cache dir)."""

    gate_features: int = 8
    """Features sampled for the gate-shape plot (RSAE only)."""

    pre_act_sample: int = 4096
    """Pre-activation rows kept from the test stream for the gate-shape plot."""


# Lightning checkpoints store the hyperparameters and are loaded with torch.load(weights_only=True).
torch.serialization.add_safe_globals([EvalConfig])


class TestRun:
    """State of one test epoch: a sample of pre-activations, then the final measurements and the report."""

    __test__ = False  # not a pytest class

    def __init__(self, config: EvalConfig, sae: SparseAutoencoder, name: str, checkpoint: str | None = None) -> None:
        self.config, self.sae, self.name, self.checkpoint = config, sae, name, checkpoint
        self.pre_acts: list[Tensor] = []
        self.kept = 0
        self.probing_tasks: list[dict[str, Any]] | None = None

    def observe(self, pre_acts: Tensor) -> None:
        if self.kept < self.config.pre_act_sample:
            rows = pre_acts[: self.config.pre_act_sample - self.kept].detach().float().cpu()
            self.pre_acts.append(rows)
            self.kept += rows.shape[0]

    def finish(self, metrics: SAEMetrics, trainer: Any) -> dict[str, float | None]:
        """Compute everything, write the report on rank 0 of `trainer`, and return the scalar metrics."""
        values: dict[str, float | None] = dict(metrics.compute())
        # Collectives under DDP: every rank takes part, then rank 0 alone runs the LM and writes.
        histogram = metrics.density_histogram()
        n_tokens = int(trainer.strategy.reduce(metrics.mse.n_tokens.clone(), reduce_op="sum"))
        if not trainer.is_global_zero:
            return values
        datamodule = trainer.datamodule
        lm = None
        if self.config.ce_sequences > 0 or self.config.probing:
            lm = _load_lm(datamodule)
        if self.config.ce_sequences > 0:
            values.update(self._cross_entropy(lm, datamodule))
        probing = self._probing(lm) if self.config.probing else None
        if probing is not None:  # the mean accuracies join the printed test metrics; per task in the report
            values.update({f"probing_{source}_{k}": acc for source, result in probing.items()
                           for k, acc in result["mean"].items()})
        report = self._report(values, histogram, n_tokens, probing, datamodule)
        folder = Path(self.config.report_dir or Path(trainer.default_root_dir) / "reports" / self.name)
        from rsae.eval.report import write_report

        paths = write_report(report, folder)
        print(f"rsae: test report of {report['name']} in {paths['json'].parent}")
        return values

    def _cross_entropy(self, lm: Any, datamodule: Any) -> dict[str, float]:
        from rsae.eval.downstream import downstream_cross_entropy

        tokens = held_out_sequences(datamodule, self.config.ce_sequences)
        result = downstream_cross_entropy(lm, self.sae, tokens, scale=self.sae.input_scale,
                                          batch_size=self.config.ce_batch_size,
                                          autocast_bf16=self.config.autocast_bf16)
        result["ce_n_tokens"] = result.pop("n_tokens")  # predictions scored, not the streamed tokens
        return result

    def _probing(self, lm: Any) -> dict[str, Any]:
        from rsae.eval.probing import build_tasks, probing_activations, sparse_probing

        sae = self.sae
        folder = self.config.probing_dir or cache_dir() / "probing"
        activations = probing_activations(lm, sae.cfg.hook_name, build_tasks(), folder)
        self.probing_tasks = [task.task for task in activations.values()]  # sources, sizes, content hashes
        encode = sae.encode
        return {"sae": sparse_probing(activations, encode, scale=sae.input_scale),
                "lm": sparse_probing(activations, None)}

    def _report(self, values: dict[str, float | None], histogram: dict[str, Any], n_tokens: int,
                probing: dict[str, Any] | None, datamodule: Any) -> dict[str, Any]:
        from rsae.eval.gate_curves import gate_curves
        from rsae.eval.report import make_report

        sae = self.sae
        pre_acts = torch.cat(self.pre_acts) if self.pre_acts else None
        curves = None
        if sae.cfg.architecture == "rsae" and pre_acts is not None:
            teacher = _teacher_of(sae)
            curves = gate_curves(sae, teacher, features=self.config.gate_features, pre_acts=pre_acts)
        data = {**getattr(datamodule, "metadata", dict)(), "split": "test" if datamodule.test_shard_ids else "val",
                "n_tokens": n_tokens, "evaluation": asdict(self.config), "probing_tasks": self.probing_tasks}
        return make_report(self.name, sae, values, data, checkpoint=self.checkpoint,
                           density_histogram=histogram, probing=probing, gate_curves=curves)


def held_out_sequences(datamodule: Any, n: int) -> Tensor:
    """Token sequences [n, T] (BOS first) of the shards the DataModule holds out for test (else validation)."""
    shards = list(datamodule.test_shard_ids) or list(datamodule.val_shard_ids)
    if datamodule.cache is None or not shards:
        raise ValueError("the spliced cross-entropy needs held-out shards of an activation cache "
                         "(set data.test_shards or data.val_shards >= 1), or set model.evaluation.ce_sequences: 0")
    parts, have = [], 0
    for shard in shards:
        rows = torch.from_numpy(datamodule.cache.tokens(shard)[: n - have].astype("int64"))
        parts.append(rows)
        have += rows.shape[0]
        if have >= n:
            break
    return torch.cat(parts)


def _load_lm(datamodule: Any) -> Any:
    cache = getattr(datamodule, "cache", None)
    return datamodule.source.lm if cache is None else cache_lm(cache)


def cache_lm(cache: Any) -> Any:
    """The LM an activation cache was made with, processed the same way (loaded once per process)."""
    source = cache.manifest.get("model_source") or cache.model
    processing = cache.manifest.get("lm_processing")
    return _language_model(source if Path(str(source)).is_dir() else cache.model,
                           None if processing is None else tuple(sorted(processing.items())))


@functools.lru_cache(maxsize=1)
def _language_model(spec: str, processing: tuple[tuple[str, bool], ...] | None) -> Any:
    """One LM per process: several test runs in a row (the quickstart's four) would each reload it otherwise. It
    is processed as the cache's activations were, so the spliced CE reads the stream the SAE was trained on."""
    from rsae.data.lm import load_lm

    return load_lm(spec, verbose=False, processing=None if processing is None else dict(processing))


def _teacher_of(sae: Any) -> Any:
    """The RSAE's teacher, when its folder is recorded and still on disk (only the gate plot needs it)."""
    from rsae.zoo.checkpoint import load

    folder = sae.cfg.extra.get("teacher")
    if folder is None or not Path(folder).is_dir():
        return None
    teacher = load(folder)
    teacher.set_input_scale(sae.input_scale)
    return teacher.to(sae.device)
