"""Tensor helpers shared by models, losses and pipelines (torch only, no diffalign imports)."""

from __future__ import annotations

import torch


def per_row(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value as fp32 on ``like``'s device, ready to broadcast against ``like`` [B, ...].

    A [B] vector becomes [B, 1, ..., 1]; a scalar (Python or 0-d) or a tensor already
    broadcastable to ``like`` is only converted.
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


__all__ = ["per_row"]
