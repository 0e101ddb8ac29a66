"""The cheaper candidates as settings, each against a float64 oracle of what it computes: the gradient-norm trigger
(`gam_trigger_std`), the interval with scaled radii (`gam_interval_scale_rho`), orthogonal-part reuse
(`gam_reuse_orthogonal`) and the momentum-direction perturbation (`gam_perturbation="momentum"`)."""

import math

import pytest
import torch
from transformers import TrainerCallback

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.gam import GradNormTrigger

from oracle import flat_gradient_fn, oracle_direction
from test_cheap_gam import HPARAMS, ORACLE, stored_correction, train, twin_models
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args


def seeded_run(tmp_path, **overrides):
    """A run of `test_cheap_gam.train` from a seeded TinyClassifier: (model, data, initial theta, recorder)."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    theta0 = flat_params(model)
    recorder, _ = train(model, data, tmp_path, **overrides)
    return model, data, theta0, recorder


def test_options_switched_off_are_exact_gam(tmp_path):
    model, twin = twin_models()
    data = make_data()
    train(model, data, tmp_path, max_steps=3, gam_trigger_std=None, gam_interval_scale_rho=False,
          gam_reuse_orthogonal=False, gam_perturbation="gradient")
    train(twin, data, tmp_path, max_steps=3)
    assert torch.equal(flat_params(model), flat_params(twin))


# ---- gradient-norm trigger ----


def test_trigger_rule_by_hand():
    trigger = GradNormTrigger(k=1.0, decay=0.75)
    # x = 4: mu = 0.25 * 4 = 1, var = 0.25 * (4 - 1)^2 = 2.25, 4 > 1 + 1.5: full.
    assert trigger(4.0) and trigger.mean == 1.0 and trigger.var == 2.25
    # x = 2: mu = 0.75 + 0.5 = 1.25, var = 0.75 * 2.25 + 0.25 * 0.75^2 = 1.828125, 2 > 1.25 + 1.35 is false: stock.
    assert not trigger(2.0) and trigger.mean == 1.25 and trigger.var == 1.828125
    # A non-finite x changes nothing and runs no full step.
    assert not trigger(math.inf) and trigger.mean == 1.25 and trigger.var == 1.828125


def test_trigger_runs_full_gam_only_on_high_gradient_norms(tmp_path):
    """Each step: g0 on the batch; the rule on ||g0||^2 decides between GAM's d and g0 itself (the pass already paid
    for), as `GradNormTrigger` states it, computed here in float64 from the oracle's gradients."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=64)
    theta = flat_params(model)
    steps = 8
    recorder, _ = train(model, data, tmp_path, max_steps=steps, gam_trigger_std=0.3, gam_trigger_decay=0.7)
    mean = var = 0.0
    kinds = []
    for step in range(steps):
        gradient, _ = flat_gradient_fn(model, batch_of(data, 8 * step, 8))
        g0 = gradient(theta)
        x = (g0 @ g0).item()
        mean = 0.7 * mean + 0.3 * x
        var = 0.7 * var + 0.3 * (x - mean) ** 2
        full = x > mean + 0.3 * math.sqrt(var)
        kinds.append(full)
        expected = oracle_direction(gradient, theta, **ORACLE) if full else g0
        assert relative_error(theta - recorder.params[step], expected) < 1e-10
        assert recorder.logs[step]["gam/passes"] == (4 if full else 1)
        theta = recorder.params[step]
    assert any(kinds) and not all(kinds)  # both kinds of step occur


def test_trigger_stock_steps_equal_the_stock_trainer(tmp_path):
    """A trigger that never fires (a huge k) leaves the stock Trainer's parameters, bit for bit."""
    model, stock = twin_models()
    data = make_data()
    train(model, data, tmp_path, max_steps=3, gam_trigger_std=1e30)
    train(stock, data, tmp_path, max_steps=3, gam_method="none")
    assert torch.equal(flat_params(model), flat_params(stock))


# ---- interval with scaled radii ----


def test_interval_scales_both_radii_by_the_interval(tmp_path):
    model, data, theta0, recorder = seeded_run(tmp_path, max_steps=2, gam_interval=2, gam_interval_scale_rho=True)
    gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    scaled = dict(ORACLE, grad_rho=2 * ORACLE["grad_rho"], grad_norm_rho=2 * ORACLE["grad_norm_rho"])
    expected = oracle_direction(gradient, theta0, **scaled)
    assert relative_error(oracle_direction(gradient, theta0, **ORACLE), expected) > 1e-3  # the scale matters
    assert relative_error(theta0 - recorder.params[0], expected) < 1e-10
    plain, _ = flat_gradient_fn(model, batch_of(data, 8, 8))  # step 1: a plain gradient step
    assert relative_error(recorder.params[0] - recorder.params[1], plain(recorder.params[0])) < 1e-10
    assert recorder.logs[0]["gam/grad_rho"] == 2 * ORACLE["grad_rho"]
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1]


