"""Choosing GAM's radii with `Trainer.hyperparameter_search` (Optuna): a search space, a short budget, an objective."""

import math
from typing import Any, Callable, Optional, Sequence

from transformers import TrainingArguments

from .config import GAM_METHODS

# Ranges suited to AdamW fine-tuning (log-uniform): the released SGD radii (rho' 0.02, rho 0.2) sit inside them.
GRAD_RHO_RANGE = (1e-3, 1e-1)
GRAD_NORM_RHO_RANGE = (1e-2, 1.0)


def gam_hp_space_for(
    grad_rho: tuple[float, float] = GRAD_RHO_RANGE,
    grad_norm_rho: tuple[float, float] = GRAD_NORM_RHO_RANGE,
    method: str | Sequence[str] = "gam",
    extra: Optional[Callable[[Any], dict[str, Any]]] = None,
    fixed: Optional[dict[str, Any]] = None,
) -> Callable[[Any], dict[str, Any]]:
    """
    An Optuna search space for [`~transformers.Trainer.hyperparameter_search`] (`hp_space=`) over GAM's radii.

    rho' (`gam_grad_rho`) and rho (`gam_grad_norm_rho`) are two independent log-uniform axes, not a fixed ratio:
    their best ratio depends on the model and the optimizer. Each is sampled under its field's name, so
    `BestRun.hyperparameters` holds `gam_*` values that can be passed back to [`GAMConfig`].

    Args:
        grad_rho: `(low, high)` of rho', both > 0. Default 1e-3 to 1e-1 (AdamW fine-tuning).
        grad_norm_rho: `(low, high)` of rho, both > 0. Default 1e-2 to 1.
        method: a `gam_method` value applied to every trial (`"gam"`: both radii are sampled; `"sam"`: rho' only;
            `"none"`: no radius), or a sequence of them (`("gam", "sam")`), sampled as `gam_method` so that SAM and
            GAM share the trials and the budget; rho is then sampled only for the trials that run GAM.
        extra: `extra(trial)` returns further hyper-parameters to search (`learning_rate`, say), merged into each
            trial's values.
        fixed: values set for every trial but not searched, so they are absent from `BestRun.hyperparameters`;
            [`short_budget`] gives the training length of a short trial.

    Returns:
        `hp_space(trial) -> dict` of `TrainingArguments`/`GAMConfig` field names and values.
    """
    grad_rho = _check_range("grad_rho", grad_rho)
    grad_norm_rho = _check_range("grad_norm_rho", grad_norm_rho)
    methods = (method,) if isinstance(method, str) else tuple(method)
    if not methods or any(m not in GAM_METHODS for m in methods):
        raise ValueError(f"`method` must be one of {', '.join(repr(m) for m in GAM_METHODS)} or a sequence of them; "
                         f"got {method!r}.")
    fixed = dict(fixed or {})

    def hp_space(trial) -> dict[str, Any]:
        if isinstance(method, str):
            chosen = method
        else:
            chosen = trial.suggest_categorical("gam_method", list(methods))
        params: dict[str, Any] = {**fixed, "gam_method": chosen}
        if chosen in ("gam", "sam"):
            params["gam_grad_rho"] = trial.suggest_float("gam_grad_rho", *grad_rho, log=True)
        if chosen == "gam":
            params["gam_grad_norm_rho"] = trial.suggest_float("gam_grad_norm_rho", *grad_norm_rho, log=True)
        if extra is not None:
            params.update(extra(trial))
        return params

    return hp_space


def gam_hp_space(trial) -> dict[str, Any]:
    """The default search space (`hp_space=hf_gam.gam_hp_space`): GAM with rho' log-uniform in [1e-3, 1e-1] and rho
    log-uniform in [1e-2, 1], each trial at the full training length of its arguments. See [`gam_hp_space_for`]."""
    return gam_hp_space_for()(trial)


def short_budget(args: TrainingArguments, fraction: float) -> dict[str, Any]:
    """
    The training length of a trial that runs `fraction` of the run `args` describes, for `gam_hp_space_for(fixed=...)`.

    With `max_steps > 0`: `max_steps` times `fraction` (at least 1). Otherwise `num_train_epochs` times `fraction`
    (the Trainer rounds the steps of a fractional epoch count up; an integer `args.num_train_epochs` is made a float
    of the same value, since the Trainer would cast a trial's epoch count to an integer: call this on the arguments
    the trainer is built with, before building it). An absolute `warmup_steps` (>= 1) shrinks by the
    same fraction, so that a trial's learning-rate schedule (and `gam_rho_schedule`, `gam_start`) is the full run's,
    compressed; a warm-up ratio (`warmup_steps` < 1) needs no change.

    Cost: a search of `n_trials` trials trains `n_trials * fraction` times the steps of one full run (plus one
    evaluation per trial, or the evaluations `eval_strategy` asks for). The radii are then chosen for a short run:
    confirm the best ones with a full run.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1]; got {fraction!r}.")
    if args.max_steps > 0:
        budget: dict[str, Any] = {"max_steps": max(1, math.floor(args.max_steps * fraction + 0.5))}
    else:
        # The Trainer casts a trial's value to the type of the current one: an integer epoch count would truncate
        # 1.5 epochs to 1 and 0.5 to 0. The field is declared a float; the value stays the same.
        args.num_train_epochs = float(args.num_train_epochs)
        budget = {"num_train_epochs": args.num_train_epochs * fraction}
    if args.warmup_steps >= 1:
        budget["warmup_steps"] = math.floor(args.warmup_steps * fraction + 0.5)
    return budget


def metric_objective(name: str) -> Callable[[dict[str, float]], float]:
    """
    A `compute_objective` for [`~transformers.Trainer.hyperparameter_search`] that returns one evaluation metric:
    `metric_objective("accuracy")` with `compute_metrics` returning `{"accuracy": ...}` and `direction="maximize"`.

    The Trainer's default objective is the evaluation loss when there are no other metrics, and otherwise the *sum*
    of all of them (accuracy + F1, or anything a callback adds to the metrics), which is rarely the intended target.
    `name` may omit the `eval_` prefix. A missing metric raises a `KeyError` that lists the ones there are.
    """
    key = name if name.startswith("eval_") else f"eval_{name}"

    def compute_objective(metrics: dict[str, float]) -> float:
        if key not in metrics:
            raise KeyError(f"metric_objective: no {key!r} among the evaluation metrics {sorted(metrics)}; return it "
                           "from `compute_metrics`.")
        return float(metrics[key])

    return compute_objective


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(b) for b in bounds)
    if not 0.0 < low <= high:
        raise ValueError(f"`{name}` must be (low, high) with 0 < low <= high (a log-uniform range); got {bounds!r}.")
    return low, high
