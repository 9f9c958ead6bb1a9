"""Config of the online GRPO trainer (``method: grpo``): every key, its default and its meaning.

One dataclass per YAML block (``sampler``, ``schedule``, ``advantage``, ``loss``, ``rewards``,
``eval``); :class:`GRPOConfig` adds the rollout/update sizes to the keys every trainer shares
(:class:`diffalign.config.BaseTrainConfig`). :meth:`GRPOConfig.validate` rejects impossible
combinations with a :class:`~diffalign.config.ConfigError` naming the key (CLI exit code 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import BaseTrainConfig, check, option
from ..losses.grpo import KL_FORMS, LOG_PROB_FORMS, REDUCTIONS
from ..pipelines import ODE_SOLVERS, SIGMA_SCHEDULES, STEP_KINDS
from .advantages import MULTI_REWARD_MODES, STD_MODES, TREE_MODES
from .ema_config import EMAOptions, validate_ema

SCHEDULE_KINDS = ("full", "window", "tree")
WINDOW_MODES = ("slide", "random")
SWEEP_ENDS = ("truncate", "wrap")
WIDTH_PRUNING = ("none", "per_branch", "best_worst")
STEP_WEIGHTINGS = ("none", "noise", "inverse_dt")
TIMESTEP_ROUNDINGS = ("round", "floor")
REWARD_ON = ("final", "x0_last")
PROMPT_SAMPLINGS = ("random", "distinct", "epoch")


@dataclass
class SamplerOptions:
    """How rollouts and evaluation images are sampled."""

    num_steps: int = option(10, help="denoising steps of training rollouts")
    eval_num_steps: int = option(40, help="denoising steps of evaluation sampling (ODE); usually more than num_steps")
    guidance_scale: float = option(4.5, help="classifier-free guidance scale (<= 1: no guidance)")
    cfg: bool = option(True, help="false: train and sample without classifier-free guidance (no uncond forward)")
    step: str = option("auto", help=(
        "stochastic step: auto (flow_sde for flow models, ddim for UNets) | ddim | flow_sde | cps | dance"
    ))
    noise_level: float | None = option(None, help=(
        "eta (ddim, cps, dance) or a (flow_sde); None: the kind's paper default"
    ))
    ode_solver: str = option("euler", help=(
        "deterministic steps (outside the window, between branches, eval): euler | heun | dpm2m"
    ))
    pre_window_solver: str | None = option(None, help=(
        "the deterministic steps before a rollout's first stochastic step (before MixGRPO's window): null "
        "(ode_solver) | euler | heun | dpm2m. MixGRPO-Flash (Tencent-Hunyuan/MixGRPO "
        "fastvideo/utils/sampling_utils.py run_sample_step, dpm_apply_strategy post) takes Euler steps "
        "before the window and DPM-Solver++(2M) only after it: euler"
    ))
    resolution: int = option(512, help="image side in pixels (a multiple of 8)")
    shared_noise: bool = option(False, help="one initial noise per prompt group (DanceGRPO; TempFlow's seed groups)")
    logprob_reduction: str = option("mean", help="mean | sum over latent elements (rollout, loss and KL alike)")
    cps_logprob: str = option("gaussian", help=(
        "the log-prob of step: cps: gaussian (the exact Gaussian density) | flow_grpo (flow_grpo's CPS "
        "convention -(x - mean)^2, no 1/(2 std^2) and no normaliser: its clip range 1e-5 assumes it)"
    ))
    sigma_schedule: str = option("scheduler", help=(
        "training rollouts' sigma table (flow models): scheduler (the checkpoint scheduler's shifted "
        "table, the pipeline's default sampler; flow_grpo) | time_shift (DanceGRPO, MixGRPO, BranchGRPO: "
        "shift * u / (1 + (shift - 1) u) on u = linspace(1, 0, num_steps + 1)). Evaluation keeps the "
        "scheduler's"
    ))
    shift: float = option(3.0, help="sigma_schedule: time_shift: the shift (DanceGRPO, MixGRPO, BranchGRPO: 3)")


@dataclass
class WindowOptions:
    """MixGRPO / Flow-GRPO-Fast: ``size`` stochastic steps, the rest ODE."""

    size: int = option(4, help="stochastic steps in the window")
    start: int = option(0, help="first window position")
    shift: int = option(1, help="steps the window moves ...")
    interval: int = option(25, help="... every this many training steps")
    end: int | None = option(None, help=(
        "last window start; then it wraps to start. Default: num_steps - 3 with sweep_end=truncate "
        "(MixGRPO's max_timesteps = sampling_steps - 2, exclusive), num_steps - size with wrap"
    ))
    mode: str = option("slide", help="slide | random (uniform in [start, end] each training step)")
    sweep_end: str = option("truncate", help=(
        "slide near the end of a sweep: truncate (MixGRPO, zqqqqz2000/MixGRPO "
        "fastvideo/utils/grpo_states.py: the window is steps [p, min(p + size, end + 1)), shrinking at "
        "the end, so the last two steps are never stochastic) | wrap (every window has `size` steps; the "
        "last start is num_steps - size, which trains the last step; diffalign's convention before issue "
        "14)"
    ))
    post_window_ratio: float | None = option(None, help=(
        "MixGRPO-Flash (Tencent-Hunyuan/MixGRPO fastvideo/utils/sampling_utils.py run_sample_step with "
        "--dpm_post_compress_ratio 0.4, --dpm_algorithm_type dpmsolver++, --dpm_apply_strategy post): "
        "after the window's last step L come int(max((N - L) * ratio, 1)) sigma points (N steps), "
        "sigma_{L+1} first: with sigma_schedule time_shift the release's points (shift applied to "
        "linspace(u_{L+1}, 0, points) in unshifted time), otherwise the table's grid subsampled evenly; "
        "the DPM-Solver++(2M) history (x0 of step L) is carried across the window into them. null: off. "
        "Needs ode_solver: dpm2m"
    ))
    post_window_to_zero: bool = option(True, help=(
        "true: at least one ODE step after the window, so every rollout ends at sigma 0. false (the "
        "release, Tencent-Hunyuan/MixGRPO sampling_utils.py): with fewer than 2 points (late windows, "
        "e.g. L >= 21 of 25 at ratio 0.4) no step follows the window and the rollout ends, and is scored, "
        "at sigma_{L+1} > 0"
    ))


@dataclass
class TreeOptions:
    """BranchGRPO / TempFlow-GRPO: rows split ``branch_factor`` ways before each branch step."""

    branch_steps: list[int] = option(factory=lambda: [0, 2], help="the steps before which every row branches")
    branch_factor: int = option(2, help="children per branch")
    sde_between: bool = option(True, help="false: only the branch steps are stochastic (TempFlow-GRPO)")
    split_noise_scale: float = option(1.0, help=(
        "children of a branch step are mean + std * split_noise_scale * z (the log-prob keeps the step's "
        "own std); BranchGRPO (Fredreic1849/BranchGRPO, finetune_flux_branchgrpo_8gpus.sh "
        "--tree_split_noise_scale) uses 4.0"
    ))
    width_pruning: str = option("none", help=(
        "width pruning of the trained transitions after the last branch step (BranchGRPO "
        "--width_pruning_mode, off by default there): none | per_branch (mode 1: per last-branch node, "
        "the best width_pruning_ratio of its transitions by advantage) | best_worst (mode 2: of all of "
        "them, the best and the worst width_pruning_ratio/2)"
    ))
    width_pruning_ratio: float = option(0.5, help=(
        "fraction kept by width pruning (BranchGRPO --width_pruning_ratio 0.5)"
    ))
    depth_pruning_steps: list[int] = option(factory=list, help=(
        "depth pruning: transitions at these step indices are not trained (rollouts unchanged). "
        'BranchGRPO --depth_pruning counts tree depth = step + 1 ("15,16,17,18" of 20 steps = steps '
        "14..17); empty there by default"
    ))
    depth_pruning_slide_interval: int = option(0, help=(
        "sliding depth pruning (BranchGRPO --depth_pruning_slide, --depth_pruning_slide_interval 30): the "
        "pruned steps move one step earlier every this many training steps; 0: fixed"
    ))
    depth_pruning_stop_step: int = option(0, help=(
        "... until the earliest pruned step is this one (BranchGRPO --depth_pruning_stop_depth 9 = step "
        "8)"
    ))
    pruning_fraction: float = option(1.0, help=(
        "prune (width and depth) only during the first pruning_fraction of max_steps (BranchGRPO "
        "--pruning_step_ratio 1.0)"
    ))


@dataclass
class ScheduleOptions:
    """Which steps of a rollout are stochastic (and trained on)."""

    kind: str = option("full", help="full (every step) | window (MixGRPO) | tree (BranchGRPO / TempFlow-GRPO)")
    timestep_fraction: float = option(1.0, help=(
        "train on a fraction of each row's stochastic steps (DanceGRPO 0.6, flow_grpo 0.99; MixGRPO's "
        '"part" windows and BranchGRPO\'s trees train every one: 1.0, whatever their scripts\' '
        "--timestep_fraction)"
    ))
    timestep_selection: str = option("random", help=(
        "which steps that fraction keeps: random (DanceGRPO: a random subset per row, round(N * f)) | "
        "first (flow_grpo's train_sd3.py: the first int(N * f) steps of the trajectory, in sampling "
        "order; with f < 1 that never includes the last step)"
    ))
    exclude_last_step: bool = option(False, help=(
        "never train the last sampling step (sigma_next = 0); the fraction applies to the other steps of "
        "each row. DanceGRPO: true with random and floor (a random int((N - 1) * f) of steps 0..N-2)"
    ))
    timestep_rounding: str | None = option(None, help=(
        "how many of a row's n candidate steps the fraction keeps: round (n * f rounded) | floor (int(n * "
        "f): flow_grpo and DanceGRPO); null: round for random, floor for first. At least one"
    ))
    window: WindowOptions = option(factory=WindowOptions, help="kind: window")
    tree: TreeOptions = option(factory=TreeOptions, help="kind: tree")


@dataclass
class AdvantageOptions:
    """How rewards become advantages (:mod:`diffalign.trainers.advantages`)."""

    std: str = option("group", help="normalise by the std of: group | global | none")
    eps: float = option(1e-4, help="added to the std (flow_grpo 1e-4; DanceGRPO, MixGRPO, BranchGRPO 1e-8)")
    std_ddof: int = option(0, help=(
        "std divisor n - ddof: 0 population std (flow_grpo's np.std) | 1 unbiased (torch.std: DanceGRPO, "
        "MixGRPO, BranchGRPO; sqrt(n / (n - 1)) larger)"
    ))
    drop_zero_advantage: bool = option(False, help=(
        "train only on transitions whose advantage is nonzero (flow_grpo drops samples whose advantages "
        "are all zero, e.g. groups with equal rewards, before the update)"
    ))
    clip: float | None = option(5.0, help="clamp |A| (Flow-GRPO's adv_clip_max); null: no clamp")
    multi_reward: str = option("weighted_sum", help="several rewards: weighted_sum | sum_of_advantages (DanceGRPO)")
    tree: str = option("depth", help="tree rollouts: depth (node values normalised per depth) | leaf")


@dataclass
class GRPOLossOptions:
    """The clipped GRPO objective (:func:`diffalign.losses.grpo_clip_loss`)."""

    clip_range: float = option(1e-4, help="PPO clip of the importance ratio")
    kl_beta: float = option(0.0, help="weight of the closed-form KL to the reference (LoRA disabled)")
    kl_form: str = option("gaussian", help=(
        "the KL's divisor (diffalign.losses.grpo.gaussian_kl_same_std): gaussian (the step's true std; "
        "exact KL) | flow_grpo (flow_grpo's train_sd3.py: the diffusion coefficient without sqrt(ds), so "
        "1/ds smaller per SDE step: a kl_beta from the Flow-GRPO paper means this form)"
    ))
    ratio_norm: bool = option(False, help="GRPO-Guard's RatioNorm of the log-ratio")
    step_weighting: str = option("none", help="none | noise (TempFlow: ~ step std) | inverse_dt (GRPO-Guard: ~ 1/ds)")
    max_nonfinite_steps: int = option(5, help="abort after this many consecutive steps with a NaN/inf update")
    recompute_old_logprob: bool = option(False, help=(
        "recompute the old log-probs (and step means) before each step's update: the trained model's "
        "training forward under no_grad, in exactly the micro-batches of the first pass (verl's "
        "old_log_prob), instead of the values recorded by the rollout. Under bf16 the rollout forward "
        "(batch_size rows, x2 with CFG) and the training forward (train_batch_size rows) can take "
        "different kernels, so the same sample's log-prob differs between them and the first, on-policy "
        "ratio is not 1 (logprob_mismatch > 0); a 1e-4 clip_range (flow_grpo's, set for an fp32 "
        "transformer) then clips on-policy rows. On: the first update's ratio is exactly 1 "
        "(first_update_max_log_ratio = 0); costs one no-grad forward per trained transition. Off: the "
        "recorded values (fp32 runs are unchanged)"
    ))


@dataclass
class RewardSpec:
    """One reward of the (weighted) reward mix."""

    name: str = option("pickscore", help=(
        "any diffalign.rewards name (NAME or NAME=PATH) or a simple reward (redness, ...)"
    ))
    weight: float = option(1.0, help="weight in the combined reward (or its advantage)")
    args: dict[str, Any] = option(factory=dict, help="kwargs of the reward factory")


@dataclass
class EvalOptions:
    """ODE-sampled evaluation on fixed noise."""

    every: int = option(0, help="evaluate every this many steps (0: only after the last step; -1: never)")
    num_prompts: int = option(8, help="the first prompts of the prompt list")
    seed: int = option(1234, help="seed of the fixed evaluation noise")
    batch_size: int = option(64, help=(
        "prompts sampled, decoded and scored together per process (the eval prompts are split over the "
        "processes first): bounds evaluation memory (2048 images decoded at once do not fit a GPU); the "
        "per-prompt results do not depend on it, up to kernel numerics"
    ))
    data: str | None = option(None, help=(
        "prompt file (.txt/.json/.jsonl/.csv) to evaluate on; null: the training prompts"
    ))
    rewards: list[RewardSpec] = option(factory=list, help=(
        "rewards watched at evaluation besides the training ones (a reward-hacking guard, e.g. train on "
        "pickscore, watch hpsv2 and aesthetic): logged as eval_reward/NAME, plotted in reward_curve.png"
    ))
    at_start: bool = option(False, help=(
        "also evaluate the starting weights, before the first update (logged as step 0): the origin of "
        "reward-against-time curves (testbed-compare's efficiency race)"
    ))
    keep_best: str | None = option(None, help=(
        "save the weights of the evaluation with the highest eval_reward/NAME (a training or eval.rewards "
        "reward name, or eval_reward_mean) to output_dir/best (LoRA only): a checkpoint chosen on the "
        "eval prompts, e.g. where a learned reward is over-optimised; null: keep the final weights only"
    ))


@dataclass
class GRPOConfig(BaseTrainConfig):
    """Config of ``method: grpo``. ``data``: a prompt file (:mod:`diffalign.data.prompts`: ``.txt``
    one prompt a line, or ``.jsonl``/``.json``/``.csv`` rows whose other fields are metadata for
    rewards); null uses a built-in list. ``batch_size``: images per rollout batch per process (a
    multiple of ``group_size``). ``max_steps``: rollout+train steps."""

    method: str = option("grpo", help="the trainer (always grpo here)")
    # the methods this config class runs (subclasses add theirs)
    METHODS = ("grpo",)
    batch_size: int = option(8, help="images per rollout batch per process (whole groups)")
    group_size: int = option(8, help="samples per prompt; advantages are relative within a group")
    prompts_per_step: int = option(4, help="prompts per training step, per process")
    inner_epochs: int = option(1, help="passes over the recorded transitions per step")
    updates_per_epoch: int = option(1, help="optimizer updates per pass over the transitions")
    train_batch_size: int | None = option(None, help="transitions per training forward (null: batch_size)")
    reward_threads: int = option(1, help="score rewards on this many threads, overlapping the next rollout (0: inline)")
    reward_on: str = option("final", help=(
        "what is decoded and scored: final (the rollout's final latent) | x0_last (the model's "
        "x0-prediction at the last step: DanceGRPO, BranchGRPO)"
    ))
    prompt_sampling: str = option("random", help=(
        "the step's prompts: random (independent draws, with replacement) | distinct (flow_grpo's "
        "DistributedKRepeatSampler: a fresh permutation each step, distinct prompts over all processes) | "
        "epoch (DanceGRPO's DistributedSampler: walk through a shuffled prompt list, reshuffled each "
        "epoch)"
    ))
    sampler: SamplerOptions = option(factory=SamplerOptions, help="how rollouts and evaluation images are sampled")
    schedule: ScheduleOptions = option(factory=ScheduleOptions, help=(
        "which steps of a rollout are stochastic and trained on (full, window, tree)"
    ))
    advantage: AdvantageOptions = option(factory=AdvantageOptions, help=(
        "how rewards become advantages (grouping, normalisation, clipping)"
    ))
    loss: GRPOLossOptions = option(factory=GRPOLossOptions, help="the clipped policy-gradient loss and its KL term")
    rewards: list[RewardSpec] = option(factory=lambda: [RewardSpec()], help="the rewards, combined by weight")
    eval: EvalOptions = option(factory=EvalOptions, help="periodic evaluation on held-out prompts")
    ema: EMAOptions = option(factory=EMAOptions, help="EMA of the trained parameters")

    @property
    def needs_reference(self) -> bool:
        return self.loss.kl_beta > 0

    def validate(self) -> None:
        super().validate()
        _validate_sizes(self)
        _validate_sampler(self.sampler)
        _validate_schedule(self)
        _validate_advantage_and_loss(self.advantage, self.loss)
        check(not (self.loss.ratio_norm and self.sampler.cps_logprob == "flow_grpo"), "loss.ratio_norm",
              "RatioNorm's bias term assumes the Gaussian log-prob: use sampler.cps_logprob=gaussian with it")
        _validate_rewards_and_eval(self)
        validate_ema(self.ema)


def _validate_sizes(c: GRPOConfig) -> None:
    check(c.method in c.METHODS, "method", f"this trainer runs method: {' or '.join(c.METHODS)}")
    check(c.group_size >= 2, "group_size", "must be >= 2 (advantages are relative within a group)")
    check(c.batch_size % c.group_size == 0, "batch_size",
           f"must be divisible by group_size={c.group_size} (images per rollout batch, whole groups)")
    check(c.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    check((c.prompts_per_step * c.group_size) % c.batch_size == 0, "prompts_per_step",
           f"prompts_per_step * group_size ({c.prompts_per_step * c.group_size}) must be a multiple of batch_size={c.batch_size}")
    check(c.inner_epochs >= 1, "inner_epochs", "must be >= 1")
    check(c.updates_per_epoch >= 1, "updates_per_epoch", "must be >= 1")
    check(c.train_batch_size is None or c.train_batch_size >= 1, "train_batch_size", "must be >= 1")
    check(c.gradient_accumulation_steps == 1, "gradient_accumulation_steps",
           "must be 1 for grpo: use updates_per_epoch and train_batch_size")
    check(c.reward_threads >= 0, "reward_threads", "must be >= 0")


def _validate_sampler(s: SamplerOptions) -> None:
    check(s.num_steps >= 1, "sampler.num_steps", "must be >= 1")
    check(s.eval_num_steps >= 1, "sampler.eval_num_steps", "must be >= 1")
    check(s.guidance_scale >= 0, "sampler.guidance_scale", "must be >= 0")
    check(s.step == "auto" or s.step in STEP_KINDS, "sampler.step", f"must be auto or one of {', '.join(STEP_KINDS)}")
    check(s.noise_level is None or s.noise_level >= 0, "sampler.noise_level", "must be >= 0")
    check(s.noise_level is None or s.step not in ("cps",) or s.noise_level <= 1, "sampler.noise_level", "cps needs eta in [0, 1]")
    check(s.ode_solver in ODE_SOLVERS, "sampler.ode_solver", f"must be one of {', '.join(ODE_SOLVERS)}")
    check(s.pre_window_solver is None or s.pre_window_solver in ODE_SOLVERS, "sampler.pre_window_solver",
          f"must be null or one of {', '.join(ODE_SOLVERS)}")
    check(s.resolution >= 8 and s.resolution % 8 == 0, "sampler.resolution", "must be a positive multiple of 8")
    check(s.logprob_reduction in REDUCTIONS, "sampler.logprob_reduction", "must be mean or sum")
    check(s.cps_logprob in LOG_PROB_FORMS, "sampler.cps_logprob", f"must be one of {', '.join(LOG_PROB_FORMS)}")
    check(s.cps_logprob == "gaussian" or s.step == "cps", "sampler.cps_logprob",
          "flow_grpo is flow_grpo's convention for sampler.step=cps only")
    check(s.sigma_schedule in SIGMA_SCHEDULES, "sampler.sigma_schedule", f"must be one of {', '.join(SIGMA_SCHEDULES)}")
    check(s.shift > 0, "sampler.shift", "must be > 0")


def _validate_schedule(c: GRPOConfig) -> None:
    sch, n = c.schedule, c.sampler.num_steps
    check(sch.kind in SCHEDULE_KINDS, "schedule.kind", "must be full, window or tree")
    check(0 < sch.timestep_fraction <= 1, "schedule.timestep_fraction", "must be in (0, 1]")
    check(sch.timestep_selection in ("random", "first"), "schedule.timestep_selection", "must be random or first")
    check(sch.timestep_rounding is None or sch.timestep_rounding in TIMESTEP_ROUNDINGS, "schedule.timestep_rounding",
          "must be round, floor or null")
    # the enum-like keys of the window and the tree are checked whatever the kind: a typo in a
    # block the run does not use is still a typo (and would surface when the kind is switched)
    check(sch.window.sweep_end in SWEEP_ENDS, "schedule.window.sweep_end", "must be truncate or wrap")
    check(sch.window.mode in WINDOW_MODES, "schedule.window.mode", "must be slide or random")
    check(sch.tree.width_pruning in WIDTH_PRUNING, "schedule.tree.width_pruning", f"must be one of {', '.join(WIDTH_PRUNING)}")
    if sch.kind == "window":
        w = sch.window
        check(1 <= w.size <= n, "schedule.window.size",
               f"must be in [1, sampler.num_steps={n}] (window larger than the number of steps)")
        check(0 <= w.start <= n - w.size, "schedule.window.start",
               f"window [{w.start}, {w.start + w.size}) does not fit in sampler.num_steps={n}")
        last = n - w.size if w.sweep_end == "wrap" or w.mode == "random" else n - 1
        check(w.end is None or w.start <= w.end <= last, "schedule.window.end", f"must be in [window.start, {last}]")
        check(w.end is not None or w.sweep_end == "wrap" or w.mode == "random" or w.start <= n - 3, "schedule.window.start",
               f"sweep_end=truncate ends at step {n - 3} (num_steps - 3): start must not be later, or set window.end")
        check(w.post_window_ratio is None or 0 < w.post_window_ratio <= 1, "schedule.window.post_window_ratio",
               "must be in (0, 1] or null")
        check(w.post_window_ratio is None or c.sampler.ode_solver == "dpm2m", "sampler.ode_solver",
               "schedule.window.post_window_ratio (MixGRPO-Flash) carries DPM-Solver++(2M) history: use dpm2m")
        check(w.shift >= 0, "schedule.window.shift", "must be >= 0")
        check(w.interval >= 1, "schedule.window.interval", "must be >= 1")
    if sch.kind == "tree":
        t = sch.tree
        check(len(t.branch_steps) >= 1, "schedule.tree.branch_steps", "must list at least one step")
        check(len(set(t.branch_steps)) == len(t.branch_steps), "schedule.tree.branch_steps", "must not repeat a step")
        check(all(0 <= b < n for b in t.branch_steps), "schedule.tree.branch_steps",
               f"every branch step must be in [0, sampler.num_steps={n})")
        check(t.branch_factor >= 2, "schedule.tree.branch_factor", "must be >= 2")
        check(t.split_noise_scale > 0, "schedule.tree.split_noise_scale", "must be > 0")
        check(0 < t.width_pruning_ratio <= 1, "schedule.tree.width_pruning_ratio", "must be in (0, 1]")
        check(all(0 <= d < n for d in t.depth_pruning_steps), "schedule.tree.depth_pruning_steps",
               f"every step must be in [0, sampler.num_steps={n})")
        check(t.depth_pruning_slide_interval >= 0, "schedule.tree.depth_pruning_slide_interval", "must be >= 0")
        check(0 <= t.depth_pruning_stop_step < n, "schedule.tree.depth_pruning_stop_step", f"must be in [0, {n})")
        check(0 <= t.pruning_fraction <= 1, "schedule.tree.pruning_fraction", "must be in [0, 1]")
        leaves = t.branch_factor ** len(t.branch_steps)
        check(c.group_size % leaves == 0, "group_size",
               f"must be a multiple of branch_factor ** len(branch_steps) = {leaves} (leaves per tree)")


def _validate_advantage_and_loss(a: AdvantageOptions, lo: GRPOLossOptions) -> None:
    check(a.std in STD_MODES, "advantage.std", f"must be one of {', '.join(STD_MODES)}")
    check(a.eps >= 0, "advantage.eps", "must be >= 0")
    check(a.clip is None or a.clip > 0, "advantage.clip", "must be > 0 or null")
    check(a.multi_reward in MULTI_REWARD_MODES, "advantage.multi_reward", f"must be one of {', '.join(MULTI_REWARD_MODES)}")
    check(a.tree in TREE_MODES, "advantage.tree", f"must be one of {', '.join(TREE_MODES)}")
    check(a.std_ddof in (0, 1), "advantage.std_ddof", "must be 0 (population std) or 1 (unbiased)")
    check(lo.kl_form in KL_FORMS, "loss.kl_form", f"must be one of {', '.join(KL_FORMS)}")
    check(lo.clip_range > 0, "loss.clip_range", "must be > 0")
    check(lo.kl_beta >= 0, "loss.kl_beta", "must be >= 0")
    check(lo.step_weighting in STEP_WEIGHTINGS, "loss.step_weighting", "must be none, noise or inverse_dt")


def _validate_rewards_and_eval(c: GRPOConfig) -> None:
    check(len(c.rewards) >= 1, "rewards", "must list at least one reward ({name, weight})")
    for i, r in enumerate(c.rewards):
        check(bool(r.name), f"rewards[{i}].name", "must be a reward name")
        check(math.isfinite(r.weight), f"rewards[{i}].weight", "must be a finite number")
    check(len({r.name for r in c.rewards}) == len(c.rewards), "rewards", "names must be unique")
    for i, r in enumerate(c.eval.rewards):
        check(bool(r.name), f"eval.rewards[{i}].name", "must be a reward name")
    check(len({r.name for r in c.eval.rewards}) == len(c.eval.rewards), "eval.rewards", "names must be unique")
    check(c.reward_on in REWARD_ON, "reward_on", f"must be one of {', '.join(REWARD_ON)}")
    check(c.prompt_sampling in PROMPT_SAMPLINGS, "prompt_sampling", f"must be one of {', '.join(PROMPT_SAMPLINGS)}")
    check(c.eval.every >= -1, "eval.every", "must be >= -1")
    check(c.eval.num_prompts >= 0, "eval.num_prompts", "must be >= 0")
    check(c.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    check(c.eval.keep_best is None or c.lora.rank > 0, "eval.keep_best", "keeps LoRA weights: needs lora.rank > 0")
    check(c.eval.keep_best is None or (c.eval.every >= 0 and c.eval.num_prompts > 0), "eval.keep_best",
          "needs evaluations (eval.every >= 0 and eval.num_prompts > 0)")
    names = {r.name for r in c.rewards} | {r.name for r in c.eval.rewards} | {"eval_reward_mean"}
    check(c.eval.keep_best is None or c.eval.keep_best in names, "eval.keep_best",
          f"{c.eval.keep_best!r} is not a reward of this run (one of {', '.join(sorted(names))})")

