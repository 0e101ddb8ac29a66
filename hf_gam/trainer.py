"""`GAMTrainer`: the Hugging Face `Trainer` with GAM's passes inside `training_step`.

The methods `GAMMixin` overrides, against the stock ones of Transformers 5.24 (what each keeps; what it changes):

- `__init__`: every stock argument and step, a `GAMConfig` kept as given and never written to; a plain
  `TrainingArguments` becomes a `GAMConfig` copy, `gam_*` values are checked, DeepSpeed, SageMaker MP, LOMO and FSDP1
  are refused, 16-bit trainable parameters and `activation_offloading` get a warning, and so does a model not loaded
  with `from_pretrained` while the fine-tuning schedule is in force (it names `PRETRAIN_GAM`).
- `_build_accelerator_args`: the stock arguments; with GAM at every step and `ddp_find_unused_parameters=None`, DDP
  gets `find_unused_parameters=False`.
- `_hp_search_setup`: the stock trial set-up; then the trial's `gam_*` values are checked.
- `train`: the stock loop; first GAM's state (work buffers, stored correction, metrics) is dropped.
- `training_step`: the stock step for plain steps; a GAM step keeps its context parallelism, `model.train()`,
  `optimizer.train()`, input preparation, loss context, multi-GPU mean, accumulation scaling, `accelerator.backward`,
  `torch_empty_cache_steps` and returned loss, and runs GAM's passes, leaving the GAM direction in `p.grad`.
- `log`: the stock log, adding to the given dict; GAM's `gam/*` metrics are added to a training log.
- `create_model_card`: the stock card and arguments; `gam` tags and a section with GAM's settings are added.
- `_load_from_checkpoint`, `_load_best_model`: the parent trainer's method; a checkpoint whose key names are not the
  model's is converted to them first (see `_gam_key_conversion`).
- `_issue_warnings_after_load`: the stock warnings, except while such a checkpoint loads (checked after, as an error).
"""

import contextlib
import copy
import dataclasses
import math
import os
from typing import Any, Optional

import torch
from torch import nn
from accelerate.utils import DistributedDataParallelKwargs
from accelerate.utils.memory import clear_device_cache
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled, logging

from .config import GAMConfig, gam_config_class, uses_finetuning_schedule, validate_gam_fields
from .gam import (
    DTensor,
    DataParallel,
    GAMHyperParams,
    GAMStats,
    GAMStep,
    GradNormTrigger,
    StepInputs,
    norm_layers,
    sharded_sum,
)

logger = logging.get_logger(__name__)

@dataclasses.dataclass
class GAMMetricSums:
    """Sums over the micro-batches that ran GAM's passes since the last log, by name. Each is a 0-dim float64 tensor
    on the device once a micro-batch has added to it (reading one would make the host wait), 0.0 before."""

    micro_batches: Any = 0.0  # micro-batches recorded
    skipped: Any = 0.0  # micro-batches with a non-finite pass
    grad_norm: Any = 0.0  # ||g0|| (finite micro-batches only, in the units of the micro-batch's mean loss)
    flatness: Any = 0.0  # ||g1 - g0|| / rho' (finite micro-batches that measured it)
    measured_flatness: Any = 0.0  # finite micro-batches that measured flatness
    cos: Any = 0.0  # cosine of h- and h+ (finite micro-batches that measured it)
    measured_cos: Any = 0.0  # finite micro-batches that measured cos

    def add(self, **values: torch.Tensor) -> None:
        """Add one micro-batch's `values`, one for every field."""
        names = {f.name for f in dataclasses.fields(self)}
        if set(values) != names:
            raise KeyError(f"GAMMetricSums.add needs exactly the fields {sorted(names)}; got {sorted(values)}.")
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def summed_over_ranks(self, reduce_sum) -> dict[str, float]:
        """The sums as floats, each summed over the ranks by `reduce_sum(tensor) -> tensor` (None: this process
        only): one collective for all of them, the fields packed in the order of their names."""
        names = sorted(f.name for f in dataclasses.fields(self))
        values = [getattr(self, name) for name in names]
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        if reduce_sum is not None:
            packed = reduce_sum(packed)
        return dict(zip(names, packed.cpu().tolist()))


