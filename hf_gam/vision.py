"""Image-classification data for the recipes: argument dataclasses, dataset presets, loading with
clear errors, the standard ViT fine-tuning transforms, a collator, and top-1/top-5 accuracy.

The recipes (`recipes/vit_imagenet.py`, `recipes/vit_finegrained.py`) share everything here. This
module does not import the trainer; the recipes put the two together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from hf_gam.config import GAMConfig
from hf_gam.modelcard import append_test_results

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Errors: each one says what is wrong and what to do, without a stack of library internals.
# --------------------------------------------------------------------------------------------
class RecipeError(ValueError):
    """Base class of the errors a recipe reports to the user as a one-line message."""


class UnknownPresetError(RecipeError):
    """The `--dataset` short name is not one of `PRESETS`."""


class MissingColumnError(RecipeError):
    """The image or label column named on the command line is not in the dataset."""


class LabelColumnError(RecipeError):
    """The label column is not a `datasets.ClassLabel` (or the image column is not an image)."""


class MissingSplitError(RecipeError):
    """A split the recipe needs is not in the dataset."""


class DatasetUnavailableError(RecipeError):
    """The dataset cannot be reached: offline, gated, private, misspelt, or script-based."""


AUGMENTATIONS = ("crop_flip", "crop", "none")
"""Choices of `--train_augmentation`."""

# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetPreset:
    """Where a named dataset lives on the Hub and how its columns and splits are called.

    `validation_split` is `None` when the dataset has no validation split of its own: the recipe then carves a
    stratified one out of train. `test_split` is evaluated once, after training, and never used to select anything.
    """

    name: str
    dataset_name: str
    train_split: str
    validation_split: str | None
    test_split: str | None
    image_column_name: str = "image"
    label_column_name: str = "label"
    dataset_config_name: str | None = None
    num_labels: int | None = None
    gated: bool = False
    note: str = ""


IMAGENET_1K = DatasetPreset(
    name="imagenet-1k",
    dataset_name="ILSVRC/imagenet-1k",
    train_split="train",
    validation_split=None,  # its `validation` split is the set everyone reports (its `test` split has no labels)
    test_split="validation",
    num_labels=1000,
    gated=True,
    note="Gated: accept the terms on the dataset page, then log in with `hf auth login`.",
)

# Each preset was checked against its dataset card or viewer page (this machine cannot reach the Hub):
# - cars: card features `image`, `label` (196-way class label); viewer splits train 8,144 / test 8,041 plus seven
#   corrupted copies of test (contrast, gaussian_noise, impulse_noise, jpeg_compression, motion_blur, pixelate,
#   spatter), which are never downloaded because only the named splits are loaded.
# - pets: card features `image`, `label` (37-way), `image_id`, `label_cat_dog`; splits train 3,680 / test 3,669.
# - flowers: card features `image`, `label` (102-way); viewer splits train 1,020 / validation 1,020 / test 6,149.
# - cub: card features `image`, `label` (200-way), `bbox`; viewer splits train 5,994 / test 5,794.
# - food: viewer splits train 75,750 / validation 25,250 (the official test images), columns `image`, `label`.
# - aircraft: `HuggingFaceM4/FGVC-Aircraft` is a loading script, which `datasets` 4 and later refuse. The parquet
#   repository `dpdl-benchmark/fgvc_aircraft` is used instead; its card could not be read from here, so its
#   `variant` column (100-way) and split names are taken from public code that trains on it. A missing split or a
#   label column that is not a class label stops the run with the dataset's actual splits and columns.
PRESETS: dict[str, DatasetPreset] = {
    "cars": DatasetPreset(
        name="cars",
        dataset_name="tanganke/stanford_cars",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=196,
        note="Stanford Cars, 8,144 train / 8,041 test; the repo also holds corrupted copies of test (never loaded).",
    ),
    "pets": DatasetPreset(
        name="pets",
        dataset_name="timm/oxford-iiit-pet",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=37,
        note="Oxford-IIIT Pets, 37 breeds: 3,680 train (the official trainval list) / 3,669 test.",
    ),
    "flowers": DatasetPreset(
        name="flowers",
        dataset_name="dpdl-benchmark/oxford_flowers102",
        train_split="train",
        validation_split="validation",
        test_split="test",
        num_labels=102,
        note="Flowers-102: 1,020 train / 1,020 validation / 6,149 test.",
    ),
    "cub": DatasetPreset(
        name="cub",
        dataset_name="bentrevett/caltech-ucsd-birds-200-2011",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=200,
        note="CUB-200-2011: 5,994 train / 5,794 test; its `bbox` column is dropped.",
    ),
    "aircraft": DatasetPreset(
        name="aircraft",
        dataset_name="dpdl-benchmark/fgvc_aircraft",
        train_split="train",
        validation_split="validation",
        test_split="test",
        label_column_name="variant",
        num_labels=100,
        note="FGVC-Aircraft, 100-way `variant` labels (`family`/`manufacturer` are coarser); 3,334 train / "
        "3,333 validation / 3,333 test images in the official split.",
    ),
    "food": DatasetPreset(
        name="food",
        dataset_name="ethz/food101",
        train_split="train",
        validation_split=None,  # its `validation` split holds the official test images
        test_split="validation",
        num_labels=101,
        note="Food-101: 75,750 train / 25,250 `validation` (the official test images, used as the test split).",
    ),
}


def resolve_preset(name: str) -> DatasetPreset:
    """The preset called `name` (case-insensitive, `-`/`_` ignored); `UnknownPresetError` otherwise."""
    key = name.strip().lower().replace("_", "-")
    aliases = {
        "stanford-cars": "cars",
        "oxford-pets": "pets",
        "oxford-iiit-pet": "pets",
        "flowers102": "flowers",
        "flowers-102": "flowers",
        "cub-200-2011": "cub",
        "cub200": "cub",
        "fgvc-aircraft": "aircraft",
        "food101": "food",
        "food-101": "food",
        "imagenet": "imagenet-1k",
    }
    key = aliases.get(key, key)
    if key == IMAGENET_1K.name:
        return IMAGENET_1K
    if key not in PRESETS:
        raise UnknownPresetError(
            f"Unknown dataset preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}. "
            "For another dataset pass `--dataset_name <hub id>` or `--train_dir/--validation_dir`."
        )
    return PRESETS[key]


# --------------------------------------------------------------------------------------------
# Arguments shared by the recipes (names follow the Transformers image-classification example)
# --------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune and how to load it."""

    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={
            "help": "Checkpoint to fine-tune: a Hub id or a local folder holding an "
            "`AutoModelForImageClassification` checkpoint (timm checkpoints load through the "
            "`timm_wrapper` model type when `timm` is installed)."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config to use if not the checkpoint's own."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use if not the checkpoint's own."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the Hub repository to run (read it first)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={
            "help": "Replace a classification head of another size (e.g. a 1000-way ImageNet head) with a new one "
            "for this dataset's labels."
        },
    )


