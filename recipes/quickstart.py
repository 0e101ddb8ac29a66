"""What GAM buys in fine-tuning, in about two minutes on two CPU cores, on bundled data (no download).

GAM pays where the fine-tuning set is small or its labels noisy, so that is what the demo fine-tunes on. A small
ViT is pretrained on the digits 0-4 (scikit-learn's 8x8 digits, the stock step), saved, and loaded back with
`from_pretrained` and a new 5-way head; it is then fine-tuned on 100 images of the digits 5-9 for 40 epochs, with
the stock step (`gam_method="none"`) and with `GAMConfig()`'s defaults, once per seed (4 seeds, each with its own
draw of the 100 images and its own new head), and every model is tested on the same 300 other images: accuracy as
trained, and after compression (`hf_gam.compression`: pruning and 2-bit weights, each on a copy). It prints the
mean and the standard deviation over the seeds, and GAM's paired difference to the stock step of the same seed.

This is the `vit_100` scenario of the fine-tuning benchmark (`benchmarks/finetune.py`, the same data, draws and
fine-tuning settings; docs/RESULTS.md: +3.3 points of test accuracy over five seeds, +14 after 90% pruning), except
that one source model, pretrained with the first seed, serves every seed.

    python recipes/quickstart.py                                     # 100 images: the stock step against GAM
    python recipes/quickstart.py --n_train 496 --label_noise 0.2     # 496 images, 20% of their labels flipped
    python recipes/quickstart.py --gam_method sam --gam_grad_rho 0.05    # ... against SAM
    python recipes/quickstart.py --gam_reuse_interval 3              # ... against hf_gam.CHEAP_GAM

Every `GAMConfig` / `TrainingArguments` field is a command-line option, spelt in full, for the fine-tuning runs that
are compared with the stock step; a token on the command line is refused (log in with `hf auth login` or set HF_TOKEN).
"""

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageClassification, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.compression import compression_report
from hf_gam.vision import collate_fn, exit_on_recipe_error, parse_recipe_args, recipe_parser
from hf_gam.vision.digits import SOURCE_CLASSES, TARGET_CLASSES, digits_model, transfer_task

DEFAULTS = {
    "output_dir": "outputs/quickstart", "num_train_epochs": 40, "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256, "learning_rate": 1e-3, "weight_decay": 0.05, "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "eval_strategy": "no", "save_strategy": "no",
    "logging_strategy": "no", "report_to": "none", "remove_unused_columns": False, "dataloader_num_workers": 0,
    "disable_tqdm": True, "dataloader_pin_memory": False, "seed": 0,
}
"""The fine-tuning settings of the benchmark on top of `GAMConfig`'s (AdamW, as the Trainer's default); flags
override them."""

COMPRESSIONS = ("prune:0.9", "prune:0.7", "rtn:2")
COLUMN = {"gam": "GAM", "sam": "SAM", "none": "stock step again"}
ROWS = {"baseline": "test accuracy", "pruned_90": "after pruning 90% of the weights", "pruned_70": "after pruning 70%",
        "weights_2bit": "2-bit weights"}


@dataclass
class QuickstartArguments:
    n_train: int = field(
        default=100,
        metadata={"help": "Fine-tuning images of the digits 5-9, drawn anew for each seed from a pool of 496 (496 or "
                  "more: all of them)."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction of the fine-tuning labels flipped to another class, drawn anew for each seed "
                  "(the test labels stay true)."},
    )
    num_seeds: int = field(
        default=4,
        metadata={"help": "Fine-tuning runs per column, with the seeds --seed, --seed + 1, ...: each draws its own "
                  "images, flipped labels and new head."},
    )
    pretrain_epochs: int = field(default=30, metadata={"help": "Epochs of pretraining on the digits 0-4."})
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
        save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no", use_cpu=args.use_cpu,
        seed=args.seed, dataloader_pin_memory=False)
    trainer = Trainer(model=digits_model("vit", len(SOURCE_CLASSES)), args=pretrain_args, train_dataset=source_rows,
                      data_collator=collate_fn)
    trainer.remove_callback(PrinterCallback)  # no line of train metrics: the table below is the output
    trainer.train()
    trainer.save_model(path)
    return path


