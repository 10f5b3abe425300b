"""The Hub model card (`README.md`) of a zoo entry folder: YAML front matter, the evaluation table, how it was
built, and the teacher's licence and source."""

from __future__ import annotations

from typing import Any

import yaml

from rsae.zoo.registry import Card


def model_card(entry: Card, cfg: dict[str, Any]) -> str:
    """Markdown with front matter (`library_name: rsae`, tags, `base_model`) for the entry's folder on the Hub."""
    front = {"library_name": "rsae", "tags": ["sparse-autoencoder", "rsae", "interpretability", cfg.get("family"),
                                             f"mode-{cfg.get('mode')}"],
             "base_model": entry.lm.get("hub_name") or entry.lm.get("name"),
             "license": entry.teacher.get("license_id", "other")}
    table = entry.evaluation.get("table") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {entry.name}", "",
             f"A Rational SAE (rsae, mode `{cfg.get('mode')}`, degree {cfg.get('degree')}) of "
             f"`{entry.lm.get('hook_name')}` in `{entry.lm.get('name')}`, upgraded from {entry.teacher.get('source')}.",
             "", "```python", "import rsae", f'model = rsae.zoo.load("{entry.name}")', "```", ""]
    if table:
        # The card's table holds the runs and metrics in the order `rsae zoo build` measured them.
        runs = list(table)
        metrics = list(dict.fromkeys(metric for run in runs for metric in table[run]))
        lines += ["## Evaluation", "", "| metric | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        for metric in metrics:
            lines.append(f"| {metric} | " + " | ".join(_fmt(table[r].get(metric)) for r in runs) + " |")
        data = entry.evaluation.get("data")
        lines += ["", describe_data(data) if data else "", "The control is the teacher fine-tuned with the same "
                  "recipe, data and steps: the RSAE's gain over it is what the rational gate adds.", ""]
    lines += ["## How it was built", "", "```bash", entry.build_command(), "```", "",
              f"Recipe: `rsae {entry.recipe.get('command')}` with {entry.recipe.get('args')} (the stages are "
              "rsae's `configs/`).", "", "## Teacher", "",
              f"{entry.teacher.get('description', '')} Source: {entry.teacher.get('source')}; format "
              f"{entry.teacher.get('format')}; licence: {entry.teacher.get('license')}.", ""]
    if entry.notes:
        lines += [entry.notes, ""]
    return "\n".join(lines)


def describe_data(data: dict[str, Any]) -> str:
    """One sentence: the text an entry was trained on and the held-out text its table was measured on."""
    def corpus(part: dict[str, Any]) -> str:
        pinned = ", ".join(f"{s['package']}=={s['version']}" for s in part.get("sources") or [])
        return f"`{part['corpus']}`" + (f" ({pinned})" if pinned else "")

    train, held_out = data["train"], data["evaluation"]
    tokens = f"{held_out['cached_tokens']:,} tokens of " if "cached_tokens" in held_out else ""
    return (f"Trained on {train['cached_tokens']:,} cached tokens of {corpus(train)} ({train['training_shards']} "
            f"shards train); measured on {tokens}{corpus(held_out)} ({held_out['split']}), the cross-entropy on "
            f"{data['ce_sequences']} of its sequences.")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)