@dataclass
class DataTrainingArguments:
    """Which images to train on, which to select the model with, and which to test on once at the end."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id of the dataset (e.g. `ILSVRC/imagenet-1k`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration (subset) of the dataset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the dataset."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Local training images in imagefolder layout: <dir>/<class>/<image>."}
    )
    validation_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local validation images (imagefolder layout), used for evaluation during training and model "
            "selection. Without it a stratified part of `--train_dir` is held out."
        },
    )
    test_dir: str | None = field(
        default=None,
        metadata={"help": "Local test images (imagefolder layout), evaluated once after training."},
    )
    train_split: str | None = field(default=None, metadata={"help": "Split to train on (default: the preset's, or 'train')."})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split used for evaluation during training, early stopping and model selection (default: the "
            "preset's; for other datasets 'validation' if the dataset has it). Without one, a stratified part of "
            "train is held out (`--validation_split_fraction`)."
        },
    )
    test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split evaluated once after training and reported as `test_*` (default: the preset's; for other "
            "datasets 'test' if the dataset has it)."
        },
    )
    validation_split_fraction: float = field(
        default=0.1,
        metadata={
            "help": "When the data have no validation split: the fraction of train held out as one, stratified by "
            "class and seeded by `--seed`."
        },
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: the preset's, or 'image')."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the class labels (default: the preset's, or 'label')."}
    )
    train_augmentation: str = field(
        default="crop_flip",
        metadata={
            "help": "Training augmentation: 'crop_flip' (random-resized crop and horizontal flip, the ViT fine-tuning "
            "default), 'crop' (no flip: for classes a mirror image changes, such as digits or text), or 'none' (the "
            "evaluation transform).",
            "choices": list(AUGMENTATIONS),
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the validation and test sets (debugging)."}
    )


@dataclass
class RecipeTrainingArguments(GAMConfig):
    """`GAMConfig` plus what a recipe does with an output folder that already holds checkpoints."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an `--output_dir` that already holds checkpoints, deleting those checkpoints. "
            "Without it such a folder is refused; `--resume_from_checkpoint last` continues the run instead."
        },
    )


