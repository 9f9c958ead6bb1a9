"""Config of the offline pair trainer: ``method:`` any registered offline method
(:data:`diffalign.losses.methods.OFFLINE_METHODS`).

What differs between methods (default beta, reference, data variant, noising, cacheability) is
read from the method's class; this file holds only the keys. ``loss:`` inherits every method's
options dataclass, so its YAML keys stay flat (``loss.tau``, ``loss.snr_value``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BaseTrainConfig, check, option
from .ema_config import EMAOptions, validate_ema
from ..data.cache import CACHE_DTYPES
from ..data.variants import PERTURBATIONS, VariantDataOptions
from ..losses.methods import (
    DPO, NOISING_MODES, OFFLINE_METHODS, CoPGOptions, IPOOptions, KTOOptions, MaPOOptions, OfflineMethod, TPOOptions, offline_method,
)


@dataclass
class PairLossOptions(MaPOOptions, KTOOptions, IPOOptions, TPOOptions, CoPGOptions):
    """``loss:`` of the pair trainer: the keys every method shares, plus (inherited) each
    method's own options. A method reads only its ``Options`` fields. The bases define disjoint
    keys (``tests/test_config_help.py`` checks it), so their order sets no precedence."""

    beta: float | None = option(None, help="None: the method's default_beta (dpo-like 5000, mapo 0.1)")
    max_nonfinite_steps: int = option(5, help="abort after this many consecutive NaN/inf steps")
    noising: str | None = option(None, help="random | ddim_inversion; None: the method's own (ddim_inversion for inpo)")
    inversion_steps: int = option(4, help="DDIM/Euler inversion steps for noising=ddim_inversion")
    cached_reference: bool = option(False, help=(
        "Estimator variant, never the default (needs data_opts.cache_dir): one fixed (timestep, noise) "
        "per pair, and the reference's losses at it computed once into the cache; no reference forward "
        "while training, at the price of one noise draw per pair for the whole run."
    ))

    def validate(self) -> None:
        super().validate()  # every method's options (cooperative through the bases)
        check(self.noising is None or self.noising in NOISING_MODES, "loss.noising", f"must be one of {', '.join(NOISING_MODES)}")
        check(self.inversion_steps >= 1, "loss.inversion_steps", "must be >= 1")


@dataclass
class PairTrainConfig(BaseTrainConfig):
    """Config of ``method:`` one of the registered offline methods (dpo, mapo, sft, kto, dcpo,
    tpo, ipo, copg, inpo, ...)."""

    method: str = option(DPO.name, help=(

        "the offline method: dpo | mapo | sft | kto | dcpo | tpo | ipo | copg | inpo "

        "(diffalign.losses.methods.OFFLINE_METHODS)"

    ))
    data_opts: VariantDataOptions = option(factory=VariantDataOptions, help=(
        "how preference pairs are read, cropped, cached and varied"
    ))
    loss: PairLossOptions = option(factory=PairLossOptions, help=(
        "the method's loss options (shared keys plus each method's own)"
    ))
    ema: EMAOptions = option(factory=EMAOptions, help=(
        "EMA of the trained parameters; the saved weights are the EMA's (flow_grpo's convention, "
        ":mod:`.ema`)"
    ))

    @property
    def objective(self) -> type[OfflineMethod]:
        """The method class that runs (resolved with the ``loss`` options)."""
        return offline_method(self.method).resolve(self.loss)

    def build_objective(self, num_train_timesteps: int = 1000) -> OfflineMethod:
        """The callable loss: ``objective(mses, batch) -> (loss, metrics)``."""
        return self.objective(self.loss.beta, self.loss, num_train_timesteps)

    @property
    def beta(self) -> float:
        return self.loss.beta if self.loss.beta is not None else self.objective.default_beta

    @property
    def noising(self) -> str:
        return self.loss.noising if self.loss.noising is not None else self.objective.noising

    @property
    def loss_kind(self) -> str:
        """The pure loss that runs: dpo | mapo | sft | kto | ipo | copg."""
        return self.objective.loss_kind

    @property
    def needs_reference(self) -> bool:
        return self.objective.needs_reference or self.noising == "ddim_inversion"

    def validate(self) -> None:
        super().validate()
        check(self.method in OFFLINE_METHODS, "method", f"the pair trainer runs {', '.join(OFFLINE_METHODS)}")
        check(self.data is not None, "data", "is required (hub id, dataset dir or parquet)")
        method = self.objective
        check(self.loss.beta is None or self.loss.beta > 0 or not method.beta_required, "loss.beta", "must be > 0")
        self.loss.validate()
        validate_ema(self.ema)
        check(self.data_opts.caption_perturbation in PERTURBATIONS, "data_opts.caption_perturbation",
              f"must be one of {', '.join(PERTURBATIONS)}")
        check(0.0 <= self.data_opts.empty_prompt_prob <= 1.0, "data_opts.empty_prompt_prob", "must be in [0, 1]")
        check(self.data_opts.resolution >= 8, "data_opts.resolution", "must be >= 8")
        check(self.data_opts.cache_dtype in CACHE_DTYPES, "data_opts.cache_dtype", f"must be one of {', '.join(CACHE_DTYPES)}")
        if self.loss.cached_reference:
            check(bool(self.data_opts.cache_dir), "loss.cached_reference", "needs data_opts.cache_dir (the losses live in the cache)")
            check(self.data_opts.cache, "loss.cached_reference", "needs the latent cache (data_opts.cache=true)")
            supported = [m.name for m in OFFLINE_METHODS.values() if m.cached_reference]
            check(method.cached_reference, "loss.cached_reference", f"applies to {', '.join(supported)}")


__all__ = ["PairLossOptions", "PairTrainConfig"]
