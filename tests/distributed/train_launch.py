"""Run with `accelerate launch --multi_gpu --num_processes 2 train_launch.py OUT_DIR` (CPU, gloo): a tiny model
trains with GAMTrainer on a learnable task and saves a checkpoint; rank 0 saves its final weights for comparison."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_gam import PRETRAIN_GAM, GAMConfig, GAMTrainer  # noqa: E402
from tiny import TinyClassifier  # noqa: E402


def learnable_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [{"x": x[i], "labels": int(labels[i])} for i in range(n)]


def main():
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = TinyClassifier(hidden=16, dtype=torch.float32)
    args = GAMConfig(output_dir=out_dir, per_device_train_batch_size=16, num_train_epochs=4, learning_rate=0.3,
                     optim="sgd", logging_steps=4, save_strategy="steps", save_steps=16, report_to="none",
                     remove_unused_columns=False, use_cpu=True, disable_tqdm=True, gam_grad_rho=0.05, **PRETRAIN_GAM)
    trainer = GAMTrainer(model=model, args=args, train_dataset=learnable_data())
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        torch.save({"losses": losses, "state_dict": model.state_dict(), "global_step": trainer.state.global_step,
                    "world_size": trainer.args.world_size, "log_history": trainer.state.log_history},
                   os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    main()