@dataclass
class ResolvedData:
    """Where the data come from once presets and defaults are applied.

    `validation_split` / `test_split` are `None` when there is none (a validation split is then carved out of
    train). A name marked optional is a default for a dataset without a preset: it is used only if it exists.
    """

    dataset_name: str | None
    dataset_config_name: str | None
    dataset_revision: str | None
    train_dir: str | None
    validation_dir: str | None
    test_dir: str | None
    train_split: str
    validation_split: str | None
    test_split: str | None
    image_column_name: str
    label_column_name: str
    validation_optional: bool = False
    test_optional: bool = False

    @property
    def description(self) -> str:
        """A short name of the data for logs and the model card."""
        if self.dataset_name:
            return self.dataset_name if not self.dataset_config_name else f"{self.dataset_name} ({self.dataset_config_name})"
        return "imagefolder"


def resolve_data(args: DataTrainingArguments, preset: DatasetPreset | None = None) -> ResolvedData:
    """Merge `args` with `preset` (command-line values win) and check that a source is given."""
    local = args.train_dir is not None or args.validation_dir is not None or args.test_dir is not None
    if local and args.dataset_name is not None:
        raise RecipeError("Pass either `--dataset_name` (or a preset) or `--train_dir/--validation_dir`, not both.")
    if local and args.train_dir is None:
        raise RecipeError("`--validation_dir`/`--test_dir` need `--train_dir` too.")
    if preset is not None and local:
        preset = None  # local folders replace the preset's Hub data
    dataset_name = args.dataset_name or (preset.dataset_name if preset else None)
    if dataset_name is None and not local:
        raise RecipeError("No data: pass a preset (`--dataset`), `--dataset_name <hub id>`, or `--train_dir`.")
    if preset is not None and args.dataset_name not in (None, preset.dataset_name):
        preset = None  # another Hub dataset: the preset's columns and splits do not apply
    if preset is not None:
        validation_split = args.validation_split or preset.validation_split
        test_split = args.test_split or preset.test_split
    else:
        validation_split = args.validation_split or "validation"
        test_split = args.test_split or "test"
    return ResolvedData(
        dataset_name=dataset_name,
        dataset_config_name=args.dataset_config_name or (preset.dataset_config_name if preset else None),
        dataset_revision=args.dataset_revision,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        test_dir=args.test_dir,
        train_split=args.train_split or (preset.train_split if preset else "train"),
        validation_split=validation_split,
        test_split=test_split,
        image_column_name=args.image_column_name or (preset.image_column_name if preset else "image"),
        label_column_name=args.label_column_name or (preset.label_column_name if preset else "label"),
        validation_optional=preset is None and args.validation_split is None,
        test_optional=preset is None and args.test_split is None,
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """Silence the Hub client's per-retry warnings; the error that follows says what happened."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _unavailable(dataset_name: str, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Cannot load dataset {dataset_name!r}: {reason}. If it is gated (ImageNet-1k is), accept its terms on "
        f"https://huggingface.co/datasets/{dataset_name} and log in with `hf auth login` (or set HF_TOKEN). If this "
        "machine is offline, download it once where the Hub is reachable and run with HF_HUB_OFFLINE=1 and the same "
        "cache (`--cache_dir` / HF_HOME), or use local folders with `--train_dir/--validation_dir`."
    )


def hub_dataset_path(dataset_name: str) -> str:
    """What `datasets` is given for the Hub id `dataset_name`: the id itself.

    The one place where a Hub id becomes a path; tests point it at a local folder laid out like the Hub repository.
    """
    return dataset_name


@contextlib.contextmanager
def _hub_errors(dataset_name: str) -> Iterator[None]:
    """Turn every way of not reaching `dataset_name` into one `DatasetUnavailableError`."""
    import datasets
    from huggingface_hub import errors as hub_errors

    try:
        with _quiet_hub_retries():
            yield
    except hub_errors.GatedRepoError:
        raise _unavailable(dataset_name, "it is gated and this account has no access (or no token was found)") from None
    except datasets.exceptions.DatasetNotFoundError as error:
        gated = "gated" in str(error).lower()
        reason = "it is gated and no valid token was found" if gated else "it does not exist or is private"
        raise _unavailable(dataset_name, reason) from None
    except hub_errors.OfflineModeIsEnabled:
        raise _unavailable(dataset_name, "HF_HUB_OFFLINE is set and it is not in the local cache") from None
    except ConnectionError as error:  # datasets' own ConnectionError subclasses this builtin
        if "OfflineModeIsEnabled" in str(error) or datasets.config.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        else:
            reason = "the Hub cannot be reached (no network, or a proxy/firewall blocks huggingface.co)"
        raise _unavailable(dataset_name, reason) from None
    except RuntimeError as error:
        if "scripts are no longer supported" in str(error):
            raise DatasetUnavailableError(
                f"Dataset {dataset_name!r} is published with a loading script, which this version of `datasets` "
                "does not run. Try the Hub's Parquet conversion: `--dataset_revision refs/convert/parquet`."
            ) from None
        raise


def load_hub_dataset(
    dataset_name: str,
    config_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    splits: Callable[[list[str]], list[str]] | None = None,
):
    """`datasets.load_dataset` on a Hub id, downloading only the splits the run needs.

    `splits` receives the dataset's split names (read from its card and file list, before any data file is
    downloaded) and returns the ones to load; `None` loads every split. Every way of not reaching the dataset
    becomes one `DatasetUnavailableError`.
    """
    import datasets

    path = hub_dataset_path(dataset_name)
    with _hub_errors(dataset_name):
        builder = datasets.load_dataset_builder(path, config_name, revision=revision, cache_dir=cache_dir)
        files = builder.config.data_files
        if splits is None or not files:
            return datasets.load_dataset(path, config_name, revision=revision, cache_dir=cache_dir)
        wanted = splits(list(files))
        data_files = {split: list(files[split]) for split in wanted}
        return datasets.load_dataset(path, config_name, data_files=data_files, revision=revision, cache_dir=cache_dir)


def choose_splits(data: ResolvedData, available: Sequence[str]) -> dict[str, str]:
    """`{role: split name}` for the roles `train`, `validation` and `test` that `data` asks for and `available` has.

    A split named on the command line or by a preset must exist; an optional default name is skipped when absent.
    """
    chosen = {"train": data.train_split}
    for role, name, optional in (
        ("validation", data.validation_split, data.validation_optional),
        ("test", data.test_split, data.test_optional),
    ):
        if name is not None and (name in available or not optional):
            chosen[role] = name
    for role, name in chosen.items():
        if name not in available:
            flag = {"train": "--train_split", "validation": "--validation_split", "test": "--test_split"}[role]
            raise MissingSplitError(
                f"Split {name!r} not found; the dataset has: {', '.join(available)}. Pass `{flag}`."
            )
    if chosen.get("test") is not None and chosen["test"] in (chosen["train"], chosen.get("validation")):
        raise RecipeError(f"The test split {chosen['test']!r} is also used for training or model selection.")
    return chosen


def load_image_datasets(data: ResolvedData, cache_dir: str | None = None) -> dict[str, Any]:
    """`{role: Dataset}` for `train` and, when the data have them, `validation` and `test`.

    Hub datasets: only the chosen splits are downloaded (Stanford Cars' repository also holds seven corrupted copies
    of its test split). Local folders: `--train_dir`, `--validation_dir`, `--test_dir`.
    """
    import datasets

    if data.train_dir is not None:
        dirs = {"train": data.train_dir, "validation": data.validation_dir, "test": data.test_dir}
        for role, path in dirs.items():
            if path is not None and not os.path.isdir(path):
                raise RecipeError(f"`--{role}_dir` {path!r} is not a directory.")
        data_files = {role: os.path.join(path, "**") for role, path in dirs.items() if path is not None}
        return dict(datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir))
    chosen: dict[str, str] = {}

    def pick(available: list[str]) -> list[str]:
        chosen.update(choose_splits(data, available))
        return list(dict.fromkeys(chosen.values()))

    loaded = load_hub_dataset(data.dataset_name, data.dataset_config_name, data.dataset_revision, cache_dir, splits=pick)
    if not chosen:  # the dataset lists no files per split: everything was loaded
        chosen = choose_splits(data, list(loaded.keys()))
    return {role: loaded[name] for role, name in chosen.items()}


def carve_validation(train, fraction: float, seed: int, label_column: str) -> tuple:
    """`(train, validation)`: a seeded, class-stratified `fraction` of `train` held out for model selection."""
    if not 0.0 < fraction < 1.0:
        raise RecipeError(f"`--validation_split_fraction` must lie in (0, 1); got {fraction}.")
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=label_column)
    except ValueError as error:
        raise RecipeError(
            f"Cannot hold out a stratified {fraction:g} of the {len(train)} training images for validation ({error}). "
            "Pass a validation split (`--validation_split` / `--validation_dir`) or another `--validation_split_fraction`."
        ) from None
    return parts["train"], parts["test"]


def select_splits(splits: dict[str, Any], data: ResolvedData, validation_fraction: float, seed: int) -> tuple:
    """`(train, validation, test)`: check the columns, keep only the image and label ones, and carve a stratified
    validation split out of train when the data have none. `test` is `None` when there is no test split."""
    image, label = data.image_column_name, data.label_column_name
    class_names = check_columns(splits["train"], image, label)
    prepared = {}
    for role, dataset in splits.items():
        if role != "train" and check_columns(dataset, image, label) != class_names:
            raise LabelColumnError(f"The {role} split's class names differ from the training split's.")
        prepared[role] = dataset.select_columns([image, label])  # drops `bbox`, `image_id`, ...
    train, validation = prepared["train"], prepared.get("validation")
    if validation is None:
        train, validation = carve_validation(train, validation_fraction, seed, label)
        logger.info(
            "No validation split: held out %d of %d training images (stratified, seed %d) for model selection.",
            len(validation), len(train) + len(validation), seed,
        )
    return train, validation, prepared.get("test")


def check_columns(dataset, image_column: str, label_column: str) -> list[str]:
    """Check that `dataset` has an image column and a `ClassLabel` column; return the class names."""
    import datasets

    columns = list(dataset.column_names)
    for kind, name, flag in (("image", image_column, "--image_column_name"), ("label", label_column, "--label_column_name")):
        if name not in columns:
            raise MissingColumnError(
                f"The {kind} column {name!r} is not in the dataset; its columns are: {', '.join(columns)}. "
                f"Pass `{flag}`."
            )
    image_feature = dataset.features[image_column]
    if not isinstance(image_feature, datasets.Image):
        raise LabelColumnError(
            f"Column {image_column!r} holds {image_feature!r}, not images; pass the right `--image_column_name`."
        )
    label_feature = dataset.features[label_column]
    if not isinstance(label_feature, datasets.ClassLabel):
        raise LabelColumnError(
            f"Column {label_column!r} is {label_feature!r}, not a class label (`datasets.ClassLabel`), so class "
            "names and their number are unknown. Pick another `--label_column_name`, or encode it first with "
            "`Dataset.class_encode_column`."
        )
    return list(label_feature.names)


def maybe_truncate(dataset, max_samples: int | None, seed: int):
    """The first `max_samples` examples of `dataset` after a seeded shuffle (all of them if `None`)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Metrics (computed here: `evaluate.load("accuracy")` needs the Hub)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Command line: dataclasses + recipe defaults + an optional YAML/JSON file
