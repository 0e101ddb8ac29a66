"""The recipes end to end, offline: a few dozen generated PNGs in imagefolder layout and a tiny ViT saved
with `save_pretrained`. Only the Hub's network boundary (`HfApi.create_repo` / `HfApi.upload_folder`)
is replaced, in the push test."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_gam import GAMTrainer  # noqa: E402
from hf_gam.compression import DEFAULT_COMPRESSIONS  # noqa: E402
from hf_gam.modelcard import GAM_CITATION, read_compression_table, read_gam_section, read_test_results  # noqa: E402
from hf_gam.vision import RecipeError, build_transforms  # noqa: E402
from hub import FakeHub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}
SECRET = "hf_thisIsNotARealTokenButMustNeverBeWritten"
CANARY = "canary-run-name-held-by-the-training-arguments"


def load_recipe(name: str):
    """Import `recipes/<name>.py` as a module (the recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Imagefolder train (8 per class) and validation (4 per class) sets, and a tiny ViT checkpoint."""
    root = tmp_path_factory.mktemp("recipe_assets")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 4)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i}.png")
    model_dir = root / "tiny-vit"
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=10,  # a 10-way head: the recipe must replace it
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        model_dir
    )
    return root


def base_args(assets: Path, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(assets / "tiny-vit"),
        "--output_dir", str(output_dir),
        "--use_cpu",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "12",
        "--num_train_epochs", "1",
        "--learning_rate", "1e-3",
        "--dataloader_num_workers", "0",
        "--logging_steps", "1",
        "--seed", "0",
        "--report_to", "none",
    ]


class RecordingGAMTrainer(GAMTrainer):
    """`GAMTrainer` that remembers its instances, so a test can compare the trained model with the saved one."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingGAMTrainer.instances.append(self)


def validation_batch(assets: Path, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values (eval transform of `processor`) and labels of every validation image."""
    _, evaluate = build_transforms(processor)
    dataset = datasets.load_dataset("imagefolder", data_dir=str(assets / "validation"), split="train")
    pixels = torch.stack([evaluate(image.convert("RGB")) for image in dataset["image"]])
    return pixels, torch.tensor(dataset["label"])


def check_saved_run(output_dir: Path, assets: Path, trained_model=None, metrics=None) -> ModelCard:
    """Model, processor and card are written; the model reloads and predicts what the trained one did."""
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (output_dir / name).is_file(), name
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert reloaded.config.num_labels == 3 and set(reloaded.config.id2label.values()) == set(CLASSES)
    processor = AutoImageProcessor.from_pretrained(output_dir)
    pixels, labels = validation_batch(assets, processor)
    with torch.no_grad():
        logits = reloaded(pixel_values=pixels).logits
    if trained_model is not None:
        trained_model = trained_model.eval()
        with torch.no_grad():
            assert torch.equal(trained_model(pixel_values=pixels).logits, logits)
    if metrics is not None:
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        assert metrics["eval_accuracy"] == pytest.approx(accuracy)
    card = ModelCard.load(output_dir / "README.md")
    assert {"gam", "sharpness-aware", "image-classification"} <= set(card.data.tags)
    assert GAM_CITATION in card.text
    # Accuracy after compression, measured on the validation split (these runs have no test split): all of it.
    compression = read_compression_table(card.text)
    assert list(compression) == ["baseline", *(c.name for c in DEFAULT_COMPRESSIONS)]
    assert f"{len(labels)} examples of the split `{assets / 'validation'}`" in card.text
    if metrics is not None:
        assert compression["baseline"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
        assert metrics["compression_pruned_90"] == pytest.approx(compression["pruned_90"], abs=1e-4)
    return card


def card_metric(card_text: str, name: str) -> float:
    """The value of `- {name}: value` in the stock card's list of final evaluation results."""
    for line in card_text.splitlines():
        if line.startswith(f"- {name}: "):
            return float(line.split(": ", 1)[1])
    raise AssertionError(f"no final {name!r} in the card")


def expected_gam_rows(args) -> dict[str, str]:
    return {
        name: repr(value) if isinstance(value, float) else str(value)
        for name, value in vars(args).items()
        if name.startswith("gam_")
    }


def test_vit_imagenet_recipe_end_to_end(assets, tmp_path, monkeypatch):
    recipe = load_recipe("vit_imagenet")
    monkeypatch.setattr(recipe, "GAMTrainer", RecordingGAMTrainer)
    output_dir = tmp_path / "imagenet-run"
    argv = base_args(assets, output_dir) + [
        "--train_dir", str(assets / "train"),
        "--validation_dir", str(assets / "validation"),
        "--gam_grad_rho", "0.015",
        "--save_strategy", "no",
    ]
    metrics = recipe.main(argv)
    trainer = RecordingGAMTrainer.instances[-1]
    assert trainer.args.gam_method == "gam" and trainer.args.gam_grad_rho == 0.015
    assert trainer.state.global_step == 3  # 24 images, batch 8, one epoch
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_top5_accuracy" not in metrics  # only 3 classes
    card = check_saved_run(output_dir, assets, trainer.model, metrics)
    rows = read_gam_section(card.text)
    assert {k: rows[k] for k in expected_gam_rows(trainer.args)} == expected_gam_rows(trainer.args)
    assert rows["optim"] == trainer.args.optim.value and rows["total_train_batch_size"] == "8"
    assert str(assets / "tiny-vit") in card.text  # base checkpoint
    assert card_metric(card.text, "Accuracy") == pytest.approx(metrics["eval_accuracy"], abs=1e-4)


def test_vit_finegrained_recipe_end_to_end(assets, tmp_path, monkeypatch):
    recipe = load_recipe("vit_finegrained")
    monkeypatch.setattr(recipe, "GAMTrainer", RecordingGAMTrainer)
    output_dir = tmp_path / "finegrained-run"
    argv = base_args(assets, output_dir) + [
        "--train_dir", str(assets / "train"),
        "--validation_dir", str(assets / "validation"),
        "--gam_method", "sam",
        "--gam_formula", "paper",
    ]
    metrics = recipe.main(argv)
    trainer = RecordingGAMTrainer.instances[-1]
    card = check_saved_run(output_dir, assets, trainer.model, metrics)
    rows = read_gam_section(card.text)
    assert rows["gam_method"] == "sam" and rows["gam_formula"] == "paper"
    assert list(output_dir.glob("checkpoint-*")), "save_strategy=epoch should leave a checkpoint"


def test_finegrained_recipe_on_a_dataset_with_its_own_column_names(assets, tmp_path):
    """`--dataset_name` (a local folder here) with `--image_column_name/--label_column_name`."""
    source = datasets.load_dataset("imagefolder", data_dir=str(assets / "train"), split="train")
    renamed = source.rename_columns({"image": "photo", "label": "species"})
    data_dir = tmp_path / "custom"
    data_dir.mkdir()
    renamed.to_parquet(str(data_dir / "train.parquet"))
    renamed.select(range(0, 24, 2)).to_parquet(str(data_dir / "test.parquet"))
    recipe = load_recipe("vit_finegrained")
    argv = base_args(assets, tmp_path / "custom-run") + [
        "--dataset_name", str(data_dir),
        "--test_split", "test",
        "--image_column_name", "photo",
        "--label_column_name", "species",
        "--max_steps", "1",
        "--save_strategy", "no",
        "--gam_method", "none",
        "--compression_eval_samples", "12",
    ]
    metrics = recipe.main(argv)
    assert "eval_accuracy" in metrics and "test_accuracy" in metrics
    # The stock step's card has the table too, measured on (here all 12 of) the test split's examples.
    card = ModelCard.load(tmp_path / "custom-run" / "README.md")
    assert "12 examples of the split `test`" in card.text
    assert read_compression_table(card.text)["baseline"] == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    with pytest.raises(Exception, match="label column 'label'.*photo, species"):
        recipe.main(argv[: argv.index("--label_column_name")] + ["--max_steps", "1"])


def test_recipe_errors_are_one_line_messages(assets, tmp_path):
    """Run as a script, a bad preset exits with status 2 and one line naming the known presets."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "vit_finegrained.py"), "--dataset", "birdsnap",
         "--output_dir", str(tmp_path / "x"), "--use_cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: Unknown dataset preset 'birdsnap'")
    assert "Traceback" not in result.stderr


def test_push_to_hub_uploads_model_and_gam_card(assets, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the usual login; it must not reach arguments, cards or logs
    recipe = load_recipe("vit_finegrained")
    monkeypatch.setattr(recipe, "GAMTrainer", RecordingGAMTrainer)
    output_dir = tmp_path / "push-run"
    argv = base_args(assets, output_dir) + [
        "--train_dir", str(assets / "train"),
        "--validation_dir", str(assets / "validation"),
        "--push_to_hub",
        "--hub_model_id", "someone/tiny-vit-gam",
        "--gam_grad_norm_rho", "0.1",
        "--gam_gamma", "0.05",
        "--run_name", CANARY,  # a value the arguments do hold: it must show up where a token in them would
    ]
    metrics = recipe.main(argv)
    args = RecordingGAMTrainer.instances[-1].args
    assert hub.created == ["someone/tiny-vit-gam"]
    assert hub.uploads and hub.uploads[-1]["message"] == "End of training"
    assert all(upload["token"] is None for upload in hub.uploads)
    remote = tmp_path / "hub" / "someone" / "tiny-vit-gam"
    card = check_saved_run(remote, assets, metrics=metrics)
    assert not list(remote.glob("checkpoint-*"))
    rows = read_gam_section(card.text)
    assert {k: rows[k] for k in expected_gam_rows(args)} == expected_gam_rows(args)
    assert rows["gam_grad_norm_rho"] == "0.1" and rows["gam_gamma"] == "0.05"
    assert rows["optim"] == args.optim.value and rows["learning_rate"] == "0.001"
    assert "imagefolder" in card.text and str(assets / "tiny-vit") in card.text
    assert card_metric(card.text, "Accuracy") == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    uploaded = {path.name: path.read_bytes() for path in remote.rglob("*") if path.is_file()}
    assert CANARY.encode() in uploaded["training_args.bin"]  # the scan below reads what a leak would reach
    for name, content in uploaded.items():
        assert SECRET.encode() not in content, name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_recipe_under_accelerate_launch_two_processes(assets, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): trains, evaluates, saves once."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate is not None, "accelerate's launcher must be installed next to the Python running the tests"
    output_dir = tmp_path / "ddp-run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "recipes" / "vit_imagenet.py"),
        *base_args(assets, output_dir),
        "--train_dir", str(assets / "train"),
        "--validation_dir", str(assets / "validation"),
        "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--save_strategy", "no",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert "eval_accuracy" in eval_results and train_results["epoch"] > 0
    card = check_saved_run(output_dir, assets)
    rows = read_gam_section(card.text)
    assert rows["num_processes"] == "2" and rows["total_train_batch_size"] == "8"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(
    "recipe_name, config_name, dataset_name",
    [("vit_imagenet", "vit_imagenet.yaml", "ILSVRC/imagenet-1k"), ("vit_finegrained", "vit_cars.yaml", "tanganke/stanford_cars")],
)
def test_example_configs_parse_to_valid_arguments(recipe_name, config_name, dataset_name, tmp_path):
    """The shipped YAML files name only real options, with values `GAMConfig` accepts."""
    from transformers import HfArgumentParser

    from hf_gam import GAMConfig
    from hf_gam.vision import DataTrainingArguments, ModelArguments, parse_recipe_args, resolve_data, resolve_preset

    recipe = load_recipe(recipe_name)
    data_class = getattr(recipe, "FineGrainedDataArguments", DataTrainingArguments)
    parser = HfArgumentParser((ModelArguments, data_class, GAMConfig))
    argv = ["--config", str(REPO / "recipes" / "configs" / config_name), "--use_cpu", "--bf16", "false",
            "--output_dir", str(tmp_path)]
    model_args, data_args, args = parse_recipe_args(parser, recipe.DEFAULTS, argv)
    assert model_args.model_name_or_path == "google/vit-base-patch16-224-in21k"
    assert args.gam_method == "gam" and args.learning_rate == 5e-5 and not args.remove_unused_columns
    preset = resolve_preset(getattr(data_args, "dataset", None) or "imagenet")
    assert resolve_data(data_args, preset).dataset_name == dataset_name


def all_bytes_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("spelling", [["--hub_tok", SECRET], ["--hub_token", SECRET], [f"--hub_token={SECRET}"]])
def test_token_on_the_command_line_is_refused_and_never_written(spelling, assets, tmp_path, monkeypatch):
    """The leak path: a token flag (even abbreviated) would be pickled into training_args.bin and uploaded."""
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    recipe = load_recipe("vit_finegrained")
    output_dir = tmp_path / "token-run"
    argv = base_args(assets, output_dir) + [
        "--train_dir", str(assets / "train"), "--validation_dir", str(assets / "validation"),
        "--max_steps", "1", "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "someone/leak",
    ] + spelling
    error = None
    try:
        recipe.main(argv)
    except Exception as raised:  # noqa: BLE001  (checked below, after the files)
        error = raised
    for folder in (output_dir, tmp_path / "hub"):
        if folder.exists():
            for name, content in all_bytes_under(folder).items():
                assert SECRET.encode() not in content, name
    assert isinstance(error, RecipeError) and "HF_TOKEN" in str(error)
    assert not hub.created and not hub.uploads


def test_output_dir_with_checkpoints_is_refused_resumed_only_when_asked_or_overwritten(
    assets, tmp_path, monkeypatch, caplog
):
    from hf_gam import vision

    recipe = load_recipe("vit_finegrained")
    monkeypatch.setattr(recipe, "GAMTrainer", RecordingGAMTrainer)
    output_dir = tmp_path / "resume-run"
    argv = base_args(assets, output_dir) + [
        "--train_dir", str(assets / "train"), "--validation_dir", str(assets / "validation"),
        "--save_strategy", "epoch", "--num_train_epochs", "1",
    ]
    with pytest.raises(RecipeError, match="no checkpoint"):
        recipe.main(argv + ["--resume_from_checkpoint", "last"])
    recipe.main(argv)
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    card_before = (output_dir / "README.md").read_bytes()

    loads = []
    real_load = vision.load_image_datasets
    monkeypatch.setattr(vision, "load_image_datasets", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    with pytest.raises(RecipeError) as refused:
        recipe.main(argv + ["--gam_grad_rho", "0.005"])
    message = str(refused.value)
    assert "\n" not in message and "checkpoint-3" in message
    assert "--resume_from_checkpoint last" in message and "--output_dir" in message
    assert not loads  # refused before any data was loaded
    assert (output_dir / "README.md").read_bytes() == card_before

    caplog.set_level("INFO", logger="hf_gam.vision")
    recipe.main(argv + ["--resume_from_checkpoint", "last", "--num_train_epochs", "2"])
    resumed = [r.getMessage() for r in caplog.records if "Resuming from checkpoint" in r.getMessage()]
    assert resumed and str(output_dir / "checkpoint-3") in resumed[0] and "global step 3" in resumed[0]
    assert RecordingGAMTrainer.instances[-1].state.global_step == 6

    recipe.main(argv + ["--overwrite_output_dir", "--gam_grad_rho", "0.005"])
    trainer = RecordingGAMTrainer.instances[-1]
    assert trainer.args.gam_grad_rho == 0.005 and trainer.state.global_step == 3  # a fresh run, not a resumed one
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"][0]["epoch"] <= 1


class EvaluationRecorder(GAMTrainer):
    """`GAMTrainer` that records, for every evaluation, its metric prefix, when it ran and which images it saw."""

    calls: list = []

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        training = self.state.global_step < self.state.max_steps
        EvaluationRecorder.calls.append((metric_key_prefix, training, image_hashes(dataloader.dataset)))
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)


def image_hashes(dataset) -> set[str]:
    import hashlib

    table = dataset.with_format("arrow")[:]
    return {hashlib.sha256(item["bytes"] or item["path"].encode()).hexdigest() for item in table.column("image").to_pylist()}


def test_model_selection_never_sees_the_test_split(assets, tmp_path, monkeypatch):
    """No validation split: a stratified part of train is carved out; evaluation during training and best-model
    selection see only it; the test split is evaluated once, at the end, and reported as test_*."""
    source = datasets.load_dataset("imagefolder", data_dir=str(assets / "train"), split="train")
    data_dir = tmp_path / "hub-like"
    data_dir.mkdir()
    source.to_parquet(str(data_dir / "train.parquet"))  # 24 images, 8 per class
    test = datasets.load_dataset("imagefolder", data_dir=str(assets / "validation"), split="train")
    test.to_parquet(str(data_dir / "test.parquet"))  # 12 other images
    recipe = load_recipe("vit_finegrained")
    monkeypatch.setattr(recipe, "GAMTrainer", EvaluationRecorder)
    EvaluationRecorder.calls = []
    output_dir = tmp_path / "selection-run"
    argv = base_args(assets, output_dir) + [
        "--dataset_name", str(data_dir), "--validation_split_fraction", "0.25", "--num_train_epochs", "2",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end",
        "--metric_for_best_model", "accuracy", "--gam_method", "none",
    ]
    metrics = recipe.main(argv)
    train_images = image_hashes(datasets.load_dataset("parquet", data_files=str(data_dir / "train.parquet"), split="train"))
    test_images = image_hashes(datasets.load_dataset("parquet", data_files=str(data_dir / "test.parquet"), split="train"))
    assert len(train_images) == 24 and len(test_images) == 12 and not train_images & test_images
    prefixes = [prefix for prefix, _, _ in EvaluationRecorder.calls]
    assert prefixes == ["eval", "eval", "eval", "test"]  # two epochs, the final validation, the test once
    validation_images = EvaluationRecorder.calls[0][2]
    assert len(validation_images) == 6 and validation_images <= train_images
    for prefix, training, seen in EvaluationRecorder.calls[:-1]:
        assert seen == validation_images and not seen & test_images
    _, training, seen = EvaluationRecorder.calls[-1]
    assert not training and seen == test_images
    test_results = json.loads((output_dir / "test_results.json").read_text())
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert test_results["test_accuracy"] == metrics["test_accuracy"] == all_results["test_accuracy"]
    assert all_results["eval_accuracy"] == metrics["eval_accuracy"]
    card = (output_dir / "README.md").read_text()
    assert read_test_results(card)["test_accuracy"] == pytest.approx(test_results["test_accuracy"], abs=1e-4)
    assert "split `test`" in card
    assert card_metric(card, "Accuracy") == pytest.approx(metrics["eval_accuracy"], abs=1e-4)  # stock card: validation


def test_both_recipes_run_the_same_steps(assets, tmp_path):
    """Given the same flags, the two recipes make the same run: the same metrics, validation, test and compression."""
    results = {}
    for name in ("vit_imagenet", "vit_finegrained"):
        argv = base_args(assets, tmp_path / name) + [
            "--train_dir", str(assets / "train"),
            "--validation_dir", str(assets / "validation"),
            "--test_dir", str(assets / "validation"),
            "--max_steps", "2", "--save_strategy", "no", "--compression_eval_samples", "12",
        ]
        results[name] = load_recipe(name).main(argv)
        assert (tmp_path / name / "test_results.json").is_file() and (tmp_path / name / "README.md").is_file()
    imagenet, finegrained = results["vit_imagenet"], results["vit_finegrained"]
    assert set(imagenet) == set(finegrained)
    assert {"eval_accuracy", "test_accuracy", "compression_baseline", "compression_pruned_90"} <= set(imagenet)
    timings = ("_runtime", "_per_second")
    assert {k: v for k, v in imagenet.items() if not k.endswith(timings)} == {
        k: v for k, v in finegrained.items() if not k.endswith(timings)
    }


def test_the_run_leaves_the_callers_training_args_as_given(assets, tmp_path):
    """`remove_unused_columns=True` would drop the image column: the trainer gets a copy with it off, and the
    caller's arguments are not written to."""
    from hf_gam import vision

    parser = vision.recipe_parser(vision.ModelArguments, vision.DataTrainingArguments, vision.RecipeTrainingArguments)
    argv = base_args(assets, tmp_path / "run") + [
        "--train_dir", str(assets / "train"), "--validation_dir", str(assets / "validation"),
        "--max_steps", "1", "--save_strategy", "no", "--compression_eval_samples", "0",
        "--remove_unused_columns", "true",
    ]
    model_args, data_args, training_args = vision.parse_recipe_args(parser, vision.COMMON_TRAINING_DEFAULTS, argv)
    before = (vars(model_args).copy(), vars(data_args).copy(), training_args.to_dict())
    metrics = vision.run_image_classification(model_args, data_args, training_args, RecordingGAMTrainer)
    assert "eval_accuracy" in metrics
    assert RecordingGAMTrainer.instances[-1].args.remove_unused_columns is False
    assert training_args.remove_unused_columns is True
    assert (vars(model_args), vars(data_args), training_args.to_dict()) == before


FRESH_LOAD = """
import json, sys, torch
from transformers import AutoModelForImageClassification
repo, subfolder, pixels, labels = sys.argv[1:]
model = AutoModelForImageClassification.from_pretrained(repo, subfolder=subfolder).eval()
with torch.no_grad():
    predictions = model(pixel_values=torch.load(pixels)).logits.argmax(-1)
print(json.dumps({"accuracy": (predictions == torch.load(labels)).float().mean().item(),
                  "hf_gam_imported": any(name.split(".")[0] == "hf_gam" for name in sys.modules)}))
"""


def test_recipe_exports_compressed_variants_pushes_them_and_the_card_reports_them(assets, tmp_path, monkeypatch):
    from hf_gam.modelcard import read_variants_table

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: hub.upload_folder(api, **kw))
    # A small ViT whose MLP is four times its width (its patch embedding, a convolution, stays in float32).
    model_dir = tmp_path / "vit-4x"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=256, image_size=32, patch_size=8)).save_pretrained(model_dir)
    shutil.copy(assets / "tiny-vit" / "preprocessor_config.json", model_dir)
    recipe = load_recipe("vit_finegrained")
    argv = base_args(assets, tmp_path / "run") + [
        "--model_name_or_path", str(model_dir),
        "--train_dir", str(assets / "train"), "--validation_dir", str(assets / "validation"),
        "--max_steps", "2", "--save_strategy", "no", "--export_compressed", "int8,mlp:0.5+int8",
        "--push_to_hub", "--hub_model_id", "someone/tiny-vit-small",
    ]
    recipe.main(argv)
    remote = tmp_path / "hub" / "someone" / "tiny-vit-small"
    card = ModelCard.load(remote / "README.md")
    table = read_variants_table(card.text)
    assert list(table) == ["none", "int8", "mlp:0.5+int8"]
    assert "![Accuracy against size on disk" in card.text and (remote / "compressed_variants.svg").is_file()
    pixels, labels = validation_batch(assets, AutoImageProcessor.from_pretrained(remote))
    torch.save(pixels, tmp_path / "pixels.pt")
    torch.save(labels, tmp_path / "labels.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    trained_bytes = (remote / "model.safetensors").stat().st_size
    for variant, folder, bound in (("int8", "compressed/int8", 0.42), ("mlp:0.5+int8", "compressed/mlp_0.5-int8", 0.35)):
        assert (remote / folder / "model.safetensors").stat().st_size <= bound * trained_bytes
        assert table[variant]["size_mb"] == pytest.approx((remote / folder / "model.safetensors").stat().st_size / 1e6,
                                                          abs=1e-3)
        done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(remote), folder, str(tmp_path / "pixels.pt"),
                               str(tmp_path / "labels.pt")], capture_output=True, text=True, cwd=str(tmp_path), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
        assert loaded["hf_gam_imported"] is False
        assert table[variant]["accuracy"] == pytest.approx(loaded["accuracy"], abs=1e-4)  # what the card says
    # Asking again into the same folder is refused before training; a spec that stores nothing smaller at parsing.
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        recipe.main(argv[: argv.index("--push_to_hub")])
    with pytest.raises(ValueError, match="store nothing smaller"):
        recipe.main(base_args(assets, tmp_path / "other") + ["--train_dir", str(assets / "train"),
                                                              "--export_compressed", "prune:0.9"])
    assert not (tmp_path / "other").exists()


def test_a_variant_export_would_refuse_is_refused_before_training(assets, tmp_path):
    recipe = load_recipe("vit_finegrained")
    output_dir = tmp_path / "refused"
    argv = base_args(assets, output_dir) + ["--train_dir", str(assets / "train"), "--max_steps", "1",
                                            "--save_strategy", "no", "--export_compressed", "int8,mlp:0.3+int4"]
    with pytest.raises(ValueError, match="multiples of 32"):  # 64 - round(0.3 * 64) = 45 inputs to each fc2
        recipe.main(argv)
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "train_results.json").exists()
