"""`GAMTrainer`: the Hugging Face `Trainer` with GAM's passes inside `training_step`."""

import contextlib
import copy
import dataclasses
import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from .config import GAMConfig, gam_config_class, validate_gam_fields
from .gam import DTensor, DataParallel, GAMHyperParams, GAMStats, GAMStep, norm_layers, sharded_sum

logger = logging.get_logger(__name__)

# Summed over the micro-batches between two logs, then averaged (over micro-batches and ranks).
_METRICS = ("grad_norm", "flatness", "cos", "skipped")


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
    the default `gam_*` values). Only `training_step` changes: for each micro-batch it runs GAM's four forward and
    backward passes (two for `gam_method="sam"`) and leaves the GAM direction in `p.grad`, with the parameters back at
    their exact values. The Trainer's own optimizer, scheduler, clipping, gradient accumulation, checkpointing,
    callbacks and logging run unchanged. `gam_method="none"` is the stock Trainer.

    Some trainers record metrics inside `compute_loss` (TRL's `SFTTrainer`: token count, entropy, token accuracy).
    They describe the batch at theta: the attributes named in `gam_pass_side_effects` are restored after each
    perturbed pass to what pass 1 left.
    """

    gam_pass_side_effects: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *positional, **kwargs):
        if args is None:
            args = GAMConfig(output_dir="trainer_output")
        args = as_gam_config(args)
        validate_gam_fields(args)
        if args.deepspeed:
            raise ValueError(_DEEPSPEED_MESSAGE)
        if args.ddp_find_unused_parameters is None and args.gam_method != "none" and args.gam_interval == 1:
            # Every pass runs under `no_sync`, where DDP never reduces, so its search for unused parameters (a graph
            # walk per forward) would buy nothing. Gradients are averaged by GAMTrainer itself.
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *positional, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(_DEEPSPEED_MESSAGE)
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise ValueError(
                f"GAMTrainer cannot use optim={self.args.optim.value!r}: LOMO updates the parameters inside backward, "
                "so there is no gradient to combine. Choose another optimizer."
            )
        self.gam_hparams = GAMHyperParams(
            method=self.args.gam_method,
            grad_rho=self.args.gam_grad_rho,
            grad_norm_rho=self.args.gam_grad_norm_rho,
            alpha=self.args.gam_alpha,
            beta=self.args.gam_beta,
            gamma=self.args.gam_gamma,
            formula=self.args.gam_formula,
            adaptive=self.args.gam_adaptive,
            eps=self.args.gam_eps,
        )
        self._gam_step: Optional[GAMStep] = None
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
            if any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable):
                logger.warning(
                    "GAMTrainer: some trainable parameters are 16-bit. The finite differences g1 - g0 and the "
                    "perturbations lose precision in 16 bits; keep float32 parameters and use `bf16=True` or "
                    "`fp16=True` (autocast) for mixed precision."
                )
        self._gam_sums: Optional[torch.Tensor] = None
        self._gam_count = 0
        self._gam_radii = (self.args.gam_grad_rho, self.args.gam_grad_norm_rho)

    # ---- the step ----

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Optional[torch.Tensor | int] = None,
    ) -> torch.Tensor:
        """One micro-batch: GAM's passes, the direction d accumulated in `p.grad`; returns the loss at theta."""
        if self.args.gam_method == "none" or self.state.global_step % self.args.gam_interval != 0:
            return super().training_step(model, inputs, num_items_in_batch)

        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            step = self._get_gam_step(model)

            data_parallel, reduce, sync_context = self._gam_parallelism(model, step)

            def forward_backward(pass_index: int) -> torch.Tensor:
                # A fresh shallow copy each pass: `compute_loss` pops "labels" when label smoothing is on.
                with sync_context(), self._gam_pass_context(pass_index):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
                    if self.args.n_gpu > 1:
                        loss = loss.mean()
                    if not self._loss_is_scaled_for_ga(num_items_in_batch):
                        loss = loss / self.current_gradient_accumulation_steps
                    self.accelerator.backward(loss)
                return loss.detach()

            grad_rho, grad_norm_rho = self._current_radii()
            stats = step.run(
                forward_backward,
                self.gam_hparams,
                grad_rho=grad_rho,
                grad_norm_rho=grad_norm_rho,
                norm_modules=self._gam_norm_layers,
                same_rng=self.args.gam_same_rng,
                reduce=reduce,
                data_parallel=data_parallel,
            )
            del inputs
        self._record_gam_stats(stats, grad_rho, grad_norm_rho)
        return stats.loss

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
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _get_gam_step(self, model: nn.Module) -> GAMStep:
        if self._gam_step is None:
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
        """(rho', rho), scaled by the current over the initial learning rate when `gam_rho_schedule="lr"`."""
        grad_rho, grad_norm_rho = self.args.gam_grad_rho, self.args.gam_grad_norm_rho
        if self.args.gam_rho_schedule == "lr":
            if self.args.learning_rate <= 0:
                return 0.0, 0.0
            scale = self._get_learning_rate() / self.args.learning_rate
            grad_rho, grad_norm_rho = grad_rho * scale, grad_norm_rho * scale
        return grad_rho, grad_norm_rho

    # ---- metrics ----

    def _record_gam_stats(self, stats: GAMStats, grad_rho: float, grad_norm_rho: float) -> None:
        values = [stats.grad_norm, stats.flatness, stats.cos if self.args.gam_method == "gam" else 0.0]
        values = [v if not stats.skipped else 0.0 for v in values] + [float(stats.skipped)]
        row = torch.tensor(values, dtype=torch.float64)
        self._gam_sums = row if self._gam_sums is None else self._gam_sums + row
        self._gam_count += 1
        self._gam_radii = (grad_rho, grad_norm_rho)

    def _gam_logs(self) -> dict[str, float]:
        """The GAM metrics since the last log, averaged over micro-batches and ranks; resets them."""
        sums = torch.zeros(len(_METRICS) + 1, dtype=torch.float64)
        if self._gam_sums is not None:
            sums[: len(_METRICS)] = self._gam_sums
            sums[-1] = self._gam_count
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
        self._gam_sums, self._gam_count = None, 0
        count = sums[-1].item()
        if count == 0:
            return {}
        skipped = sums[3].item()
        logs = {
            "gam/grad_rho": self._gam_radii[0],
            "gam/grad_norm_rho": self._gam_radii[1],
            "gam/skipped_steps": skipped,
        }
        finite = count - skipped  # the means cover the micro-batches whose passes all finished
        if finite > 0:
            logs["gam/grad_norm"] = sums[0].item() / finite
            logs["gam/flatness"] = sums[1].item() / finite
            if self.args.gam_method == "gam":
                logs["gam/cos"] = sums[2].item() / finite
        return logs

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.args.gam_method != "none":
            logs = {**logs, **self._gam_logs()}
        super().log(logs, start_time)

    # ---- model card ----

    def create_model_card(self, *args, tags: Optional[str | list[str]] = None, **kwargs) -> None:
        """The stock model card, tagged `gam` and `sharpness-aware`, with a section recording GAM's settings."""
        from .modelcard import GAM_TAGS, append_gam_section

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in GAM_TAGS if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if self.is_world_process_zero():
            append_gam_section(os.path.join(self.args.output_dir, "README.md"), self.args)


class GAMTrainer(GAMMixin, Trainer):
    """
    A [`~transformers.Trainer`] that trains with Gradient norm Aware Minimization (Zhang et al., CVPR 2023):
    `GAMMixin` + `Trainer`. See `GAMMixin`.
    """


_DEEPSPEED_MESSAGE = (
    "GAMTrainer does not support DeepSpeed: the DeepSpeed engine owns the backward pass and the optimizer step, so "
    "the GAM passes cannot place their direction in the gradients. Use FSDP (`accelerate launch` with an FSDP config, "
    "or `fsdp=...` in GAMConfig) or DDP for multi-GPU training."
)
