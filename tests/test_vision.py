"""Image-classification data of the recipes: presets, errors, splits, transforms, metrics, arguments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
from huggingface_hub.utils import httpx  # noqa: E402  (the HTTP client the Hub library uses)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import ConvNextImageProcessor, ViTImageProcessor  # noqa: E402

from hf_gam.config import GAMConfig  # noqa: E402
from hf_gam.vision import (  # noqa: E402
    IMAGENET_1K,
    PRESETS,
    DataTrainingArguments,
    DatasetUnavailableError,
    LabelColumnError,
    MissingColumnError,
    MissingSplitError,
    ModelArguments,
    RecipeError,
    UnknownPresetError,
    accuracy_metrics,
    build_transforms,
    carve_validation,
    check_columns,
    choose_splits,
    collate_fn,
    image_geometry,
    load_hub_dataset,
    make_batch_transform,
    parse_recipe_args,
    recipe_parser as make_recipe_parser,
    resolve_data,
    resolve_preset,
    select_splits,
    top_k_predictions,
)

EXPECTED_PRESETS = {
    # name: (hub id, train split, validation split (None: carved from train), test split, image column, label column,
    #        classes)
    "cars": ("tanganke/stanford_cars", "train", None, "test", "image", "label", 196),
    "pets": ("timm/oxford-iiit-pet", "train", None, "test", "image", "label", 37),
    "flowers": ("dpdl-benchmark/oxford_flowers102", "train", "validation", "test", "image", "label", 102),
    "cub": ("bentrevett/caltech-ucsd-birds-200-2011", "train", None, "test", "image", "label", 200),
    "aircraft": ("dpdl-benchmark/fgvc_aircraft", "train", "validation", "test", "image", "variant", 100),
    "food": ("ethz/food101", "train", None, "validation", "image", "label", 101),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_each_preset_resolves_to_its_id_columns_and_splits(name):
    preset = resolve_preset(name)
    got = (preset.dataset_name, preset.train_split, preset.validation_split, preset.test_split,
           preset.image_column_name, preset.label_column_name, preset.num_labels)
    assert got == EXPECTED_PRESETS[name]
    data = resolve_data(DataTrainingArguments(), preset)
    assert (data.dataset_name, data.train_split, data.validation_split, data.test_split, data.image_column_name,
            data.label_column_name) == got[:6]
    assert not data.validation_optional and not data.test_optional


def test_presets_are_exactly_the_documented_ones_and_aliases_work():
    assert set(PRESETS) == set(EXPECTED_PRESETS)
    assert resolve_preset("Stanford_Cars") is PRESETS["cars"]
    assert resolve_preset("FGVC-Aircraft") is PRESETS["aircraft"]
    assert resolve_preset("imagenet") is IMAGENET_1K and IMAGENET_1K.dataset_name == "ILSVRC/imagenet-1k"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UnknownPresetError, match="Known presets: aircraft, cars, cub, flowers, food, pets"):
        resolve_preset("birdsnap")


def test_command_line_overrides_preset_and_other_hub_id_drops_its_columns():
    data = resolve_data(DataTrainingArguments(label_column_name="family", test_split="validation"), PRESETS["aircraft"])
    assert (data.label_column_name, data.test_split, data.train_split) == ("family", "validation", "train")
    other = resolve_data(DataTrainingArguments(dataset_name="someone/birds"), PRESETS["aircraft"])
    assert (other.dataset_name, other.label_column_name) == ("someone/birds", "label")
    assert (other.validation_split, other.test_split, other.validation_optional, other.test_optional) == (
        "validation", "test", True, True)
    local = resolve_data(DataTrainingArguments(train_dir="/a", validation_dir="/b"), PRESETS["cars"])
    assert local.dataset_name is None and local.description == "imagefolder"
    with pytest.raises(RecipeError, match="No data"):
        resolve_data(DataTrainingArguments())
    with pytest.raises(RecipeError, match="not both"):
        resolve_data(DataTrainingArguments(dataset_name="x/y", train_dir="/a"))


def small_dataset(label_feature=None, n=12):
    images = [Image.new("RGB", (8 + i, 10), color=(i * 20, 0, 0)) for i in range(n)]
    label_feature = label_feature or datasets.ClassLabel(names=["a", "b", "c"])
    labels = [i % 3 for i in range(n)] if isinstance(label_feature, datasets.ClassLabel) else [f"c{i % 3}" for i in range(n)]
    features = datasets.Features({"img": datasets.Image(), "breed": label_feature, "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({"img": images, "breed": labels, "note": ["x"] * n}, features=features)


def test_missing_column_lists_the_available_ones():
    dataset = small_dataset()
    assert check_columns(dataset, "img", "breed") == ["a", "b", "c"]
    with pytest.raises(MissingColumnError, match=r"label column 'label'.*img, breed, note.*--label_column_name"):
        check_columns(dataset, "img", "label")
    with pytest.raises(MissingColumnError, match="image column 'image'.*--image_column_name"):
        check_columns(dataset, "image", "breed")


def test_label_column_that_is_not_a_class_label():
    dataset = small_dataset(label_feature=datasets.Value("string"))
    with pytest.raises(LabelColumnError, match="not a class label"):
        check_columns(dataset, "img", "breed")
    with pytest.raises(LabelColumnError, match="not images"):
        check_columns(small_dataset(), "note", "breed")


def test_choose_splits_named_optional_and_missing():
    cars = resolve_data(DataTrainingArguments(), PRESETS["cars"])
    available = ["train", "test", "contrast", "pixelate"]
    assert choose_splits(cars, available) == {"train": "train", "test": "test"}  # no validation: carved
    generic = resolve_data(DataTrainingArguments(dataset_name="a/b"))
    assert choose_splits(generic, ["train", "validation"]) == {"train": "train", "validation": "validation"}
    assert choose_splits(generic, ["train", "validation", "test"])["test"] == "test"
    flowers = resolve_data(DataTrainingArguments(), PRESETS["flowers"])
    with pytest.raises(MissingSplitError, match="'validation' not found; the dataset has: train, test.*--validation_split"):
        choose_splits(flowers, ["train", "test"])
    clash = resolve_data(DataTrainingArguments(test_split="train"), PRESETS["cars"])
    with pytest.raises(RecipeError, match="test split 'train' is also used"):
        choose_splits(clash, ["train", "test"])


def labelled_rows(counts, start=0):
    """A dataset with `counts[c]` examples of class c, each with a unique `image_id` and a unique tiny image."""
    ids, labels, images = [], [], []
    for label, count in enumerate(counts):
        for _ in range(count):
            index = start + len(ids)
            ids.append(f"id{index}")
            labels.append(label)
            images.append(Image.new("RGB", (4, 4), color=(index % 256, index // 256, label)))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=len(counts)), "image_id": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels, "image_id": ids}, features=features)


def test_carved_validation_is_stratified_seeded_and_disjoint_from_train():
    counts = [40, 20, 10, 30]
    full = labelled_rows(counts)
    train, validation = carve_validation(full, 0.1, seed=3, label_column="label")
    train_ids, validation_ids = set(train["image_id"]), set(validation["image_id"])
    assert not train_ids & validation_ids and train_ids | validation_ids == set(full["image_id"])
    per_class = np.bincount(validation["label"], minlength=len(counts))
    assert all(abs(got - 0.1 * n) <= 1 for got, n in zip(per_class, counts)), per_class  # per-class proportions
    assert per_class.sum() == 10
    again, _ = carve_validation(full, 0.1, seed=3, label_column="label")
    other, _ = carve_validation(full, 0.1, seed=4, label_column="label")
    assert again["image_id"] == train["image_id"] and set(other["image_id"]) != train_ids
    with pytest.raises(RecipeError, match=r"\(0, 1\)"):
        carve_validation(full, 1.5, seed=0, label_column="label")
    with pytest.raises(RecipeError, match="stratified"):
        carve_validation(labelled_rows([1, 1, 1, 1]), 0.5, seed=0, label_column="label")


def test_select_splits_drops_extra_columns_and_carves_only_without_validation():
    data = resolve_data(DataTrainingArguments(), PRESETS["pets"])
    splits = {"train": labelled_rows([10, 10]), "test": labelled_rows([3, 3], start=100)}
    train, validation, test = select_splits(splits, data, 0.2, seed=0)
    assert train.column_names == validation.column_names == test.column_names == ["image", "label"]
    assert (len(train), len(validation), len(test)) == (16, 4, 6)
    flowers = resolve_data(DataTrainingArguments(), PRESETS["flowers"])
    own = {"train": labelled_rows([5, 5]), "validation": labelled_rows([2, 2], start=50), "test": labelled_rows([1, 1])}
    train, validation, _ = select_splits(own, flowers, 0.2, seed=0)
    assert (len(train), len(validation)) == (10, 4)


def test_offline_hub_dataset_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnavailableError) as info:
        load_hub_dataset("nobody/not-cached-anywhere-1234")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf auth login" in message and "gated" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _online(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def test_gated_hub_dataset_says_how_to_log_in(monkeypatch):
    _online(monkeypatch)
    request = httpx.Request("HEAD", "https://huggingface.co/datasets/ILSVRC/imagenet-1k/resolve/main/README.md")

    def gated(self, *args, **kwargs):
        raise GatedRepoError("gated", response=httpx.Response(401, request=request))

    monkeypatch.setattr(HfApi, "hf_hub_download", gated)
    with pytest.raises(DatasetUnavailableError, match="gated.*hf auth login"):
        load_hub_dataset("ILSVRC/imagenet-1k")


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    _online(monkeypatch)

    def unreachable(self, *args, **kwargs):
        try:
            raise httpx.ConnectError("Name or service not known")
        except httpx.ConnectError as cause:
            raise LocalEntryNotFoundError("cannot reach") from cause

    monkeypatch.setattr(HfApi, "hf_hub_download", unreachable)
    with pytest.raises(DatasetUnavailableError, match="cannot be reached"):
        load_hub_dataset("tanganke/stanford_cars")


def test_script_based_dataset_points_to_the_parquet_conversion(monkeypatch, tmp_path):
    _online(monkeypatch)
    readme = tmp_path / "0123abcd" / "README.md"
    readme.parent.mkdir()
    readme.write_text("card")
    monkeypatch.setattr(HfApi, "hf_hub_download", lambda self, *args, **kwargs: str(readme))
    with pytest.raises(DatasetUnavailableError, match="refs/convert/parquet"):
        load_hub_dataset("HuggingFaceM4/FGVC-Aircraft")


def test_geometry_of_vit_and_convnext_processors():
    vit = image_geometry(ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3))
    assert (vit.crop_size, vit.resize_size, vit.mean, vit.std) == ((32, 32), 32, (0.5,) * 3, (0.25,) * 3)
    convnext = image_geometry(ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875))
    assert (convnext.crop_size, convnext.resize_size) == ((224, 224), 256)


def test_transforms_collate_and_normalisation():
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    train, evaluate = build_transforms(processor)
    dataset = small_dataset(n=4)
    batch = make_batch_transform(evaluate, "img", "breed")(dataset[:4])
    collated = collate_fn([{"pixel_values": p, "labels": y} for p, y in zip(batch["pixel_values"], batch["labels"])])
    assert collated["pixel_values"].shape == (4, 3, 16, 16) and collated["labels"].tolist() == [0, 1, 2, 0]
    # A uniform red image maps to (1, -1, -1) with mean 0.5 and std 0.5.
    red = evaluate(Image.new("RGB", (40, 30), color=(255, 0, 0)))
    assert torch.allclose(red[0], torch.ones(16, 16)) and torch.allclose(red[1], -torch.ones(16, 16))
    assert train(Image.new("RGB", (40, 30))).shape == (3, 16, 16)


def test_top1_top5_accuracy_against_a_direct_count():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(50, 10)), dtype=torch.float32)
    labels = rng.integers(0, 10, size=50)
    indices = top_k_predictions(logits).numpy()
    metrics = accuracy_metrics(indices, labels, num_labels=10)
    ranks = (logits.numpy() > logits.numpy()[np.arange(50), labels][:, None]).sum(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(ranks == 0))
    assert metrics["top5_accuracy"] == pytest.approx(np.mean(ranks < 5))
    assert 0 < metrics["accuracy"] < metrics["top5_accuracy"] < 1
    padded = accuracy_metrics(np.vstack([indices, indices[:2]]), np.concatenate([labels, [-100, -100]]), 10)
    assert padded == metrics
    assert set(accuracy_metrics(indices[:, :3], labels % 3, num_labels=3)) == {"accuracy"}


def recipe_parser():
    return make_recipe_parser(ModelArguments, DataTrainingArguments, GAMConfig)


def test_arguments_from_defaults_yaml_and_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("gam_grad_rho: 0.01\nlearning_rate: 1e-4\nnum_train_epochs: 3\ndataset_name: a/b\n")
    defaults = {"num_train_epochs": 8, "output_dir": str(tmp_path / "out"), "use_cpu": True}
    model_args, data_args, args = parse_recipe_args(
        recipe_parser(), defaults, ["--config", str(config), "--num_train_epochs", "2", "--gam_alpha", "0.4"]
    )
    assert (args.gam_grad_rho, args.learning_rate, args.num_train_epochs, args.gam_alpha) == (0.01, 1e-4, 2, 0.4)
    assert data_args.dataset_name == "a/b" and model_args.model_name_or_path == "google/vit-base-patch16-224-in21k"
    _, _, only_file = parse_recipe_args(recipe_parser(), defaults, [str(config)])
    assert only_file.num_train_epochs == 3


def test_bad_config_keys_tokens_and_gam_values_are_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("gam_rho: 0.1\n")
    defaults = {"output_dir": str(tmp_path / "out"), "use_cpu": True}
    with pytest.raises(RecipeError, match="Unknown option.*gam_rho"):
        parse_recipe_args(recipe_parser(), defaults, ["--config", str(config)])
    with pytest.raises(RecipeError, match="hf auth login"):
        parse_recipe_args(recipe_parser(), defaults, ["--hub_token", "hf_abc"])
    with pytest.raises(ValueError, match="gam_alpha"):
        parse_recipe_args(recipe_parser(), defaults, ["--gam_alpha", "1.5"])


def test_flags_are_never_abbreviated_and_tokens_are_refused_by_any_spelling(tmp_path):
    defaults = {"output_dir": str(tmp_path / "out"), "use_cpu": True}
    with pytest.raises(RecipeError, match="spelt in full"):
        parse_recipe_args(recipe_parser(), defaults, ["--learning_r", "1e-3"])
    with pytest.raises(RecipeError, match="spelt in full"):
        parse_recipe_args(recipe_parser(), defaults, ["--conf", "x.yaml"])
    for argv in (["--hub_tok", "hf_x"], ["--hub_token", "hf_x"], ["--hub_token=hf_x"], ["--hub-token", "x"],
                 ["--HUB_TOKEN", "x"], ["--run_name", "hf_abcdefghijklmnopqrstuvwxyz012345"]):
        with pytest.raises(RecipeError, match="HF_TOKEN"):
            parse_recipe_args(recipe_parser(), defaults, argv)
    config = tmp_path / "token.yaml"
    config.write_text("hub_token: hf_abc\n")
    with pytest.raises(RecipeError, match="HF_TOKEN"):
        parse_recipe_args(recipe_parser(), defaults, ["--config", str(config)])
    # Flags that merely contain "token" are not tokens.
    _, _, args = parse_recipe_args(recipe_parser(), defaults, ["--average_tokens_across_devices", "false"])
    assert args.average_tokens_across_devices is False


# --------------------------------------------------------------------------------------------
# Each preset loads through the recipe's own code path, from a local folder laid out like its Hub repository
# (README.md with the card's `configs`/`dataset_info`, `data/<split>-00000-of-00001.parquet`). Only the step that
# turns the Hub id into a path (`hf_gam.vision.hub_dataset_path`) is replaced.
# --------------------------------------------------------------------------------------------
CORRUPTED_CARS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")
PRESET_REPOS = {
    # name: (splits in the repository, extra columns {name: feature}); labels use the preset's class count.
    "cars": (("train", "test") + CORRUPTED_CARS, {}),
    "pets": (("train", "test"), {"image_id": datasets.Value("string"),
                                 "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"])}),
    "flowers": (("train", "validation", "test"), {}),
    "cub": (("train", "test"), {"bbox": datasets.Sequence(datasets.Value("float32"), length=4)}),
    "aircraft": (("train", "validation", "test"), {"family": datasets.ClassLabel(num_classes=70),
                                                   "manufacturer": datasets.ClassLabel(num_classes=30)}),
    "food": (("train", "validation"), {}),
}


def write_hub_like_repo(root, preset, splits, extra, broken=()):
    """A dataset repository as `push_to_hub` lays it out; the splits in `broken` hold unreadable bytes."""
    import io

    import yaml

    features = datasets.Features({
        preset.image_column_name: datasets.Image(),
        preset.label_column_name: datasets.ClassLabel(names=[f"class {i}" for i in range(preset.num_labels)]),
        **extra,
    })
    (root / "data").mkdir(parents=True)
    split_infos = []
    for number, split in enumerate(splits):
        n = 12
        rows = {preset.image_column_name: [], preset.label_column_name: []}
        for i in range(n):
            buffer = io.BytesIO()
            Image.new("RGB", (5, 5), color=(number * 30, i * 20, 7)).save(buffer, format="PNG")
            rows[preset.image_column_name].append({"bytes": buffer.getvalue(), "path": None})
            rows[preset.label_column_name].append(i % 3)
        for name, feature in extra.items():
            if isinstance(feature, datasets.ClassLabel):
                rows[name] = [i % 2 for i in range(n)]
            elif isinstance(feature, datasets.Sequence):
                rows[name] = [[0.0, 1.0, 2.0, 3.0]] * n
            else:
                rows[name] = [f"{split}-{i}" for i in range(n)]
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        if split in broken:
            path.write_bytes(b"not a parquet file: reading this split is a bug")
        else:
            datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
        split_infos.append({"name": split, "num_examples": n})
    card = {
        "dataset_info": {"features": features._to_yaml_list(), "splits": split_infos},
        "configs": [{"config_name": "default",
                     "data_files": [{"split": split, "path": f"data/{split}-*"} for split in splits]}],
    }
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n")


@pytest.mark.parametrize("name", sorted(PRESET_REPOS))
def test_preset_loads_from_a_repository_with_its_real_schema(name, tmp_path, monkeypatch):
    from hf_gam import vision

    preset = PRESETS[name]
    splits, extra = PRESET_REPOS[name]
    broken = CORRUPTED_CARS if name == "cars" else ()
    repo = tmp_path / "repo"
    write_hub_like_repo(repo, preset, splits, extra, broken=broken)
    seen = []
    monkeypatch.setattr(vision, "hub_dataset_path", lambda dataset_name: seen.append(dataset_name) or str(repo))
    data = resolve_data(DataTrainingArguments(), preset)
    loaded = vision.load_image_datasets(data, cache_dir=str(tmp_path / "cache"))
    assert seen and set(seen) == {preset.dataset_name}
    expected_roles = {"train", "test"} | ({"validation"} if preset.validation_split else set())
    assert set(loaded) == expected_roles
    train, validation, test = select_splits(loaded, data, 0.25, seed=0)
    for dataset in (train, validation, test):
        assert dataset.column_names == [preset.image_column_name, preset.label_column_name]
        assert dataset.features[preset.label_column_name].num_classes == preset.num_labels
        assert isinstance(dataset[0][preset.image_column_name], Image.Image)
    if preset.validation_split is None:
        assert (len(train), len(validation)) == (9, 3)  # carved: 25% of 12, one per class
    else:
        assert (len(train), len(validation)) == (12, 12)


def test_train_augmentation_choices():
    """'crop_flip' mirrors some images, 'crop' never does, 'none' is the evaluation transform."""
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    left = Image.new("RGB", (8, 8))
    left.paste((255, 255, 255), (0, 0, 4, 8))  # white left half: a flip moves it right
    torch.manual_seed(0)

    def mirrored(transform, n=40):
        # A crop keeps the white half on the left (or fills the image with it); only a flip puts it right.
        return any(transform(left)[0, :, -1].mean() > transform(left)[0, :, 0].mean() for _ in range(n))

    assert mirrored(build_transforms(processor, "crop_flip")[0])
    assert not mirrored(build_transforms(processor, "crop")[0])
    train, evaluate = build_transforms(processor, "none")
    assert train is evaluate
    with pytest.raises(RecipeError, match="train_augmentation"):
        build_transforms(processor, "flip")


def as_plain(rows: list[dict]) -> list[tuple]:
    """Rows of `{"pixel_values": tensor, "labels": int}` as comparable tuples."""
    return [(tuple(row["pixel_values"].flatten().tolist()), row["labels"]) for row in rows]


def test_digits_transfer_task_is_the_benchmarks_scenario():
    """`transfer_task(n, noise, seed)`: a seeded draw of n images of the pool of 5-9, a seeded share of their labels
    flipped; validation and test fixed and true; the source every image of 0-4."""
    from hf_gam.vision import digits

    x, labels = digits.digits_by_class(8)
    test, validation, pool = digits.split_target(labels, digits.TARGET_CLASSES)
    target = digits.TARGET_CLASSES
    clean = digits.transfer_task(100, 0.0, seed=3)
    assert len(clean.source) == len(digits.class_indices(labels, digits.SOURCE_CLASSES)) == 901
    assert as_plain(clean.train) == as_plain(digits.examples(x, labels, digits.draw(pool, 100, 3), target))
    assert as_plain(clean.test) == as_plain(digits.examples(x, labels, test, target))
    assert as_plain(clean.validation) == as_plain(digits.examples(x, labels, validation, target))
    noisy = digits.transfer_task(100, 0.2, seed=3)
    assert as_plain(noisy.train) == as_plain(digits.flip_labels(clean.train, 0.2, 5, seed=3))
    assert sum(a["labels"] != b["labels"] for a, b in zip(clean.train, noisy.train)) == 20
    assert as_plain(noisy.test) == as_plain(clean.test)
    assert as_plain(digits.transfer_task(100, 0.2, seed=4).train) != as_plain(noisy.train)
    assert len(digits.transfer_task(10_000).train) == len(pool) == 496
