"""Train a small ViT with GAMTrainer on scikit-learn's bundled digits (8x8 images, no download).

    python recipes/quickstart.py                        # GAM with the default gam_* values
    python recipes/quickstart.py --gam_method none      # the stock Trainer, for comparison
    python recipes/quickstart.py --gam_grad_rho 0.05 --num_train_epochs 20

Every `GAMConfig` / `TrainingArguments` field is a command-line option, spelt in full; a token on the command
line is refused (log in with `hf auth login` or set HF_TOKEN). Prints the test accuracy.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.vision import exit_on_recipe_error, parse_recipe_args, recipe_parser

DEFAULTS = {
    "output_dir": "outputs/quickstart", "num_train_epochs": 10, "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 256, "learning_rate": 1e-3, "weight_decay": 0.05, "warmup_steps": 20,
    "eval_strategy": "epoch", "save_strategy": "no", "logging_steps": 20, "report_to": "none",
    "remove_unused_columns": False, "dataloader_num_workers": 0,
}
"""The demo's training settings on top of `GAMConfig`'s; flags override them."""


@dataclass
class QuickstartArguments:
    hidden_size: int = field(default=64, metadata={"help": "Width of the ViT."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Depth of the ViT."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of the 1797 digits held out for testing."})


def load_digits_splits(test_fraction: float, seed: int = 0):
    """Digits as lists of {"pixel_values": (1, 8, 8) float tensor in [0, 1], "labels": int}, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = digits.target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )

    def rows(index):
        return [{"pixel_values": images[i], "labels": int(labels[i])} for i in index]

    return rows(train_idx), rows(test_idx)


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict[str, float]:
    parser = recipe_parser(QuickstartArguments, GAMConfig)
    script_args, args = parse_recipe_args(parser, DEFAULTS, argv)

    train, test = load_digits_splits(script_args.test_fraction, seed=args.seed)
    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=script_args.hidden_size,
        num_hidden_layers=script_args.num_hidden_layers, num_attention_heads=4,
        intermediate_size=2 * script_args.hidden_size, num_labels=10,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(config)
    trainer = GAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"gam_method={args.gam_method}  test accuracy: {metrics['eval_accuracy']:.4f} "
          f"({len(test)} held-out digits, {len(train)} for training)")
    return metrics


if __name__ == "__main__":
    exit_on_recipe_error(main)