def fine_tune(source_dir: str, train_rows, args: GAMConfig):
    """Load the source model with a new head (`from_pretrained`) and fine-tune it; returns the model and seconds."""
    set_seed(args.seed)  # the same new head for both columns of a seed
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier": expected, it is the new head
    model = AutoModelForImageClassification.from_pretrained(source_dir, num_labels=len(TARGET_CLASSES),
                                                            ignore_mismatched_sizes=True)
    hf_logging.set_verbosity(verbosity)
    trainer = GAMTrainer(model=model, args=args, train_dataset=train_rows, data_collator=collate_fn)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - start


def mean_and_spread(values: list[float]) -> str:
    """`mean ± standard deviation` (0 for a single value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def paired_difference(gam: list[float], stock: list[float]) -> str:
    """The mean per-seed difference and, in brackets, the lowest and highest."""
    differences = [a - b for a, b in zip(gam, stock)]
    return f"{statistics.mean(differences):+.3f} [{min(differences):+.3f}, {max(differences):+.3f}]"


def main(argv=None) -> dict[str, list[dict[str, float]]]:
    """Run the demo; returns, for each column, the compression reports of its models, one per seed."""
    parser = recipe_parser(QuickstartArguments, GAMConfig)
    script_args, args = parse_recipe_args(parser, DEFAULTS, argv)
    torch.set_num_threads(script_args.threads)
    hf_logging.disable_progress_bar()  # the table below is the output
    seeds = [args.seed + i for i in range(script_args.num_seeds)]

    # 1. A pretrained model to start from: the stock step on all the digits 0-4.
    source_rows = transfer_task(script_args.n_train, script_args.label_noise, seeds[0]).source
    source_dir = pretrain(source_rows, args, script_args.pretrain_epochs)

    # 2. For each seed, its own fine-tuning set: fine-tune with the stock step and with GAM from the same new head,
    #    and measure both models on the same test images.
    columns = {"stock step": dataclasses.replace(args, gam_method="none"), COLUMN[args.gam_method]: args}
    reports = {name: [] for name in columns}
    seconds = {name: [] for name in columns}
    for seed in seeds:
        task = transfer_task(script_args.n_train, script_args.label_noise, seed)
        test_batch = collate_fn(task.test)
        for name, run_args in columns.items():
            model, took = fine_tune(source_dir, task.train, dataclasses.replace(run_args, seed=seed))
            reports[name].append(compression_report(model, [test_batch], COMPRESSIONS))
            seconds[name].append(took)

    # 3. Mean and spread over the seeds, side by side, and the paired difference.
    noise = f", {script_args.label_noise:.0%} of their labels flipped" if script_args.label_noise else ""
    print(f"\nPretrained on {len(source_rows)} digits 0-4; fine-tuned on {len(task.train)} images of 5-9{noise} "
          f"for {args.num_train_epochs:g} epochs; tested on {len(task.test)} others.")
    print(f"Mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}: each its own draw of "
          "the fine-tuning images and its own new head);\nlast column: the difference of the same seed, mean "
          "[lowest, highest].\n")
    stock, other = reports
    width = max(len(label) for label in ROWS.values()) + 2
    print(" " * width + f"{stock:>16}{other:>16}{other + ' - ' + stock:>28}")
    for key, label in ROWS.items():
        stock_values = [report[key] for report in reports[stock]]
        other_values = [report[key] for report in reports[other]]
        print(f"{label:<{width}}{mean_and_spread(stock_values):>16}{mean_and_spread(other_values):>16}"
              f"{paired_difference(other_values, stock_values):>28}")
    times = [f"{statistics.mean(seconds[name]):.0f}" for name in (stock, other)]
    print(f"{'training time per run (s)':<{width}}{times[0]:>16}{times[1]:>16}")
    return reports


if __name__ == "__main__":
    exit_on_recipe_error(main)
