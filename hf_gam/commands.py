"""What the command lines (`python -m hf_gam.compression`, `python -m hf_gam.flatness`, `python -m hf_gam.landscape`)
share: the arguments naming a saved checkpoint and the labelled examples to measure it on, and their loading."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from .measuring import stack_examples

__all__ = ["add_checkpoint_arguments", "checkpoint_examples", "imagefolder_examples", "load_checkpoint"]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def imagefolder_examples(path: str, model, checkpoint: str | None = None, num_examples: int | None = None,
                         split: str | None = None) -> list[dict]:
    """Labelled images of an imagefolder, `path/<label>/<image>` (or `path/<split>/<label>/<image>` when that folder
    exists). At most `num_examples`, taken from the classes in turn (the first image of each class, then the second,
    ...), so that a bounded sample covers every class. Labels come from the model's `label2id`; a model with the
    default names (`LABEL_0`, ...) takes the sorted folder names in order, and a folder the model does not know is an
    error. Images are prepared by the checkpoint's image processor when it has one, else resized and scaled to
    [-1, 1]."""
    import itertools
    import os

    from PIL import Image

    if split and os.path.isdir(os.path.join(path, split)):
        path = os.path.join(path, split)
    labels = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not labels:
        raise ValueError(f"{path} holds no class folders: an imagefolder is laid out as <dir>/<label>/<image>.")
    label2id = getattr(model.config, "label2id", None) or {}
    default_names = all(str(name).startswith("LABEL_") for name in label2id)
    if default_names:
        num_labels = getattr(model.config, "num_labels", len(labels))
        if len(labels) > num_labels:
            raise ValueError(f"{path} has {len(labels)} class folders; the model has {num_labels} labels.")
        label2id = {name: i for i, name in enumerate(labels)}
    unknown = [name for name in labels if name not in label2id]
    if unknown:
        raise ValueError(f"the model's labels ({sorted(label2id)[:10]}...) do not name the folders {unknown} of {path}.")
    files = [[os.path.join(path, name, f) for f in sorted(os.listdir(os.path.join(path, name)))
              if f.lower().endswith(IMAGE_EXTENSIONS)] for name in labels]
    chosen = [pair for row in itertools.zip_longest(*[[(name, f) for f in fs] for name, fs in zip(labels, files)])
              for pair in row if pair is not None][:num_examples]
    processor = None
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(checkpoint)
    size = getattr(model.config, "image_size", 224)
    channels = getattr(model.config, "num_channels", 3)
    examples = []
    for name, file in chosen:
        img = Image.open(file).convert("L" if channels == 1 else "RGB")
        if processor is not None:
            x = processor(img, return_tensors="pt")["pixel_values"][0]
        else:
            img = img.resize((size, size))
            pixels = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
            x = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0
        examples.append({"pixel_values": x, "labels": int(label2id[name])})
    if not examples:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {path}.")
    return examples


def checkpoint_examples(checkpoint: str, model, data: str, split: str, num_examples: int) -> dict:
    """One batch of at most `num_examples` labelled examples for measuring the checkpoint `model` was loaded from:
    `data="digits"`, the bundled digits' `split` (scaled to [-1, 1], repeated over the model's channels), or an
    imagefolder path (see `imagefolder_examples`)."""
    if data == "digits":
        from .vision.digits import digits_examples

        examples = digits_examples(split)[:num_examples]
        channels = getattr(model.config, "num_channels", 1)
        examples = [{**e, "pixel_values": e["pixel_values"].expand(channels, -1, -1)} for e in examples]
    else:
        examples = imagefolder_examples(data, model, checkpoint, num_examples, split)
    return stack_examples(examples)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, split: str, num_examples: int) -> None:
    """The command-line arguments naming a saved checkpoint and the labelled examples to measure it on, as
    `load_checkpoint` reads them."""
    parser.add_argument("checkpoint", help="directory written by save_pretrained / a Trainer checkpoint")
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn, bundled) or an imagefolder path (<dir>/<class>/<image>): at most "
                        "--num-examples images, taken from the classes in turn")
    parser.add_argument("--split", default=split, help="digits split (train, validation or test); for an "
                        "imagefolder, the subfolder <dir>/<split> when there is one")
    parser.add_argument("--num-examples", type=int, default=num_examples, help="at most this many examples")


def load_checkpoint(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The image classifier saved at `args.checkpoint` and one batch of its examples (`checkpoint_examples`)."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(args.checkpoint)
    return model, checkpoint_examples(args.checkpoint, model, args.data, args.split, args.num_examples)
