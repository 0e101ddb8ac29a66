"""Cheaper GAM: reuse of the last correction (`gam_reuse_interval`), GAM only late in training (`gam_start`),
radii that grow with training (`gam_rho_schedule="linear"`)."""

import pytest
import torch
from transformers import TrainerCallback

from hf_gam import GAMConfig, GAMTrainer

from oracle import flat_gradient_fn, oracle_direction
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)
ORACLE = dict(grad_rho=0.05, grad_norm_rho=0.3, alpha=0.6, beta=0.4, gamma=0.5)


class Recorder(TrainerCallback):
    """Parameters after every optimizer step, and the logs."""

    def __init__(self, model):
        self.model, self.params, self.logs = model, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.params.append(flat_params(self.model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(dict(logs))


def train(model, data, tmp_path, **overrides):
    recorder = Recorder(model)
    args = sgd_args(tmp_path, logging_strategy="steps", logging_steps=1, **{**HPARAMS, **overrides})
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    return recorder, trainer


def twin_models():
    """Two tiny classifiers with the same weights."""
    torch.manual_seed(0)
    model = TinyClassifier()
    twin = TinyClassifier()
    twin.load_state_dict(model.state_dict())
    return model, twin


def reuse_direction(gradient, theta, correction):
    g = gradient(theta)
    return g + g.norm() * correction


def stored_correction(gradient, theta):
    """What a full step stores: the part of d orthogonal to g0, divided by ||g0||."""
    g0 = gradient(theta)
    d = oracle_direction(gradient, theta, **ORACLE)
    return (d - (d @ g0) / (g0 @ g0) * g0) / g0.norm(), d


def test_full_steps_are_bit_identical_when_a_correction_is_stored(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    plain = TinyClassifier()
    plain.load_state_dict(model.state_dict())
    train(model, data, tmp_path, gam_reuse_interval=2)
    train(plain, data, tmp_path)
    assert torch.equal(flat_params(model), flat_params(plain))


def test_reuse_step_equals_its_oracle(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    theta0 = flat_params(model)
    recorder, _ = train(model, data, tmp_path, max_steps=2, gam_reuse_interval=2)
    gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    correction, d0 = stored_correction(gradient, theta0)
    assert relative_error(theta0 - recorder.params[0], d0) < 1e-10
    gradient, _ = flat_gradient_fn(model, batch_of(data, 8, 8))
    expected = reuse_direction(gradient, recorder.params[0], correction)
    assert relative_error(gradient(recorder.params[0]), expected) > 1e-3  # the correction matters
    assert relative_error(recorder.params[0] - recorder.params[1], expected) < 1e-10
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1]


def test_reuse_under_gradient_accumulation(tmp_path):
    """Each micro-batch of a reuse step adds ||its g0|| times the correction of the last full micro-batch."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=32)
    theta0 = flat_params(model)
    recorder, _ = train(model, data, tmp_path, max_steps=2, gam_reuse_interval=2, gradient_accumulation_steps=2)
    batches = [batch_of(data, start, 8) for start in (0, 8, 16, 24)]
    grads = [flat_gradient_fn(model, b)[0] for b in batches]
    correction, _ = stored_correction(grads[1], theta0)
    # The loss of each micro-batch is divided by the 2 accumulation steps: so are g0 and d (the correction,
    # stored per unit of ||g0||, is not).
    expected = sum(reuse_direction(lambda t, g=g: g(t) / 2, recorder.params[0], correction) for g in grads[2:])
    assert relative_error(recorder.params[0] - recorder.params[1], expected) < 1e-10
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1]


def test_late_start_runs_stock_steps_first(tmp_path):
    model, stock = twin_models()
    data = make_data()
    recorder, _ = train(model, data, tmp_path, max_steps=4, gam_start=0.5)
    stock_recorder, _ = train(stock, data, tmp_path, max_steps=2, gam_method="none")
    assert torch.equal(recorder.params[1], stock_recorder.params[1])
    assert [h["gam/passes"] for h in recorder.logs] == [1, 1, 4, 4]
    gradient, _ = flat_gradient_fn(model, batch_of(data, 16, 8))
    expected = oracle_direction(gradient, recorder.params[1], **ORACLE)
    assert relative_error(recorder.params[1] - recorder.params[2], expected) < 1e-10


def test_linear_schedule_grows_the_radii_with_training(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    theta0 = flat_params(model)
    recorder, _ = train(model, data, tmp_path, max_steps=4, gam_rho_schedule="linear")
    assert [h["gam/grad_rho"] for h in recorder.logs] == pytest.approx([0.0125, 0.025, 0.0375, 0.05])
    assert [h["gam/grad_norm_rho"] for h in recorder.logs] == pytest.approx([0.075, 0.15, 0.225, 0.3])
    gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    expected = oracle_direction(gradient, theta0, **{**ORACLE, "grad_rho": 0.0125, "grad_norm_rho": 0.075})
    assert relative_error(theta0 - recorder.params[0], expected) < 1e-10


def test_linear_schedule_counts_from_the_late_start(tmp_path):
    torch.manual_seed(0)
    recorder, _ = train(TinyClassifier(), make_data(), tmp_path, max_steps=4, gam_start=0.5,
                        gam_rho_schedule="linear")
    assert [h.get("gam/grad_rho") for h in recorder.logs] == pytest.approx([None, None, 0.025, 0.05])


def test_resume_rebuilds_the_correction_with_a_full_step(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    start = TinyClassifier()
    start.load_state_dict(model.state_dict())
    data = make_data(n=64)
    recorder, _ = train(model, data, tmp_path / "run", max_steps=4, gam_reuse_interval=2, save_strategy="steps",
                        save_steps=1)
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1, 4, 1]
    resumed = Recorder(start)
    args = sgd_args(tmp_path / "run", logging_strategy="steps", logging_steps=1, max_steps=4, gam_reuse_interval=2,
                    **HPARAMS)
    trainer = GAMTrainer(model=start, args=args, train_dataset=data, callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    # Step 1 would reuse, but the correction died with the first process: it runs full GAM and stores a new one.
    assert [h["gam/passes"] for h in resumed.logs] == [4, 4, 1]


def test_a_second_train_on_the_same_trainer_starts_with_a_full_step(tmp_path):
    torch.manual_seed(0)
    recorder, trainer = train(TinyClassifier(), make_data(n=64), tmp_path, max_steps=4, gam_reuse_interval=2,
                              save_strategy="steps", save_steps=1)
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1, 4, 1]
    recorder.logs.clear()
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    # The correction the first run stored (at step 2) was made at other weights: step 1 runs full GAM.
    assert [h["gam/passes"] for h in recorder.logs] == [4, 4, 1]


@pytest.mark.parametrize("field, value", [("gam_reuse_interval", 0), ("gam_reuse_interval", 2.0), ("gam_start", 1.0),
                                          ("gam_start", -0.1)])
def test_bad_values_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        GAMConfig(output_dir=str(tmp_path), **{field: value})


def test_interval_and_reuse_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="at most one"):
        GAMConfig(output_dir=str(tmp_path), gam_interval=2, gam_reuse_interval=2)


def test_reuse_step_is_linear_in_the_loss_scale():
    """The correction is stored per unit of ||g0||, so a loss scale (fp16) that changes between the full step and a
    reuse step still gives d in the current scale's units."""
    from hf_gam.gam import GAMHyperParams, GAMStep, StepInputs

    torch.manual_seed(0)
    model = TinyClassifier()
    batches = [batch_of(make_data(), start, 8) for start in (0, 8)]

    def runner(batch, scale):
        def forward_backward(i):
            loss = model(**batch)["loss"]
            (loss * scale).backward()
            return loss.detach()
        return forward_backward

    hp = GAMHyperParams(**ORACLE)
    directions = []
    for full_scale, reuse_scale in ((1.0, 1.0), (2.0**10, 2.0**16)):
        step = GAMStep(model.parameters())
        step.run(StepInputs(runner(batches[0], full_scale), hp), store_correction=True)
        model.zero_grad(set_to_none=True)
        step.run(StepInputs(runner(batches[1], reuse_scale), hp), reuse=True)
        directions.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / reuse_scale)
        model.zero_grad(set_to_none=True)
    assert relative_error(directions[1], directions[0]) < 1e-10  # xi = 1e-12 in the denominators: not exact


def test_batch_fraction_step_equals_its_oracle(tmp_path):
    """GAM's passes on the first half of the micro-batch, the correction applied to the whole one's gradient."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    theta0 = flat_params(model)
    recorder, _ = train(model, data, tmp_path, gam_batch_fraction=0.5)
    part_gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 4))
    correction, _ = stored_correction(part_gradient, theta0)
    whole_gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    expected = reuse_direction(whole_gradient, theta0, correction)
    assert relative_error(oracle_direction(whole_gradient, theta0, **ORACLE), expected) > 1e-3  # a real change
    assert relative_error(theta0 - recorder.params[0], expected) < 1e-10
    assert recorder.logs[0]["gam/passes"] == 3.0  # 1 + 4 * 4/8


def test_batch_fraction_moves_running_statistics_once_and_leaves_the_stock_random_stream(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True, dropout=0.2)
    data = make_data()
    stock = TinyClassifier(batch_norm=True, dropout=0.2)
    stock.load_state_dict(model.state_dict())
    batch = batch_of(data, 0, 8)
    trainers = []
    for m, overrides in ((model, dict(gam_batch_fraction=0.25)), (stock, dict(gam_method="none"))):
        trainer = GAMTrainer(model=m, args=sgd_args(tmp_path, **HPARAMS, **overrides), train_dataset=data)
        trainer.current_gradient_accumulation_steps = 1
        trainers.append(trainer)
    torch.manual_seed(5)
    trainers[0].training_step(model, dict(batch))
    rng_gam = torch.get_rng_state()
    torch.manual_seed(5)
    trainers[1].training_step(stock, dict(batch))
    assert torch.equal(rng_gam, torch.get_rng_state())
    bn, stock_bn = model.net[1], stock.net[1]
    assert bn.num_batches_tracked.item() == 1
    assert torch.equal(bn.running_mean, stock_bn.running_mean) and torch.equal(bn.running_var, stock_bn.running_var)


def test_batch_fraction_takes_the_first_ceil_of_the_fraction_of_each_micro_batch(tmp_path):
    """gam_batch_fraction=0.3 of a micro-batch of 8: GAM's passes run on its first ceil(2.4) = 3 examples, at each
    step (the second step's micro-batch is examples 8-15, its part 8-10)."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    expected_model = TinyClassifier()
    expected_model.load_state_dict(model.state_dict())
    recorder, _ = train(model, data, tmp_path, gam_batch_fraction=0.3, max_steps=2)

    theta = flat_params(expected_model)
    before = [theta, *recorder.params]
    for step, start in enumerate((0, 8)):
        def direction(part_size):
            part_gradient, _ = flat_gradient_fn(expected_model, batch_of(data, start, part_size))
            correction, _ = stored_correction(part_gradient, theta)
            whole_gradient, _ = flat_gradient_fn(expected_model, batch_of(data, start, 8))
            return reuse_direction(whole_gradient, theta, correction)

        expected = direction(3)
        for other in (2, 4, 8):  # a part of another size would give another step
            assert relative_error(direction(other), expected) > 1e-3
        assert relative_error(before[step] - recorder.params[step], expected) < 1e-10  # SGD, lr 1: theta moves by -d
        theta = theta - expected
        torch.nn.utils.vector_to_parameters(theta, expected_model.parameters())
        assert recorder.logs[step]["gam/passes"] == 1 + 4 * 3 / 8


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_bad_batch_fraction_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="gam_batch_fraction"):
        GAMConfig(output_dir=str(tmp_path), gam_batch_fraction=value)