# ---- orthogonal-part reuse ----


def test_orthogonal_reuse_adds_only_the_part_orthogonal_to_the_current_gradient(tmp_path):
    model, data, theta0, recorder = seeded_run(tmp_path, max_steps=3, gam_reuse_interval=3, gam_reuse_orthogonal=True)
    gradient, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    correction, d0 = stored_correction(gradient, theta0)
    assert relative_error(theta0 - recorder.params[0], d0) < 1e-10  # the full step is unchanged
    for step in (1, 2):  # both reuse steps use the correction of step 0
        theta = recorder.params[step - 1]
        g = flat_gradient_fn(model, batch_of(data, 8 * step, 8))[0](theta)
        orthogonal = correction - (correction @ g) / (g @ g) * g
        expected = g + g.norm() * orthogonal
        assert abs((expected - g) @ g).item() < 1e-12 * g.norm().item() ** 2  # nothing added along g
        assert relative_error(g + g.norm() * correction, expected) > 1e-3  # the projection matters
        assert relative_error(theta - recorder.params[step], expected) < 1e-10
    assert [h["gam/passes"] for h in recorder.logs] == [4, 1, 1]


# ---- momentum-direction perturbation ----


class GradientsAndMomentum(TrainerCallback):
    """Before each optimizer step: the parameters, the gradient the optimizer gets, and its momentum state."""

    def __init__(self, model):
        self.model, self.trainer, self.seen = model, None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        optimizer_state = self.trainer.optimizer.state
        momenta = [optimizer_state.get(p, {}).get("exp_avg", optimizer_state.get(p, {}).get("momentum_buffer"))
                   for p in params]
        momentum = None if any(m is None for m in momenta) else torch.cat([m.reshape(-1) for m in momenta]).clone()
        self.seen.append((flat_params(self.model), grads, momentum))


@pytest.mark.parametrize("optim, optim_args, adaptive", [("adamw_torch", None, False), ("sgd", "momentum=0.9", False),
                                                         ("adamw_torch", None, True)])
def test_momentum_perturbation_is_one_pass_against_the_momentum(tmp_path, optim, optim_args, adaptive):
    """d = grad L(theta - rho' m / ||m||) (adaptive: theta - rho' m theta^2 / ||m |theta| ||), m the optimizer's
    momentum before the step; at the first step there is no momentum and d is the plain gradient."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    recorder = GradientsAndMomentum(model)
    args = sgd_args(tmp_path, max_steps=3, logging_strategy="steps", logging_steps=1, optim=optim, optim_args=optim_args,
                    learning_rate=0.05, gam_method="sam", gam_perturbation="momentum", gam_adaptive=adaptive,
                    **{**HPARAMS, "gam_grad_rho": 0.5})
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    rho = 0.5
    for step, (theta, grads, momentum) in enumerate(recorder.seen):
        gradient, _ = flat_gradient_fn(model, batch_of(data, 8 * step, 8))
        if step == 0:
            assert momentum is None
            expected = gradient(theta)
        else:
            if adaptive:
                point = theta - rho * momentum * theta**2 / ((momentum * theta.abs()).norm() + 1e-12)
            else:
                point = theta - rho * momentum / (momentum.norm() + 1e-12)
            expected = gradient(point)
            assert relative_error(gradient(theta), expected) > 1e-3  # the perturbation matters
            assert relative_error(gradient(theta + (point - theta).neg()), expected) > 1e-3  # and so does its sign
        assert relative_error(grads, expected) < 1e-10
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["gam/passes"] for h in logs] == [1, 1, 1]


def test_momentum_perturbation_without_momentum_is_refused(tmp_path):
    args = sgd_args(tmp_path, max_steps=2, gam_method="sam", gam_perturbation="momentum")  # SGD, momentum 0
    trainer = GAMTrainer(model=TinyClassifier(), args=args, train_dataset=make_data())
    with pytest.raises(ValueError, match="keeps none"):
        trainer.train()


@pytest.mark.parametrize("overrides, message", [
    (dict(gam_perturbation="momentum"), "gam_method='sam'"),
    (dict(gam_method="sam", gam_perturbation="momentum", gam_reuse_interval=2), "one pass per step"),
    (dict(gam_trigger_std=1.0, gam_reuse_interval=2), "does not combine"),
    (dict(gam_trigger_std=float("nan")), "gam_trigger_std"),
    (dict(gam_trigger_decay=1.0), "gam_trigger_decay"),
    (dict(gam_perturbation="noise"), "gam_perturbation"),
])
def test_bad_combinations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        GAMConfig(output_dir=str(tmp_path), **overrides)
