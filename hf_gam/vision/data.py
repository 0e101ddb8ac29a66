"""Which data a run uses and how they are split: `resolve_data` merges the command line with a preset,
`load_image_datasets` loads the chosen splits (from the Hub or local imagefolder copies), `select_splits` checks
the columns and carves a stratified validation split out of train when the data have none."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .arguments import DataTrainingArguments
from .errors import LabelColumnError, MissingColumnError, MissingSplitError, RecipeError
from .hub import load_hub_dataset
from .presets import DatasetPreset

logger = logging.getLogger(__name__)


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
