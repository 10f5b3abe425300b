from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def small_cpu_settings() -> Iterator[None]:
    """One thread and the eager gate for modules of tiny shapes.

    One thread avoids oversubscribing the shared cores (measured 5-10x faster here), and the eager
    gate avoids a ~1 min torch.compile per gate variant."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSAE_COMPILE", "0")
        yield
    torch.set_num_threads(threads)
