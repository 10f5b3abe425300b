"""Batches of activations as models, calibration and training read them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor


def activations_of(batch: Any) -> Tensor:
    """The activation tensor of a batch: a tensor, or a tuple/list starting with one (the DataModule yields
    `(activations, token_ids)` when asked for token ids)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a batch of activations (a tensor or a tuple starting with one), got {type(x)}")
    return x


def iter_batches(activations: Tensor | Iterable[Any], batch_size: int, max_tokens: int | None = None,
                 ) -> Iterator[Tensor]:
    """[n, d_in] batches from a tensor or an iterable of batches (a DataLoader works), at most `max_tokens` rows."""
    source: Iterable[Any] = activations.split(batch_size) if isinstance(activations, Tensor) else activations
    seen = 0
    for item in source:
        x = activations_of(item)
        x = x.reshape(-1, x.shape[-1])
        if max_tokens is not None:
            x = x[: max_tokens - seen]
        if x.shape[0]:
            yield x
        seen += x.shape[0]
        if max_tokens is not None and seen >= max_tokens:
            return
