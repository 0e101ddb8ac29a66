"""What one optimizer step costs with GAM and SAM, relative to the stock Trainer.

Every arm trains the same model (same initial weights) on the same batches through `GAMTrainer`, with
`gam_method="none"` (the stock Trainer step), "sam", "gam", "gam" with `gam_interval=2`, and "gam" with
`gam_reuse_interval` k (full GAM every k-th step, one pass plus the stored correction between) or
`gam_batch_fraction` f (GAM's passes on a part of each micro-batch), all at every step with constant radii; and
`hf_gam.PRETRAIN_GAM` (which starts GAM at 75% of the run: its time ratio covers a window with the same quarter of GAM
steps as a whole run, its memory is that of its GAM steps). `GAMConfig()`'s defaults (and `FINETUNE_GAM`,
`RELEASED_GAM`) are the row "GAM", `hf_gam.CHEAP_GAM` the row "GAM, reuse 3". "stock step x4" runs the stock step 4
times on each micro-batch: the floor of GAM's 4 passes with nothing else added.

* Time: a callback reads the clock at `on_step_begin` and `on_step_end`, so a step is the forward and backward
  passes, clipping and the optimizer step (not data loading, logging or evaluation). Arms are interleaved:
  every round runs each arm for a few steps in a shuffled order, and the first steps of each run are dropped
  (first-call allocations). We report, per arm, the median over rounds of (mean step time of the arm in that
  round) / (mean step time of the stock Trainer in that round), with the range over rounds.
* Peak memory: one short run per arm. On CUDA, `torch.cuda.max_memory_allocated` above the memory held before
  the run. On CPU, the PyTorch profiler's memory timeline (every allocation and free of the CPU allocator while
  the run lasts; `profile_memory=True`). Reported as (peak of the arm - peak of the stock Trainer) divided by
  the bytes of the trainable parameters, so "1.0" means one more parameter-sized buffer at the peak.
* Collectives per step under 2 ranks (`--collectives`): the script relaunches itself with
  `torchrun --nproc_per_node 2` (gloo on CPU). Each rank wraps `torch.distributed.all_reduce`,
  `reduce_scatter_tensor`, `all_gather_into_tensor`, `broadcast` (and `all_gather`, `reduce`) before anything
  else is imported, and registers a counting communication hook on the DDP model, since DDP's own gradient
  all-reduce is issued from C++ and bypasses the Python functions. Counted between step begin and step end.
  The same worker also times every arm under 2 ranks, interleaved over 3 rounds, as ratios to the stock step.

    python benchmarks/step_cost.py            # full setting, a few minutes on 2 cores
    python benchmarks/step_cost.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather", "reduce")
COUNTS: dict[str, int] = {}
_ORIGINAL: dict = {}


def _install_collective_counters() -> None:
    """Wrap the Python-level collectives of `torch.distributed` so each call is counted by name."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = _ORIGINAL[name] = getattr(c10d, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            COUNTS[_name] = COUNTS.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(c10d, name, counted)
        setattr(dist, name, counted)


if os.environ.get("STEP_COST_COUNT_COLLECTIVES") == "1":
    _install_collective_counters()

import torch  # noqa: E402

