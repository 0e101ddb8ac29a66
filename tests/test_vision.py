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
from transformers import ConvNextImageProcessor, HfArgumentParser, ViTImageProcessor  # noqa: E402

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
    check_columns,
    collate_fn,
    image_geometry,
    load_hub_dataset,
    make_batch_transform,
    parse_recipe_args,
    resolve_data,
    resolve_preset,
    select_splits,
    top_k_predictions,
)

EXPECTED_PRESETS = {
    # name: (hub id, train split, eval split, image column, label column, classes)
    "cars": ("tanganke/stanford_cars", "train", "test", "image", "label", 196),
    "pets": ("timm/oxford-iiit-pet", "train", "test", "image", "label", 37),
    "flowers": ("dpdl-benchmark/oxford_flowers102", "train", "test", "image", "label", 102),
    "cub": ("bentrevett/caltech-ucsd-birds-200-2011", "train", "test", "image", "label", 200),
    "aircraft": ("HuggingFaceM4/FGVC-Aircraft", "train", "test", "image", "variant", 100),
    "food": ("ethz/food101", "train", "validation", "image", "label", 101),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_each_preset_resolves_to_its_id_columns_and_splits(name):
    preset = resolve_preset(name)
    got = (preset.dataset_name, preset.train_split, preset.eval_split, preset.image_column_name,
           preset.label_column_name, preset.num_labels)
    assert got == EXPECTED_PRESETS[name]
    data = resolve_data(DataTrainingArguments(), preset)
    assert (data.dataset_name, data.train_split, data.eval_split, data.image_column_name, data.label_column_name) == (
        got[:5]
    )


def test_presets_are_exactly_the_documented_ones_and_aliases_work():
    assert set(PRESETS) == set(EXPECTED_PRESETS)
    assert resolve_preset("Stanford_Cars") is PRESETS["cars"]
    assert resolve_preset("FGVC-Aircraft") is PRESETS["aircraft"]
    assert resolve_preset("imagenet") is IMAGENET_1K and IMAGENET_1K.dataset_name == "ILSVRC/imagenet-1k"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UnknownPresetError, match="Known presets: aircraft, cars, cub, flowers, food, pets"):
        resolve_preset("birdsnap")


def test_command_line_overrides_preset_and_other_hub_id_drops_its_columns():
    data = resolve_data(DataTrainingArguments(label_column_name="family", eval_split="validation"), PRESETS["aircraft"])
    assert (data.label_column_name, data.eval_split, data.train_split) == ("family", "validation", "train")
    other = resolve_data(DataTrainingArguments(dataset_name="someone/birds"), PRESETS["aircraft"])
    assert (other.dataset_name, other.label_column_name) == ("someone/birds", "label")
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


def test_splits_named_held_out_and_missing():
    full = small_dataset(n=20)
    dataset_dict = datasets.DatasetDict({"train": full, "test": full.select(range(5))})
    data = resolve_data(DataTrainingArguments(), PRESETS["cars"])
    train, evaluation = select_splits(dataset_dict, data, None, seed=0)
    assert (len(train), len(evaluation)) == (20, 5)
    train, evaluation = select_splits(dataset_dict, data, 0.25, seed=0)
    assert (len(train), len(evaluation)) == (15, 5)
    food = resolve_data(DataTrainingArguments(), PRESETS["food"])
    with pytest.raises(MissingSplitError, match="'validation' not found; the dataset has: train, test"):
        select_splits(dataset_dict, food, None, seed=0)
    with pytest.raises(RecipeError, match=r"\(0, 1\)"):
        select_splits(dataset_dict, data, 1.5, seed=0)


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
    return HfArgumentParser((ModelArguments, DataTrainingArguments, GAMConfig))


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
