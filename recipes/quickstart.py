"""What GAM buys in fine-tuning, in about two minutes on two CPU cores, on bundled data (no download).

A small ViT is pretrained on the digits 0-4 (scikit-learn's 8x8 digits, the stock step), saved, and loaded back
with `from_pretrained` and a new 5-way head; it is then fine-tuned on 496 images of the digits 5-9 for 30 epochs
twice, with the stock step (`gam_method="none"`) and with `GAMConfig()`'s defaults, and both models are tested on
300 other images: accuracy as trained, and after compression (`hf_gam.compression`: pruning, low-bit and int8
weights, each on a copy). One seed: `docs/RESULTS.md` has the averages over seeds and scenarios.

    python recipes/quickstart.py                                          # the stock step against GAM's defaults
    python recipes/quickstart.py --gam_method sam --gam_grad_rho 0.05     # ... against SAM
    python recipes/quickstart.py --gam_reuse_interval 3                   # ... against hf_gam.CHEAP_GAM

Every `GAMConfig` / `TrainingArguments` field is a command-line option, spelt in full, for the fine-tuning run that
is compared with the stock step; a token on the command line is refused (log in with `hf auth login` or set HF_TOKEN).
"""

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.compression import compression_report
from hf_gam.vision import collate_fn, exit_on_recipe_error, parse_recipe_args, recipe_parser
from hf_gam.vision.digits import (
    SOURCE_CLASSES,
    TARGET_CLASSES,
    class_indices,
    digits_by_class,
    digits_model,
    examples,
    split_target,
)

DEFAULTS = {
    "output_dir": "outputs/quickstart", "num_train_epochs": 30, "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256, "learning_rate": 1e-3, "weight_decay": 0.05, "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "eval_strategy": "no", "save_strategy": "no",
    "logging_steps": 100, "report_to": "none", "remove_unused_columns": False, "dataloader_num_workers": 0,
    "disable_tqdm": True, "dataloader_pin_memory": False,
}
"""The fine-tuning settings on top of `GAMConfig`'s (AdamW, as the Trainer's default); flags override them."""

COMPRESSIONS = ("prune:0.9", "prune:0.7", "rtn:4", "rtn:2", "int8_dynamic")
COLUMN = {"gam": "GAM", "sam": "SAM", "none": "stock step again"}
ROWS = {"baseline": "test accuracy", "pruned_90": "after pruning 90% of the weights", "pruned_70": "after pruning 70%",
        "weights_4bit": "4-bit weights", "weights_2bit": "2-bit weights", "int8_dynamic": "int8 dynamic quantization"}


@dataclass
class QuickstartArguments:
    pretrain_epochs: int = field(default=20, metadata={"help": "Epochs of pretraining on the digits 0-4."})
    threads: int = field(
        default=1,
        metadata={"help": "CPU threads for torch: the model is so small that more threads only add overhead (and "
                  "change the rounding, so the numbers differ a little with the thread count)."},
    )


def pretrain(source_rows, args: GAMConfig, epochs: int) -> str:
    """Pretrain a ViT on the source digits with the stock Trainer and save it; returns its directory."""
    path = os.path.join(args.output_dir, "source-vit")
    set_seed(args.seed)
    pretrain_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "pretraining"), num_train_epochs=epochs, learning_rate=2e-3,
        per_device_train_batch_size=32, weight_decay=0.05, warmup_steps=0.05, lr_scheduler_type="cosine",
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=100, use_cpu=args.use_cpu, seed=args.seed,
        dataloader_pin_memory=False)
    trainer = Trainer(model=digits_model("vit", len(SOURCE_CLASSES)), args=pretrain_args, train_dataset=source_rows,
                      data_collator=collate_fn)
    trainer.train()
    trainer.save_model(path)
    return path


def fine_tune(source_dir: str, train_rows, args: GAMConfig):
    """Load the source model with a new head (`from_pretrained`) and fine-tune it; returns the model and seconds."""
    set_seed(args.seed)  # the same new head for both runs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier": expected, it is the new head
    model = AutoModelForImageClassification.from_pretrained(source_dir, num_labels=len(TARGET_CLASSES),
                                                            ignore_mismatched_sizes=True)
    hf_logging.set_verbosity(verbosity)
    trainer = GAMTrainer(model=model, args=args, train_dataset=train_rows, data_collator=collate_fn)
    start = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - start


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = recipe_parser(QuickstartArguments, GAMConfig)
    script_args, args = parse_recipe_args(parser, DEFAULTS, argv)
    torch.set_num_threads(script_args.threads)

    # 1. Data: all digits 0-4 to pretrain on; the digits 5-9 split into a fine-tuning set and a test set.
    x, labels = digits_by_class()
    test, _, pool = split_target(labels, TARGET_CLASSES)
    source_rows = examples(x, labels, class_indices(labels, SOURCE_CLASSES), SOURCE_CLASSES)
    train_rows = examples(x, labels, pool, TARGET_CLASSES)
    test_batch = collate_fn(examples(x, labels, test, TARGET_CLASSES))

    # 2. A pretrained model to start from.
    source_dir = pretrain(source_rows, args, script_args.pretrain_epochs)

    # 3. Fine-tune it twice, with the stock step and with GAM, and measure both on the test images.
    runs = {"stock step": dataclasses.replace(args, gam_method="none"), COLUMN[args.gam_method]: args}
    reports, seconds = {}, {}
    for name, run_args in runs.items():
        model, seconds[name] = fine_tune(source_dir, train_rows, run_args)
        reports[name] = compression_report(model, [test_batch], COMPRESSIONS)

    # 4. Side by side.
    print(f"\nPretrained on {len(source_rows)} digits 0-4; fine-tuned on {len(train_rows)} images of 5-9 for "
          f"{args.num_train_epochs:g} epochs; tested on {len(test)} others.\n")
    width = max(len(label) for label in ROWS.values()) + 2
    print(" " * width + "".join(f"{name:>22}" for name in reports))
    for key, label in ROWS.items():
        print(f"{label:<{width}}" + "".join(f"{report[key]:>22.3f}" for report in reports.values()))
    print(f"{'training time (s)':<{width}}" + "".join(f"{s:>22.0f}" for s in seconds.values()))
    return reports


if __name__ == "__main__":
    exit_on_recipe_error(main)
