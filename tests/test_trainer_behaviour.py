"""GAMTrainer inside the Trainer's loop: stock equality, exact restore, BatchNorm, frozen parameters, resume,
random state, interval, metrics and bad input."""

import copy
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_gam import GAMConfig, GAMTrainer

from oracle import flat_gradient_fn
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args


def params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_method_none_is_bit_identical_to_stock_trainer(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.2, dtype=torch.float32)
    data = make_data(n=48, dtype=torch.float32)
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=5, gradient_accumulation_steps=2,
                  learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
                  disable_tqdm=True, seed=3)
    stock, gam = copy.deepcopy(model), copy.deepcopy(model)
    Trainer(model=stock, args=TrainingArguments(**common), train_dataset=data).train()
    GAMTrainer(model=gam, args=GAMConfig(gam_method="none", **common), train_dataset=data).train()
    assert not params_equal(stock, model)  # training moved them
    assert params_equal(stock, gam)


def test_zero_learning_rate_restores_parameters_and_moves_batch_norm_once(tmp_path):
    torch.manual_seed(1)
    model = TinyClassifier(batch_norm=True, dropout=0.3, dtype=torch.float32)
    data = make_data(n=8, dtype=torch.float32, seed=1)
    reference = copy.deepcopy(model).train()
    reference(**batch_of(data, 0, 8))  # one plain forward moves the running statistics once

    trained = copy.deepcopy(model)
    args = sgd_args(tmp_path, learning_rate=0.0, gam_grad_rho=0.5, gam_grad_norm_rho=1.0)
    trainer = GAMTrainer(model=trained, args=args, train_dataset=data)
    trainer.train()
    assert params_equal(model, trained)
    bn, bn_ref = trained.net[1], reference.net[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


def test_batch_norm_flag_restored_when_a_pass_raises(tmp_path):
    from hf_gam.gam import GAMHyperParams, GAMStep, StepInputs, norm_layers

    torch.manual_seed(2)
    model = TinyClassifier(batch_norm=True, dtype=torch.float32)
    batch = batch_of(make_data(n=8, dtype=torch.float32), 0, 8)
    before = copy.deepcopy(model)

    def forward_backward(i):
        if i == 2:
            raise RuntimeError("pass 3 failed")
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    with pytest.raises(RuntimeError, match="pass 3 failed"):
        GAMStep(model.parameters()).run(StepInputs(forward_backward, GAMHyperParams(), norm_modules=norm_layers(model)))
    assert model.net[1].track_running_stats
    assert model.net[1].num_batches_tracked.item() == 1
    assert params_equal(model, before)


def test_frozen_parameters_are_never_touched(tmp_path):
    torch.manual_seed(3)
    model = TinyClassifier()
    frozen = model.net[0].bias
    frozen.requires_grad_(False)
    frozen_before = frozen.detach().clone()
    data = make_data(n=24, seed=3)
    args = sgd_args(tmp_path, max_steps=3, gam_grad_rho=0.5, gam_grad_norm_rho=1.0, gam_adaptive=True)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert torch.equal(frozen, frozen_before)
    assert frozen.grad is None
    assert all(frozen is not p for p in trainer._gam_step.params)


def test_same_rng_gives_every_pass_the_same_dropout_mask(tmp_path):
    """With zero radii all four passes evaluate theta: with the same masks d equals the stock gradient."""
    torch.manual_seed(4)
    model = TinyClassifier(dropout=0.5)
    data = make_data(n=8, seed=4)
    zero = dict(gam_grad_rho=0.0, gam_grad_norm_rho=0.0)

    stock = copy.deepcopy(model)
    before = flat_params(model)
    Trainer(model=stock, args=sgd_args(tmp_path), train_dataset=data).train()
    plain = before - flat_params(stock)

    same = copy.deepcopy(model)
    GAMTrainer(model=same, args=sgd_args(tmp_path, **zero), train_dataset=data).train()
    assert relative_error(before - flat_params(same), plain) < 1e-10

    fresh = copy.deepcopy(model)
    GAMTrainer(model=fresh, args=sgd_args(tmp_path, gam_same_rng=False, **zero), train_dataset=data).train()
    assert relative_error(before - flat_params(fresh), plain) > 1e-3


def test_random_stream_after_a_gam_step_matches_the_stock_step(tmp_path):
    torch.manual_seed(5)
    model = TinyClassifier(dropout=0.5)
    data = make_data(n=8, seed=5)
    Trainer(model=copy.deepcopy(model), args=sgd_args(tmp_path), train_dataset=data).train()
    after_stock = torch.rand(4)
    GAMTrainer(model=copy.deepcopy(model), args=sgd_args(tmp_path), train_dataset=data).train()
    after_gam = torch.rand(4)
    assert torch.equal(after_stock, after_gam)


def test_interval_runs_plain_gradients_between_gam_steps(tmp_path):
    """gam_interval=2 over 2 steps: step 0 is GAM, step 1 is the plain gradient of the second batch."""
    from oracle import oracle_direction

    torch.manual_seed(6)
    model = TinyClassifier()
    data = make_data(n=16, seed=6)
    hp = dict(grad_rho=0.05, grad_norm_rho=0.3, gamma=0.5)
    args = sgd_args(tmp_path, max_steps=2, gam_interval=2, gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_gamma=0.5)
    gradient1, theta = flat_gradient_fn(model, batch_of(data, 0, 8))
    gradient2, _ = flat_gradient_fn(model, batch_of(data, 8, 8))
    after_gam = theta - oracle_direction(gradient1, theta, **hp)
    expected = after_gam - gradient2(after_gam)
    # The same schedule with GAM on both steps lands elsewhere.
    after_two_gam = after_gam - oracle_direction(gradient2, after_gam, **hp)
    assert relative_error(after_two_gam, expected) > 1e-4

    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert relative_error(flat_params(model), expected) < 1e-10
    assert trainer.state.global_step == 2


def test_gam_metrics_in_logs(tmp_path):
    torch.manual_seed(7)
    data = make_data(n=32, seed=7)
    args = sgd_args(tmp_path, max_steps=4, logging_strategy="steps", logging_steps=2, learning_rate=0.1)
    trainer = GAMTrainer(model=TinyClassifier(), args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["gam/grad_norm"] > 0
        assert entry["gam/flatness"] > 0
        assert -1.0 <= entry["gam/cos"] <= 1.0
        assert entry["gam/grad_rho"] == 0.02 and entry["gam/grad_norm_rho"] == 0.2
        assert entry["gam/skipped_steps"] == 0


def test_loss_at_theta_is_logged(tmp_path):
    torch.manual_seed(8)
    model = TinyClassifier()
    data = make_data(n=8, seed=8)
    expected = model(**batch_of(data, 0, 8))["loss"].item()
    args = sgd_args(tmp_path, logging_strategy="steps", logging_steps=1)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    # The Trainer sums the logged loss in float32; the loss at theta1 differs by about 1e-2 here.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    torch.manual_seed(9)
    model = TinyClassifier(dropout=0.3, dtype=torch.float32)
    data = make_data(n=64, dtype=torch.float32, seed=9)
    common = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                  lr_scheduler_type="linear", use_cpu=True, report_to="none", save_strategy="steps", save_steps=3,
                  remove_unused_columns=False, disable_tqdm=True, seed=11, gam_grad_rho=0.1)
    full = copy.deepcopy(model)
    GAMTrainer(model=full, args=GAMConfig(**common), train_dataset=data).train()
    checkpoint = os.path.join(str(tmp_path / "run"), "checkpoint-3")
    assert os.path.isdir(checkpoint)

    common["output_dir"] = str(tmp_path / "resumed")
    resumed = copy.deepcopy(model)
    GAMTrainer(model=resumed, args=GAMConfig(**common), train_dataset=data).train(resume_from_checkpoint=checkpoint)
    assert not params_equal(full, model)
    assert params_equal(full, resumed)


def test_plain_training_arguments_mean_gam_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=3e-4)
    trainer = GAMTrainer(model=TinyClassifier(), args=args, train_dataset=make_data())
    assert isinstance(trainer.args, GAMConfig)
    assert trainer.args.learning_rate == 3e-4
    assert (trainer.args.gam_method, trainer.args.gam_grad_rho, trainer.args.gam_grad_norm_rho) == ("gam", 0.02, 0.2)


