"""Rollouts for online RL: step kinds (:mod:`.steps`), schedules (:mod:`.schedules`), engine (:mod:`.rollout`)."""

from .rollout import DeterministicStep, GuidedModel, Rollout, cat_rollouts, rollout, sample
from .schedules import (
    SIGMA_SCHEDULES, RolloutPlan, SamplingTable, full_plan, ode_plan, post_window_compressed, post_window_points,
    sampling_table, time_shift_table, tree_plan, window_plan, window_start, window_stop,
)
from .steps import (
    ODE_SOLVERS, PARAMETRIZATIONS, STEP_KINDS, CPSStep, DanceSDEStep, DDIMStep, DPMSolver2M, EulerODE, FlowSDEStep,
    HeunODE, ODESolver, StepCoeffs, StepKind, make_ode_solver, make_step_kind, split_prediction,
)

__all__ = [
    "CPSStep", "DDIMStep", "DPMSolver2M", "DeterministicStep", "DanceSDEStep", "EulerODE", "FlowSDEStep", "GuidedModel",
    "HeunODE", "ODESolver", "ODE_SOLVERS", "PARAMETRIZATIONS", "Rollout", "RolloutPlan", "SIGMA_SCHEDULES", "STEP_KINDS",
    "SamplingTable", "StepCoeffs", "StepKind", "cat_rollouts", "full_plan", "make_ode_solver", "make_step_kind",
    "ode_plan", "post_window_compressed", "post_window_points", "rollout", "sample", "sampling_table", "split_prediction",
    "time_shift_table", "tree_plan", "window_plan", "window_start", "window_stop",
]
