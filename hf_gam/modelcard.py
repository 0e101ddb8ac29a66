"""What GAM adds to the model card that `Trainer.create_model_card` writes.

`GAMTrainer.create_model_card` extends the card's tags with `GAM_TAGS` and then calls
`append_gam_section(readme_path, args)`, which adds one Markdown section recording how the
model was trained: the method, every `gam_*` value, the base optimizer, learning rate, batch
size, epochs, and the paper's citation. The section sits between two HTML comments, so a
second call replaces it instead of adding a copy.

Nothing here reads a token: only the fields named below are written, never `hub_token` or
any other credential. This module has no image code and does not import the trainer.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields, is_dataclass
from typing import Any

GAM_TAGS: list[str] = ["gam", "sharpness-aware"]
"""Tags added to the card's metadata by `GAMTrainer.create_model_card`."""

GAM_CITATION: str = """@InProceedings{Zhang_2023_CVPR,
    author    = {Zhang, Xingxuan and Xu, Renzhe and Yu, Han and Zou, Hao and Cui, Peng},
    title     = {Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves Generalization},
    booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
    month     = {June},
    year      = {2023},
    pages     = {20247-20257}
}"""
"""BibTeX entry of the paper (CVPR 2023, arXiv 2303.03108)."""

SECTION_BEGIN = "<!-- hf_gam:gam-section:begin -->"
SECTION_END = "<!-- hf_gam:gam-section:end -->"
SECTION_TITLE = "## Training with GAM"

_METHOD_DESCRIPTIONS = {
    "gam": "GAM (Gradient norm Aware Minimization, accelerated form: four forward/backward passes per micro-batch)",
    "sam": "SAM (two forward/backward passes per micro-batch, radius `gam_grad_rho`)",
    "none": "none (the stock Trainer step; GAM disabled)",
}
_MOMENTUM_SAM = ("SAM along the optimizer's momentum (Momentum-SAM, Becker et al., 2024: one forward/backward pass "
                 "per micro-batch at the point the momentum leads to, radius `gam_grad_rho`)")


def gam_field_names(args: Any) -> list[str]:
    """Names of every `gam_*` attribute of `args`, in declaration order when `args` is a dataclass."""
    if is_dataclass(args):
        names = [f.name for f in fields(args) if f.name.startswith("gam_")]
    else:
        names = sorted(name for name in vars(args) if name.startswith("gam_"))
    # Never let anything that looks like a credential through, whatever its prefix.
    return [name for name in names if "token" not in name.lower()]


def _format_value(value: Any) -> str:
    """Text of one value as it appears in the card (enums by their value, floats by `repr`)."""
    value = getattr(value, "value", value)  # enums such as `OptimizerNames`
    if isinstance(value, float):
        return repr(value)
    return str(value)


def gam_settings(args: Any) -> dict[str, str]:
    """The rows of the card's GAM table: every `gam_*` value, then the base optimizer settings."""
    rows = {name: _format_value(getattr(args, name)) for name in gam_field_names(args)}
    world_size = int(getattr(args, "world_size", 1) or 1)
    per_device = int(args.per_device_train_batch_size)
    accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    rows["optim"] = _format_value(args.optim)
    rows["learning_rate"] = _format_value(args.learning_rate)
    rows["weight_decay"] = _format_value(getattr(args, "weight_decay", 0.0))
    rows["lr_scheduler_type"] = _format_value(getattr(args, "lr_scheduler_type", ""))
    rows["per_device_train_batch_size"] = str(per_device)
    rows["gradient_accumulation_steps"] = str(accumulation)
    rows["num_processes"] = str(world_size)
    rows["total_train_batch_size"] = str(per_device * accumulation * world_size)
    rows["num_train_epochs"] = _format_value(args.num_train_epochs)
    max_steps = getattr(args, "max_steps", -1)
    if max_steps is not None and max_steps > 0:
        rows["max_steps"] = str(max_steps)
    rows["seed"] = str(getattr(args, "seed", ""))
    return rows