# GAM and SAM at every step with constant radii: the defaults (`hf_gam.FINETUNE_GAM`), written out, so that the arm
# "GAM" is `GAMConfig()` and "GAM, reuse 3" is `hf_gam.CHEAP_GAM`.
EVERY_STEP = dict(gam_start=0.0, gam_rho_schedule="constant")
ARMS = {
    "stock Trainer": dict(gam_method="none"),
    # GAM's floor: a Trainer whose step is the stock step run 4 times on the same micro-batch (see `FloorTrainer`).
    "stock step x4 (GAM's floor)": dict(gam_method="none", floor_passes=4),
    "SAM": dict(gam_method="sam", **EVERY_STEP),
    "GAM": dict(gam_method="gam", **EVERY_STEP),
    "GAM, interval 2": dict(gam_method="gam", gam_interval=2, **EVERY_STEP),
    "GAM, interval 3": dict(gam_method="gam", gam_interval=3, **EVERY_STEP),
    "GAM, reuse 2": dict(gam_method="gam", gam_reuse_interval=2, **EVERY_STEP),
    "GAM, reuse 3": dict(gam_method="gam", gam_reuse_interval=3, **EVERY_STEP),
    "GAM, reuse 4": dict(gam_method="gam", gam_reuse_interval=4, **EVERY_STEP),
    "GAM, batch fraction 1/4": dict(gam_method="gam", gam_batch_fraction=0.25, **EVERY_STEP),
    "GAM, batch fraction 1/8": dict(gam_method="gam", gam_batch_fraction=0.125, **EVERY_STEP),
    # PRETRAIN_GAM starts GAM at 75% of the run: over a 14-step run with 2 steps dropped, steps 11-13 run GAM, so the
    # measured window holds the same quarter of GAM steps as any run.
    "PRETRAIN_GAM": "PRETRAIN_GAM",
}
SETTINGS = {
    # image side, patch, hidden, layers, batch, rounds, steps per run, dropped steps per run
    # steps - drop = 12: every measured window holds whole cycles of the intervals 2, 3 and 4.
    "full": dict(image=32, patch=4, hidden=128, layers=4, batch=32, rounds=7, steps=14, drop=2),
    "quick": dict(image=16, patch=4, hidden=32, layers=1, batch=16, rounds=2, steps=13, drop=1),
    # For a CUDA GPU (`benchmarks/gpu_check.sh`): a ViT-S/16-sized model at 224 px.
    "gpu": dict(image=224, patch=16, hidden=384, layers=6, batch=64, rounds=5, steps=14, drop=2),
    # A ViT-B/16-sized model, to see which costs follow the compute and which the number of passes.
    "gpu_large": dict(image=224, patch=16, hidden=768, layers=12, batch=96, rounds=3, steps=14, drop=2),
}


