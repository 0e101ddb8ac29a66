"""Do GAM's settings generalize? AdamW, SAM and GAM arms in three regimes on scikit-learn's digits.

Every arm is data: a name and a dict of `GAMConfig` keyword arguments, plus `epochs_x`, a multiplier of the
regime's epochs. `{}` is `GAMConfig()`'s defaults as they are when the script runs. Built-in arms:
  adamw, adamw_2x, adamw_4x   `gam_method="none"` (the stock Trainer step) for 1x, 2x and 4x the epochs:
                              AdamW given the forward/backward passes of SAM (2x) and of GAM (4x)
  gam_default                 `{}`: GAM at the package defaults (for fine-tuning: full GAM at every step)
  pretrain_gam                `hf_gam.PRETRAIN_GAM` (for training from scratch: GAM late, radii ramping up)
  gam_<rho'>_<rho>            the GAM sweep, `gam_grad_rho` x `gam_grad_norm_rho` on two grids (GAM at every step,
                              constant radii, as in the paper; gam_0.02_0.2 is the released setting)
  sam_<rho'>                  the SAM sweep, as many points as the GAM sweep, up to 0.1 (every step, constant)
  cheap_gam                   `hf_gam.CHEAP_GAM`
  front_<field>_<value>       `--arms frontier_sweep`: the defaults with one cost-cutting field changed
                              (`gam_reuse_interval` 2, 4, 8; `gam_batch_fraction` 0.5, 0.25, 0.125; `gam_start`
                              0.5, 0.9): the cost / accuracy / flatness frontier (`--plot` draws it)
More arms from the command line, without code changes (values are read as int, float, bool or str):
    --arm 'late=gam_grad_rho=0.05,gam_rho_schedule=lr' --arm 'gam_k2=gam_interval=2'
`--arms adamw,gam_default,late` runs a subset (`gam_sweep` and `sam_sweep` name the sweeps; adamw always runs).
A key `GAMConfig` does not know fails before anything trains.

Regimes (each a function returning data, a model and a training budget; all use AdamW, cosine schedule):
  fit        ViT from scratch on 400 training digits, a budget where AdamW fits them (train accuracy ~1.0)
  underfit   the same with a third of the epochs: AdamW stops short (train accuracy ~0.9)
  finetune   a ViT pretrained (AdamW, once per seed) on digits 0-4 and saved with `save_pretrained` and an
             image processor, fine-tuned on digits 5-9, written as imagefolder PNGs, through the product's
             own recipe, `recipes/vit_finegrained.py`'s `main(argv)` (its warm-up and clipping; with
             `--train_augmentation none`, since a mirrored digit is another digit): AdamW fits the set
             (train accuracy ~0.98)

Data: the 1,797 bundled 8x8 digits, split once by `hf_gam.vision.digits.digits_examples` (30% test; the rest 80% train,
20% validation). The validation split chooses the sweep points; the test split is read only for the table.

Reported per regime and arm, over seeds (arms of one seed share the initial weights and run in a shuffled order):
final-epoch test, train and validation accuracy; the top Hessian eigenvalue of the training loss on a fixed
batch of training examples (`hf_gam.flatness`, power iteration); forward/backward passes relative to AdamW
(examples forwarded in training mode, counted by a forward hook; every training forward has one backward);
training time relative to the same seed's AdamW run; paired differences to AdamW (same seed) of test accuracy
and of log eigenvalue, with 95% t-intervals. Sweeps: the point with the best mean validation accuracy is chosen.

    python benchmarks/generalization.py --json gen.json     # full: 5 seeds, 3 regimes, 22 arms (~32 minutes*)
    python benchmarks/generalization.py --quick             # 1 seed, tiny budgets, 5 arms (under a minute)
    python benchmarks/generalization.py --tables gen.json   # re-make the tables from a saved run

*Estimate on 2 shared CPU cores (load average ~4.5), one thread: seed 0 of every regime with the arms adamw,
adamw_4x, gam_default and sam_0.05 (11 AdamW-runs of passes per regime) took 69 s, of which 53 s in training
(2.3, 1.2 and 1.3 s per AdamW-run of passes for fit, underfit and finetune) and about 1 s per run besides.
The full setting is 65 AdamW-runs of passes and 22 runs per regime and seed: 5 x (65 x 4.8 + 66 x 1) s ~ 32 min.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SETTINGS = {
    "full": dict(
        seeds=[0, 1, 2, 3, 4], regimes=["fit", "underfit", "finetune"],
        fit_epochs=15, underfit_epochs=7, pretrain_epochs=20, finetune_epochs=8, n_train=400,
        gam_grad_rho=[0.002, 0.005, 0.02], gam_grad_norm_rho=[0.02, 0.05, 0.2],
        sam_rho=[0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.085, 0.1],
        flat_examples=256, eig_iters=10,
    ),
    "quick": dict(
        seeds=[0], regimes=["fit", "underfit", "finetune"],
        fit_epochs=2, underfit_epochs=1, pretrain_epochs=2, finetune_epochs=1, n_train=128,
        gam_grad_rho=[0.005], gam_grad_norm_rho=[0.05], sam_rho=[0.05],
        flat_examples=64, eig_iters=3,
    ),
}
# One optimizer for every arm: AdamW, cosine schedule. From scratch: lr 2e-3, batch 32, 10% warm-up, weight decay
# 0.05 (budgets picked by hand on seeds 0 and 1: 15 epochs fit 400 digits, 7 do not). Fine-tuning: the recipe's
# defaults (5% warm-up, clipping at 1) with lr 1e-3 and batch 32.
LEARNING_RATE = 2e-3
FINETUNE_LEARNING_RATE = 1e-3
FINETUNE_AUGMENTATION = "none"
WEIGHT_DECAY = 0.05
# The sweeps run GAM and SAM at every step with constant radii, as the paper does (the defaults' schedule, written out
# so that the sweeps do not depend on the defaults).
EVERY_STEP = {"gam_start": 0.0, "gam_rho_schedule": "constant"}
# `--arms frontier_sweep`: each cost-cutting field alone, on top of `GAMConfig()`'s defaults.
FRONTIER = {"gam_reuse_interval": [2, 4, 8], "gam_batch_fraction": [0.5, 0.25, 0.125], "gam_start": [0.5, 0.9]}
BATCH = 32


# --------------------------------------------------------------------------------------------------
# Arms


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, anything else stays a string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_arm(spec: str) -> tuple[str, dict]:
    """'name=key=value,key=value' -> (name, {key: value}); 'name=' is `GAMConfig()`'s defaults."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"An arm is 'name=key=value,...'; got {spec!r}.")
    config = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Arm {name!r}: {item!r} is not key=value.")
        config[key.strip()] = parse_value(value.strip())
    return name, config


