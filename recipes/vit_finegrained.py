#!/usr/bin/env python
"""Fine-tune a Vision Transformer on a fine-grained classification set with GAM.

Stanford Cars on one GPU:

    python recipes/vit_finegrained.py --dataset cars \\
        --model_name_or_path google/vit-base-patch16-224-in21k \\
        --output_dir outputs/vit-base-cars-gam --bf16

Presets (`--dataset NAME`), each holding the Hub id, splits and column names (see `hf_gam.vision.PRESETS`):
cars (tanganke/stanford_cars), pets (timm/oxford-iiit-pet), flowers (dpdl-benchmark/oxford_flowers102),
cub (bentrevett/caltech-ucsd-birds-200-2011), aircraft (dpdl-benchmark/fgvc_aircraft, 100-way `variant`),
food (ethz/food101). Any other Hub dataset: `--dataset_name ID --image_column_name COL --label_column_name COL`
(the label column must be a `ClassLabel`). Local folders: `--train_dir DIR [--validation_dir DIR] [--test_dir DIR]`.
Only the splits a run needs are downloaded.

Model selection never sees the test split: evaluation during training, early stopping and best-model selection
use the dataset's validation split (Flowers-102, FGVC-Aircraft) or, when it has none, a stratified
`--validation_split_fraction` (default 0.1) of train held out with `--seed`. The test split (Food-101's is called
`validation`) is evaluated once after training and reported as `test_*` metrics and a line of the model card.

An `--output_dir` that already holds checkpoints is refused: continue that run with
`--resume_from_checkpoint last` (or a checkpoint path), or start over there with `--overwrite_output_dir`.

Where the defaults come from (a starting point, not a tuned result):
- GAM: `hf_gam.FINETUNE_GAM`, chosen explicitly (`gam_start=0.0`, `gam_rho_schedule=constant`, also
  `GAMConfig`'s defaults): the released radii (rho=0.2, rho'=0.02) and weights (alpha=0.6, beta=0.5,
  gamma=0.03) at every step, the setting that beat AdamW in the package's fine-tuning benchmark
  (docs/RESULTS.md). For a cheaper run pass the values of `hf_gam.CHEAP_GAM` as flags (docs/configuration.md
  lists them). The model card records the setting and the accuracy after compression.
- Optimizer: the Trainer's default AdamW at its default learning rate 5e-5, cosine decay, 5% warmup,
  clipping at norm 1.
- Batch 32 on one GPU and 10 epochs: chosen to fit one GPU and a short run; the ViT paper's transfer runs
  used batch 512 and 500 to 10,000 steps depending on the dataset, so longer runs may help.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_gam import GAMTrainer, vision


@dataclass
class FineGrainedDataArguments(vision.DataTrainingArguments):
    """`DataTrainingArguments` plus the short name of a preset."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": f"Preset: one of {', '.join(sorted(vision.PRESETS))}. Overridden by `--dataset_name`/`--train_dir`."
        },
    )


DEFAULTS: dict[str, Any] = {
    **vision.COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/vit-finegrained-gam",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 10,
    "logging_steps": 20,
    "dataloader_num_workers": 4,
}
"""Recipe defaults on top of `GAMConfig`'s; see the module docstring for where each comes from."""


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the command line (or `argv`) and run `hf_gam.vision.run_image_classification` with `GAMTrainer`:
    fine-tune, evaluate, test once, measure compression, write the model card; return the validation (`eval_*`),
    test (`test_*`) and compression (`compression_*`) metrics."""
    # Arguments: dataclass defaults < DEFAULTS < a `--config` file < flags. Tokens on the command line are refused.
    parser = vision.recipe_parser(vision.ModelArguments, FineGrainedDataArguments, vision.RecipeTrainingArguments)
    model_args, data_args, training_args = vision.parse_recipe_args(parser, DEFAULTS, argv)
    preset = vision.resolve_preset(data_args.dataset) if data_args.dataset else None  # Hub id, splits, columns
    # The run (hf_gam/vision/run.py): the resume policy before any data loads, the data, the model, training,
    # validation, the test split once, accuracy after compression, the model card or the push.
    return vision.run_image_classification(model_args, data_args, training_args, GAMTrainer, preset)


if __name__ == "__main__":
    vision.exit_on_recipe_error(main)
