"""`GAMConfig`: the Trainer's arguments plus GAM's hyper-parameters."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

GAM_METHODS = ("gam", "sam", "none")
GAM_FORMULAS = ("released", "paper")
GAM_SYNC_MODES = ("local", "global")
GAM_RHO_SCHEDULES = ("constant", "lr", "linear")
GAM_PERTURBATIONS = ("gradient", "momentum")


@dataclass
class GAMConfig(TrainingArguments):
    """
    [`~transformers.TrainingArguments`] with the hyper-parameters of Gradient norm Aware Minimization
    (Zhang et al., CVPR 2023). Every field of `TrainingArguments` keeps its meaning; the `gam_*` fields
    below control the ascent passes that `GAMTrainer` runs before each optimizer step.

    The defaults are for fine-tuning a pretrained model, the regime GAM pays in: full GAM at every step with the
    released radii and weights (rho' = 0.02, rho = 0.2, alpha = 0.6, beta = 0.5, gamma = 0.03), constant. From
    scratch with AdamW those radii slow fitting down: use `PRETRAIN_GAM` there (GAM in the last quarter of the
    steps, radii ramping up); `FINETUNE_GAM` names the defaults' schedule. `CHEAP_GAM` is a cheaper fine-tuning
    setting; `RELEASED_GAM` pins the released values (for SGD runs like the authors'). docs/RESULTS.md measures
    each of them.
    """

    gam_method: str = field(
        default="gam",
        metadata={
            "help": "'gam': four forward/backward passes per micro-batch (GAM, Algorithm 2 of the paper). "
            "'sam': two passes, plain SAM with radius `gam_grad_rho`. 'none': the stock Trainer step.",
            "choices": list(GAM_METHODS),
        },
    )
    gam_grad_rho: float = field(
        default=0.02,
        metadata={"help": "rho': radius of the SAM-like step along g/||g|| and of the finite-difference steps."},
    )
    gam_grad_norm_rho: float = field(
        default=0.2,
        metadata={"help": "rho: radius of the ascent along the gradient-norm direction h0 = g1 - g0."},
    )
    gam_alpha: float = field(
        default=0.6,
        metadata={"help": "alpha in [0, 1]: h+ = alpha * g1 + (1 - alpha) * g3."},
    )
    gam_beta: float = field(
        default=0.5,
        metadata={
            "help": "beta in [0, 1]: h- = g0 + (1 - beta) * g2 ('released' formula) or "
            "beta * g0 + (1 - beta) * g2 ('paper' formula)."
        },
    )
    gam_gamma: float = field(
        default=0.03,
        metadata={"help": "gamma >= 0: weight of the part of h- orthogonal to h+ that is removed: d = h+ - gamma * h-_perp."},
    )
    gam_formula: str = field(
        default="released",
        metadata={
            "help": "Formula for h-: 'released' (g0 + (1 - beta) * g2, the one the released defaults were tuned with) "
            "or 'paper' (beta * g0 + (1 - beta) * g2, Algorithm 2 as printed).",
            "choices": list(GAM_FORMULAS),
        },
    )
    gam_adaptive: bool = field(
        default=False,
        metadata={"help": "Scale every perturbation by theta^2 as in ASAM: e = r * g * theta^2 / ||g * |theta|||."},
    )
    gam_eps: float = field(
        default=1e-12,
        metadata={"help": "xi: added to every norm in a denominator."},
    )
    gam_sync: str = field(
        default="local",
        metadata={
            "help": "Data parallel semantics. 'local': every rank perturbs with its own gradients and the final "
            "directions are averaged once per optimizer step (the released behaviour). 'global': the gradient of "
            "every pass is averaged across ranks, so a step equals single-process GAM on the global batch.",
            "choices": list(GAM_SYNC_MODES),
        },
    )
    gam_rho_schedule: str = field(
        default="constant",
        metadata={
            "help": "'constant' radii; 'lr': both radii scaled by the current learning rate over `learning_rate`; "
            "'linear': both radii grow linearly over the steps that run GAM, counted from `gam_start`: at optimizer "
            "step t (from 0) of a run of T steps whose GAM part starts at step s, the radii are their full values "
            "times min((t - s + 1) / (T - s), 1), so the first GAM step gets 1 / (T - s) of them and the last the "
            "full values (sharpness-aware steps help most late in training).",
            "choices": list(GAM_RHO_SCHEDULES),
        },
    )
    gam_interval: int = field(
        default=1,
        metadata={"help": "Run the GAM passes every `gam_interval` optimizer steps and a plain gradient in between."},
    )
    gam_start: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the optimizer steps, in [0, 1), run as plain gradient steps before GAM starts (GAM "
            "only in the late phase of training). 0 runs GAM from the first step."
        },
    )
    gam_reuse_interval: int = field(
        default=1,
        metadata={
            "help": "Run full GAM every `gam_reuse_interval` optimizer steps; in between, one pass: d = g + the GAM "
            "correction of the last full step (its part orthogonal to that step's gradient), rescaled by ||g|| over "
            "that step's gradient norm. 1 runs full GAM at every step."
        },
    )
    gam_batch_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of each micro-batch, in (0, 1], that GAM's passes run on: with f < 1 the four passes "
            "run on the first ceil(f * batch) examples and store their correction, then one pass on the whole "
            "micro-batch applies it (d = g + ||g|| * correction, as on a reuse step): 1 + 4f passes' worth of compute. "
            "1 runs GAM on the whole micro-batch."
        },
    )
    gam_interval_scale_rho: bool = field(
        default=False,
        metadata={
            "help": "With `gam_interval` k > 1: both radii times k on the steps that run GAM (Composer's SAM scales "
            "its radius with its interval). False keeps the radii as given."
        },
    )
    gam_reuse_orthogonal: bool = field(
        default=False,
        metadata={
            "help": "With `gam_reuse_interval` > 1: a reuse step adds only the part of the stored correction "
            "orthogonal to the current gradient g, d = g + ||g|| * (c - <c, g> / ||g||^2 * g), c the correction "
            "(LookSAM, Liu et al., CVPR 2022, reuses the part of SAM's gradient orthogonal to the gradient). False: "
            "d = g + ||g|| * c."
        },
    )
    gam_trigger_std: Optional[float] = field(
        default=None,
        metadata={
            "help": "k: run the full step only when the squared norm of the first pass's gradient, x = ||g||^2, "
            "exceeds its running mean by k running standard deviations (x > mu + k * sigma, moving averages of "
            "decay `gam_trigger_decay`, updated with x first; AE-SAM, Jiang et al., ICLR 2023); otherwise the step "
            "is the stock step with that pass's gradient (1 pass). None: the full step at every GAM step."
        },
    )
    gam_trigger_decay: float = field(
        default=0.9,
        metadata={"help": "delta in [0, 1): decay of the moving averages of `gam_trigger_std`."},
    )
    gam_perturbation: str = field(
        default="gradient",
        metadata={
            "help": "'gradient': SAM's ascent pass. 'momentum' (with `gam_method='sam'`): no ascent pass, the one "
            "pass runs at theta - rho' * m / ||m||, m the optimizer's momentum (AdamW's exp_avg, SGD's "
            "momentum_buffer), and its gradient is the update (Momentum-SAM, Becker et al., 2024): 1 pass per step.",
            "choices": list(GAM_PERTURBATIONS),
        },
    )
    gam_same_rng: bool = field(
        default=True,
        metadata={
            "help": "Give all passes of a micro-batch the same random state (same dropout masks), so the gradient "
            "differences measure curvature rather than mask noise."
        },
    )

    def __post_init__(self):
        validate_gam_fields(self)
        super().__post_init__()


def gam_config_class(base: type) -> type:
    """
    A dataclass with the fields of `base` (a [`~transformers.TrainingArguments`] subclass such as
    `Seq2SeqTrainingArguments` or TRL's `SFTConfig`) and the `gam_*` fields of [`GAMConfig`].

    `base`'s own defaults and `__post_init__` are kept (they come first in the method resolution order), then
    `GAMConfig.__post_init__` checks the `gam_*` values. Equivalent to `@dataclass class X(base, GAMConfig): pass`;
    the `@dataclass` is what declares the `gam_*` fields, and a subclass without it is refused when it is built.
    """
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"gam_config_class expects a subclass of TrainingArguments; got {base!r}.")
    if issubclass(GAMConfig, base):  # TrainingArguments itself
        return GAMConfig
    if issubclass(base, GAMConfig):
        check_gam_fields_declared(base)
        return base
    if base not in _COMBINED:
        namespace = {
            "__doc__": f"`{base.__name__}` with the `gam_*` fields of `GAMConfig` (built by `gam_config_class`).",
            "__module__": __name__,
            # Pickled (the Trainer saves `training_args.bin`) as its base class and its values: the class is rebuilt.
            "__reduce__": lambda self: (_rebuild, (base, dict(self.__dict__))),
        }
        _COMBINED[base] = dataclass(type(f"GAM{base.__name__}", (base, GAMConfig), namespace))
    return _COMBINED[base]


_COMBINED: dict[type, type] = {}


def _rebuild(base: type, values: dict) -> GAMConfig:
    """Unpickles an instance of `gam_config_class(base)` without running `__post_init__` again."""
    args = object.__new__(gam_config_class(base))
    args.__dict__.update(values)
    return args


def check_gam_fields_declared(cls: type) -> None:
    """Raise a `TypeError` when `cls` subclasses `GAMConfig` but its dataclass fields lack the `gam_*` ones.

    `class Args(SFTConfig, GAMConfig): pass` without `@dataclass` takes its fields (and `__init__`) from `SFTConfig`:
    `gam_*` keyword arguments are refused, `HfArgumentParser` drops `--gam_*` flags it can leave unparsed, `to_dict`
    omits them, and GAM would silently run with the class defaults.
    """
    declared = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(GAMConfig) if f.name.startswith("gam_") and f.name not in declared]
    if missing:
        raise TypeError(
            f"{cls.__name__} subclasses GAMConfig but does not declare its fields ({', '.join(missing)}): a subclass "
            "of several argument classes must be a dataclass. Decorate it with `@dataclass`, or build it with "
            f"`hf_gam.gam_config_class({cls.__bases__[0].__name__})`."
        )


RELEASED_GAM: dict = {
    "gam_grad_rho": 0.02,
    "gam_grad_norm_rho": 0.2,
    "gam_alpha": 0.6,
    "gam_beta": 0.5,
    "gam_gamma": 0.03,
    "gam_formula": "released",
    "gam_rho_schedule": "constant",
    "gam_start": 0.0,
}
"""The authors' released CIFAR-100 ResNet setting (SGD lr 0.1, momentum 0.9, 200 epochs): GAM at every step with
constant radii. Today's defaults have these values; this name pins them. `GAMConfig(..., optim="sgd",
**RELEASED_GAM)` for SGD runs like the authors'."""

FINETUNE_GAM: dict = {
    "gam_start": 0.0,
    "gam_rho_schedule": "constant",
}
"""For fine-tuning a pretrained model, the defaults' schedule: GAM at every step with constant radii. `GAMConfig()`
has these values already; naming them chooses the regime explicitly (the recipes do), whatever the defaults."""

PRETRAIN_GAM: dict = {
    "gam_start": 0.75,
    "gam_rho_schedule": "linear",
}
"""For training from scratch with AdamW: GAM only in the last quarter of the optimizer steps, with radii growing
linearly from 0 to the released values (1.75 passes per step over a run). At every step the released radii slow
AdamW's fitting down enough to lose accuracy from scratch; this setting does not. `GAMConfig(..., **PRETRAIN_GAM)`."""

CHEAP_GAM: dict = {
    "gam_reuse_interval": 3,
}
"""For fine-tuning at half the compute of full GAM: full GAM on every third step, and in between one pass that adds
the last full step's correction to the gradient (`gam_reuse_interval=3`): (4 + 1 + 1) / 3 = 2 passes per step,
the cost of SAM. In the fine-tuning benchmark it kept 85% of full GAM's accuracy gain over AdamW and more than all
of its gain after 90% pruning, the cheapest candidate that kept 80% of both (docs/RESULTS.md).
`GAMConfig(..., **CHEAP_GAM)`."""


def uses_finetuning_schedule(args) -> bool:
    """Whether `args` runs GAM (or SAM) on the schedule for fine-tuning, `FINETUNE_GAM`'s: from the first step, with
    constant radii."""
    return args.gam_method != "none" and all(getattr(args, name) == value for name, value in FINETUNE_GAM.items())


def validate_gam_fields(args) -> None:
    """Raise a `ValueError` that names the first `gam_*` field of `args` holding a bad value (a `TypeError` when the
    class of `args` does not declare the `gam_*` fields, see `check_gam_fields_declared`)."""
    if isinstance(args, GAMConfig):
        check_gam_fields_declared(type(args))
    choices = {
        "gam_method": GAM_METHODS,
        "gam_formula": GAM_FORMULAS,
        "gam_sync": GAM_SYNC_MODES,
        "gam_rho_schedule": GAM_RHO_SCHEDULES,
        "gam_perturbation": GAM_PERTURBATIONS,
    }
    for name, allowed in choices.items():
        value = getattr(args, name)
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")
    for name in ("gam_grad_rho", "gam_grad_norm_rho", "gam_gamma"):
        value = getattr(args, name)
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"`{name}` must be a non-negative number; got {value!r}.")
    for name in ("gam_alpha", "gam_beta"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must lie in [0, 1]; got {value!r}.")
    if not args.gam_eps > 0:
        raise ValueError(f"`gam_eps` must be a positive number; got {args.gam_eps!r}.")
    for name in ("gam_interval", "gam_reuse_interval"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    if args.gam_interval > 1 and args.gam_reuse_interval > 1:
        raise ValueError("Set at most one of `gam_interval` and `gam_reuse_interval` above 1: between full GAM steps, "
                         "`gam_interval` takes plain gradient steps and `gam_reuse_interval` reuses the last correction.")
    if not 0.0 < args.gam_batch_fraction <= 1.0:
        raise ValueError(f"`gam_batch_fraction` must lie in (0, 1]; got {args.gam_batch_fraction!r}.")
    if not 0.0 <= args.gam_start < 1.0:
        raise ValueError(f"`gam_start` must lie in [0, 1); got {args.gam_start!r}.")
    if args.gam_trigger_std is not None:
        if isinstance(args.gam_trigger_std, bool) or not math.isfinite(args.gam_trigger_std):
            raise ValueError(f"`gam_trigger_std` must be a finite number or None; got {args.gam_trigger_std!r}.")
        if args.gam_reuse_interval > 1 or args.gam_batch_fraction < 1.0:
            raise ValueError("`gam_trigger_std` decides between the full step and the stock step; it does not combine "
                             "with `gam_reuse_interval` > 1 or `gam_batch_fraction` < 1.")
    if not 0.0 <= args.gam_trigger_decay < 1.0:
        raise ValueError(f"`gam_trigger_decay` must lie in [0, 1); got {args.gam_trigger_decay!r}.")
    if args.gam_perturbation == "momentum":
        if args.gam_method != "sam":
            raise ValueError("`gam_perturbation='momentum'` replaces SAM's ascent pass and needs `gam_method='sam'`: "
                             "every gradient of GAM's passes enters its direction, so the momentum would save no pass.")
        if args.gam_reuse_interval > 1 or args.gam_batch_fraction < 1.0 or args.gam_trigger_std is not None:
            raise ValueError("`gam_perturbation='momentum'` runs one pass per step; it does not combine with "
                             "`gam_reuse_interval`, `gam_batch_fraction` or `gam_trigger_std`.")
