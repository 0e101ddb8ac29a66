"""Run with `torchrun --nproc_per_node 2 gam_ranks.py OUT_DIR`: GAM under DDP (local and global) through
GAMTrainer, and under FSDP2 (`fully_shard`) through the GAMStep code GAMTrainer drives, on CPU with gloo.

Rank 0 saves, per scenario, the parameters after one SGD step (lr 1) and the collectives counted per step.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_gam import GAMTrainer  # noqa: E402
from hf_gam.gam import GAMHyperParams, GAMStep, sharded_sum  # noqa: E402
from tiny import TinyClassifier, batch_of, make_data, sgd_args  # noqa: E402

HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)

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

    def on_step_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not getattr(wrapped, "_counted", False):
            wrapped.register_comm_hook(None, counting_hook)
            wrapped._counted = True
        CALLS.update(all_reduce=0, ddp_buckets=0)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(dict(CALLS))


def ddp_scenario(out_dir, name, model, data, **overrides):
    counter = CountPerStep()
    args = sgd_args(os.path.join(out_dir, name), **HPARAMS, **overrides)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[counter])
    counter.trainer = trainer
    trainer.train()
    if dist.get_rank() == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "calls": counter.per_step},
                   os.path.join(out_dir, f"{name}.pt"))


def fsdp2_scenario(out_dir, model, data):
    """FSDP2: each rank holds a shard of every parameter and sees its own 8 samples."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.net[0])
    fully_shard(model)
    rank = dist.get_rank()
    batch = batch_of(data, 8 * rank, 8)
    step = GAMStep(model.parameters())
    assert isinstance(step.params[0], torch.distributed.tensor.DTensor)

    def forward_backward(pass_index):
        model.set_requires_gradient_sync(True)
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    hp = GAMHyperParams(grad_rho=0.05, grad_norm_rho=0.3, alpha=0.6, beta=0.4, gamma=0.5)
    theta = [p.full_tensor().clone() for p in model.parameters()]
    stats = step.run(forward_backward, hp, reduce=sharded_sum(step.params))
    after = [p.full_tensor() for p in model.parameters()]
    d = [p.grad.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save({"restored": all(torch.equal(a, b) for a, b in zip(after, theta)), "d": d,
                    "skipped": bool(stats.failed)}, os.path.join(out_dir, "fsdp2.pt"))


def main():
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=16, seed=0)
    ddp_scenario(out_dir, "local", copy.deepcopy(model), data, gam_sync="local")
    ddp_scenario(out_dir, "global", copy.deepcopy(model), data, gam_sync="global")
    # 2 micro-batches per rank, 2 optimizer steps: still one gradient all-reduce per step in local mode.
    ddp_scenario(out_dir, "local_accumulate", copy.deepcopy(model), make_data(n=64, seed=1), gam_sync="local",
                 gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1)
    ddp_scenario(out_dir, "global_accumulate", copy.deepcopy(model), make_data(n=64, seed=1), gam_sync="global",
                 gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1)
    fsdp2_scenario(out_dir, copy.deepcopy(model), data)
    dist.barrier()


if __name__ == "__main__":
    main()