def make_model(s: dict, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=s["image"], patch_size=s["patch"], num_channels=3, hidden_size=s["hidden"],
        num_hidden_layers=s["layers"], num_attention_heads=4, intermediate_size=2 * s["hidden"], num_labels=10,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def make_data(s: dict, n_batches: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    n = s["batch"] * n_batches
    x = torch.randn(n, 3, s["image"], s["image"], generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": int(y[i])} for i in range(n)]


class StepClock:
    """Trainer callback: wall time and collective counts between `on_step_begin` and `on_step_end`."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._t0 = time.perf_counter()
                clock._c0 = dict(COUNTS)

            def on_step_end(self, args, state, control, **kwargs):
                clock.times.append(time.perf_counter() - clock._t0)
                clock.counts.append({k: COUNTS.get(k, 0) - clock._c0.get(k, 0) for k in COUNTS})

        self.callback = _Callback()
        self.times: list[float] = []
        self.counts: list[dict] = []


def resolve_arm(arm) -> dict:
    """A copy of the arm's keyword arguments (a string names a ready setting: "PRETRAIN_GAM" is `hf_gam.PRETRAIN_GAM`)."""
    if isinstance(arm, str):
        import hf_gam

        return dict(getattr(hf_gam, arm))
    return dict(arm)


def make_trainer(model, data, s: dict, arm: dict, steps: int, out_dir: str, callbacks=()):
    from hf_gam import GAMConfig, GAMTrainer

    arm = resolve_arm(arm)
    passes = arm.pop("floor_passes", None)
    trainer_class = GAMTrainer
    if passes is not None:
        class FloorTrainer(GAMTrainer):
            """The stock training step run `passes` times on each micro-batch: what GAM's passes cost with nothing
            else added (the gradients simply accumulate)."""

            def training_step(self, model, inputs, num_items_in_batch=None):
                for _ in range(passes - 1):
                    super().training_step(model, inputs, num_items_in_batch)
                return super().training_step(model, inputs, num_items_in_batch)

        trainer_class = FloorTrainer
    args = GAMConfig(
        output_dir=out_dir, per_device_train_batch_size=s["batch"], max_steps=steps, learning_rate=1e-3,
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=0, **arm,
    )
    return trainer_class(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def time_arms(s: dict, arms: dict, out_dir: str) -> dict:
    base = make_model(s)
    data = make_data(s, s["steps"])
    per_round = {name: [] for name in arms}
    order = list(arms)
    rng = random.Random(0)
    for _ in range(s["rounds"]):
        rng.shuffle(order)
        for name in order:
            clock = StepClock()
            trainer = make_trainer(copy.deepcopy(base), data, s, arms[name], s["steps"], out_dir, [clock.callback])
            trainer.train()
            # Mean within a run: with `gam_interval` or `gam_reuse_interval` > 1 the steps cycle through two costs.
            per_round[name].append(statistics.mean(clock.times[s["drop"] :]))
    stock = per_round["stock Trainer"]
    ratios = {}
    for name, times in per_round.items():
        r = [t / b for t, b in zip(times, stock)]
        ratios[name] = (statistics.median(r), min(r), max(r))
    return {"ratios": ratios, "stock_ms": 1000 * statistics.median(stock)}


def _run_peak_bytes(trainer) -> int | None:
    """Peak bytes allocated during `trainer.train()` above what was held before it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        trainer.train()
    try:
        from torch.profiler._memory_profiler import Action

        timeline = prof._memory_profile().timeline
    except Exception:  # the memory timeline is a private API of the profiler
        return None
    current = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def memory_arms(s: dict, arms: dict, out_dir: str) -> dict:
    base = make_model(s)
    data = make_data(s, 3)
    peaks = {}
    for name, arm in arms.items():
        # 3 steps: a reuse arm allocates its correction buffer on its first (full) step. GAM from the first step
        # (an arm that starts late would not reach its GAM steps in 3): the peak of its GAM steps.
        arm = {**resolve_arm(arm), "gam_start": 0.0}
        trainer = make_trainer(copy.deepcopy(base), data, s, arm, 3, out_dir)
        peaks[name] = _run_peak_bytes(trainer)
    unit = _param_bytes(base)
    if peaks["stock Trainer"] is None:
        return {name: None for name in arms}
    return {name: (p - peaks["stock Trainer"]) / unit for name, p in peaks.items()}


# ------------------------------------------------------------------------------------------------
# Collectives under torchrun

DIST_ARMS = {
    "stock Trainer": dict(gam_method="none"),
    "SAM": dict(gam_method="sam", **EVERY_STEP),
    "GAM, local sync": dict(gam_method="gam", gam_sync="local", **EVERY_STEP),
    "GAM, global sync": dict(gam_method="gam", gam_sync="global", **EVERY_STEP),
    "GAM, local sync, grad. accum. 2": dict(gam_method="gam", gam_sync="local", gradient_accumulation_steps=2,
                                            **EVERY_STEP),
    "GAM, local sync, reuse 4": dict(gam_method="gam", gam_sync="local", gam_reuse_interval=4, **EVERY_STEP),
    "GAM, local sync, batch fraction 1/8": dict(gam_method="gam", gam_sync="local", gam_batch_fraction=0.125,
                                                **EVERY_STEP),
}


def collectives_worker(setting: str, out_path: str, rounds: int = 3) -> None:
    """Runs on every rank under torchrun. Per arm: collective counts per step (first round) and the step time
    relative to the stock Trainer (each round runs every arm, in a rotated order). Written by rank 0."""
    from transformers import TrainerCallback

    s = dict(SETTINGS[setting])
    names = list(DIST_ARMS)
    counts, times = {}, {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            arm = DIST_ARMS[name]
            clock = StepClock()
            holder = {}

            class HookInstaller(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    ddp = holder["trainer"].model_wrapped
                    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):

                        def hook(state_, bucket):
                            # DDP's default reduction (average), issued through the uncounted original function.
                            COUNTS["DDP bucket all_reduce"] = COUNTS.get("DDP bucket all_reduce", 0) + 1
                            tensor = bucket.buffer().div_(torch.distributed.get_world_size())
                            future = _ORIGINAL["all_reduce"](tensor, async_op=True).get_future()
                            return future.then(lambda f: f.value()[0])

                        ddp.register_comm_hook(None, hook)

            data = make_data(s, 2 * s["steps"] * arm.get("gradient_accumulation_steps", 1))
            with tempfile.TemporaryDirectory() as out_dir:
                trainer = make_trainer(make_model(s), data, s, arm, s["steps"], out_dir,
                                       [HookInstaller(), clock.callback])
                holder["trainer"] = trainer
                trainer.train()
            times[name].append(statistics.mean(clock.times[s["drop"]:]))
            if r == 0:
                steps = clock.counts[1:]  # drop the first step
                keys = sorted({k for c in steps for k in c})
                counts[name] = {k: statistics.median([c.get(k, 0) for c in steps]) for k in keys}
    stock = times["stock Trainer"]
    ratios = {}
    for name, values in times.items():
        per_round = [t / b for t, b in zip(values, stock)]
        ratios[name] = (statistics.median(per_round), min(per_round), max(per_round))
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"counts": counts, "ratios": ratios}, f)
    torch.distributed.barrier()  # both ranks done before either exits and tears down gloo


def count_collectives(setting: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "counts.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            os.path.abspath(__file__), "--setting", setting, "--worker-collectives", out_path,
        ]
        env = {**os.environ, "STEP_COST_COUNT_COLLECTIVES": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out_path) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------


def run(setting: str = "full", collectives: bool = True, threads: int = 1, names: list[str] | None = None) -> dict:
    torch.set_num_threads(threads)
    s = SETTINGS[setting]
    arms = ARMS if names is None else {"stock Trainer": ARMS["stock Trainer"], **{n: ARMS[n] for n in names}}
    with tempfile.TemporaryDirectory() as out_dir:
        timing = time_arms(s, arms, out_dir)
        memory = memory_arms(s, arms, out_dir)
    counts = count_collectives(setting) if collectives else None
    return {"setting": setting, "params": sum(p.numel() for p in make_model(s).parameters()), "timing": timing,
            "memory": memory, "collectives": counts, "threads": threads}


def markdown(result: dict) -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {result['threads']} thread(s)"
    s = SETTINGS[result["setting"]]
    lines = [
        f"Setting `{result['setting']}`: ViT {s['layers']} layers, hidden {s['hidden']}, {s['image']}x{s['image']} "
        f"images, patch {s['patch']}, batch {s['batch']}, {result['params']:,} parameters; {dev}; "
        f"{s['rounds']} interleaved rounds of {s['steps']} steps (first {s['drop']} dropped). "
        f"Stock Trainer step (median over rounds of the mean): {result['timing']['stock_ms']:.1f} ms.",
        "",
        "| arm | time per step / stock (median over rounds) | range over rounds | peak memory above stock (x parameter bytes) |",
        "|---|---|---|---|",
    ]
    for name, (med, lo, hi) in result["timing"]["ratios"].items():
        mem = result["memory"][name]
        mem_text = "n/a" if mem is None else f"{mem:+.2f}"
        lines.append(f"| {name} | {med:.2f} | {lo:.2f} - {hi:.2f} | {mem_text} |")
    if result["collectives"] is not None:
        counts, ratios = result["collectives"]["counts"], result["collectives"]["ratios"]
        keys = sorted({k for c in counts.values() for k in c})
        lines += ["", "2 ranks (torchrun, gloo, 1 thread each): collectives per optimizer step (median over steps 2 "
                  f"to {s['steps']} of the first round) and time per step relative to the stock Trainer (median "
                  "and range over 3 interleaved rounds):", ""]
        lines.append("| arm | " + " | ".join(keys) + " | time / stock | range |")
        lines.append("|---|" + "---|" * (len(keys) + 2))
        for name, c in counts.items():
            med, lo, hi = ratios[name]
            lines.append(f"| {name} | " + " | ".join(f"{c.get(k, 0):g}" for k in keys)
                         + f" | {med:.2f} | {lo:.2f} - {hi:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (seconds)")
    parser.add_argument("--setting", choices=list(SETTINGS), default=None)
    parser.add_argument("--no-collectives", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default=None, help="';'-separated arm names (default: all); the stock Trainer is "
                        f"always measured. Arms: {'; '.join(ARMS)}")
    parser.add_argument("--worker-collectives", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setting = args.setting or ("quick" if args.quick else "full")
    if args.worker_collectives:
        torch.set_num_threads(1)
        collectives_worker(setting, args.worker_collectives)
        return None
    names = None
    if args.arms:
        names = [n for n in args.arms.split(";") if n != "stock Trainer"]
        unknown = [n for n in names if n not in ARMS]
        if unknown:
            parser.error(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    result = run(setting, collectives=not args.no_collectives, threads=args.threads, names=names)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
