"""Checks of the mixed-precision paths on a CUDA GPU, through a real GAMTrainer.

    python benchmarks/gpu_check.py            # needs CUDA; about a minute
    python benchmarks/gpu_check.py --cpu      # the same logic on the CPU (bf16 autocast; fp16 with a CPU scaler)

1. fp16 (autocast + the GradScaler Accelerate creates, gradient clipping on): the first step's scale is forced
   so high that a pass overflows: the step must be skipped (parameters bit-identical, no NaN), the scale
   lowered, `gam/skipped_steps` logged, and the next steps must train.
2. bf16 autocast: GAM trains, the loss falls, parameters stay float32.
3. The step time of GAM and SAM relative to the stock Trainer (interleaved runs) on a small ViT.
Prints one line per check and exits non-zero if a check fails.
"""

import argparse
import statistics
import sys
import time

import torch
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

from hf_gam import GAMConfig, GAMTrainer


def make_data(n: int, image_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long() + (images[:, 1].mean(dim=(1, 2)) > 0).long()
    return [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(n)]


def make_model(hidden: int, layers: int, image_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden, num_labels=3)
    return ViTForImageClassification(config)


def flat(model):
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


class StepRecorder(TrainerCallback):
    def __init__(self, model, scaler_source):
        self.model, self.scaler_source, self.rows, self.times, self._t = model, scaler_source, [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)
        scaler = self.scaler_source()
        self.rows.append((flat(self.model), scaler.get_scale() if scaler is not None else None))


def args_for(out, cpu, **overrides):
    values = dict(output_dir=out, per_device_train_batch_size=32, max_steps=8, learning_rate=1e-3,
                  max_grad_norm=1.0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  remove_unused_columns=False, use_cpu=cpu, seed=0, dataloader_num_workers=0)
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
    scaler._backoff_factor = 2.0**-110  # one skip brings the scale down to 2^16
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


def step_time_ratios(cpu: bool, rounds: int) -> None:
    """Median over rounds of (median step time of an arm) / (median step time of the stock Trainer)."""
    hidden, layers, size, batch = (64, 2, 32, 32) if cpu else (384, 6, 64, 128)
    ratios = {"sam": [], "gam": []}
    arms = ["none", "sam", "gam"]
    for r in range(-1, rounds):  # round -1 warms up (allocator, kernels) and is not counted
        times = {}
        for method in arms[r % 3:] + arms[: r % 3]:  # a different arm goes first in each round
            model = make_model(hidden, layers, size)
            extra = {} if cpu else {"bf16": True}
            trainer = GAMTrainer(model=model, args=args_for(f"/tmp/gpu_check/time_{method}", cpu, gam_method=method,
                                                            per_device_train_batch_size=batch, max_steps=12,
                                                            logging_steps=100, **extra),
                                 train_dataset=make_data(12 * batch, size, seed=max(r, 0)))
            recorder = StepRecorder(model, lambda: None)
            trainer.add_callback(recorder)
            trainer.train()
            times[method] = statistics.median(recorder.times[3:])
        if r < 0:
            continue
        for method in ratios:
            ratios[method].append(times[method] / times["none"])
    device = "cpu" if cpu else torch.cuda.get_device_name()
    print(f"\nStep time relative to the stock Trainer ({device}; ViT hidden {hidden}, {layers} layers, "
          f"{size}px, batch {batch}, {rounds} interleaved rounds):")
    print("| arm | median ratio | range |\n|---|---|---|\n| none | 1.00 | - |")
    for method, values in ratios.items():
        print(f"| {method} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA needed)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("No CUDA device: run with --cpu, or on a GPU machine.")
        return 2
    if not args.cpu:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = fp16_overflow(args.cpu)
    ok &= bf16_trains(args.cpu)
    step_time_ratios(args.cpu, args.rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
