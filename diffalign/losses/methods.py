"""The offline preference methods, each one object that declares what it needs.

A method is a class with

* ``name``: the config's ``method`` value;
* ``default_beta``: beta when ``loss.beta`` is unset;
* ``needs_reference``: whether its loss compares the trained model with the frozen reference
  (as torchtune's ``PreferenceLoss.is_reference_free``, negated);
* ``variant``: the :class:`DataVariant` it reads (the data layer maps a variant to its stream);
* ``Options``: the dataclass of its own ``loss.*`` keys (the pair trainer's ``loss`` block
  inherits every method's options, so the YAML keys stay flat);
* ``noising``: how its ``x_t`` are made by default (``random`` or ``ddim_inversion``);
* ``cacheable`` / ``cached_reference``: whether the latent cache can serve its data, and whether
  it supports the cached-reference estimator;
* ``__call__(mses, batch) -> (loss, metrics)`` on an instance built with beta and the options,
  delegating to the pure tensor losses of :mod:`.preference` and :mod:`.offline`.

Every method is registered here, in :data:`OFFLINE_METHODS`; the pair trainer, its config, the
data variants and the latent cache derive everything from the registered class.

Adding a method: a class here decorated with :func:`register` (its ``Options`` added to the
pair trainer's ``PairLossOptions`` bases when it has options of its own), a tiny config, a test.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from ..config import check, option
from .offline import diffusion_copg_loss, diffusion_ipo_loss, diffusion_kto_loss
from .preference import diffusion_dpo_loss, mapo_loss, sft_loss


class DataVariant(enum.Enum):
    """The data a method reads (see :mod:`diffalign.data.variants` for the batches)."""

    PAIRS = "pairs"  # Pick-a-Pic pairs: chosen + rejected image, one caption
    DUAL_CAPTION_PAIRS = "dual_caption_pairs"  # pairs + the rejected image's own caption
    REWARD_PAIRS = "reward_pairs"  # pairs + a scalar reward per image
    CAPTION_PAIRS = "caption_pairs"  # one image, its caption (chosen) vs a perturbed one (rejected)
    CAPTION_UNPAIRED = "caption_unpaired"  # the caption pairs as a desirable + an undesirable example
    UNPAIRED = "unpaired"  # images labelled desirable / undesirable


class PairMSEs(NamedTuple):
    """Per-sample denoising MSEs [B] of one batch. For unpaired batches ``*_w`` are the desirable
    images' and ``*_l`` the undesirable ones'. ``ref_*`` are None when no reference ran."""

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None


# ------------------------------------------------------------------------------ options
@dataclass
class LossOptions:
    """Base of the options dataclasses; ``validate`` chains through every base (cooperative)."""

    def validate(self) -> None:
        pass


@dataclass
class MaPOOptions(LossOptions):
    snr_value: float = option(0.5, help="MaPO's s")

    def validate(self) -> None:
        super().validate()
        check(self.snr_value > 0, "loss.snr_value", "must be > 0")


@dataclass
class KTOOptions(LossOptions):
    lambda_d: float = option(1.0, help="weight of desirable examples")
    lambda_u: float = option(1.0, help="weight of undesirable examples")

    def validate(self) -> None:
        super().validate()
        check(self.lambda_d >= 0 and self.lambda_u >= 0 and self.lambda_d + self.lambda_u > 0,
              "loss.lambda_d", "KTO weights lambda_d, lambda_u must be >= 0 and not both 0")


@dataclass
class IPOOptions(LossOptions):
    tau: float = option(1.0, help="target log-ratio margin 1/(2 tau)")

    def validate(self) -> None:
        super().validate()
        check(self.tau > 0, "loss.tau", "must be > 0")


@dataclass
class TPOOptions(LossOptions):
    base: str = option("dpo", help="dpo | kto: the loss on the caption pairs")

    def validate(self) -> None:
        super().validate()
        check(self.base in TPO.BASES, "loss.base", f"must be {' or '.join(TPO.BASES)} (TPO's loss)")


@dataclass
class CoPGOptions(LossOptions):
    reward_chosen: float = option(1.0, help="rewards when the batch carries none")
    reward_rejected: float = option(0.0, help="CoPG: reward of the rejected image when the batch carries none")


def _options_of(cls: type, options: Any) -> Any:
    """``cls`` built from the same-named attributes of ``options`` (the trainer's flat block)."""
    if options is None or isinstance(options, cls):
        return options if options is not None else cls()
    return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})