# --------------------------------------------------------------------------------------------
COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,  # evaluate the test split, when there is one, once after training
    "remove_unused_columns": False,  # the transforms read the image column
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a float below 1 is a fraction of the training steps
    "max_grad_norm": 1.0,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
}
"""Training defaults both recipes set on top of `GAMConfig`'s (each recipe's docstring says why)."""


def recipe_parser(*dataclass_types: type) -> Any:
    """An `HfArgumentParser` over `dataclass_types` that accepts only whole flag names (no `--hub_tok`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types, allow_abbrev=False)


_TOKEN_MESSAGE = (
    "Do not pass a token as an argument (it would be saved with the training arguments in training_args.bin and "
    "uploaded with them): log in with `hf auth login` (`huggingface-cli login`) or set the HF_TOKEN environment "
    "variable."
)


def _is_token_name(name: str) -> bool:
    """`token`, `hub_token`, `push_to_hub_token`: the names `TrainingArguments.to_dict` redacts."""
    return name == "token" or name.endswith("_token")


def _looks_like_token_flag(arg: str) -> bool:
    """`--hub_token`, `--hub-token=...`, `--hub_tok`, `--HUB_TOKEN`: any spelling or prefix of a token flag."""
    if not arg.startswith("-"):
        return False
    name = arg.split("=", 1)[0].lstrip("-").replace("-", "_").lower()
    return _is_token_name(name) or (len(name) > len("hub_") and "hub_token".startswith(name))


def refuse_tokens(argv: Sequence[str], values: dict[str, Any]) -> None:
    """Raise `RecipeError` if `argv` or the config `values` carry a Hub token, whatever its spelling."""
    if any(_looks_like_token_flag(arg) for arg in argv) or any(_is_token_name(key.lower()) and value for key, value in values.items()):
        raise RecipeError(_TOKEN_MESSAGE)
    if any(re.fullmatch(r"hf_[A-Za-z0-9]{20,}", arg.split("=", 1)[-1]) for arg in argv):
        raise RecipeError("An argument looks like a Hub token. " + _TOKEN_MESSAGE)


def parse_recipe_args(parser: Any, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> tuple:
    """Parse `argv` into the parser's dataclasses.

    Precedence, lowest first: the dataclass defaults, the recipe's `defaults`, a YAML/JSON file given as
    `--config FILE` (or as the only argument, as in the Transformers examples), then the command line.
    Unknown keys in the file are an error. Flags must be spelt in full (`--learning_r` is an error, not
    `--learning_rate`). A token on the command line (any spelling) or in the file is refused: log in with
    `hf auth login` or set HF_TOKEN, so the token never lands in saved arguments or logs.
    """
    import sys

    parser.allow_abbrev = False  # argparse reads it at parse time: `--hub_tok` must never become `--hub_token`
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_tokens(argv, {})
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, argv = pre.parse_known_args(argv)
    config_path = known.config
    if config_path is None and len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        config_path, argv = argv[0], []
    values = dict(defaults)
    if config_path is not None:
        values.update(load_config_file(config_path))
    refuse_tokens([], values)
    known_names = {f.name for dtype in parser.dataclass_types for f in fields(dtype) if f.init}
    unknown = sorted(set(values) - known_names)
    if unknown:
        raise RecipeError(f"Unknown option(s) in {config_path or 'recipe defaults'}: {', '.join(unknown)}.")
    parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise RecipeError(
            f"Unknown argument(s): {' '.join(remaining)}. Flags must be spelt in full; `--help` lists them."
        )
    return tuple(parsed)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a flat mapping of option names to values from a YAML or JSON file."""
    if not os.path.isfile(path):
        raise RecipeError(f"Config file {path!r} not found.")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"Config file {path!r} must hold a mapping of option names to values.")
    return values


