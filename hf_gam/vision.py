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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

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


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetPreset:
    """Where a named dataset lives on the Hub and how its columns and splits are called."""

    name: str
    dataset_name: str
    train_split: str
    eval_split: str
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
    eval_split="validation",
    num_labels=1000,
    gated=True,
    note="Gated: accept the terms on the dataset page, then log in with `hf auth login`.",
)

PRESETS: dict[str, DatasetPreset] = {
    "cars": DatasetPreset(
        name="cars",
        dataset_name="tanganke/stanford_cars",
        train_split="train",
        eval_split="test",
        num_labels=196,
        note="Stanford Cars, 8,144 train / 8,041 test; the repo also holds corrupted copies of test.",
    ),
    "pets": DatasetPreset(
        name="pets",
        dataset_name="timm/oxford-iiit-pet",
        train_split="train",
        eval_split="test",
        num_labels=37,
        note="Oxford-IIIT Pets, 37 breeds; train is the official trainval list.",
    ),
    "flowers": DatasetPreset(
        name="flowers",
        dataset_name="dpdl-benchmark/oxford_flowers102",
        train_split="train",
        eval_split="test",
        num_labels=102,
        note="Flowers-102: 1,020 train / 1,020 validation / 6,149 test.",
    ),
    "cub": DatasetPreset(
        name="cub",
        dataset_name="bentrevett/caltech-ucsd-birds-200-2011",
        train_split="train",
        eval_split="test",
        num_labels=200,
        note="CUB-200-2011: 5,994 train / 5,794 test; also has a `bbox` column (unused).",
    ),
    "aircraft": DatasetPreset(
        name="aircraft",
        dataset_name="HuggingFaceM4/FGVC-Aircraft",
        train_split="train",
        eval_split="test",
        label_column_name="variant",
        num_labels=100,
        note="FGVC-Aircraft, 100-way `variant` labels (`family`/`manufacturer` are coarser). The repo was "
        "published with a loading script; if `datasets` refuses it, pass "
        "`--dataset_revision refs/convert/parquet`.",
    ),
    "food": DatasetPreset(
        name="food",
        dataset_name="ethz/food101",
        train_split="train",
        eval_split="validation",
        num_labels=101,
        note="Food-101: 75,750 train / 25,250 `validation` (the official test images).",
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
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id of the dataset (e.g. `ILSVRC/imagenet-1k`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration (subset) of the dataset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the dataset."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Local training images in imagefolder layout: <dir>/<class>/<image>."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Local evaluation images in imagefolder layout: <dir>/<class>/<image>."}
    )
    train_split: str | None = field(default=None, metadata={"help": "Split to train on (default: the preset's, or 'train')."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (default: the preset's, or 'validation')."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: the preset's, or 'image')."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the class labels (default: the preset's, or 'label')."}
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction of the training split and evaluate on it instead of `eval_split`: use it "
            "to tune hyper-parameters (GAM radii included) without looking at the test split. Also used when the "
            "dataset has no evaluation split."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})


@dataclass
class ResolvedData:
    """Where the data come from once presets and defaults are applied."""

    dataset_name: str | None
    dataset_config_name: str | None
    dataset_revision: str | None
    train_dir: str | None
    validation_dir: str | None
    train_split: str
    eval_split: str
    image_column_name: str
    label_column_name: str

    @property
    def description(self) -> str:
        """A short name of the data for logs and the model card."""
        if self.dataset_name:
            return self.dataset_name if not self.dataset_config_name else f"{self.dataset_name} ({self.dataset_config_name})"
        return "imagefolder"


def resolve_data(args: DataTrainingArguments, preset: DatasetPreset | None = None) -> ResolvedData:
    """Merge `args` with `preset` (command-line values win) and check that a source is given."""
    local = args.train_dir is not None or args.validation_dir is not None
    if local and args.dataset_name is not None:
        raise RecipeError("Pass either `--dataset_name` (or a preset) or `--train_dir/--validation_dir`, not both.")
    if local and args.train_dir is None:
        raise RecipeError("`--validation_dir` needs `--train_dir` too.")
    if preset is not None and local:
        preset = None  # local folders replace the preset's Hub data
    dataset_name = args.dataset_name or (preset.dataset_name if preset else None)
    if dataset_name is None and not local:
        raise RecipeError("No data: pass a preset (`--dataset`), `--dataset_name <hub id>`, or `--train_dir`.")
    if preset is not None and args.dataset_name not in (None, preset.dataset_name):
        preset = None  # another Hub dataset: the preset's columns do not apply
    return ResolvedData(
        dataset_name=dataset_name,
        dataset_config_name=args.dataset_config_name or (preset.dataset_config_name if preset else None),
        dataset_revision=args.dataset_revision,
        train_dir=args.train_dir,
        validation_dir=args.validation_dir,
        train_split=args.train_split or (preset.train_split if preset else "train"),
        eval_split=args.eval_split or (preset.eval_split if preset else "validation"),
        image_column_name=args.image_column_name or (preset.image_column_name if preset else "image"),
        label_column_name=args.label_column_name or (preset.label_column_name if preset else "label"),
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


def load_hub_dataset(
    dataset_name: str, config_name: str | None = None, revision: str | None = None, cache_dir: str | None = None
):
    """`datasets.load_dataset` on a Hub id, with every way of not reaching it turned into one clear error."""
    import datasets
    from huggingface_hub import errors as hub_errors

    try:
        with _quiet_hub_retries():
            return datasets.load_dataset(dataset_name, config_name, revision=revision, cache_dir=cache_dir)
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


def load_image_datasets(data: ResolvedData, cache_dir: str | None = None):
    """A `DatasetDict` with the splits named in `data` (or local `train`/`validation` folders)."""
    import datasets

    if data.train_dir is not None:
        data_files = {"train": os.path.join(data.train_dir, "**")}
        if data.validation_dir is not None:
            data_files["validation"] = os.path.join(data.validation_dir, "**")
        for split, path in (("train", data.train_dir), ("validation", data.validation_dir)):
            if path is not None and not os.path.isdir(path):
                raise RecipeError(f"`--{split}_dir` {path!r} is not a directory.")
        return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    return load_hub_dataset(data.dataset_name, data.dataset_config_name, data.dataset_revision, cache_dir)


def select_splits(dataset_dict, data: ResolvedData, train_val_split: float | None, seed: int):
    """`(train, eval)` datasets: the named splits, or train and a held-out part of it."""
    is_local = data.train_dir is not None
    train_name = "train" if is_local else data.train_split
    eval_name = "validation" if is_local else data.eval_split
    available = list(dataset_dict.keys())
    if train_name not in dataset_dict:
        raise MissingSplitError(f"Split {train_name!r} not found; the dataset has: {', '.join(available)}.")
    train = dataset_dict[train_name]
    if train_val_split is None and eval_name not in dataset_dict:
        if is_local:
            raise MissingSplitError("No `--validation_dir` given: pass one, or `--train_val_split 0.1` to hold out part of train.")
        raise MissingSplitError(
            f"Split {eval_name!r} not found; the dataset has: {', '.join(available)}. Pass `--eval_split` or "
            "`--train_val_split`."
        )
    if train_val_split is not None:
        if not 0.0 < train_val_split < 1.0:
            raise RecipeError(f"`--train_val_split` must lie in (0, 1); got {train_val_split}.")
        parts = train.train_test_split(test_size=train_val_split, seed=seed)
        return parts["train"], parts["test"]
    return train, dataset_dict[eval_name]


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


def build_transforms(image_processor: Any) -> tuple[Callable, Callable]:
    """`(train, eval)` torchvision transforms for ViT fine-tuning with the checkpoint's size, mean and std.

    Train: random-resized crop to the input size, horizontal flip. Eval: resize the shorter side, center crop.
    """
    from torchvision import transforms as T

    geometry = image_geometry(image_processor)
    normalize = T.Normalize(mean=geometry.mean, std=geometry.std)
    train = T.Compose([T.RandomResizedCrop(geometry.crop_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    evaluate = T.Compose([T.Resize(geometry.resize_size), T.CenterCrop(geometry.crop_size), T.ToTensor(), normalize])
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
    "remove_unused_columns": False,  # the transforms read the image column
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a float below 1 is a fraction of the training steps
    "max_grad_norm": 1.0,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
}
"""Training defaults both recipes set on top of `GAMConfig`'s (each recipe's docstring says why)."""


def parse_recipe_args(parser: Any, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> tuple:
    """Parse `argv` into the parser's dataclasses.

    Precedence, lowest first: the dataclass defaults, the recipe's `defaults`, a YAML/JSON file given as
    `--config FILE` (or as the only argument, as in the Transformers examples), then the command line.
    Unknown keys in the file are an error. A token on the command line or in the file is refused: log in
    with `hf auth login` or set HF_TOKEN, so the token never lands in saved arguments or logs.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, argv = pre.parse_known_args(argv)
    config_path = known.config
    if config_path is None and len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        config_path, argv = argv[0], []
    values = dict(defaults)
    if config_path is not None:
        values.update(load_config_file(config_path))
    known_names = {f.name for dtype in parser.dataclass_types for f in fields(dtype) if f.init}
    unknown = sorted(set(values) - known_names)
    if unknown:
        raise RecipeError(f"Unknown option(s) in {config_path or 'recipe defaults'}: {', '.join(unknown)}.")
    if any(arg.split("=")[0] in ("--hub_token", "--hub-token") for arg in argv) or values.get("hub_token"):
        raise RecipeError(
            "Do not pass a token as an argument (it would be saved with the training arguments): log in with "
            "`hf auth login` or set the HF_TOKEN environment variable."
        )
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)


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
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def run_image_classification(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: Any,
    trainer_class: type,
    preset: DatasetPreset | None = None,
) -> dict[str, float]:
    """Fine-tune `model_args.model_name_or_path` on the data described by `data_args` (and `preset`).

    `trainer_class` is the Trainer to use (the recipes pass `GAMTrainer`). Saves the model, its image
    processor and a model card to `training_args.output_dir`, pushes them when `--push_to_hub` is set,
    and returns the final evaluation metrics (empty without `--do_eval`).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    setup_logging(training_args)
    data = resolve_data(data_args, preset)
    logger.info("Data: %s; training arguments: %s", data, training_args)
    if training_args.remove_unused_columns:
        logger.warning("Setting `remove_unused_columns=False`: the image column is only read by the transforms.")
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading the dataset"):
        dataset_dict = load_image_datasets(data, cache_dir=model_args.cache_dir)
    train_dataset, eval_dataset = select_splits(dataset_dict, data, data_args.train_val_split, training_args.seed)
    class_names = check_columns(train_dataset, data.image_column_name, data.label_column_name)
    check_columns(eval_dataset, data.image_column_name, data.label_column_name)
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
    train_transform, eval_transform = build_transforms(image_processor)
    train_dataset = maybe_truncate(train_dataset, data_args.max_train_samples, training_args.seed)
    eval_dataset = maybe_truncate(eval_dataset, data_args.max_eval_samples, training_args.seed)
    train_dataset.set_transform(make_batch_transform(train_transform, data.image_column_name, data.label_column_name))
    eval_dataset.set_transform(make_batch_transform(eval_transform, data.image_column_name, data.label_column_name))

    trainer = trainer_class(
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
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
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