def named_setting(args: Any) -> str | None:
    """The ready setting the run used, as the card names it: `GAMConfig()`'s defaults when every `gam_*` value is its
    default, else the `hf_gam.*_GAM` setting whose values on top of the defaults are exactly the run's; `None` for any
    other setting (its values are in the card's table all the same).

    `FINETUNE_GAM` and `RELEASED_GAM` hold the defaults' values, so a run that named either one cannot be told from
    a run of the defaults: the card says "the defaults" and names both, and claims no purpose (an SGD run with
    `RELEASED_GAM` is not "for fine-tuning")."""
    from dataclasses import fields as dataclass_fields

    from .config import CHEAP_GAM, FINETUNE_GAM, PRETRAIN_GAM, RELEASED_GAM, GAMConfig

    defaults = {f.name: f.default for f in dataclass_fields(GAMConfig) if f.name.startswith("gam_")}
    run = {name: getattr(args, name, None) for name in defaults}
    if run == defaults:
        same = [name for name, setting in (("FINETUNE_GAM", FINETUNE_GAM), ("RELEASED_GAM", RELEASED_GAM))
                if {**defaults, **setting} == defaults]
        return "the defaults of `GAMConfig`" + (
            f" (the values of {' and '.join(f'`hf_gam.{name}`' for name in same)} too)" if same else "")
    for name, setting, purpose in (("PRETRAIN_GAM", PRETRAIN_GAM, "for training from scratch"),
                                   ("CHEAP_GAM", CHEAP_GAM, "for fine-tuning at less compute")):
        if run == {**defaults, **setting}:
            return f"`hf_gam.{name}` ({purpose})"
    return None


