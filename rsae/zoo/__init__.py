"""Trained SAEs: the rsae checkpoint format (`rsae.zoo.checkpoint`), importers of public formats
(`rsae.zoo.importers`), export (`rsae.zoo.export`), and the model zoo on the Hugging Face Hub.

    rsae.zoo.load("smollm2-135m/L15/topk")      # a ready model (HF cache, then the Hub, then the shipped copy)
    rsae.zoo.pull(name) / rsae.zoo.push(folder, repo_id, path_in_repo=...)
    rsae.zoo.list()                             # name, family, L0, explained variance, status
    rsae.zoo.card(name)                         # what an entry is and how it is built
"""

from rsae.zoo.hub import entries as list  # noqa: A004 - `rsae.zoo.list()` is the API the zoo promises
from rsae.zoo.hub import load, pull, push
from rsae.zoo.registry import Card, ZooError, card

__all__ = ["Card", "ZooError", "card", "list", "load", "pull", "push"]
