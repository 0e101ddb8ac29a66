"""The standard ViT fine-tuning transforms, sized and normalised from the checkpoint's image processor, and the
collator that stacks transformed examples into a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RecipeError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("crop_flip", "crop", "none")
"""Choices of `--train_augmentation`."""


def _get(obj: Any, key: str) -> Any:
    """`obj[key]` or `obj.key` for the size dictionaries processors keep; `None` if absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


@dataclass(frozen=True)
class ImageGeometry:
    """Input size and normalisation a checkpoint expects."""

    crop_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def image_geometry(image_processor: Any) -> ImageGeometry:
    """Read crop size, eval resize size, mean and std from an image processor.

    ViT-style processors (`size={"height", "width"}`) resize the shorter side to that size and crop it;
    processors with `size={"shortest_edge"}` plus a `crop_size` or `crop_pct` (ConvNeXt, ResNet) resize to
    the shortest edge (or size / crop_pct) and crop `crop_size`; timm processors carry a `data_config`.
    """
    data_config = getattr(image_processor, "data_config", None)
    if isinstance(data_config, dict) and "input_size" in data_config:  # timm checkpoints
        height, width = data_config["input_size"][-2:]
        crop_pct = data_config.get("crop_pct") or 1.0
        return ImageGeometry(
            crop_size=(int(height), int(width)),
            resize_size=int(round(min(height, width) / crop_pct)),
            mean=tuple(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(data_config.get("std", IMAGENET_DEFAULT_STD)),
        )
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    height, width, shortest = _get(size, "height"), _get(size, "width"), _get(size, "shortest_edge")
    if _get(crop, "height") and _get(crop, "width"):
        crop_size = (int(_get(crop, "height")), int(_get(crop, "width")))
    elif height and width:
        crop_size = (int(height), int(width))
    elif shortest:
        crop_size = (int(shortest), int(shortest))
    else:
        raise RecipeError(f"Cannot read the input size from image processor {type(image_processor).__name__}.")
    crop_pct = getattr(image_processor, "crop_pct", None)
    if shortest and crop_pct and not _get(crop, "height"):
        resize_size = int(round(int(shortest) / crop_pct))
    elif shortest:
        resize_size = int(shortest)
    else:
        resize_size = min(crop_size)
    mean = getattr(image_processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(image_processor, "image_std", None) or IMAGENET_DEFAULT_STD
    return ImageGeometry(crop_size=crop_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std))


def build_transforms(image_processor: Any, augmentation: str = "crop_flip") -> tuple[Callable, Callable]:
    """`(train, eval)` torchvision transforms for ViT fine-tuning with the checkpoint's size, mean and std.

    Train (`augmentation`): "crop_flip", random-resized crop to the input size and horizontal flip; "crop", the crop
    alone; "none", the evaluation transform. Eval: resize the shorter side, center crop.
    """
    from torchvision import transforms as T

    if augmentation not in AUGMENTATIONS:
        raise RecipeError(f"--train_augmentation must be one of {', '.join(AUGMENTATIONS)}; got {augmentation!r}.")
    geometry = image_geometry(image_processor)
    normalize = T.Normalize(mean=geometry.mean, std=geometry.std)
    evaluate = T.Compose([T.Resize(geometry.resize_size), T.CenterCrop(geometry.crop_size), T.ToTensor(), normalize])
    if augmentation == "none":
        return evaluate, evaluate
    steps = [T.RandomResizedCrop(geometry.crop_size)]
    if augmentation == "crop_flip":
        steps.append(T.RandomHorizontalFlip())
    train = T.Compose(steps + [T.ToTensor(), normalize])
    return train, evaluate


def make_batch_transform(transform: Callable, image_column: str, label_column: str) -> Callable[[dict], dict]:
    """A function for `Dataset.set_transform` that turns a batch into `pixel_values` and `labels`."""

    def apply(batch: dict) -> dict:
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch[image_column]],
            "labels": list(batch[label_column]),
        }

    return apply


def collate_fn(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch for the model."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long),
    }