def as_gam_config(args: TrainingArguments) -> GAMConfig:
    """`args` with GAM's default `gam_*` values added when it has none: an instance of `gam_config_class(type(args))`,
    so that the fields of a `TrainingArguments` subclass (`Seq2SeqTrainingArguments`, TRL's `SFTConfig`) are kept."""
    if isinstance(args, GAMConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
    return gam_config_class(type(args))(**values)


class GAMMixin:
    """
    Gradient norm Aware Minimization (Zhang et al., CVPR 2023) for any [`~transformers.Trainer`] subclass:
    `class MyTrainer(GAMMixin, Seq2SeqTrainer)` trains with GAM. Put `GAMMixin` first, so that its
    `training_step` runs in place of the parent's.

    It takes every argument `Trainer` takes; `args` is a [`GAMConfig`] (a plain `TrainingArguments` means GAM with
    the default `gam_*` values). The step is what changes: for each micro-batch `training_step` runs GAM's four forward
    and backward passes (two for `gam_method="sam"`) and leaves the GAM direction in `p.grad`, with the parameters back
    at their exact values. The Trainer's own optimizer, scheduler, clipping, gradient accumulation, checkpointing,
    callbacks and logging run unchanged (the module docstring lists every override). `gam_method="none"` is the stock
    Trainer.

    Some trainers record metrics inside `compute_loss` (TRL's `SFTTrainer`: token count, entropy, token accuracy).
    They describe the batch at theta: the attributes named in `gam_pass_side_effects` are restored after each
    perturbed pass to what pass 1 left.
    """

    gam_pass_side_effects: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *positional, **kwargs):
        if args is None:
            logger.info("No `TrainingArguments` passed, using `output_dir=tmp_trainer`.")
            args = GAMConfig(output_dir="tmp_trainer")  # the stock Trainer's folder in that case
        args = as_gam_config(args)
        validate_gam_fields(args)
        if args.deepspeed:
            raise ValueError(_DEEPSPEED_MESSAGE)
        if is_sagemaker_mp_enabled():
            raise ValueError(
                "GAMTrainer does not support SageMaker model parallelism: its training step runs the forward and "
                "backward inside smdistributed's own step function, where GAM's passes cannot run."
            )
        super().__init__(model, args, *positional, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(_DEEPSPEED_MESSAGE)
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise ValueError(
                f"GAMTrainer cannot use optim={self.args.optim.value!r}: LOMO updates the parameters inside backward, "
                "so there is no gradient to combine. Choose another optimizer."
            )
        self._gam_step: Optional[GAMStep] = None
        self._gam_trigger: Optional[GradNormTrigger] = None  # the running statistics of `gam_trigger_std`
        self._gam_norm_layers: list[nn.Module] = []
        if self.args.gam_method != "none":
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if not trainable:
                raise ValueError("GAMTrainer: the model has no trainable parameters (all have requires_grad=False).")
            if self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False):
                raise ValueError(
                    "GAMTrainer supports FSDP2 only (FSDP1 flattens parameters, so GAM cannot restore them exactly): "
                    "set `fsdp_version: 2` in the FSDP config (`fsdp_config={'version': 2}`)."
                )
            if getattr(self.args, "activation_offloading", False):
                logger.warning(
                    "GAMMixin: `activation_offloading=True` has no effect on the GAM passes: GAM's `training_step` "
                    "replaces the one of the parent trainer, which is where TRL enters its offloading context."
                )
            if (uses_finetuning_schedule(self.args) and loaded_from_pretrained(self.model) is False
                    and not self.args.optim.value.startswith("sgd")):
                logger.warning(_FROM_SCRATCH_MESSAGE)
            if any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable):
                logger.warning(
                    "GAMTrainer: some trainable parameters are 16-bit. The finite differences g1 - g0 and the "
                    "perturbations lose precision in 16 bits; keep float32 parameters and use `bf16=True` or "
                    "`fp16=True` (autocast) for mixed precision."
                )
        self._gam_reset_metrics()
        self._gam_radii = (self.args.gam_grad_rho, self.args.gam_grad_norm_rho)
        self._gam_checkpoint_conversion = None  # the `KeyConversion` of a checkpoint being loaded

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """The stock Accelerator arguments; with GAM at every step and `ddp_find_unused_parameters` left at None,
        DDP does not search for unused parameters. Every pass runs under `no_sync`, where DDP never reduces, so the
        search (a graph walk per forward) would buy nothing: GAMTrainer averages the gradients itself. The value is
        set on the DDP arguments, never on `args`."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        args = self.args
        every_step = args.gam_method != "none" and args.gam_interval == 1 and args.gam_start == 0
        if args.ddp_find_unused_parameters is None and every_step:
            for handler in accelerator_args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = False
        return accelerator_args

    # ---- the step ----

    @property
    def gam_hparams(self) -> GAMHyperParams:
        """The step's hyper-parameters, read from `self.args` each time (`hyperparameter_search` sets a trial's values
        on `args` after the trainer is built)."""
        args = self.args
        return GAMHyperParams(method=args.gam_method, grad_rho=args.gam_grad_rho, grad_norm_rho=args.gam_grad_norm_rho,
                              alpha=args.gam_alpha, beta=args.gam_beta, gamma=args.gam_gamma, formula=args.gam_formula,
                              adaptive=args.gam_adaptive, eps=args.gam_eps, reuse_orthogonal=args.gam_reuse_orthogonal,
                              perturbation=args.gam_perturbation)

    def _hp_search_setup(self, trial) -> None:
        """`Trainer._hp_search_setup`, then the trial's `gam_*` values checked like the config's."""
        super()._hp_search_setup(trial)
        validate_gam_fields(self.args)

    def train(self, *args, **kwargs):
        """`Trainer.train`, with GAM's state (parameter list, work buffers, stored correction, metrics) bound to the
        model this call trains: `model_init` and `hyperparameter_search` build a new model for every call."""
        self._gam_step = None
        self._gam_trigger = None
        self._gam_reset_metrics()
        return super().train(*args, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Optional[torch.Tensor | int] = None,
    ) -> torch.Tensor:
        """One micro-batch: GAM's passes, the direction d accumulated in `p.grad`; returns the loss at theta."""
        kind = self._gam_step_kind()
        if kind == "plain":
            self._gam_passes += 1
            self._gam_micro_batches += 1
            return super().training_step(model, inputs, num_items_in_batch)

        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            step = self._get_gam_step(model)
            reuse = kind == "reuse" and step.has_correction

            data_parallel, reduce, sync_context = self._gam_parallelism(model, step)

            def passes_on(batch: dict[str, Any], counted: bool = True):
                """The forward/backward of `batch`; only the first pass of a `counted` batch keeps the side effects of
                `compute_loss` (see `gam_pass_side_effects`)."""

                def forward_backward(pass_index: int) -> torch.Tensor:
                    # A fresh shallow copy each pass: `compute_loss` pops "labels" when label smoothing is on.
                    with sync_context(), self._gam_pass_context(pass_index if counted else 1):
                        with self.compute_loss_context_manager():
                            loss = self.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
                        if self.args.n_gpu > 1:
                            loss = loss.mean()
                        if not self._loss_is_scaled_for_ga(num_items_in_batch):
                            loss = loss / self.current_gradient_accumulation_steps
                        self.accelerator.backward(loss)
                    return loss.detach()

                return forward_backward

            part = None if reuse else leading_part(inputs, self.args.gam_batch_fraction)
            grad_rho, grad_norm_rho = self._current_radii()
            step_inputs = StepInputs(
                forward_backward=passes_on(inputs),
                hp=dataclasses.replace(self.gam_hparams, grad_rho=grad_rho, grad_norm_rho=grad_norm_rho),
                norm_modules=self._gam_norm_layers,
                same_rng=self.args.gam_same_rng,
                reduce=reduce,
                data_parallel=data_parallel,
                # A loss scaler skips a step with a non-finite gradient; without one, nothing would.
                nonfinite="mark" if self.accelerator.scaler is not None else "drop",
                sub_forward_backward=None if part is None else passes_on(part, counted=False),
                # The loss scaler's scale exists once a backward ran: the units are read after pass 1.
                run_full=self._gam_run_full(data_parallel, lambda: self._gam_units(inputs, num_items_in_batch)),
                momentum=self._gam_momentum(step) if self.args.gam_perturbation == "momentum" else None,
            )
            stats = step.run(step_inputs, store_correction=self.args.gam_reuse_interval > 1 and not reuse,
                             reuse=reuse)
            units = self._gam_units(inputs, num_items_in_batch)
            part_units = units if part is None else self._gam_units(part, num_items_in_batch)
            passes = stats.passes
            if part is not None:  # the passes on the part cost their share of a whole pass
                passes = 1 + (stats.passes - 1) * _batch_size(part) / _batch_size(inputs)
            del inputs, part
        self._gam_empty_cache()
        self._record_gam_stats(stats, grad_rho, grad_norm_rho, units, part_units, passes)
        return stats.loss

    def _gam_run_full(self, data_parallel: Optional[DataParallel], units_of):
        """For `gam_trigger_std`: the `StepInputs.run_full` test of this micro-batch (None when the option is off).

        It reads ||g0|| on the host (one synchronisation), in the units of the micro-batch's mean loss (`units_of()`,
        see `_gam_units`), and under DDP "local" averages its square over the ranks first, so that every rank takes
        the same decision."""
        if self.args.gam_trigger_std is None:
            return None
        if self._gam_trigger is None:
            self._gam_trigger = GradNormTrigger(k=self.args.gam_trigger_std, decay=self.args.gam_trigger_decay)
        trigger = self._gam_trigger

        def run_full(grad_norm: torch.Tensor) -> bool:
            squared = (grad_norm.double() * units_of()).square()
            if data_parallel is not None and data_parallel.mode == "local":
                squared = self.accelerator.reduce(squared, reduction="mean")
            return trigger(squared.item())

        return run_full

    def _gam_momentum(self, step: GAMStep) -> list[Optional[torch.Tensor]]:
        """The optimizer's momentum of each parameter of `step` (AdamW's `exp_avg`, SGD's `momentum_buffer`), None
        where it holds none yet; a `ValueError` when, after the first optimizer step, it holds none at all."""
        state = self.optimizer.state
        found = []
        for p in step.params:
            entry = state.get(p, {})
            m = entry.get("exp_avg", entry.get("momentum_buffer"))
            found.append(m if isinstance(m, torch.Tensor) else None)
        if self.state.global_step > 0 and all(m is None for m in found):
            raise ValueError(
                f"`gam_perturbation='momentum'` needs an optimizer that keeps a momentum (AdamW's `exp_avg`, SGD's "
                f"`momentum_buffer` with momentum > 0); optim={self.args.optim.value!r} keeps none."
            )
        return found

    def _gam_step_kind(self) -> str:
        """'plain' (the stock step), 'full' (all of GAM's passes) or 'reuse' (one pass and the stored correction)."""
        args, step = self.args, self.state.global_step
        if args.gam_method == "none" or step < self._gam_start_step() or step % args.gam_interval != 0:
            return "plain"
        if args.gam_reuse_interval > 1 and step % args.gam_reuse_interval != 0:
            return "reuse"
        return "full"

    def _gam_start_step(self) -> int:
        """The first optimizer step that runs GAM (`gam_start` of the run's `max_steps`)."""
        return math.ceil(self.args.gam_start * self.state.max_steps) if self.args.gam_start > 0 else 0

    def _gam_empty_cache(self) -> None:
        """`torch_empty_cache_steps`, as the stock training step honours it."""
        every = self.args.torch_empty_cache_steps
        if every is not None and self.state.global_step % every == 0:
            clear_device_cache()
            if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                torch.mps.clear_graph_cache()

    @contextlib.contextmanager
    def _gam_pass_context(self, pass_index: int):
        """Around pass `pass_index`: after a perturbed pass, the attributes in `gam_pass_side_effects` get back the
        values pass 1 left (metrics recorded by `compute_loss` count every batch once, at theta)."""
        names = [n for n in self.gam_pass_side_effects if hasattr(self, n)] if pass_index > 0 else []
        saved = {n: copy.deepcopy(getattr(self, n)) for n in names}
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The stock Trainer's rule: is the loss already normalised for gradient accumulation?"""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since Transformers 5.2x
        if scaled is not None:
            return scaled
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _gam_units(self, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor | float:
        """The factor that turns a norm of the gradients the passes left into the norm of the gradient of the
        micro-batch's mean loss: it undoes the accumulation normalisation and the loss scale (no host sync)."""
        factor: torch.Tensor | float = 1.0
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            factor = float(self.current_gradient_accumulation_steps)
        elif num_items_in_batch is not None and "labels" in inputs:
            # The loss was divided by the items of the whole optimizer step; the micro-batch's mean divides by its own.
            if "shift_labels" in inputs:
                labels = inputs["shift_labels"]
            elif getattr(self, "_loss_shifts_labels", False):
                labels = inputs["labels"][..., 1:]
            else:
                labels = inputs["labels"]
            items = labels.ne(-100).sum().clamp(min=1)
            factor = num_items_in_batch / items
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                factor = factor / (self.accelerator.num_processes // self.get_tp_size())
        scaler = self.accelerator.scaler
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            factor = factor / scaler._scale.double()
        return factor

    def _get_gam_step(self, model: nn.Module) -> GAMStep:
        """The `GAMStep` of the trainable parameters of `model`, rebuilt when they change (a new model, a parameter
        frozen or unfrozen)."""
        if self._gam_step is None or not self._gam_step.matches(model.parameters()):
            if self._gam_step is not None:
                logger.info("GAMTrainer: the trainable parameters changed; GAM's work buffers are rebuilt.")
            self._gam_step = GAMStep(model.parameters())
            self._gam_norm_layers = norm_layers(model)
        return self._gam_step

    def _gam_parallelism(self, model: nn.Module, step: GAMStep):
        """(data_parallel, reduce, sync_context) for this micro-batch.

        DDP: every pass under `no_sync`; GAMStep averages the gradients itself ("local": once per optimizer step;
        "global": after every pass). FSDP2: every pass reduce-scatters its gradient (sync forced on, also inside the
        Trainer's `no_sync` for early micro-batches), and norms and inner products are summed over the shards, so a
        step equals one-process GAM on the global batch.
        """
        if isinstance(step.params[0], DTensor):
            def synced():
                model.set_requires_gradient_sync(True)
                return contextlib.nullcontext()

            return None, sharded_sum(step.params), synced
        if self.accelerator.num_processes > 1:
            data_parallel = DataParallel(mode=self.args.gam_sync, sync_now=self.accelerator.sync_gradients)
            return data_parallel, None, lambda: self.accelerator.no_sync(model)
        return None, None, contextlib.nullcontext

    def _current_radii(self) -> tuple[float, float]:
        """(rho', rho) after `gam_rho_schedule`: times the current over the initial learning rate ("lr"), or times the
        fraction of GAM's steps done, counting this one ("linear"); then times `gam_interval` with
        `gam_interval_scale_rho`."""
        grad_rho, grad_norm_rho = self.args.gam_grad_rho, self.args.gam_grad_norm_rho
        if self.args.gam_rho_schedule == "lr":
            if self.args.learning_rate <= 0:
                return 0.0, 0.0
            scale = self._get_learning_rate() / self.args.learning_rate
        elif self.args.gam_rho_schedule == "linear":
            start = self._gam_start_step()
            scale = min((self.state.global_step - start + 1) / max(self.state.max_steps - start, 1), 1.0)
        else:
            scale = 1.0
        if self.args.gam_interval_scale_rho:
            scale = scale * self.args.gam_interval
        if scale == 1.0:
            return grad_rho, grad_norm_rho
        return grad_rho * scale, grad_norm_rho * scale

    # ---- metrics ----

    def _gam_reset_metrics(self) -> None:
        self._gam_sums = GAMMetricSums()
        self._gam_passes = 0
        self._gam_micro_batches = 0

    def _record_gam_stats(self, stats: GAMStats, grad_rho: float, grad_norm_rho: float, units, part_units,
                          passes: float) -> None:
        """Adds this micro-batch's metrics to device-side sums (read on the host only when they are logged).
        `units` turn the whole micro-batch's norms into those of its mean loss, `part_units` those measured on the
        part GAM's passes ran on; `passes` counts whole-micro-batch passes' worth of compute."""
        failed = stats.failed
        zero = torch.zeros((), dtype=torch.float64, device=failed.device)
        finite = (~failed).double()

        def where_finite(value: Optional[torch.Tensor]) -> torch.Tensor:
            return zero if value is None else torch.where(failed, zero, value.to(zero.device, torch.float64))

        self._gam_sums.add(
            micro_batches=torch.ones_like(zero),
            skipped=failed.double(),
            grad_norm=where_finite(stats.grad_norm * units),
            flatness=where_finite(None if stats.flatness is None else stats.flatness * part_units),
            measured_flatness=finite * float(stats.flatness is not None),
            cos=where_finite(stats.cos),
            measured_cos=finite * float(stats.cos is not None),
        )
        self._gam_passes += passes
        self._gam_micro_batches += 1
        self._gam_radii = (grad_rho, grad_norm_rho)

    def _gam_logs(self) -> dict[str, float]:
        """The GAM metrics since the last log, averaged over micro-batches and ranks; resets them."""
        reduce_sum = None
        if self.args.world_size > 1:
            def reduce_sum(packed: torch.Tensor) -> torch.Tensor:
                return self.accelerator.reduce(packed.to(self.args.device), reduction="sum")
        sums = self._gam_sums.summed_over_ranks(reduce_sum)
        logs: dict[str, float] = {}
        if self._gam_micro_batches:
            logs["gam/passes"] = self._gam_passes / self._gam_micro_batches
        self._gam_reset_metrics()
        count, skipped = sums["micro_batches"], sums["skipped"]
        if count == 0:
            return logs
        logs.update({"gam/grad_rho": self._gam_radii[0], "gam/grad_norm_rho": self._gam_radii[1],
                     "gam/skipped_steps": skipped})
        if count > skipped:  # the means cover the micro-batches whose passes all finished
            logs["gam/grad_norm"] = sums["grad_norm"] / (count - skipped)
        if sums["measured_flatness"]:
            logs["gam/flatness"] = sums["flatness"] / sums["measured_flatness"]
        if sums["measured_cos"]:
            logs["gam/cos"] = sums["cos"] / sums["measured_cos"]
        return logs

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """`Trainer.log`, with GAM's metrics added to a training log; like the stock method, it adds to `logs`."""
        if "loss" in logs and self.args.gam_method != "none":
            logs.update(self._gam_logs())
        super().log(logs, start_time)

    # ---- model card ----

    def create_model_card(self, language: Optional[str] = None, license: Optional[str] = None,
                          tags: Optional[str | list[str]] = None, *args, **kwargs) -> None:
        """The stock model card, tagged `gam` and `sharpness-aware`, with a section recording GAM's settings. Takes
        the stock arguments, by keyword or in the stock order."""
        from .modelcard import GAM_TAGS, append_gam_section

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in GAM_TAGS if t not in tags]
        super().create_model_card(language, license, tags, *args, **kwargs)
        if self.is_world_process_zero():
            append_gam_section(os.path.join(self.args.output_dir, "README.md"), self.args)

    # ---- checkpoints ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """The parent trainer's `_load_from_checkpoint`, with the checkpoint's key names converted to the model's when
        they differ (see `_gam_key_conversion`)."""
        with self._gam_key_conversion(self.model if model is None else model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """The parent trainer's `_load_best_model`, with the key names converted as in `_load_from_checkpoint`."""
        with self._gam_key_conversion(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The stock warnings, except for a checkpoint whose names are being converted: its keys are checked in the
        model's names when the loading ends (the stock warnings of a sharded checkpoint compare the raw names)."""
        if self._gam_checkpoint_conversion is None:
            super()._issue_warnings_after_load(load_result)

    @contextlib.contextmanager
    def _gam_key_conversion(self, model: nn.Module, checkpoint: str):
        """Around the parent trainer's loading of `checkpoint` into `model`.

        When the checkpoint's full-model weights hold names that are not the model's (Transformers 5.x saves a
        `PreTrainedModel` in the original key format, which the stock Trainer's raw `load_state_dict` leaves
        unloaded), `model.load_state_dict` converts them first, as `from_pretrained` does, then runs as the model
        defines it; afterwards a key that matched nothing, or a weight left out, is a `CheckpointMismatchError`.
        Otherwise, and under FSDP or for PEFT adapters, the parent's loading runs untouched.
        """
        from transformers.trainer_utils import _is_peft_model

        from .checkpoint import KeyConversion, needs_key_conversion

        if self.is_fsdp_enabled or _is_peft_model(model) or not needs_key_conversion(model, checkpoint):
            yield
            return
        with KeyConversion(model) as conversion:
            self._gam_checkpoint_conversion = conversion
            try:
                yield
            finally:
                self._gam_checkpoint_conversion = None
        conversion.check(checkpoint)


class GAMTrainer(GAMMixin, Trainer):
    """
    A [`~transformers.Trainer`] that trains with Gradient norm Aware Minimization (Zhang et al., CVPR 2023):
    `GAMMixin` + `Trainer`. See `GAMMixin`.
    """


def _batch_size(inputs: dict[str, Any]) -> Optional[int]:
    """The leading dimension of the micro-batch: that of `labels`, else of the first tensor with one."""
    for value in [inputs.get("labels"), *inputs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def leading_part(inputs: dict[str, Any], fraction: float) -> Optional[dict[str, Any]]:
    """The first ceil(fraction * batch) examples of a micro-batch (every tensor whose leading dimension is the batch
    size is sliced, anything else kept), or None when that is the whole micro-batch."""
    size = _batch_size(inputs)
    if fraction >= 1.0 or size is None:
        return None
    keep = max(1, math.ceil(fraction * size))
    if keep >= size:
        return None
    return {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
            for k, v in inputs.items()}


def loaded_from_pretrained(model: nn.Module) -> Optional[bool]:
    """Whether the Transformers model inside `model` (also under a PEFT wrapper) was loaded by `from_pretrained`, which
    records the weight conversions it applied on the instance: True or False, or None when `model` holds no
    `PreTrainedModel` (a plain `nn.Module`: unknown)."""
    from transformers import PreTrainedModel

    models = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not models:
        return None
    return any(getattr(m, "_weight_conversions", None) is not None for m in models)


_FROM_SCRATCH_MESSAGE = (
    "GAMTrainer: the model was not loaded with `from_pretrained`, and GAM runs with GAMConfig's defaults, which are "
    "for fine-tuning (full GAM at every step with the released radii). From scratch with AdamW those radii slow "
    "fitting down and cost accuracy: use `GAMConfig(..., **hf_gam.PRETRAIN_GAM)` (GAM in the last quarter of the "
    "steps, radii ramping up). If the weights are pretrained and were loaded another way, ignore this warning."
)

_DEEPSPEED_MESSAGE = (
    "GAMTrainer does not support DeepSpeed: the DeepSpeed engine owns the backward pass and the optimizer step, so "
    "the GAM passes cannot place their direction in the gradients. Use FSDP (`accelerate launch` with an FSDP config, "
    "or `fsdp=...` in GAMConfig) or DDP for multi-GPU training."
)