def test_log_adds_to_the_dict_it_is_given_as_the_stock_log_does(tmp_path):
    given = {}
    for name, trainer_class in (("stock", Trainer), ("gam", GAMTrainer)):
        args = sgd_args(tmp_path, logging_strategy="steps", logging_steps=1)
        trainer = trainer_class(model=TinyClassifier(), args=args, train_dataset=make_data(n=8))
        trainer.train()
        given[name] = {"loss": 0.5}
        trainer.log(given[name])
    assert given["gam"] == given["stock"] == {"loss": 0.5, "epoch": 1.0}


def test_no_arguments_means_the_stock_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert GAMTrainer(model=TinyClassifier()).args.output_dir == Trainer(model=TinyClassifier()).args.output_dir


@pytest.mark.parametrize("overrides, find_unused", [
    (dict(gam_start=0.0), False),  # GAM at every step: every pass runs under no_sync
    (dict(gam_start=0.5), True),  # stock steps first: the stock default (True for a module that is not a PreTrainedModel)
    (dict(gam_start=0.0, ddp_find_unused_parameters=True), True),  # the caller's choice
])
def test_ddp_unused_parameter_search_is_decided_without_changing_args(tmp_path, overrides, find_unused):
    args = sgd_args(tmp_path, **overrides)
    given = args.ddp_find_unused_parameters
    trainer = GAMTrainer(model=TinyClassifier(), args=args, train_dataset=make_data())
    assert trainer.args is args and args.ddp_find_unused_parameters is given
    assert trainer.accelerator.ddp_handler.find_unused_parameters is find_unused


@pytest.mark.parametrize(
    "field, value",
    [("gam_grad_rho", -0.1), ("gam_grad_norm_rho", -1.0), ("gam_gamma", -0.5), ("gam_alpha", 1.5),
     ("gam_alpha", -0.1), ("gam_beta", 2.0), ("gam_beta", -0.01), ("gam_method", "gsam"), ("gam_formula", "printed"),
     ("gam_sync", "async"), ("gam_rho_schedule", "cosine"), ("gam_interval", 0), ("gam_interval", 1.5),
     ("gam_eps", 0.0), ("gam_grad_rho", float("nan"))],
)
def test_bad_values_name_their_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        GAMConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_no_trainable_parameters_is_refused(tmp_path):
    model = TinyClassifier()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GAMTrainer(model=model, args=sgd_args(tmp_path), train_dataset=make_data())


def test_deepspeed_is_refused_naming_fsdp(tmp_path):
    args = sgd_args(tmp_path)
    args.deepspeed = {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(ValueError, match="FSDP"):
        GAMTrainer(model=TinyClassifier(), args=args, train_dataset=make_data())


def test_sagemaker_model_parallelism_is_refused(tmp_path, monkeypatch):
    import hf_gam.trainer

    monkeypatch.setattr(hf_gam.trainer, "is_sagemaker_mp_enabled", lambda: True)
    with pytest.raises(ValueError, match="SageMaker model parallelism"):
        GAMTrainer(model=TinyClassifier(), args=sgd_args(tmp_path), train_dataset=make_data())


def test_work_buffers_are_at_most_three_parameter_copies(tmp_path):
    torch.manual_seed(10)
    model = TinyClassifier()
    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, max_steps=3), train_dataset=make_data(n=24))
    trainer.train()
    step = trainer._gam_step
    numel = sum(p.numel() for p in model.parameters())
    assert step.buffer_numel() == 3 * numel
    first = [t.data_ptr() for flat in step._flat.values() for t in flat.values()]
    trainer.args.max_steps = 4
    trainer.train(resume_from_checkpoint=False)
    assert [t.data_ptr() for flat in step._flat.values() for t in flat.values()] == first