# How the x_t of a method are made (its ``noising``; ``loss.noising`` overrides it): forward
# noising with a random draw, or InPO's DDIM/Euler inversion of the reference
# (:mod:`diffalign.trainers.inversion`).
NOISING_MODES = ("random", "ddim_inversion")


# ------------------------------------------------------------------------------ methods
class OfflineMethod:
    """Base class of the offline methods (see the module docstring for the attributes)."""

    name: ClassVar[str]
    loss_kind: ClassVar[str]  # the pure loss that runs (dpo | mapo | sft | kto | ipo | copg)
    default_beta: ClassVar[float] = 5000.0
    beta_required: ClassVar[bool] = True  # False: beta 0 is allowed (the loss ignores it)
    needs_reference: ClassVar[bool] = True
    variant: ClassVar[DataVariant] = DataVariant.PAIRS
    Options: ClassVar[type] = LossOptions
    noising: ClassVar[str] = "random"  # one of NOISING_MODES
    cacheable: ClassVar[bool] = True
    cached_reference: ClassVar[bool] = False

    def __init__(self, beta: float | None = None, options: Any = None, num_train_timesteps: int = 1000) -> None:
        self.beta = self.default_beta if beta is None else beta
        self.options = _options_of(self.Options, options)
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def resolve(cls, options: Any) -> type[OfflineMethod]:
        """The class that runs with these options (TPO's ``loss.base`` picks its loss)."""
        return cls

    def __call__(self, mses: PairMSEs, batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


OFFLINE_METHODS: dict[str, type[OfflineMethod]] = {}


def register(cls: type[OfflineMethod]) -> type[OfflineMethod]:
    """Class decorator: make ``cls`` the method of ``method: <cls.name>``."""
    if cls.name in OFFLINE_METHODS:
        raise ValueError(f"offline method {cls.name!r} registered twice")
    OFFLINE_METHODS[cls.name] = cls
    return cls


def offline_method(name: str) -> type[OfflineMethod]:
    """The registered method class of ``name`` (KeyError names the registered ones)."""
    try:
        return OFFLINE_METHODS[name]
    except KeyError:
        raise KeyError(f"unknown offline method {name!r}; registered: {', '.join(OFFLINE_METHODS)}") from None


@register
class DPO(OfflineMethod):
    """Diffusion-DPO (:func:`~diffalign.losses.preference.diffusion_dpo_loss`)."""

    name = loss_kind = "dpo"
    cached_reference = True

    def __call__(self, mses, batch=None):
        return diffusion_dpo_loss(mses.model_w, mses.model_l, mses.ref_w, mses.ref_l, beta=self.beta)


@register
class MaPO(OfflineMethod):
    """MaPO, reference-free (:func:`~diffalign.losses.preference.mapo_loss`)."""

    name = loss_kind = "mapo"
    default_beta = 0.1
    needs_reference = False
    Options = MaPOOptions

    def __call__(self, mses, batch=None):
        return mapo_loss(mses.model_w, mses.model_l, beta=self.beta, snr_value=self.options.snr_value,
                         num_train_timesteps=self.num_train_timesteps)


@register
class SFT(OfflineMethod):
    """SFT on the chosen image (:func:`~diffalign.losses.preference.sft_loss`); beta unused."""

    name = loss_kind = "sft"
    default_beta = 0.0
    beta_required = False
    needs_reference = False

    def __call__(self, mses, batch=None):
        return sft_loss(mses.model_w, mses.model_l)


@register
class KTO(OfflineMethod):
    """Diffusion-KTO on desirable / undesirable images (:func:`~diffalign.losses.offline.diffusion_kto_loss`)."""

    name = loss_kind = "kto"
    variant = DataVariant.UNPAIRED
    Options = KTOOptions
    cacheable = False

    def __call__(self, mses, batch=None):
        o = self.options
        return diffusion_kto_loss(mses.model_w, mses.model_l, mses.ref_w, mses.ref_l, beta=self.beta,
                                  lambda_d=o.lambda_d, lambda_u=o.lambda_u)


@register
class DCPO(DPO):
    """DCPO: the DPO loss on pairs whose rejected image is conditioned on its own caption."""

    name = "dcpo"
    variant = DataVariant.DUAL_CAPTION_PAIRS
    cacheable = False
    cached_reference = False


@register
class TPO(DPO):
    """TPO "free lunch" pairs (an image with its caption over the same image with a perturbed
    one): the DPO loss, or with ``loss.base: kto`` KTO's on the two as unpaired examples."""

    name = "tpo"
    variant = DataVariant.CAPTION_PAIRS
    Options = TPOOptions
    cacheable = False
    cached_reference = False
    BASES: ClassVar[tuple[str, ...]] = (DPO.name, KTO.name)

    @classmethod
    def resolve(cls, options):
        return TPOUnpaired if getattr(options, "base", DPO.name) == KTO.name else cls


class TPOUnpaired(KTO):
    """TPO with ``loss.base: kto`` (what :meth:`TPO.resolve` returns; not registered itself)."""

    name = TPO.name
    variant = DataVariant.CAPTION_UNPAIRED


@register
class IPO(OfflineMethod):
    """IPO on diffusion errors (:func:`~diffalign.losses.offline.diffusion_ipo_loss`)."""

    name = loss_kind = "ipo"
    Options = IPOOptions
    cached_reference = True

    def __call__(self, mses, batch=None):
        return diffusion_ipo_loss(mses.model_w, mses.model_l, mses.ref_w, mses.ref_l, beta=self.beta, tau=self.options.tau)


@register
class CoPG(OfflineMethod):
    """CoPG (:func:`~diffalign.losses.offline.diffusion_copg_loss`): per-pair rewards from the
    batch (``rewards_w`` / ``rewards_l``) when it carries them, else ``loss.reward_chosen`` /
    ``loss.reward_rejected``."""

    name = loss_kind = "copg"
    variant = DataVariant.REWARD_PAIRS
    Options = CoPGOptions
    cached_reference = True

    def __call__(self, mses, batch=None):
        if batch is not None and batch.rewards_w is not None:
            rw, rl = batch.rewards_w.to(mses.model_w.device), batch.rewards_l.to(mses.model_w.device)
        else:
            rw, rl = self.options.reward_chosen, self.options.reward_rejected
        return diffusion_copg_loss(mses.model_w, mses.model_l, mses.ref_w, mses.ref_l, rw, rl, beta=self.beta)


@register
class InPO(DPO):
    """InPO: the DPO loss at ``x_t`` from DDIM / Euler inversion of the reference instead of
    forward noising (``loss.noising: ddim_inversion`` by default)."""

    name = "inpo"
    noising = "ddim_inversion"
    cached_reference = False


__all__ = [
    "CoPG", "CoPGOptions", "DCPO", "DPO", "DataVariant", "IPO", "IPOOptions", "InPO", "KTO", "KTOOptions", "LossOptions",
    "MaPO", "MaPOOptions", "NOISING_MODES", "OFFLINE_METHODS", "OfflineMethod", "PairMSEs", "SFT", "TPO", "TPOOptions", "TPOUnpaired",
    "offline_method", "register",
]
