#!/usr/bin/env python
"""Fine-tune a Vision Transformer on ImageNet-1k with GAM (Gradient norm Aware Minimization).

ViT-B/16 from the ImageNet-21k checkpoint, 8 GPUs (global batch 8 x 64 = 512):

    hf auth login    # ImageNet-1k is gated: accept its terms on huggingface.co/datasets/ILSVRC/imagenet-1k first
    accelerate launch --multi_gpu --num_processes 8 recipes/vit_imagenet.py \\
        --model_name_or_path google/vit-base-patch16-224-in21k \\
        --output_dir outputs/vit-base-imagenet-gam --bf16 \\
        --gam_method gam

Local copies in imagefolder layout (<dir>/<class>/<image>) instead of the Hub; ImageNet's `val` images are the
test set everyone reports, so they go to `--test_dir`:

    accelerate launch --multi_gpu --num_processes 8 recipes/vit_imagenet.py \\
        --train_dir /data/imagenet/train --test_dir /data/imagenet/val --output_dir outputs/vit-in1k

Model selection never sees the test split: evaluation during training and best-model selection use a stratified
2% of train (`--validation_split_fraction 0.02`, about 25,600 images, seeded by `--seed`), or `--validation_dir`.
ImageNet's `validation` split is evaluated once after training and reported as `test_*` metrics and a line of
the model card. An `--output_dir` that already holds checkpoints is refused: continue with
`--resume_from_checkpoint last`, or start over there with `--overwrite_output_dir`.

Every option of `hf_gam.GAMConfig` (so of `transformers.TrainingArguments`, plus the `gam_*` fields) is a
command-line flag; `--config recipes/configs/vit_imagenet.yaml` (or the file as the only argument) reads
options from YAML/JSON, and flags given on the command line override the file.

Where the defaults below come from (a starting point, not a tuned result):
- GAM: `hf_gam.FINETUNE_GAM`, chosen explicitly (`gam_start=0.0`, `gam_rho_schedule=constant`, also
  `GAMConfig`'s defaults): the released radii (rho=0.2, rho'=0.02) and weights (alpha=0.6, beta=0.5,
  gamma=0.03) at every step, the setting that beat AdamW in the package's fine-tuning benchmark
  (docs/RESULTS.md). Sweep `--gam_grad_rho` and `--gam_grad_norm_rho` on the held-out validation part of
  train, never on the test split. The model card records the setting and the accuracy after compression.
- Optimizer: the Trainer's default AdamW (`adamw_torch_fused`) at the Trainer's default learning rate 5e-5,
  cosine decay with 5% warmup, gradient clipping at norm 1 (clipping and cosine decay follow the ViT paper's
  fine-tuning setup, Dosovitskiy et al. 2021, which used SGD with momentum instead of AdamW).
- Batch 512 and 8 epochs: the ViT paper fine-tuned on ImageNet at batch 512 for 20,000 steps (about 8 epochs).
- Transforms: random-resized crop and horizontal flip for training; resize and center crop for evaluation;
  the checkpoint's own input size, mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_gam import GAMTrainer, vision

DEFAULTS: dict[str, Any] = {
    **vision.COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/vit-base-imagenet-gam",
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "num_train_epochs": 8,
    "logging_steps": 50,
    "dataloader_num_workers": 8,
    "validation_split_fraction": 0.02,
}
"""Recipe defaults on top of `GAMConfig`'s; see the module docstring for where each comes from."""


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse the command line (or `argv`) and run `hf_gam.vision.run_image_classification` with `GAMTrainer`:
    fine-tune, evaluate, test once, measure compression, write the model card; return the validation (`eval_*`),
    test (`test_*`) and compression (`compression_*`) metrics."""
    # Arguments: dataclass defaults < DEFAULTS < a `--config` file < flags. Tokens on the command line are refused.
    parser = vision.recipe_parser(vision.ModelArguments, vision.DataTrainingArguments, vision.RecipeTrainingArguments)
    model_args, data_args, training_args = vision.parse_recipe_args(parser, DEFAULTS, argv)
    preset = vision.IMAGENET_1K if data_args.train_dir is None else None  # the Hub's copy unless local folders
    # The run (hf_gam/vision/run.py): the resume policy before any data loads, the data, the model, training,
    # validation, the test split once, accuracy after compression, the model card or the push.
    return vision.run_image_classification(model_args, data_args, training_args, GAMTrainer, preset)


if __name__ == "__main__":
    vision.exit_on_recipe_error(main)
