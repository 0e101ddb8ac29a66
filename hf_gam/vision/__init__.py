"""Image classification for the recipes (`recipes/vit_imagenet.py`, `recipes/vit_finegrained.py`).

Each module holds one part of a fine-tuning run:

- `errors`: the one-line errors a recipe reports (`RecipeError` and its subclasses).
- `presets`: named datasets (`--dataset cars`): Hub id, splits, columns.
- `arguments`: the argument dataclasses and the training defaults both recipes share.
- `command_line`: parsing flags and config files, refusing tokens, exiting on a `RecipeError`.
- `resume`: what to do with an output folder that already holds checkpoints.
- `hub`: loading from the Hub with clear errors, only the splits a run needs.
- `data`: which data and splits a run uses; a stratified validation split carved out of train.
- `transforms`: the ViT fine-tuning transforms and the collator.
- `metrics`: top-1 and top-5 accuracy.
- `digits`: scikit-learn's bundled digits as a transfer task (pretrain on some classes, fine-tune on the others)
  and small models for them, for the demo and the fine-tuning benchmark (not re-exported: `hf_gam.vision.digits`).
- `run`: `run_image_classification`, the run both recipes call (load the splits, the model, build the trainer,
  train, evaluate, test once, measure compression, write the model card), and each of its steps.

Every public name is importable from `hf_gam.vision`. Two are read from this package at call time, so a test can
replace them here: `hub_dataset_path` (where a Hub id is loaded from) and `load_image_datasets`. The modules log
under the `hf_gam.vision` logger. Nothing here imports the trainer: the recipes pass `GAMTrainer` in.
"""

import logging

from .arguments import COMMON_TRAINING_DEFAULTS, DataTrainingArguments, ModelArguments, RecipeTrainingArguments
from .command_line import exit_on_recipe_error, load_config_file, parse_recipe_args, recipe_parser, refuse_tokens
from .data import (
    ResolvedData,
    carve_validation,
    check_columns,
    choose_splits,
    load_image_datasets,
    maybe_truncate,
    resolve_data,
    select_splits,
)
from .errors import (
    DatasetUnavailableError,
    LabelColumnError,
    MissingColumnError,
    MissingSplitError,
    RecipeError,
    UnknownPresetError,
)
from .hub import hub_dataset_path, load_hub_dataset
from .metrics import accuracy_metrics, make_compute_metrics, top_k_predictions
from .presets import IMAGENET_1K, PRESETS, DatasetPreset, resolve_preset
from .resume import checkpoint_step, existing_checkpoints, resolve_resume
from .run import (
    Splits,
    build_trainer,
    create_model_card_or_push,
    evaluate_model,
    evaluate_test_split,
    load_model,
    load_splits,
    measure_compression,
    run_image_classification,
    set_transforms,
    setup_logging,
    train_model,
    with_test_results_card,
)
from .transforms import (
    AUGMENTATIONS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageGeometry,
    build_transforms,
    collate_fn,
    image_geometry,
    make_batch_transform,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS",
    "COMMON_TRAINING_DEFAULTS",
    "IMAGENET_1K",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "PRESETS",
    "DataTrainingArguments",
    "DatasetPreset",
    "DatasetUnavailableError",
    "ImageGeometry",
    "LabelColumnError",
    "MissingColumnError",
    "MissingSplitError",
    "ModelArguments",
    "RecipeError",
    "RecipeTrainingArguments",
    "ResolvedData",
    "Splits",
    "UnknownPresetError",
    "accuracy_metrics",
    "build_trainer",
    "build_transforms",
    "carve_validation",
    "check_columns",
    "checkpoint_step",
    "choose_splits",
    "collate_fn",
    "create_model_card_or_push",
    "evaluate_model",
    "evaluate_test_split",
    "exit_on_recipe_error",
    "existing_checkpoints",
    "hub_dataset_path",
    "image_geometry",
    "load_config_file",
    "load_hub_dataset",
    "load_image_datasets",
    "load_model",
    "load_splits",
    "make_batch_transform",
    "make_compute_metrics",
    "maybe_truncate",
    "measure_compression",
    "parse_recipe_args",
    "recipe_parser",
    "refuse_tokens",
    "resolve_data",
    "resolve_preset",
    "resolve_resume",
    "run_image_classification",
    "select_splits",
    "set_transforms",
    "setup_logging",
    "top_k_predictions",
    "train_model",
    "with_test_results_card",
]
