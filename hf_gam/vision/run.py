"""A fine-tuning run: `run_image_classification`, which both recipes call, and the steps it runs in this order:

    setup_logging -> resolve_resume -> (set_seed) -> resolve_data -> load_splits -> load_model -> set_transforms
    -> check_exports -> build_trainer -> train_model -> evaluate_model -> evaluate_test_split
    -> measure_compression -> export_compressed -> create_model_card_or_push

Each step is a small function of its own, public so that a script of another shape can call them. This module
does not import the trainer: the recipes pass `GAMTrainer` to `run_image_classification`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from hf_gam.modelcard import (
    append_compression_table,
    append_test_results,
    append_variants_section,
    write_variants_picture,
)

from .arguments import DataTrainingArguments, ModelArguments
from .data import ResolvedData, maybe_truncate, resolve_data, select_splits
from .metrics import make_compute_metrics, top_k_predictions
from .presets import DatasetPreset
from .resume import resolve_resume
from .transforms import build_transforms, collate_fn, make_batch_transform

logger = logging.getLogger(__name__)


def setup_logging(training_args: Any) -> None:
    """Log like the Transformers examples: INFO on the main process, warnings elsewhere."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    level = training_args.get_process_log_level()
    package_logger = logging.getLogger("hf_gam.vision")  # the recipe's own lines: every module here logs below it
    package_logger.setLevel(min(level, logging.INFO) if training_args.should_log else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


@dataclass
class Splits:
    """The datasets of a run and the class names of their label column.

    `validation` is what evaluation during training, early stopping and best-model selection see; `test` (`None`
    when the data have none) is evaluated once, after training.
    """

    train: Any
    validation: Any
    test: Any | None
    class_names: list[str]


def load_splits(
    data: ResolvedData, data_args: DataTrainingArguments, training_args: Any, cache_dir: str | None = None
) -> Splits:
    """Load the splits `data` names (on the main process first, so the others read its cache), keep only the image
    and label columns, carve a stratified validation split out of train when the data have none, and truncate to
    `--max_train_samples` / `--max_eval_samples`."""
    import hf_gam.vision  # `load_image_datasets` is read from the package, where tests replace it

    logger.info("Data: %s; training arguments: %s", data, training_args)
    seed = training_args.seed
    with training_args.main_process_first(desc="loading the dataset"):
        loaded = hf_gam.vision.load_image_datasets(data, cache_dir=cache_dir)
    train, validation, test = select_splits(loaded, data, data_args.validation_split_fraction, seed)
    class_names = list(train.features[data.label_column_name].names)
    train = maybe_truncate(train, data_args.max_train_samples, seed)
    validation = maybe_truncate(validation, data_args.max_eval_samples, seed)
    if test is not None:
        test = maybe_truncate(test, data_args.max_eval_samples, seed)
    return Splits(train=train, validation=validation, test=test, class_names=class_names)


def load_model(model_args: ModelArguments, class_names: list[str]) -> tuple[Any, Any]:
    """`(model, image_processor)`: the checkpoint's config given this dataset's labels, its weights (a head of
    another size replaced, `--ignore_mismatched_sizes`), and its image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        label2id={name: index for index, name in enumerate(class_names)},
        id2label=dict(enumerate(class_names)),
        finetuning_task="image-classification",
        **common,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **common,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **common
    )
    return model, image_processor


def set_transforms(splits: Splits, image_processor: Any, data: ResolvedData, augmentation: str) -> None:
    """Give every split its transform, applied as examples are read (`Dataset.set_transform`): the `augmentation`
    (`--train_augmentation`) for train, resize and center crop for validation and test."""
    train_transform, eval_transform = build_transforms(image_processor, augmentation)
    image, label = data.image_column_name, data.label_column_name
    splits.train.set_transform(make_batch_transform(train_transform, image, label))
    splits.validation.set_transform(make_batch_transform(eval_transform, image, label))
    if splits.test is not None:
        splits.test.set_transform(make_batch_transform(eval_transform, image, label))


def with_test_results_card(trainer_class: type) -> type:
    """A subclass of `trainer_class` whose model card also gets the line of test results (`test_results`) and the
    table of accuracy after compression (`compression`)."""

    class RecipeTrainer(trainer_class):
        test_results: dict[str, float] | None = None
        test_split_name: str = "test"
        compression: tuple[dict[str, float], str, int] | None = None  # (report, split name, examples)
        compressed_variants: tuple[dict[str, dict], str] | None = None  # ({folder: export report}, split name)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            super().create_model_card(*args, **kwargs)
            readme = os.path.join(self.args.output_dir, "README.md")
            if self.test_results and self.is_world_process_zero():
                append_test_results(readme, self.test_results, self.test_split_name)
            if self.compression and self.is_world_process_zero():
                append_compression_table(readme, *self.compression)
            if self.compressed_variants and self.is_world_process_zero():
                reports, split_name = self.compressed_variants
                picture = write_variants_picture(self.args.output_dir, reports)
                append_variants_section(readme, reports, split_name, picture)

    RecipeTrainer.__name__ = RecipeTrainer.__qualname__ = trainer_class.__name__
    return RecipeTrainer


def build_trainer(trainer_class: type, model: Any, image_processor: Any, training_args: Any, splits: Splits) -> Any:
    """`trainer_class` (the recipes pass `GAMTrainer`) on `splits`, with the image collator, top-1/top-5 accuracy
    from the top-5 indices, and a model card that also records the test results.

    The transforms read the image column, so the trainer must keep it: with `remove_unused_columns=True` the trainer
    gets a copy of `training_args` with it turned off. `training_args` itself is never written to."""
    if training_args.remove_unused_columns:
        logger.warning("Using `remove_unused_columns=False`: the image column is only read by the transforms.")
        training_args = replace(training_args, remove_unused_columns=False)
    return with_test_results_card(trainer_class)(
        model=model,
        args=training_args,
        train_dataset=splits.train if training_args.do_train else None,
        eval_dataset=splits.validation if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=make_compute_metrics(len(splits.class_names)),
        preprocess_logits_for_metrics=top_k_predictions,
    )


def train_model(trainer: Any, checkpoint: str | None) -> None:
    """Train (resuming from `checkpoint` when it is not `None`), save the model, the train metrics and the state."""
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()


def evaluate_model(trainer: Any) -> dict[str, float]:
    """The final validation metrics (`eval_*`), logged and saved to `eval_results.json`."""
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def evaluate_test_split(trainer: Any, test_dataset: Any, data: ResolvedData) -> dict[str, float]:
    """Evaluate the test split once, after training: `test_*` metrics, logged, saved to `test_results.json` and
    kept for the model card's line of test results."""
    test_metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    trainer.log_metrics("test", test_metrics)
    trainer.save_metrics("test", test_metrics)
    trainer.test_results = test_metrics
    trainer.test_split_name = data.test_dir if data.train_dir is not None else data.test_split
    return test_metrics


def compression_examples(trainer: Any, splits: Splits, data: ResolvedData, num_examples: int) -> tuple[list, str]:
    """The labelled batches the compressions are measured on, the first `num_examples` examples of the test split
    (of the validation split when there is none), and the name of that split."""
    from torch.utils.data import DataLoader

    if splits.test is not None:
        dataset = splits.test
        split_name = data.test_dir if data.train_dir is not None else data.test_split
    else:
        dataset = splits.validation
        split_name = data.validation_dir or data.validation_split or "validation (held out from train)"
    examples = dataset.select(range(min(num_examples, len(dataset))))
    loader = DataLoader(examples, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    return list(loader), split_name


def measure_compression(trainer: Any, splits: Splits, data: ResolvedData, num_examples: int) -> dict[str, float]:
    """Accuracy of the final model after each compression of `hf_gam.compression` (on copies), on
    `compression_examples`: logged, saved to `compression_results.json` and kept for the model card's table. Every
    process measures the same examples, so the numbers need no gathering. `num_examples=0` skips it."""
    from hf_gam.compression import compression_report

    if num_examples <= 0:
        return {}
    batches, split_name = compression_examples(trainer, splits, data, num_examples)
    report = compression_report(trainer.model, batches)
    metrics = {f"compression_{name}": value for name, value in report.items()}
    trainer.log_metrics("compression", metrics)
    trainer.save_metrics("compression", metrics)
    trainer.compression = (report, split_name, sum(len(batch["labels"]) for batch in batches))
    return metrics


EXPORT_FOLDER = "compressed"
"""Where `export_compressed` writes the variants, inside the output folder: `compressed/<variant>`."""


def export_folders(data_args: DataTrainingArguments) -> dict[Any, str]:
    """`{compression: folder relative to the output folder}` of `--export_compressed`."""
    from hf_gam.compression import variant_name

    return {spec: f"{EXPORT_FOLDER}/{variant_name(spec)}" for spec in data_args.export_specs()}


def check_exports(data_args: DataTrainingArguments, model: Any, training_args: Any, resuming: bool) -> None:
    """Refuse, before training, what `export_compressed` would refuse after it: each variant as `export` checks it
    (`hf_gam.compression.check_exportable`: the architecture for `mlp:F`, torchao for the integer formats, int4's
    widths), existing variant folders (replaced only with `--overwrite_output_dir` or when resuming), and a recovery
    under several processes."""
    from hf_gam.compression import check_exportable

    folders = export_folders(data_args)
    if not folders:
        return
    for spec in folders:
        check_exportable(model, spec)
    if data_args.recover_steps and getattr(training_args, "world_size", 1) > 1:
        raise ValueError("--recover_steps fine-tunes the exported variants on one process; run the export with "
                         "`python -m hf_gam.compression CHECKPOINT --export ... --recover_steps N` instead.")
    existing = [folder for folder in folders.values() if os.path.exists(os.path.join(training_args.output_dir, folder))]
    if existing and not (training_args.overwrite_output_dir or resuming):
        raise ValueError(f"{training_args.output_dir} already holds {', '.join(existing)}; pass "
                         "--overwrite_output_dir to replace them.")


def export_compressed(trainer: Any, splits: Splits, data: ResolvedData, data_args: DataTrainingArguments) -> None:
    """Write each variant of `--export_compressed` to `<output_dir>/compressed/<variant>` (`hf_gam.compression.export`,
    from the final model, which stays as it is), measured on `compression_examples`; the reports are saved as
    `compressed_variants.json` and kept for the model card. The main process writes; the others wait."""
    from hf_gam.compression import export, recover_with_trainer

    folders = export_folders(data_args)
    if not folders:
        return
    if trainer.is_world_process_zero():
        batches, split_name = compression_examples(trainer, splits, data, max(data_args.compression_eval_samples, 0))
        recover = None
        if data_args.recover_steps:
            recover = recover_with_trainer(splits.train, trainer.args, data_args.recover_steps,
                                           data_collator=trainer.data_collator, trainer_class=type(trainer))
        reports = {}
        for spec, folder in folders.items():
            reports[folder] = export(
                trainer.model, spec, os.path.join(trainer.args.output_dir, folder), batches=batches or None,
                processor=trainer.processing_class, overwrite=True, log=logger.info,
                recover=recover if spec.kind == "mlp" else None,
            )
        with open(os.path.join(trainer.args.output_dir, "compressed_variants.json"), "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=2)
        trainer.compressed_variants = (reports, split_name)
    trainer.accelerator.wait_for_everyone()


def create_model_card_or_push(trainer: Any, model_args: ModelArguments, data: ResolvedData) -> None:
    """Write the model card to `--output_dir`; with `--push_to_hub`, also upload the model, its image processor
    and the card."""
    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data.description,
        "tags": ["image-classification"],
    }
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


def run_image_classification(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: Any,
    trainer_class: type,
    preset: DatasetPreset | None = None,
) -> dict[str, float]:
    """Fine-tune `model_args.model_name_or_path` on the data described by `data_args` (and `preset`): the run both
    recipes' `main` calls once their arguments are parsed.

    `trainer_class` is the Trainer to use (the recipes pass `GAMTrainer`). An output folder that already holds
    checkpoints is refused (or resumed, or overwritten: `resolve_resume`) before any data is loaded. Evaluation
    during training, early stopping and best-model selection see only the validation split (the data's own, or a
    stratified part of train). The test split, when there is one, is evaluated once after training
    (`--do_predict`) and reported as `test_*` in `test_results.json`, `all_results.json` and a line of the model
    card. Saves the model, its image processor and the card to `training_args.output_dir`, pushes them when
    `--push_to_hub` is set, and returns the final validation (`eval_*`), test (`test_*`) and compression
    (`compression_*`) metrics. None of the three argument objects is written to.
    """
    from transformers import set_seed

    setup_logging(training_args)
    # Resume only when asked; an output folder that already holds checkpoints is refused before any data loads.
    checkpoint = resolve_resume(training_args)
    set_seed(training_args.seed)

    # Data: train, validation (a stratified part of train when the data have none) and test splits.
    data = resolve_data(data_args, preset)
    splits = load_splits(data, data_args, training_args, cache_dir=model_args.cache_dir)

    # Model: the checkpoint's config and weights with a head for these classes, and its image processor; the
    # transforms at its input size, mean and std.
    model, image_processor = load_model(model_args, splits.class_names)
    set_transforms(splits, image_processor, data, data_args.train_augmentation)
    # The compressed variants to write after training: refused now rather than after the training they need.
    check_exports(data_args, model, training_args, resuming=checkpoint is not None)

    # Train, evaluate on the validation split, evaluate the test split once.
    trainer = build_trainer(trainer_class, model, image_processor, training_args, splits)
    metrics: dict[str, float] = {}
    if training_args.do_train:
        train_model(trainer, checkpoint)
    if training_args.do_eval:
        metrics.update(evaluate_model(trainer))
    if splits.test is not None and training_args.do_predict:
        metrics.update(evaluate_test_split(trainer, splits.test, data))

    # After training: accuracy after pruning, low-bit weights and weight noise (each on a copy).
    metrics.update(measure_compression(trainer, splits, data, data_args.compression_eval_samples))
    # Smaller models to deploy (`--export_compressed`), inside the output folder: the push uploads them with the rest.
    export_compressed(trainer, splits, data, data_args)

    # Last: the model card (or the push with --push_to_hub).
    create_model_card_or_push(trainer, model_args, data)
    return metrics
