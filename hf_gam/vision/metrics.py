"""Top-1 and top-5 accuracy, computed here rather than with `evaluate.load("accuracy")`, which fetches its code
from the Hub. Only the indices of the top-5 classes are gathered across processes, not every logit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def top_k_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None, k: int = 5) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the indices of the top-k classes, not every logit.

    ImageNet's 50,000 x 1,000 logits would otherwise be gathered from every rank.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def accuracy_metrics(top_k_indices: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Top-1 accuracy, and top-5 accuracy when there are more than five classes."""
    top_k_indices = np.asarray(top_k_indices)
    labels = np.asarray(labels).reshape(-1)
    keep = labels != -100  # padding added when gathering uneven batches
    top_k_indices, labels = top_k_indices[keep], labels[keep]
    metrics = {"accuracy": float(np.mean(top_k_indices[:, 0] == labels))}
    if num_labels > 5:
        metrics["top5_accuracy"] = float(np.mean((top_k_indices[:, :5] == labels[:, None]).any(axis=1)))
    return metrics


def make_compute_metrics(num_labels: int) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for a Trainer that uses `top_k_predictions` as `preprocess_logits_for_metrics`."""

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        return accuracy_metrics(predictions, labels, num_labels)

    return compute_metrics
