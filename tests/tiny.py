"""Tiny models and data sets that the tests train with a real Trainer."""

import torch
from torch import nn
from transformers import PretrainedConfig

from hf_gam import GAMConfig


class TinyClassifier(nn.Module):
    """A small MLP classifier with the Trainer's calling convention (kwargs in, dict with "loss" out)."""

    def __init__(self, n_in=4, hidden=8, n_classes=3, dropout=0.0, batch_norm=False, dtype=torch.float64):
        super().__init__()
        layers = [nn.Linear(n_in, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)]
        self.net = nn.Sequential(*layers).to(dtype)
        self.config = PretrainedConfig()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class SummedLossClassifier(TinyClassifier):
    """Takes loss kwargs, so the Trainer normalises by `num_items_in_batch` instead of dividing by the GA steps."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            out["loss"] = loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
        return out


def make_data(n=32, n_in=4, n_classes=3, dtype=torch.float64, seed=0):
    """A list of dicts (a float64 column survives only outside `datasets`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return [{"x": x[i], "labels": int(y[i])} for i in range(n)]


def batch_of(data, start, size):
    rows = data[start:start + size]
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])}


def sgd_args(output_dir, **overrides):
    """SGD with learning rate 1, no clipping, deterministic batches: a step moves theta by exactly -d. GAM runs at
    every step with constant radii (the defaults' schedule, written out so that the tests do not depend on the
    defaults), unless overridden."""
    values = dict(
        gam_start=0.0,
        gam_rho_schedule="constant",
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return GAMConfig(**values)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()