# --------------------------------------------------------------------------------------------
# The fine-tuning run shared by the recipes
# --------------------------------------------------------------------------------------------
def setup_logging(training_args: Any) -> None:
    """Log like the Transformers examples: INFO on the main process, warnings elsewhere."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    level = training_args.get_process_log_level()
    logger.setLevel(min(level, logging.INFO) if training_args.should_log else level)  # the recipe's own lines
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def checkpoint_step(checkpoint: str) -> int | None:
    """The global step recorded in `checkpoint/trainer_state.json` (`None` if unreadable)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def existing_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name)]
    names = [name for name in names if os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for name in sorted(names, key=lambda name: int(name.split("-")[1]))]


def resolve_resume(training_args: Any) -> str | None:
    """The checkpoint to resume from, or `None` for a fresh run; never a checkpoint nobody asked for.

    `--resume_from_checkpoint PATH` resumes from PATH, `--resume_from_checkpoint last` from the newest checkpoint in
    `--output_dir`. Without it, an `--output_dir` that already holds checkpoints is refused (resuming them silently
    would report the old run under the new settings), unless `--overwrite_output_dir` is given: the old checkpoints
    are then deleted (by the main process) so they cannot mix with the new run's.
    """
    output_dir = training_args.output_dir
    requested = training_args.resume_from_checkpoint
    if requested is not None and training_args.do_train:
        if requested == "last":
            found = existing_checkpoints(output_dir)
            if not found:
                raise RecipeError(
                    f"`--resume_from_checkpoint last`: there is no checkpoint-* folder in {output_dir!r} to resume from."
                )
            checkpoint = found[-1]
        elif os.path.isdir(requested):
            checkpoint = requested
        else:
            raise RecipeError(f"`--resume_from_checkpoint {requested}`: no such checkpoint folder.")
        logger.info("Resuming from checkpoint %s (global step %s).", checkpoint, checkpoint_step(checkpoint))
        return checkpoint
    found = existing_checkpoints(output_dir)
    if not found or not training_args.do_train:
        return None
    if not getattr(training_args, "overwrite_output_dir", False):
        raise RecipeError(
            f"Output directory {output_dir!r} already holds checkpoints ({os.path.basename(found[-1])}). Pass "
            "`--resume_from_checkpoint last` to continue that run, `--overwrite_output_dir` to start over there, or "
            "another `--output_dir`."
        )
    if training_args.process_index == 0:
        logger.warning("--overwrite_output_dir: deleting %s.", ", ".join(os.path.basename(path) for path in found))
        for path in found:
            shutil.rmtree(path)
    return None