def builtin_arms(s: dict) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """The built-in arms and the names of the two sweeps (`{"gam": [...], "sam": [...]}`)."""
    arms = {
        "adamw": {"gam_method": "none"},
        "adamw_2x": {"gam_method": "none", "epochs_x": 2},
        "adamw_4x": {"gam_method": "none", "epochs_x": 4},
        "gam_default": {},
    }
    from hf_gam import CHEAP_GAM, PRETRAIN_GAM

    arms["pretrain_gam"] = dict(PRETRAIN_GAM)
    arms["cheap_gam"] = dict(CHEAP_GAM)
    sweeps = {"gam": [], "sam": [], "frontier": []}
    # The cost-cutting mechanisms one at a time, on top of the defaults: their cost / accuracy / flatness frontier.
    for key, values in FRONTIER.items():
        for value in values:
            name = f"front_{key.removeprefix('gam_')}_{value:g}"
            arms[name] = {key: value}
            sweeps["frontier"].append(name)
    for grad_rho in s["gam_grad_rho"]:
        for norm_rho in s["gam_grad_norm_rho"]:
            name = f"gam_{grad_rho:g}_{norm_rho:g}"
            arms[name] = {"gam_method": "gam", "gam_grad_rho": grad_rho, "gam_grad_norm_rho": norm_rho, **EVERY_STEP}
            sweeps["gam"].append(name)
    for rho in s["sam_rho"]:
        arms[f"sam_{rho:g}"] = {"gam_method": "sam", "gam_grad_rho": rho, **EVERY_STEP}
        sweeps["sam"].append(f"sam_{rho:g}")
    return arms, sweeps