def render_gam_section(args: Any) -> str:
    """The Markdown section (with its begin/end markers) describing the GAM run configured by `args`."""
    method = str(getattr(args, "gam_method", "gam"))
    description = _METHOD_DESCRIPTIONS.get(method, method)
    if method == "sam" and getattr(args, "gam_perturbation", "gradient") == "momentum":
        description = _MOMENTUM_SAM
    lines = [
        SECTION_BEGIN,
        SECTION_TITLE,
        "",
        f"Trained with `hf_gam.GAMTrainer`. Method: {description}; Zhang et al., CVPR 2023,",
        "[arXiv:2303.03108](https://arxiv.org/abs/2303.03108).",
        "The base optimizer below applies the direction GAM computes as its gradient, with its own",
        "learning rate, schedule and weight decay.",
        "",
    ]
    setting = named_setting(args) if method != "none" else None
    if setting is not None:
        lines += [f"GAM setting: {setting}; its values are in the table.", ""]
    lines += [
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | `{value}` |" for name, value in gam_settings(args).items()]
    lines += [
        "",
        "### Citation",
        "",
        "```bibtex",
        GAM_CITATION,
        "```",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def append_gam_section(readme_path: str, args: Any) -> None:
    """Add (or replace) the GAM section of the model card at `readme_path`.

    Args:
        readme_path: the README.md that `Trainer.create_model_card` just wrote. Created if missing.
        args: the run's `GAMConfig` (any object with the `gam_*` fields and the usual
            `TrainingArguments` fields `optim`, `learning_rate`, `per_device_train_batch_size`,
            `num_train_epochs`).
    """
    _put_block(readme_path, render_gam_section(args), SECTION_BEGIN, SECTION_END)


def _put_block(readme_path: str, block: str, begin: str, end: str) -> None:
    """Replace the text between `begin` and `end` in `readme_path` with `block`, or append `block` if absent."""
    text = ""
    if os.path.exists(readme_path):
        with open(readme_path, encoding="utf-8") as f:
            text = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + block
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(text)


def read_gam_section(card_text: str) -> dict[str, str]:
    """Parse the GAM table of a card written by `append_gam_section` back into `{setting: value}`.

    Raises `ValueError` when the card has no GAM section.
    """
    start = card_text.find(SECTION_BEGIN)
    end = card_text.find(SECTION_END, start)
    if start < 0 or end < 0:
        raise ValueError("The model card has no GAM section.")
    rows: dict[str, str] = {}
    for line in card_text[start:end].splitlines():
        match = re.fullmatch(r"\| (\S+) \| `(.*)` \|", line.strip())
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


TEST_BEGIN = "<!-- hf_gam:test-results:begin -->"
TEST_END = "<!-- hf_gam:test-results:end -->"


def render_test_results(metrics: dict[str, float], split_name: str) -> str:
    """One Markdown line (between markers) with the `test_*` metrics of the single evaluation after training."""
    values = ", ".join(
        f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}"
        for name, value in metrics.items()
        if name.startswith("test_") and not name.endswith(("_runtime", "_per_second"))
    )
    line = (
        f"Test results (split `{split_name}`, evaluated once after training; never used for model selection): "
        f"{values}"
    )
    return f"{TEST_BEGIN}\n{line}\n{TEST_END}\n"


def append_test_results(readme_path: str, metrics: dict[str, float], split_name: str) -> None:
    """Add (or replace) the line of test results in the model card at `readme_path`."""
    _put_block(readme_path, render_test_results(metrics, split_name), TEST_BEGIN, TEST_END)


def read_test_results(card_text: str) -> dict[str, float]:
    """Parse the line written by `append_test_results` back into `{test_metric: value}`."""
    start = card_text.find(TEST_BEGIN)
    end = card_text.find(TEST_END, start)
    if start < 0 or end < 0:
        raise ValueError("The model card has no test results.")
    line = card_text[start + len(TEST_BEGIN) : end].strip()
    return {name: float(value) for name, value in re.findall(r"(test_\w+): ([-0-9.e+]+)", line)}


COMPRESSION_BEGIN = "<!-- hf_gam:compression:begin -->"
COMPRESSION_END = "<!-- hf_gam:compression:end -->"
COMPRESSION_TITLE = "## Accuracy after compression"


def render_compression_table(report: dict[str, float], split_name: str, num_examples: int,
                             compressions: Any = ()) -> str:
    """The card's section "Accuracy after compression" (between markers) for a `compression_report` of the final
    model: one row per compression with its accuracy and the change from the uncompressed model."""
    from .compression import descriptions

    described = descriptions(compressions)
    baseline = report["baseline"]
    lines = [
        COMPRESSION_BEGIN,
        COMPRESSION_TITLE,
        "",
        f"Top-1 accuracy on {num_examples} examples of the split `{split_name}`, measured with `hf_gam.compression`,",
        "each compression applied to a copy of the final weights (`python -m hf_gam.compression` measures a checkpoint).",
        "",
        "| compression | what | accuracy | change |",
        "|---|---|---|---|",
        f"| `none` | the trained weights | {baseline:.4f} | |",
    ]
    for name, value in report.items():
        if name != "baseline":
            lines.append(f"| `{name}` | {described.get(name, name)} | {value:.4f} | {value - baseline:+.4f} |")
    return "\n".join(lines + [COMPRESSION_END]) + "\n"


def append_compression_table(readme_path: str, report: dict[str, float], split_name: str, num_examples: int,
                             compressions: Any = ()) -> None:
    """Add (or replace) the section "Accuracy after compression" of the model card at `readme_path`."""
    block = render_compression_table(report, split_name, num_examples, compressions)
    _put_block(readme_path, block, COMPRESSION_BEGIN, COMPRESSION_END)


def read_compression_table(card_text: str) -> dict[str, float]:
    """Parse the section written by `append_compression_table` back into `{"baseline": ..., name: accuracy}`."""
    start = card_text.find(COMPRESSION_BEGIN)
    end = card_text.find(COMPRESSION_END, start)
    if start < 0 or end < 0:
        raise ValueError("The model card has no compression table.")
    rows = re.findall(r"^\| `(\w+(?:\.\d+)?)` \| [^|]* \| ([-0-9.]+) \|", card_text[start:end], re.MULTILINE)
    return {("baseline" if name == "none" else name): float(value) for name, value in rows}


VARIANTS_BEGIN = "<!-- hf_gam:compressed-variants:begin -->"
VARIANTS_END = "<!-- hf_gam:compressed-variants:end -->"
VARIANTS_TITLE = "## Compressed variants"
VARIANTS_PICTURE = "compressed_variants.svg"
"""The picture of accuracy against size on disk, written beside the card by `write_variants_picture`."""


def _variant_rows(reports: dict[str, dict]) -> list[dict]:
    """One row per model: the uncompressed one first (from the first report), then each variant."""
    first = next(iter(reports.values()))
    rows = [{"variant": "none", "path": "", **first["original"]}]
    for path, report in reports.items():
        rows.append({"variant": report["compression"], "path": path, **report["compressed"]})
    return rows


def render_variants_section(reports: dict[str, dict], split_name: str, picture: str | None = VARIANTS_PICTURE) -> str:
    """The card's section "Compressed variants" (between markers): `reports` maps each variant's folder (relative
    to the model's, as `from_pretrained(..., subfolder=...)` takes it) to its `export_report.json`."""
    rows = _variant_rows(reports)
    baseline = rows[0].get("accuracy")
    first = next(iter(reports.values()))
    lines = [
        VARIANTS_BEGIN,
        VARIANTS_TITLE,
        "",
        "Smaller models written from the final weights by `hf_gam.compression.export`, each a `save_pretrained`",
        'folder of this repository: `AutoModelForImageClassification.from_pretrained(REPO, subfolder="FOLDER")`',
        "(the integer formats load through torchao: `pip install torchao`). Size: bytes of the weight files. Latency:",
        "CPU, median of alternating timings of the two models in one run (compare within a row, not across machines).",
        f"Accuracy: top-1 on {first.get('num_examples', 0)} examples of the split `{split_name}`, measured on the",
        "model reloaded from its folder.",
        "",
        "| variant | folder | size (MB) | parameters | latency batch 1 (ms) | latency batch 32 (ms) | accuracy | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        latency = row.get("latency_ms", {})
        cells = [
            f"`{row['variant']}`", f"`{row['path']}`" if row["path"] else "(this folder)",
            f"{row['weights_bytes'] / 1e6:.3f}", f"{row['parameters']:,}",
            f"{latency['batch_1']:.2f}" if "batch_1" in latency else "",
            f"{latency['batch_32']:.2f}" if "batch_32" in latency else "",
            f"{row['accuracy']:.4f}" if "accuracy" in row else "",
            f"{row['accuracy'] - baseline:+.4f}" if "accuracy" in row and row["path"] and baseline is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if picture and baseline is not None:
        lines += ["", f"![Accuracy against size on disk, one point per variant]({picture})"]
    return "\n".join(lines + [VARIANTS_END]) + "\n"


def append_variants_section(readme_path: str, reports: dict[str, dict], split_name: str,
                            picture: str | None = VARIANTS_PICTURE) -> None:
    """Add (or replace) the section "Compressed variants" of the model card at `readme_path`."""
    _put_block(readme_path, render_variants_section(reports, split_name, picture), VARIANTS_BEGIN, VARIANTS_END)


def read_variants_table(card_text: str) -> dict[str, dict[str, float]]:
    """Parse the section written by `append_variants_section` into `{variant: {"size_mb", "parameters",
    "accuracy"}}` (`"none"` for the uncompressed model)."""
    start = card_text.find(VARIANTS_BEGIN)
    end = card_text.find(VARIANTS_END, start)
    if start < 0 or end < 0:
        raise ValueError("The model card has no section of compressed variants.")
    rows = {}
    for line in card_text[start:end].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = {"size_mb": float(cells[2]), "parameters": int(cells[3].replace(",", "")),
                                         "accuracy": float(cells[6]) if cells[6] else float("nan")}
    return rows


def variants_picture(reports: dict[str, dict]) -> str:
    """An SVG scatter plot of accuracy against size on disk (MB), one labelled point per model (no plotting
    library needed)."""
    rows = [row for row in _variant_rows(reports) if "accuracy" in row]
    width, height, left, right, top, bottom = 560, 360, 70, 30, 30, 50
    sizes = [row["weights_bytes"] / 1e6 for row in rows]
    accuracies = [row["accuracy"] for row in rows]
    x_max = max(sizes) * 1.1
    y_low, y_high = min(accuracies), max(accuracies)
    pad = max(0.02, 0.1 * (y_high - y_low))
    y_low, y_high = max(0.0, y_low - pad), min(1.0, y_high + pad)
    if y_high <= y_low:
        y_high = y_low + pad

    def x(value: float) -> float:
        return left + (width - left - right) * value / x_max

    def y(value: float) -> float:
        return height - bottom - (height - top - bottom) * (value - y_low) / (y_high - y_low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">weights on disk (MB)</text>',
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(top + height - bottom) / 2})">accuracy</text>',
    ]
    for i in range(5):
        value = x_max * i / 4
        parts.append(f'<text x="{x(value):.1f}" y="{height - bottom + 16}" text-anchor="middle">{value:.2f}</text>')
        level = y_low + (y_high - y_low) * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(level) + 4:.1f}" text-anchor="end">{level:.3f}</text>')
    for row, size, value in zip(rows, sizes, accuracies):
        color = "black" if row["variant"] == "none" else "#1f77b4"
        parts.append(f'<circle cx="{x(size):.1f}" cy="{y(value):.1f}" r="5" fill="{color}"/>')
        parts.append(f'<text x="{x(size) + 8:.1f}" y="{y(value) - 6:.1f}">{row["variant"]}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def write_variants_picture(directory: str, reports: dict[str, dict]) -> str | None:
    """Write `variants_picture(reports)` to `directory/VARIANTS_PICTURE`; returns its name, or None when no report
    has an accuracy."""
    if not any("accuracy" in report["compressed"] for report in reports.values()):
        return None
    with open(os.path.join(directory, VARIANTS_PICTURE), "w", encoding="utf-8") as f:
        f.write(variants_picture(reports))
    return VARIANTS_PICTURE
