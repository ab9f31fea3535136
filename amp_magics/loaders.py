"""DataLoaders re-made with one thing changed (the batch size, the sampler), everything else
the user gave kept: collate_fn, workers and their context, pin_memory, drop_last, generator."""
from __future__ import annotations

from typing import Any

import torch


def remade(loader: torch.utils.data.DataLoader, **changes: Any) -> torch.utils.data.DataLoader:
    """`loader` made again over its dataset with `changes` (batch_size=, sampler=) applied."""
    workers = loader.num_workers
    kept = dict(
        batch_size=loader.batch_size, sampler=loader.sampler, num_workers=workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False)
    return torch.utils.data.DataLoader(loader.dataset, **{**kept, **changes})
