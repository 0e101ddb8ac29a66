"""Checks of the mixed-precision paths on a CUDA GPU, through a real GAMTrainer.

    python benchmarks/gpu_check.py            # needs CUDA; well under a minute
    python benchmarks/gpu_check.py --cpu      # the same logic on the CPU (bf16 autocast; fp16 with a CPU scaler)

1. fp16 (autocast + the GradScaler Accelerate creates, gradient clipping on): the first step's scale is forced
   so high that a pass overflows: the step must be skipped (parameters bit-identical, no NaN), the scale
   lowered, `gam/skipped_steps` logged, and the next steps must train.
2. bf16 autocast: GAM trains, the loss falls, parameters stay float32.
Prints one line per check and exits non-zero if a check fails. Step time and memory on the GPU come from
`benchmarks/step_cost.py`, which `gpu_check.sh` runs next.
"""

import argparse
import statistics
import sys

import torch
from step_cost import make_model as step_cost_model
from transformers import TrainerCallback

from hf_gam import GAMConfig, GAMTrainer


def make_data(n: int, image_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long() + (images[:, 1].mean(dim=(1, 2)) > 0).long()
    return [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(n)]


def make_model(hidden: int, layers: int, image_size: int, seed: int = 0):
    """The ViT of the step-cost benchmark, at the given size."""
    return step_cost_model(dict(image=image_size, patch=4, hidden=hidden, layers=layers), seed=seed)


def flat(model):
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


class StepRecorder(TrainerCallback):
    """After every optimizer step: the parameters (flat, on the CPU) and the loss scale."""

    def __init__(self, model, scaler_source):
        self.model, self.scaler_source, self.rows = model, scaler_source, []

    def on_step_end(self, args, state, control, **kwargs):
        scaler = self.scaler_source()
        self.rows.append((flat(self.model), scaler.get_scale() if scaler is not None else None))


def args_for(out, cpu, **overrides):
    values = dict(output_dir=out, per_device_train_batch_size=32, max_steps=8, learning_rate=1e-3,
                  max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  remove_unused_columns=False, use_cpu=cpu, seed=0, dataloader_num_workers=0,
                  gam_start=0.0, gam_rho_schedule="constant")  # GAM from the first step
    values.update(overrides)
    return GAMConfig(**values)


def check(name, ok, detail):
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return ok


def fp16_overflow(cpu: bool) -> bool:
    model = make_model(64, 2, 32)
    theta = flat(model)
    data = make_data(512, 32)
    overrides = {} if cpu else {"fp16": True}
    trainer = GAMTrainer(model=model, args=args_for("/tmp/gpu_check/fp16", cpu, max_grad_norm=0.0 if cpu else 1.0,
                                                    **overrides), train_dataset=data)
    if cpu:  # Accelerate makes no scaler on the CPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    scaler = trainer.accelerator.scaler
    ok = check("fp16 GradScaler present", scaler is not None, type(scaler).__name__)
    scaler._init_scale = 2.0**126  # every pass would overflow fp16/fp32 gradients at this scale
    scaler._init_growth_tracker = 0
    scaler._scale = None
    scaler._growth_tracker = None
    # One skip brings the scale down to 2^10, where this model's passes no longer overflow (at 2^16 a perturbed pass
    # can: a second skip would then leave a scale of 2^-94, where every fp16 gradient underflows to zero).
    scaler._backoff_factor = 2.0**-116
    recorder = StepRecorder(model, lambda: trainer.accelerator.scaler)
    trainer.add_callback(recorder)
    trainer.train()
    first, scale_1 = recorder.rows[0]
    ok &= check("fp16 overflow step skipped, parameters bit-identical", torch.equal(first, theta),
                f"max |change| {float((first - theta).abs().max()):.3g}")
    ok &= check("fp16 no NaN in parameters", all(torch.isfinite(r[0]).all() for r in recorder.rows), "checked every step")
    ok &= check("fp16 scale lowered", scale_1 is not None and scale_1 < 2.0**126, f"scale after step 1: {scale_1}")
    skipped = [h.get("gam/skipped_steps") for h in trainer.state.log_history if "loss" in h]
    ok &= check("fp16 skipped counter", skipped[0] >= 1 and sum(skipped[1:]) == 0, f"per step: {skipped}")
    ok &= check("fp16 training goes on", not torch.equal(recorder.rows[-1][0], theta), "parameters moved after the skip")
    return ok


def bf16_trains(cpu: bool) -> bool:
    model = make_model(64, 2, 32)
    trainer = GAMTrainer(model=model, args=args_for("/tmp/gpu_check/bf16", cpu, bf16=True, max_steps=30,
                                                    learning_rate=3e-3), train_dataset=make_data(960, 32))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    ok = check("bf16 loss falls", last < first, f"mean of first 5 steps {first:.4f}, last 5 {last:.4f}")
    ok &= check("bf16 parameters stay float32", all(p.dtype == torch.float32 for p in model.parameters()), "dtype")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA needed)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA device: run with --cpu, or on a GPU machine.")
        return 2
    if not args.cpu:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = fp16_overflow(args.cpu)
    ok &= bf16_trains(args.cpu)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
