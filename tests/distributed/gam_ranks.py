"""Run with `torchrun --nproc_per_node 2 gam_ranks.py OUT_DIR [SCENARIO ...]` (every scenario by default): GAM under
DDP (local and global) through GAMTrainer, a non-finite pass on one rank only, the gradient-norm trigger, FSDP2
(`fully_shard`) through `GAMTrainer.training_step`, and accuracy after compression averaged over ranks, on CPU with
gloo.

Rank 0 saves, per scenario, the parameters after each optimizer step and the collectives counted per step. A
collective waits at most `TIMEOUT`, so a rank left waiting by the other fails the run instead of hanging it.
"""

import copy
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_gam import GAMTrainer  # noqa: E402
from tiny import TinyClassifier, batch_of, flat_params, make_data, sgd_args  # noqa: E402

HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)
TIMEOUT = timedelta(seconds=60)

CALLS = {"all_reduce": 0, "ddp_buckets": 0}
_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    CALLS["all_reduce"] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce


def counting_hook(state, bucket):
    """A DDP communication hook that counts the buckets DDP itself would all-reduce."""
    CALLS["ddp_buckets"] += 1
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size())
    work = dist.distributed_c10d.all_reduce(tensor, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class CountPerStep(TrainerCallback):
    """Counts the collectives issued between the start and the end of each optimizer step."""

    def __init__(self):
        self.trainer = None
        self.per_step = []
        self.params = []  # the parameters after each step

    def on_step_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not getattr(wrapped, "_counted", False):
            wrapped.register_comm_hook(None, counting_hook)
            wrapped._counted = True
        CALLS.update(all_reduce=0, ddp_buckets=0)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(dict(CALLS))
        self.params.append(flat_params(self.trainer.model))


def ddp_scenario(out_dir, name, model, data, **overrides):
    counter = CountPerStep()
    args = sgd_args(os.path.join(out_dir, name), **HPARAMS, **overrides)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[counter])
    counter.trainer = trainer
    trainer.train()
    if dist.get_rank() == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "calls": counter.per_step,
                    "steps": counter.params, "logs": trainer.state.log_history},
                   os.path.join(out_dir, f"{name}.pt"))


class CollectiveInForward(TinyClassifier):
    """TinyClassifier whose forward runs a collective, as SyncBatchNorm does: a rank that skipped a pass would leave
    the other waiting in it. On rank `bad_rank`, the loss of forward number `bad_forward` (counting from 0) is
    infinite."""

    def __init__(self, bad_rank=1, bad_forward=2):
        super().__init__()
        self.bad_rank, self.bad_forward = bad_rank, bad_forward
        self.forwards = 0

    def forward(self, x, labels=None):
        ranks = torch.ones((), dtype=torch.float64)
        dist.all_reduce(ranks)
        assert ranks.item() == dist.get_world_size(), "the ranks are out of step"
        out = super().forward(x, labels)
        if self.forwards == self.bad_forward and dist.get_rank() == self.bad_rank:
            out["loss"] = out["loss"] * math.inf
        self.forwards += 1
        return out


def every_rank_scenario(out_dir, name, data, make_model, scaler=False, callbacks=(), **overrides):
    """DDP local, SGD (lr 1 unless overridden), a log at every step, on `make_model()` (built after seeding): rank 0
    saves every rank's parameters after each step, forward count and loss scale, and its logs. With `scaler`, a
    GradScaler is installed (Accelerate creates none on CPU); `callbacks(model)` gives further callbacks."""
    torch.manual_seed(0)
    model = make_model()
    counter = CountPerStep()
    args = sgd_args(os.path.join(out_dir, name), gam_sync="local", logging_strategy="steps", logging_steps=1,
                    **HPARAMS, **overrides)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data,
                         callbacks=[counter, *[make(model) for make in callbacks]])
    counter.trainer = trainer
    if scaler:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    mine = {"steps": counter.params, "forwards": model.forwards,
            "scale": trainer.accelerator.scaler.get_scale() if scaler else None}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        torch.save({"ranks": everyone, "logs": trainer.state.log_history}, os.path.join(out_dir, f"{name}.pt"))


def nonfinite_scenario(out_dir, name, data, scaler=False, **overrides):
    """Rank 1 alone gets an infinite loss at pass 3 of step 0 (`CollectiveInForward`)."""
    every_rank_scenario(out_dir, name, data, CollectiveInForward, scaler=scaler, **overrides)


class RankScaledLoss(CollectiveInForward):
    """`CollectiveInForward` with no infinite loss, whose loss is multiplied by `SCALES[rank][step]` (`step` is set
    before each optimizer step): rank 0's gradient norms rise while rank 1's fall, so a trigger that decided on each
    rank's own norm would run the ranks out of step."""

    SCALES = ([1.0, 10.0, 100.0, 1000.0], [1000.0, 100.0, 10.0, 1.0])

    def __init__(self):
        super().__init__(bad_forward=-1)
        self.step = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        out["loss"] = out["loss"] * self.SCALES[dist.get_rank()][self.step]
        return out