def select_arms(arms: dict[str, dict], sweeps: dict[str, list[str]], names: list[str] | None) -> dict[str, dict]:
    """The arms called `names` (`gam_sweep`/`sam_sweep`/`frontier_sweep` expand to a group), always with `adamw`
    first; without names, every arm but the frontier."""
    if names is None:
        return {n: a for n, a in arms.items() if n not in sweeps["frontier"]}
    wanted = ["adamw"]
    for name in names:
        group = sweeps.get(name.removesuffix("_sweep")) if name.endswith("_sweep") else None
        for n in group if group is not None else [name]:
            if n not in arms:
                raise ValueError(f"Unknown arm {n!r}; known: {', '.join(arms)}, gam_sweep, sam_sweep, "
                                 "frontier_sweep.")
            if n not in wanted:
                wanted.append(n)
    return {n: arms[n] for n in wanted}


def check_arms(arms: dict[str, dict]) -> None:
    """Build a `GAMConfig` from every arm, so an unknown key or a bad value fails before any training."""
    from hf_gam import GAMConfig

    with tempfile.TemporaryDirectory() as out_dir:
        for name, arm in arms.items():
            config = dict(arm)
            epochs_x = config.pop("epochs_x", 1)
            if not (isinstance(epochs_x, (int, float)) and epochs_x > 0):
                raise ValueError(f"Arm {name!r}: epochs_x must be a positive number; got {epochs_x!r}.")
            try:
                GAMConfig(output_dir=out_dir, use_cpu=True, report_to=[], **config)
            except (TypeError, ValueError) as error:
                raise ValueError(f"Arm {name!r}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Counting forward passes


@contextlib.contextmanager
def count_training_examples():
    """Yield a one-item list that counts the examples forwarded through a classifier in training mode.

    A global forward hook: every module whose output has `logits` and that is in training mode adds its batch
    size. Evaluation and the flatness measurement run in evaluation mode and are not counted.
    """
    counter = [0]

    def hook(module, args, kwargs, output):
        logits = getattr(output, "logits", None)
        if module.training and isinstance(logits, torch.Tensor):
            counter[0] += logits.shape[0]

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Regimes


@dataclass
class Regime:
    """Data, model and budget of one regime and seed.

    `train`/`validation`/`test` are lists of `{"pixel_values", "labels"}` as the model sees them (the accuracies
    and the flatness batch are computed on these). From scratch, `make_model()` builds the initial model; when
    fine-tuning, `model_dir` is the pretrained checkpoint and `folders` the imagefolder splits for the recipe.
    """

    name: str
    train: list
    validation: list
    test: list
    epochs: int
    learning_rate: float
    make_model: Callable | None = None
    model_dir: str | None = None
    folders: dict | None = None


def make_vit(seed: int, num_channels: int = 1):
    """ViT for 8x8 digits: patch 4, 2 layers, hidden 64, no dropout (weights seeded by `seed`)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=num_channels, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def _scratch(name: str, s: dict, seed: int, epochs: int) -> Regime:
    from hf_gam.vision.digits import digits_examples

    return Regime(
        name, train=digits_examples("train")[: s["n_train"]], validation=digits_examples("validation"),
        test=digits_examples("test"), epochs=epochs, learning_rate=LEARNING_RATE, make_model=lambda: make_vit(seed),
    )


def fit_regime(s: dict, seed: int, work_dir: str) -> Regime:
    """From scratch with a budget where AdamW fits its training set."""
    return _scratch("fit", s, seed, s["fit_epochs"])


def underfit_regime(s: dict, seed: int, work_dir: str) -> Regime:
    """From scratch with a short budget where AdamW does not quite fit."""
    return _scratch("underfit", s, seed, s["underfit_epochs"])


def digit_images(labels: range) -> dict[str, list]:
    """Per split, `(PIL grayscale image, label name)` for the bundled digits with a label in `labels`."""
    from PIL import Image

    from hf_gam.vision.digits import digits_examples

    images = {}
    for split in ("train", "validation", "test"):
        images[split] = []
        for e in digits_examples(split):
            if e["labels"] in labels:
                levels = ((e["pixel_values"][0] + 1.0) * 8.0).round()  # back to the bundled 0..16 levels
                pixels = (levels * 255.0 / 16.0).round().to(torch.uint8).numpy()
                images[split].append((Image.fromarray(pixels, mode="L"), str(e["labels"])))
    return images


def write_image_folders(root: str, images: dict[str, list]) -> dict[str, str]:
    """Write `images` as imagefolder PNGs, `root/<split>/<label>/<i>.png` (once); returns the split folders."""
    for split, pairs in images.items():
        for i, (image, name) in enumerate(pairs):
            path = os.path.join(root, split, name, f"{i}.png")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                image.save(path)
    return {split: os.path.join(root, split) for split in images}


def _as_examples(pairs: list, transform, label2id: dict) -> list[dict]:
    return [{"pixel_values": transform(image.convert("RGB")), "labels": int(label2id[name])} for image, name in pairs]


class Augmented(torch.utils.data.Dataset):
    """`(PIL image, label name)` pairs as examples, `transform` applied afresh at every access."""

    def __init__(self, pairs: list, transform, label2id: dict):
        self.pairs, self.transform, self.label2id = pairs, transform, label2id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return _as_examples(self.pairs[i : i + 1], self.transform, self.label2id)[0]


def finetune_regime(s: dict, seed: int, work_dir: str) -> Regime:
    """Pretrain on digits 0-4 (cached per seed in `work_dir`), fine-tune on 5-9 through the recipe."""
    from transformers import ViTImageProcessor

    from hf_gam.vision import build_transforms

    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # The recipe's transforms with `--train_augmentation none`: a mirrored digit is another digit, and random-resized
    # crops of 8x8 images leave too little of it (with them AdamW fitted only ~75% of the fine-tuning set).
    train_transform, eval_transform = build_transforms(processor, FINETUNE_AUGMENTATION)
    model_dir = os.path.join(work_dir, f"pretrained-seed{seed}")
    if not os.path.isdir(model_dir):
        pretrain = Augmented(digit_images(range(0, 5))["train"], train_transform, {str(k): k for k in range(10)})
        model, _, _ = train_scratch(lambda: make_vit(seed, num_channels=3), pretrain, {"gam_method": "none"},
                                    s["pretrain_epochs"], LEARNING_RATE, seed, os.path.join(work_dir, "pretrain"))
        model.save_pretrained(model_dir)  # a 10-way head: the recipe replaces it with a 5-way one
        processor.save_pretrained(model_dir)
    images = digit_images(range(5, 10))
    folders = write_image_folders(os.path.join(work_dir, "digits5-9"), images)
    label2id = {name: i for i, name in enumerate(sorted({name for _, name in images["train"]}))}  # imagefolder's
    return Regime(
        "finetune", *(_as_examples(images[split], eval_transform, label2id) for split in ("train", "validation", "test")),
        epochs=s["finetune_epochs"], learning_rate=FINETUNE_LEARNING_RATE, model_dir=model_dir, folders=folders,
    )


REGIMES = {"fit": fit_regime, "underfit": underfit_regime, "finetune": finetune_regime}


# --------------------------------------------------------------------------------------------------
# Training one arm


def _epochs(arm: dict, epochs: int):
    x = arm.get("epochs_x", 1)
    return epochs * x


def train_scratch(make_model, train: list, arm: dict, epochs, lr: float, seed: int, out_dir: str):
    """Train through `GAMTrainer`; returns (model, seconds in `train()`, examples forwarded in training mode)."""
    from hf_gam import GAMConfig, GAMTrainer

    config = {k: v for k, v in arm.items() if k != "epochs_x"}
    args = GAMConfig(
        output_dir=out_dir, num_train_epochs=_epochs(arm, epochs), per_device_train_batch_size=BATCH,
        learning_rate=lr, weight_decay=WEIGHT_DECAY, lr_scheduler_type="cosine", warmup_steps=0.1,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=seed,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, **config,
    )
    trainer = GAMTrainer(model=make_model(), args=args, train_dataset=train)
    with count_training_examples() as counter, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return trainer.model, seconds, counter[0]


def recipe_argv(regime: Regime, arm: dict, seed: int, out_dir: str) -> list[str]:
    """Command line of `recipes/vit_finegrained.py` for one fine-tuning run (only flags the recipe has)."""
    argv = [
        "--model_name_or_path", regime.model_dir, "--train_dir", regime.folders["train"],
        "--validation_dir", regime.folders["validation"], "--output_dir", out_dir,
        "--cache_dir", os.path.join(os.path.dirname(regime.model_dir), "cache"),
        "--num_train_epochs", str(_epochs(arm, regime.epochs)), "--learning_rate", str(regime.learning_rate),
        "--weight_decay", str(WEIGHT_DECAY), "--per_device_train_batch_size", str(BATCH),
        "--per_device_eval_batch_size", "256", "--seed", str(seed), "--use_cpu", "--dataloader_num_workers", "0",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_strategy", "no", "--disable_tqdm", "true",
        "--report_to", "none", "--log_level", "error", "--train_augmentation", FINETUNE_AUGMENTATION,
    ]
    for key, value in arm.items():
        if key != "epochs_x":
            argv += [f"--{key}", str(value)]
    return argv


def _load_recipe():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "vit_finegrained.py")
    spec = importlib.util.spec_from_file_location("recipe_vit_finegrained", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def train_recipe(regime: Regime, arm: dict, seed: int, out_dir: str):
    """Fine-tune with the recipe's `main(argv)` in a fresh `out_dir`; returns (model, seconds, examples)."""
    from transformers import AutoModelForImageClassification

    recipe = _load_recipe()
    with count_training_examples() as counter, contextlib.redirect_stdout(io.StringIO()):
        recipe.main(recipe_argv(regime, arm, seed, out_dir))
    with open(os.path.join(out_dir, "train_results.json")) as f:
        seconds = json.load(f)["train_runtime"]
    return AutoModelForImageClassification.from_pretrained(out_dir), seconds, counter[0]


@torch.no_grad()
def accuracy(model, examples: list[dict]) -> float:
    model.eval()
    x = torch.stack([e["pixel_values"] for e in examples])
    y = torch.tensor([e["labels"] for e in examples])
    logits = torch.cat([model(pixel_values=x[i : i + 512]).logits for i in range(0, len(x), 512)])
    return (logits.argmax(-1) == y).float().mean().item()


def run_arm(s: dict, regime: Regime, arm: dict, seed: int, out_dir: str) -> dict:
    """Train one arm in one regime; returns its raw numbers."""
    from hf_gam.flatness import measure_flatness
    from hf_gam.measuring import stack_examples

    if regime.model_dir is None:
        model, seconds, examples = train_scratch(regime.make_model, regime.train, arm, regime.epochs,
                                                 regime.learning_rate, seed, out_dir)
    else:
        model, seconds, examples = train_recipe(regime, arm, seed, out_dir)
    flat = measure_flatness(model, stack_examples(regime.train[: s["flat_examples"]]), eig_iters=s["eig_iters"],
                            metrics=("eigenvalue",))
    return dict(train=accuracy(model, regime.train), val=accuracy(model, regime.validation),
                test=accuracy(model, regime.test), eig=flat["top_eigenvalue"], examples=examples, seconds=seconds)


def run_grid(key: str, groups: list[str], seeds: list[int], arms: dict[str, dict], prepare, run_one, describe,
             log=print) -> list[dict]:
    """Every group x seed x arm: `prepare(group, seed, work_dir)` once per group and seed, then `run_one(prepared,
    arm config, seed, out_dir)` for each arm, in an order shuffled by the seed, each in a fresh folder (the recipe
    resumes from checkpoints it finds). Returns the rows (`key`: the group, seed, arm, config, and what `run_one`
    returned), each logged with `describe(row)` as it ends."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    check_arms(arms)
    runs = []
    start = time.perf_counter()
    total = len(groups) * len(seeds) * len(arms)
    with tempfile.TemporaryDirectory() as work_dir:
        for group in groups:
            for seed in seeds:
                prepared = prepare(group, seed, work_dir)
                order = list(arms)
                random.Random(seed).shuffle(order)
                for name in order:
                    row = {key: group, "seed": seed, "arm": name, "config": arms[name],
                           **run_one(prepared, arms[name], seed, tempfile.mkdtemp(dir=work_dir))}
                    runs.append(row)
                    log(f"[{time.perf_counter() - start:6.0f} s] {len(runs)}/{total} {group} seed {seed} {name}: "
                        + describe(row))
    return runs


def run(s: dict, arms: dict[str, dict], log=print) -> dict:
    """Every regime x seed x arm (arms of one seed in a shuffled order); returns the raw per-run rows."""
    runs = run_grid(
        "regime", s["regimes"], s["seeds"], arms,
        prepare=lambda regime, seed, work_dir: REGIMES[regime](s, seed, work_dir),
        run_one=lambda regime, arm, seed, out_dir: run_arm(s, regime, arm, seed, out_dir),
        describe=lambda r: (f"train {r['train']:.3f} val {r['val']:.3f} test {r['test']:.3f} eig {r['eig']:.3g} "
                            f"examples {r['examples']} {r['seconds']:.1f} s"),
        log=log,
    )
    return {"settings": s, "arms": arms, "runs": runs}


# --------------------------------------------------------------------------------------------------
# Statistics and tables


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n); low = high = nan for n < 2, and all
    three nan when a value is (a log ratio of a negative eigenvalue)."""
    from scipy.stats import t

    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan, math.nan
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t.ppf((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(rows: list[dict], reference: list[dict], value: Callable[[dict, dict], float]) -> list[float]:
    """`value(row, reference row of the same seed)` for every seed both have."""
    ref = {r["seed"]: r for r in reference}
    return [value(r, ref[r["seed"]]) for r in rows if r["seed"] in ref]


def choose(runs: list[dict], regime: str, candidates: list[str], group_key: str = "regime") -> str | None:
    """The candidate arm with the best mean validation accuracy over seeds in `regime` (the runs whose `group_key`
    is `regime`; ties: the first)."""
    present = [c for c in candidates if any(r[group_key] == regime and r["arm"] == c for r in runs)]
    if not present:
        return None
    return max(present, key=lambda c: statistics.mean(r["val"] for r in runs if r[group_key] == regime and r["arm"] == c))


def _log_ratio(a: float, b: float) -> float:
    return math.log(a / b) if a > 0 and b > 0 else math.nan


def _mean_sd(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _ci(mean: float, low: float, high: float, fmt: str) -> str:
    return f"{mean:{fmt}}" + ("" if math.isnan(low) else f" [{low:{fmt}}, {high:{fmt}}]")


def markdown(result: dict) -> str:
    """One table per regime from the raw rows of `run` (or of a saved `--json` file)."""
    s, runs, arms = result["settings"], result["runs"], result["arms"]
    _, sweeps = builtin_arms(s)
    lines = [
        f"Seeds {s['seeds']}; from scratch: {s['n_train']} training digits, fit {s['fit_epochs']} epochs, underfit "
        f"{s['underfit_epochs']}, lr {LEARNING_RATE}; fine-tuning: {s['finetune_epochs']} epochs, lr "
        f"{FINETUNE_LEARNING_RATE}; AdamW, weight decay {WEIGHT_DECAY}, batch {BATCH}, cosine. "
        "Accuracies: mean ± sd over seeds; Δ and ratios: paired with AdamW of the same seed, mean [95% t-interval].",
    ]
    for regime in s["regimes"]:
        rows_of = {a: [r for r in runs if r["regime"] == regime and r["arm"] == a] for a in arms}
        chosen = {k: choose(runs, regime, [a for a in sweeps[k] if a in arms]) for k in ("gam", "sam")}
        adamw = rows_of["adamw"]
        lines += [
            "", f"### {regime}", "",
            f"Chosen on validation: GAM `{chosen['gam']}`, SAM `{chosen['sam']}` (marked *).", "",
            "| arm | test acc. | Δ test vs AdamW [95% CI] | train acc. | val. acc. | top eigenvalue | "
            "eig. / AdamW [95% CI] | passes / AdamW | time / AdamW |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in rows_of.items():
            if not rows:
                continue
            diff = t_interval(paired(rows, adamw, lambda r, a: r["test"] - a["test"]))
            log_eig = t_interval(paired(rows, adamw, lambda r, a: _log_ratio(r["eig"], a["eig"])))
            passes = statistics.mean(paired(rows, adamw, lambda r, a: r["examples"] / a["examples"]))
            seconds = statistics.median(paired(rows, adamw, lambda r, a: r["seconds"] / a["seconds"]))
            mark = " *" if name in chosen.values() else ""
            lines.append(
                f"| {name}{mark} | {_mean_sd([r['test'] for r in rows])} | {_ci(*diff, '+.3f')} | "
                f"{_mean_sd([r['train'] for r in rows])} | {_mean_sd([r['val'] for r in rows])} | "
                f"{_mean_sd([r['eig'] for r in rows], 1)} | {_ci(*(math.exp(v) for v in log_eig), '.2f')} | "
                f"{passes:.2f} | {seconds:.2f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Per regime: Δ test accuracy and eigenvalue ratio to AdamW (mean and 95% interval) against passes / AdamW."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, runs, arms = result["settings"], result["runs"], result["arms"]
    _, sweeps = builtin_arms(s)
    regimes = s["regimes"]
    fig, axes = plt.subplots(2, len(regimes), figsize=(5.2 * len(regimes), 7.5), squeeze=False)
    for col, regime in enumerate(regimes):
        adamw = [r for r in runs if r["regime"] == regime and r["arm"] == "adamw"]
        for name in arms:
            rows = [r for r in runs if r["regime"] == regime and r["arm"] == name]
            if not rows or name == "adamw":
                continue
            x = statistics.mean(paired(rows, adamw, lambda r, a: r["examples"] / a["examples"]))
            group = ("GAM sweep" if name in sweeps["gam"] else "SAM sweep" if name in sweeps["sam"] else
                     "frontier" if name in sweeps["frontier"] else "AdamW" if name.startswith("adamw") else name)
            color = {"GAM sweep": "C0", "SAM sweep": "C1", "frontier": "C2", "AdamW": "C7"}.get(group, "C3")
            for row, value in ((0, lambda r, a: r["test"] - a["test"]), (1, lambda r, a: _log_ratio(r["eig"], a["eig"]))):
                mean, low, high = t_interval(paired(rows, adamw, value))
                if row == 1:
                    mean, low, high = (math.exp(v) for v in (mean, low, high))
                ax = axes[row][col]
                ax.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=color, ms=4, capsize=2)
                if group not in ("GAM sweep", "SAM sweep"):
                    ax.annotate(name, (x, mean), fontsize=6, xytext=(3, 2), textcoords="offset points")
        axes[0][col].axhline(0, color="k", lw=0.5)
        axes[1][col].axhline(1, color="k", lw=0.5)
        axes[1][col].set_yscale("log")
        axes[0][col].set_title(regime)
        axes[1][col].set_xlabel("forward/backward passes / AdamW")
    axes[0][0].set_ylabel("Δ test accuracy vs AdamW (95% CI)")
    axes[1][0].set_ylabel("top eigenvalue / AdamW (95% CI)")
    fig.suptitle("blue: GAM sweep, orange: SAM sweep, green: cost-cutting frontier, grey: AdamW 2x/4x, red: others",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets, 5 arms")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="add an arm: GAMConfig keyword arguments (and epochs_x); repeatable")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (gam_sweep, sam_sweep: a sweep)")
    parser.add_argument("--regimes", default=None, help="comma-separated subset of fit,underfit,finetune")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--gam-grad-rho", default=None, help="GAM sweep: values of gam_grad_rho (rho')")
    parser.add_argument("--gam-grad-norm-rho", default=None, help="GAM sweep: values of gam_grad_norm_rho (rho)")
    parser.add_argument("--sam-rho", default=None, help="SAM sweep: values of gam_grad_rho")
    parser.add_argument("--json", default=None, help="write every per-seed number to this file")
    parser.add_argument("--tables", default=None, metavar="JSON", help="print the tables of a saved run; train nothing")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the cost / accuracy / flatness figure")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            result = json.load(f)
        print(markdown(result))
        if args.plot:
            plot(result, args.plot)
        return result
    torch.set_num_threads(args.threads)
    s = dict(SETTINGS["quick" if args.quick else "full"])
    for key, option in (("gam_grad_rho", args.gam_grad_rho), ("gam_grad_norm_rho", args.gam_grad_norm_rho),
                        ("sam_rho", args.sam_rho)):
        if option:
            s[key] = _floats(option)
    if args.regimes:
        s["regimes"] = args.regimes.split(",")
        unknown = set(s["regimes"]) - set(REGIMES)
        if unknown:
            parser.error(f"unknown regime(s) {', '.join(sorted(unknown))}; known: {', '.join(REGIMES)}")
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    arms, sweeps = builtin_arms(s)
    if args.quick and args.arms is None:
        args.arms = ",".join(["adamw_2x", "gam_default", *sweeps["gam"][:1], *sweeps["sam"][-1:]])
    for spec in args.arm:
        name, config = parse_arm(spec)
        arms[name] = config
    names = None if args.arms is None else args.arms.split(",")
    if names is not None:
        names += [parse_arm(spec)[0] for spec in args.arm if parse_arm(spec)[0] not in names]
    arms = select_arms(arms, sweeps, names)
    start = time.perf_counter()
    result = run(s, arms, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s, {args.threads} thread(s).")
    return result


if __name__ == "__main__":
    main()
