"""The recipes' argument dataclasses (names follow the Transformers image-classification example) and the
training defaults both recipes set on top of `GAMConfig`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_gam.config import FINETUNE_GAM, GAMConfig

from .transforms import AUGMENTATIONS


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
    compression_eval_samples: int = field(
        default=1000,
        metadata={
            "help": "After training, the model card's table 'Accuracy after compression' (pruning, low-bit weights, "
            "weight noise; `hf_gam.compression`; and the variants of `--export_compressed`) is measured on this many examples of the test split (of "
            "the validation split when there is no test split). 0 skips it."
        },
    )
    export_compressed: str | None = field(
        default=None,
        metadata={
            "help": "After training, write each of these compressions (comma-separated: int8, int8_dynamic, int4, "
            "mlp:F, mlp:F+int8, ...) as a smaller model a plain `from_pretrained` loads, to "
            "`<output_dir>/compressed/<variant>` (pushed with the rest by `--push_to_hub`: "
            "`from_pretrained(repo, subfolder='compressed/<variant>')`), measured on the examples of "
            "`--compression_eval_samples`; the model card gets a table and a picture. Needs torchao for the integer "
            "formats."
        },
    )
    recover_steps: int = field(
        default=0,
        metadata={
            "help": "Fine-tune each `mlp:F` variant of `--export_compressed` this many steps on the training split, "
            "with the run's own step and arguments, before it is quantized and written (one process only)."
        },
    )

    def export_specs(self) -> list:
        """The compressions of `--export_compressed`, parsed (`hf_gam.compression.Compression`)."""
        from hf_gam.compression import Compression

        return [Compression.parse(text) for text in (self.export_compressed or "").split(",") if text.strip()]

    def __post_init__(self):
        specs = self.export_specs()  # an unknown spec or a level out of range is an error here, before any work
        refused = [spec.spec for spec in specs if not spec.deployable]
        if refused:
            raise ValueError(f"--export_compressed: {', '.join(refused)} store nothing smaller (the weights stay in "
                             "floating point); it writes int8, int8_dynamic, int4, mlp:F and mlp:F+<integer format>.")
        if len({spec.name for spec in specs}) != len(specs):
            raise ValueError(f"--export_compressed names a variant twice: {self.export_compressed!r}.")
        if self.recover_steps < 0:
            raise ValueError(f"--recover_steps must be 0 or more; got {self.recover_steps}.")


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
    **FINETUNE_GAM,  # the recipes fine-tune pretrained checkpoints: GAM's setting for fine-tuning, chosen explicitly
}
"""Training defaults both recipes set on top of `GAMConfig`'s (each recipe's docstring says why)."""