class SetStep(TrainerCallback):
    def __init__(self, model):
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.step = state.global_step


def trigger_scenario(out_dir, name, data):
    """The gradient-norm trigger (k = 0, decay 0.5: a full step iff the squared norm exceeds its running mean), 4
    steps of `RankScaledLoss`."""
    every_rank_scenario(out_dir, name, data, RankScaledLoss, callbacks=[SetStep], max_steps=4, learning_rate=1e-5,
                        gam_trigger_std=0.0, gam_trigger_decay=0.5)


def fsdp2_scenario(out_dir, model, data):
    """FSDP2 through `GAMTrainer.training_step` (its DTensor branch), called outside `train()`: each rank holds a shard
    of every parameter and passes its own 8 samples. Call 1 (step 0) runs full GAM and stores the correction; call 2
    (step 1, `gam_reuse_interval=2`) reuses it on the next 8 samples of each rank, at the same theta."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.net[0])
    fully_shard(model)
    rank = dist.get_rank()
    trainer = GAMTrainer(model=model, args=sgd_args(os.path.join(out_dir, "fsdp2"), gam_reuse_interval=2, **HPARAMS))
    trainer.current_gradient_accumulation_steps = 1  # set by `train()` for each optimizer step
    assert isinstance(next(model.parameters()), torch.distributed.tensor.DTensor)
    theta = [p.full_tensor().clone() for p in model.parameters()]
    calls = []
    for step, start in ((0, 0), (1, 16)):
        trainer.state.global_step = step
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, batch_of(data, start + 8 * rank, 8))
        after = [p.full_tensor() for p in model.parameters()]
        calls.append({"d": [p.grad.full_tensor() for p in model.parameters()],
                      "restored": all(torch.equal(a, b) for a, b in zip(after, theta))})
    logs = trainer._gam_logs()  # the GAM metrics of both calls, summed over the ranks
    if rank == 0:
        torch.save({"calls": calls, "logs": logs}, os.path.join(out_dir, "fsdp2.pt"))


def compression_scenario(out_dir, model, data):
    """`hf_gam.compression.report_over_ranks`: each rank measures its own 8 examples; rank 0 saves every rank's local
    report and the reduced one of each rank."""
    from hf_gam.compression import compression_report, report_over_ranks

    batch = batch_of(data, 8 * dist.get_rank(), 8)
    names = ["prune:0.5", "rtn:2", "noise:0.5"]
    mine = {"local": compression_report(model, [batch], names), "reduced": report_over_ranks(model, batch, names)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        torch.save(everyone, os.path.join(out_dir, "compression.pt"))


def main():
    out_dir, only = sys.argv[1], set(sys.argv[2:])
    dist.init_process_group("gloo", timeout=TIMEOUT)
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=16, seed=0)
    scenarios = {
        "local": lambda: ddp_scenario(out_dir, "local", copy.deepcopy(model), data, gam_sync="local"),
        "global": lambda: ddp_scenario(out_dir, "global", copy.deepcopy(model), data, gam_sync="global"),
        # 2 micro-batches per rank, 2 optimizer steps: still one gradient all-reduce per step in local mode.
        "local_accumulate": lambda: ddp_scenario(
            out_dir, "local_accumulate", copy.deepcopy(model), make_data(n=64, seed=1), gam_sync="local",
            gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1),
        "global_accumulate": lambda: ddp_scenario(
            out_dir, "global_accumulate", copy.deepcopy(model), make_data(n=64, seed=1), gam_sync="global",
            gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1),
        # A full step, then a reuse step, each of 2 micro-batches per rank.
        "local_reuse": lambda: ddp_scenario(
            out_dir, "local_reuse", copy.deepcopy(model), make_data(n=64, seed=1), gam_sync="local",
            gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
            gam_reuse_interval=2, logging_strategy="steps", logging_steps=1),
        "nonfinite": lambda: nonfinite_scenario(out_dir, "nonfinite", data),
        "nonfinite_scaler": lambda: nonfinite_scenario(out_dir, "nonfinite_scaler", data, scaler=True),
        # Step 1 reuses the correction of step 0, whose passes failed on rank 1.
        "nonfinite_reuse": lambda: nonfinite_scenario(out_dir, "nonfinite_reuse", make_data(n=32, seed=0),
                                                      max_steps=2, gam_reuse_interval=2),
        "nonfinite_scaler_reuse": lambda: nonfinite_scenario(out_dir, "nonfinite_scaler_reuse", make_data(n=32, seed=0),
                                                             scaler=True, max_steps=2, gam_reuse_interval=2),
        "trigger": lambda: trigger_scenario(out_dir, "trigger", make_data(n=64, seed=0)),
        "fsdp2": lambda: fsdp2_scenario(out_dir, copy.deepcopy(model), make_data(n=32, seed=0)),
        "compression": lambda: compression_scenario(out_dir, copy.deepcopy(model), data),
    }
    for name, run in scenarios.items():
        if not only or name in only:
            run()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
