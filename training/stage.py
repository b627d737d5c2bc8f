"""The interface every training stage implements; the loop (training/loop.py) knows nothing else.

Life of a stage: `setup()` builds its trainable modules and optimizer; `load_trainable()` puts a
checkpoint's tensors back; `measure("before")`; then per step `step(step, batch)` returns the loss
(the loop does backward, clipping and the optimizer step); `sample(step)` writes a sample grid;
`measure("after")`, `export()` writes the file users load; `teardown()` frees what the stage held.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .session import Session


def make_adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (CPU and CUDA) when this torch has it, else the foreach one."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


class Stage:
    """One training stage. Subclasses set `name` and implement the methods below."""

    name = ""

    def __init__(self, session: Session):
        self.s = session
        self.cfg = session.cfg
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.holdout: list = []

    @property
    def section(self):
        """The stage's config section (steps, batch_size, lr, warmup, grad_clip)."""
        return getattr(self.cfg, self.name)

    def variants(self) -> int | None:
        """Fixed augmentation variants per sample (when caching), or None for fresh ones each epoch."""
        return None

    def lr_at(self, step: int) -> float:
        sc = self.section
        return sc.lr * min(1.0, (step + 1) / sc.warmup) if sc.warmup > 0 else sc.lr

    # --- to implement -----------------------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def trainable_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def step(self, step: int, batch: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward pass and losses of one step: (total loss with graph, {part name: detached value})."""
        raise NotImplementedError

    def measure(self, when: str) -> dict[str, float]:
        """Held-out measures; `when` is "before" or "after" (keys are suffixed with it)."""
        raise NotImplementedError

    def export(self) -> Path:
        raise NotImplementedError

    def sample(self, step: int) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError
