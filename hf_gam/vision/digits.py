"""scikit-learn's bundled 8x8 digits as a transfer task: source classes to pretrain on, target classes to fine-tune
on, fixed splits, and small Transformers models sized for them. No download: the demo and the fine-tuning benchmark
run on it offline."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
IMAGE_SIZE = {"vit": 8, "resnet": 16}
"""The image side each architecture of `digits_model` is built for (the 8x8 digits are resized bilinearly)."""


def digits_by_class(size: int = 8) -> tuple[torch.Tensor, list[int]]:
    """The 1,797 digits as `(N, 1, size, size)` float tensors in [-1, 1] (resized bilinearly from 8x8) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, [int(y) for y in digits.target]


def examples(x: torch.Tensor, labels: Sequence[int], index: Sequence[int], classes: Sequence[int]) -> list[dict]:
    """`{"pixel_values", "labels"}` rows for `index`, labels renumbered 0, 1, ... in the order of `classes`."""
    position = {c: i for i, c in enumerate(classes)}
    return [{"pixel_values": x[i], "labels": position[labels[i]]} for i in index]


def class_indices(labels: Sequence[int], classes: Sequence[int]) -> list[int]:
    """The indices of the images whose label is in `classes`."""
    return [i for i, y in enumerate(labels) if y in classes]


def split_target(labels: Sequence[int], classes: Sequence[int], n_test: int = 300,
                 n_validation: int = 100) -> tuple[list[int], list[int], list[int]]:
    """`(test, validation, pool)` indices of the images of `classes`: one fixed shuffle (seed 0), stratified by class.
    The pool is what fine-tuning sets are drawn from (496 images for the digits 5-9, 501 for 0-4)."""
    from sklearn.model_selection import train_test_split

    index = class_indices(labels, classes)
    rest, test = train_test_split(index, test_size=n_test, random_state=0, stratify=[labels[i] for i in index])
    pool, validation = train_test_split(rest, test_size=n_validation, random_state=0,
                                        stratify=[labels[i] for i in rest])
    return test, validation, pool


def draw(pool: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded sample of `n` indices of `pool` (all of them if it holds fewer), in index order."""
    return sorted(random.Random(seed).sample(list(pool), min(n, len(pool))))


def flip_labels(rows: Sequence[dict], fraction: float, n_classes: int, seed: int) -> list[dict]:
    """A copy of `rows` in which a seeded `fraction` of the labels is replaced by another class, drawn uniformly."""
    rng = random.Random(seed)
    flipped = [dict(r) for r in rows]
    for i in rng.sample(range(len(rows)), round(fraction * len(rows))):
        flipped[i]["labels"] = rng.choice([c for c in range(n_classes) if c != rows[i]["labels"]])
    return flipped


@dataclass
class TransferTask:
    """The rows of one transfer scenario and seed (`transfer_task`)."""

    source: list[dict]
    """Every image of the source classes, to pretrain on."""
    train: list[dict]
    """The fine-tuning set: a seeded draw from the pool of the target classes, some labels flipped if asked."""
    validation: list[dict]
    test: list[dict]


def transfer_task(n_train: int, label_noise: float = 0.0, seed: int = 0, size: int = 8,
                  source_classes: Sequence[int] = SOURCE_CLASSES, target_classes: Sequence[int] = TARGET_CLASSES,
                  n_test: int = 300, n_validation: int = 100) -> TransferTask:
    """Pretrain on `source_classes`, fine-tune on `n_train` images of `target_classes` (all 496 of the pool of the
    digits 5-9 when `n_train` is 496 or more) drawn with `seed`, with a seeded fraction `label_noise` of their labels
    flipped to another class; validation and test rows (fixed, `split_target`) keep their true labels. Labels are
    renumbered 0, 1, ... in the order of each class tuple. The fine-tuning benchmark's scenarios: `vit_500`
    (496, 0.0), `vit_100` (100, 0.0), `vit_500_noisy` (496, 0.2)."""
    x, labels = digits_by_class(size)
    test, validation, pool = split_target(labels, target_classes, n_test, n_validation)
    train = examples(x, labels, draw(pool, n_train, seed), target_classes)
    if label_noise:
        train = flip_labels(train, label_noise, len(target_classes), seed)
    return TransferTask(
        source=examples(x, labels, class_indices(labels, source_classes), source_classes),
        train=train,
        validation=examples(x, labels, validation, target_classes),
        test=examples(x, labels, test, target_classes),
    )


def digits_model(arch: str, num_labels: int):
    """A model for the digits built from a Transformers config (random weights): "vit", a ViT for 8x8 images (patch
    2, 4 layers, hidden 64, no dropout); "resnet", a `ResNetForImageClassification` for 16x16 ones (2 stages of
    basic blocks, 16-32-64 channels, BatchNorm)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    if arch == "vit":
        return ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if arch == "resnet":
        return ResNetForImageClassification(ResNetConfig(
            num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
            downsample_in_first_stage=False, num_labels=num_labels))
    raise ValueError(f"Unknown architecture {arch!r}; known: vit, resnet.")


def digits_examples(split: str = "test", seed: int = 0) -> list[dict]:
    """scikit-learn's bundled 8x8 digits as `{"pixel_values": (1, 8, 8) float32 tensor, "labels": int}`.

    Fixed split (seed 0): 30% test; of the rest, 20% validation and 80% train. Pixels scaled to [-1, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 8.0 - 1.0
    y = data.target.tolist()
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=0.3, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.2, random_state=seed, stratify=[y[i] for i in rest])
    chosen = {"train": train, "validation": val, "test": test}[split]
    return [{"pixel_values": x[i].unsqueeze(0), "labels": int(y[i])} for i in chosen]