def with_test_results_card(trainer_class: type) -> type:
    """A subclass of `trainer_class` whose model card also gets the line of test results (`test_results`)."""

    class RecipeTrainer(trainer_class):
        test_results: dict[str, float] | None = None
        test_split_name: str = "test"

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            super().create_model_card(*args, **kwargs)
            if self.test_results and self.is_world_process_zero():
                readme = os.path.join(self.args.output_dir, "README.md")
                append_test_results(readme, self.test_results, self.test_split_name)

    RecipeTrainer.__name__ = RecipeTrainer.__qualname__ = trainer_class.__name__
    return RecipeTrainer


def run_image_classification(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: Any,
    trainer_class: type,
    preset: DatasetPreset | None = None,
) -> dict[str, float]:
    """Fine-tune `model_args.model_name_or_path` on the data described by `data_args` (and `preset`).

    `trainer_class` is the Trainer to use (the recipes pass `GAMTrainer`). Evaluation during training, early
    stopping and best-model selection see only the validation split (the data's own, or a stratified part of
    train). The test split, when there is one, is evaluated once after training (`--do_predict`) and reported as
    `test_*` in `test_results.json`, `all_results.json` and a line of the model card. Saves the model, its image
    processor and the card to `training_args.output_dir`, pushes them when `--push_to_hub` is set, and returns
    the final validation (`eval_*`) and test (`test_*`) metrics.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, set_seed

    setup_logging(training_args)
    checkpoint = resolve_resume(training_args)  # before any data is loaded
    data = resolve_data(data_args, preset)
    logger.info("Data: %s; training arguments: %s", data, training_args)
    if training_args.remove_unused_columns:
        logger.warning("Setting `remove_unused_columns=False`: the image column is only read by the transforms.")
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading the dataset"):
        splits = load_image_datasets(data, cache_dir=model_args.cache_dir)
    train_dataset, eval_dataset, test_dataset = select_splits(
        splits, data, data_args.validation_split_fraction, training_args.seed
    )
    class_names = list(train_dataset.features[data.label_column_name].names)
    label2id = {name: index for index, name in enumerate(class_names)}
    id2label = dict(enumerate(class_names))

    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        **common,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **common,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **common
    )
    train_transform, eval_transform = build_transforms(image_processor, data_args.train_augmentation)
    train_dataset = maybe_truncate(train_dataset, data_args.max_train_samples, training_args.seed)
    eval_dataset = maybe_truncate(eval_dataset, data_args.max_eval_samples, training_args.seed)
    train_dataset.set_transform(make_batch_transform(train_transform, data.image_column_name, data.label_column_name))
    eval_dataset.set_transform(make_batch_transform(eval_transform, data.image_column_name, data.label_column_name))
    if test_dataset is not None:
        test_dataset = maybe_truncate(test_dataset, data_args.max_eval_samples, training_args.seed)
        test_dataset.set_transform(make_batch_transform(eval_transform, data.image_column_name, data.label_column_name))

    trainer = with_test_results_card(trainer_class)(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=make_compute_metrics(len(class_names)),
        preprocess_logits_for_metrics=top_k_predictions,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    metrics: dict[str, float] = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if test_dataset is not None and training_args.do_predict:
        test_metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        trainer.test_results = test_metrics
        trainer.test_split_name = data.test_dir if data.train_dir is not None else data.test_split
        metrics.update(test_metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data.description,
        "tags": ["image-classification"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return metrics


def exit_on_recipe_error(main: Callable[[], Any]) -> Any:
    """Run `main`; print a `RecipeError` as one line on stderr and exit with status 2."""
    import sys

    try:
        return main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
