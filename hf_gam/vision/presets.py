"""Named datasets: where each lives on the Hub and how its splits and columns are called (`--dataset NAME`)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownPresetError


@dataclass(frozen=True)
class DatasetPreset:
    """Where a named dataset lives on the Hub and how its columns and splits are called.

    `validation_split` is `None` when the dataset has no validation split of its own: the recipe then carves a
    stratified one out of train. `test_split` is evaluated once, after training, and never used to select anything.
    """

    name: str
    dataset_name: str
    train_split: str
    validation_split: str | None
    test_split: str | None
    image_column_name: str = "image"
    label_column_name: str = "label"
    dataset_config_name: str | None = None
    num_labels: int | None = None
    gated: bool = False
    note: str = ""


IMAGENET_1K = DatasetPreset(
    name="imagenet-1k",
    dataset_name="ILSVRC/imagenet-1k",
    train_split="train",
    validation_split=None,  # its `validation` split is the set everyone reports (its `test` split has no labels)
    test_split="validation",
    num_labels=1000,
    gated=True,
    note="Gated: accept the terms on the dataset page, then log in with `hf auth login`.",
)

# Each preset was checked against its dataset card or viewer page (this machine cannot reach the Hub):
# - cars: card features `image`, `label` (196-way class label); viewer splits train 8,144 / test 8,041 plus seven
#   corrupted copies of test (contrast, gaussian_noise, impulse_noise, jpeg_compression, motion_blur, pixelate,
#   spatter), which are never downloaded because only the named splits are loaded.
# - pets: card features `image`, `label` (37-way), `image_id`, `label_cat_dog`; splits train 3,680 / test 3,669.
# - flowers: card features `image`, `label` (102-way); viewer splits train 1,020 / validation 1,020 / test 6,149.
# - cub: card features `image`, `label` (200-way), `bbox`; viewer splits train 5,994 / test 5,794.
# - food: viewer splits train 75,750 / validation 25,250 (the official test images), columns `image`, `label`.
# - aircraft: `HuggingFaceM4/FGVC-Aircraft` is a loading script, which `datasets` 4 and later refuse. The parquet
#   repository `dpdl-benchmark/fgvc_aircraft` is used instead; its card could not be read from here, so its
#   `variant` column (100-way) and split names are taken from public code that trains on it. A missing split or a
#   label column that is not a class label stops the run with the dataset's actual splits and columns.
PRESETS: dict[str, DatasetPreset] = {
    "cars": DatasetPreset(
        name="cars",
        dataset_name="tanganke/stanford_cars",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=196,
        note="Stanford Cars, 8,144 train / 8,041 test; the repo also holds corrupted copies of test (never loaded).",
    ),
    "pets": DatasetPreset(
        name="pets",
        dataset_name="timm/oxford-iiit-pet",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=37,
        note="Oxford-IIIT Pets, 37 breeds: 3,680 train (the official trainval list) / 3,669 test.",
    ),
    "flowers": DatasetPreset(
        name="flowers",
        dataset_name="dpdl-benchmark/oxford_flowers102",
        train_split="train",
        validation_split="validation",
        test_split="test",
        num_labels=102,
        note="Flowers-102: 1,020 train / 1,020 validation / 6,149 test.",
    ),
    "cub": DatasetPreset(
        name="cub",
        dataset_name="bentrevett/caltech-ucsd-birds-200-2011",
        train_split="train",
        validation_split=None,
        test_split="test",
        num_labels=200,
        note="CUB-200-2011: 5,994 train / 5,794 test; its `bbox` column is dropped.",
    ),
    "aircraft": DatasetPreset(
        name="aircraft",
        dataset_name="dpdl-benchmark/fgvc_aircraft",
        train_split="train",
        validation_split="validation",
        test_split="test",
        label_column_name="variant",
        num_labels=100,
        note="FGVC-Aircraft, 100-way `variant` labels (`family`/`manufacturer` are coarser); 3,334 train / "
        "3,333 validation / 3,333 test images in the official split.",
    ),
    "food": DatasetPreset(
        name="food",
        dataset_name="ethz/food101",
        train_split="train",
        validation_split=None,  # its `validation` split holds the official test images
        test_split="validation",
        num_labels=101,
        note="Food-101: 75,750 train / 25,250 `validation` (the official test images, used as the test split).",
    ),
}


def resolve_preset(name: str) -> DatasetPreset:
    """The preset called `name` (case-insensitive, `-`/`_` ignored); `UnknownPresetError` otherwise."""
    key = name.strip().lower().replace("_", "-")
    aliases = {
        "stanford-cars": "cars",
        "oxford-pets": "pets",
        "oxford-iiit-pet": "pets",
        "flowers102": "flowers",
        "flowers-102": "flowers",
        "cub-200-2011": "cub",
        "cub200": "cub",
        "fgvc-aircraft": "aircraft",
        "food101": "food",
        "food-101": "food",
        "imagenet": "imagenet-1k",
    }
    key = aliases.get(key, key)
    if key == IMAGENET_1K.name:
        return IMAGENET_1K
    if key not in PRESETS:
        raise UnknownPresetError(
            f"Unknown dataset preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}. "
            "For another dataset pass `--dataset_name <hub id>` or `--train_dir/--validation_dir`."
        )
    return PRESETS[key]
