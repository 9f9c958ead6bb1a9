"""Typed batches of the offline pair trainer (what the collate functions return).

* :class:`PairBatch`: a chosen and a rejected image per row with the caption; the variants add
  the rejected side's own caption (``captions_l``), rewards (``rewards_w`` / ``rewards_l``), or
  leave ``pixels_l`` unset (one image used on both sides, TPO's caption pairs).
* :class:`CachedPairBatch`: the same pairs from the latent cache: VAE posterior moments and
  precomputed conditioning; with the cached-reference estimator also each pair's seed and the
  reference's MSEs at its fixed draws.
* :class:`UnpairedBatch`: single images labelled desirable / undesirable.

Each pair batch turns itself into model inputs (:meth:`PairBatch.latents_and_cond`), so the
trainer runs one code path whatever the batch carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Cond = dict[str, torch.Tensor]  # as diffalign.models.Cond: batch-first conditioning tensors


@dataclass
class PairBatch:
    pixels_w: torch.Tensor  # [B, 3, H, W] chosen images in [-1, 1]
    captions: list[str]
    pixels_l: torch.Tensor | None = None  # rejected images; None: the chosen image on both sides
    captions_l: list[str] | None = None  # the rejected side's captions; None: ``captions`` on both sides
    rewards_w: torch.Tensor | None = None  # [B] per-image rewards (reward pairs)
    rewards_l: torch.Tensor | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # rows the stream skipped, by reason
    sample_seed: torch.Tensor | None = None  # [B] int64: data_opts.per_sample_draws, each pair's draw seed

    def __len__(self) -> int:
        return self.pixels_w.shape[0]

    def conds(self, adapter) -> tuple[Cond, Cond]:
        """(chosen-side cond, rejected-side cond)."""
        cond = adapter.encode_prompt(self.captions)
        return cond, adapter.encode_prompt(self.captions_l) if self.captions_l is not None else cond

    def moments(self, adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior (mean, std) of the chosen then the rejected images ([2B]), or of the
        one image both sides share ([B], ``pixels_l`` None); not yet sampled."""
        pixels = self.pixels_w if self.pixels_l is None else torch.cat([self.pixels_w, self.pixels_l])
        return adapter.encode_moments(pixels.to(adapter.device))

    def latents_and_cond(self, adapter) -> tuple[torch.Tensor, Cond, Cond]:
        """(latents [2B]: chosen then rejected, chosen-side cond, rejected-side cond). The VAE
        samples its posterior from the global RNG, as ``latent_dist.sample()`` does."""
        device = adapter.device
        cond = adapter.encode_prompt(self.captions)
        cond_l = adapter.encode_prompt(self.captions_l) if self.captions_l is not None else cond
        if self.pixels_l is not None:
            latents = adapter.encode_images(torch.cat([self.pixels_w, self.pixels_l]).to(device), generator=None)
        else:
            latents_w = adapter.encode_images(self.pixels_w.to(device), generator=None)
            latents = torch.cat([latents_w, latents_w])
        return latents, cond, cond_l


@dataclass
class CachedPairBatch:
    mean_w: torch.Tensor  # [B, C, h, w] VAE posterior moments, unscaled
    std_w: torch.Tensor
    mean_l: torch.Tensor
    std_l: torch.Tensor
    cond: Cond  # precomputed prompt conditioning, batched
    captions: list[str]
    row_seed: torch.Tensor | None = None  # cached-reference estimator: each pair's draw seed
    ref_w: torch.Tensor | None = None  # ... and the reference's MSEs at those draws
    ref_l: torch.Tensor | None = None
    rewards_w: torch.Tensor | None = None  # the cache stores no rewards
    rewards_l: torch.Tensor | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    sample_seed: torch.Tensor | None = None  # [B] int64: data_opts.per_sample_draws, each pair's draw seed

    def __len__(self) -> int:
        return self.mean_w.shape[0]

    def conds(self, adapter) -> tuple[Cond, Cond]:
        cond = {k: v.to(adapter.device) for k, v in self.cond.items()}
        return cond, cond

    def moments(self, adapter) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached posterior (mean, std) of the chosen then the rejected latents ([2B])."""
        return torch.cat([self.mean_w, self.mean_l]), torch.cat([self.std_w, self.std_l])

    @property
    def has_reference(self) -> bool:
        """Whether the reference's MSEs come with the batch (the cached-reference estimator)."""
        return self.ref_w is not None

    def latents_and_cond(self, adapter) -> tuple[torch.Tensor, Cond, Cond]:
        """As :meth:`PairBatch.latents_and_cond`, sampling the cached moments."""
        cond = {k: v.to(adapter.device) for k, v in self.cond.items()}
        latents = adapter.latents_from_moments(torch.cat([self.mean_w, self.mean_l]), torch.cat([self.std_w, self.std_l]))
        return latents, cond, cond


@dataclass
class UnpairedBatch:
    pixels: torch.Tensor  # [M, 3, H, W]
    captions: list[str]  # [M]
    desirable: torch.Tensor  # bool [M]
    skipped: dict[str, int] = field(default_factory=dict)
    sample_seed: torch.Tensor | None = None  # [M] int64: data_opts.per_sample_draws, each image's draw seed

    def __len__(self) -> int:
        return self.pixels.shape[0]


__all__ = ["CachedPairBatch", "PairBatch", "UnpairedBatch"]
