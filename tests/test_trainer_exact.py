"""One GAMTrainer step equals the float64 oracle in oracle.py."""

import copy

import pytest
import torch

from hf_gam import GAMTrainer

from oracle import flat_gradient_fn, oracle_direction
from tiny import SummedLossClassifier, TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

# Radii larger than the released ones, so that every term of d matters at this scale.
HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)


def oracle_kwargs(args):
    return dict(method=args.gam_method, grad_rho=args.gam_grad_rho, grad_norm_rho=args.gam_grad_norm_rho,
                alpha=args.gam_alpha, beta=args.gam_beta, gamma=args.gam_gamma, formula=args.gam_formula,
                adaptive=args.gam_adaptive, eps=args.gam_eps)


def step_displacement(model, data, args):
    """theta_before - theta_after for the run `args` describes (SGD with learning rate 1 gives d)."""
    before = flat_params(model)
    GAMTrainer(model=model, args=args, train_dataset=data).train()
    return before - flat_params(model)


@pytest.mark.parametrize(
    "method, formula, adaptive",
    [("gam", "released", False), ("gam", "paper", False), ("gam", "released", True), ("gam", "paper", True),
     ("sam", "released", False), ("sam", "released", True)],
)
def test_one_step_equals_oracle(tmp_path, method, formula, adaptive):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    args = sgd_args(tmp_path, gam_method=method, gam_formula=formula, gam_adaptive=adaptive, **HPARAMS)
    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 8))
    expected = oracle_direction(gradient, theta, **oracle_kwargs(args))
    # The check can only tell GAM apart if d is far from the plain gradient.
    assert relative_error(gradient(theta), expected) > 1e-3

    moved = step_displacement(model, data, args)
    assert relative_error(moved, expected) < 1e-10


def test_default_hyper_parameters_equal_oracle(tmp_path):
    torch.manual_seed(1)
    model = TinyClassifier()
    data = make_data(seed=1)
    args = sgd_args(tmp_path)
    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 8))
    expected = oracle_direction(gradient, theta, **oracle_kwargs(args))
    assert relative_error(step_displacement(model, data, args), expected) < 1e-10


def test_formulas_differ(tmp_path):
    """The two formulas for h- give different steps (so the tests above tell them apart)."""
    torch.manual_seed(0)
    data = make_data()
    model = TinyClassifier()
    released = step_displacement(copy.deepcopy(model), data, sgd_args(tmp_path, gam_formula="released", **HPARAMS))
    paper = step_displacement(copy.deepcopy(model), data, sgd_args(tmp_path, gam_formula="paper", **HPARAMS))
    assert relative_error(released, paper) > 1e-4


def test_alpha_beta_one_is_gsam(tmp_path):
    """alpha = beta = 1 with the released formula: d = g1 - gamma * (part of g0 orthogonal to g1)."""
    torch.manual_seed(2)
    model = TinyClassifier()
    data = make_data(seed=2)
    rho_prime, gamma = 0.05, 0.7
    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 8))
    g0 = gradient(theta)
    g1 = gradient(theta + rho_prime * g0 / g0.norm())
    gsam = g1 - gamma * (g0 - (g0 @ g1) / (g1 @ g1) * g1)

    args = sgd_args(tmp_path, gam_grad_rho=rho_prime, gam_alpha=1.0, gam_beta=1.0, gam_gamma=gamma)
    assert relative_error(step_displacement(model, data, args), gsam) < 1e-10


def test_gamma_zero_alpha_one_is_sam(tmp_path):
    torch.manual_seed(3)
    data = make_data(seed=3)
    model = TinyClassifier()
    gam = step_displacement(copy.deepcopy(model), data, sgd_args(tmp_path, gam_alpha=1.0, gam_gamma=0.0))
    sam = step_displacement(copy.deepcopy(model), data, sgd_args(tmp_path, gam_method="sam"))
    assert relative_error(gam, sam) < 1e-12


@pytest.mark.parametrize("model_cls", [TinyClassifier, SummedLossClassifier])
def test_gradient_accumulation_is_mean_of_micro_batch_directions(tmp_path, model_cls):
    """2 micro-batches of 8: the step is the mean of the two per-micro-batch directions."""
    torch.manual_seed(4)
    model = model_cls()
    data = make_data(n=16, seed=4)
    args = sgd_args(tmp_path, gradient_accumulation_steps=2, **HPARAMS)
    expected = []
    for start in (0, 8):
        gradient, theta = flat_gradient_fn(model, batch_of(data, start, 8), loss_fn=lambda o, b: torch.nn.functional.cross_entropy(o["logits"], b["labels"]))
        expected.append(oracle_direction(gradient, theta, **oracle_kwargs(args)))
    expected = (expected[0] + expected[1]) / 2
    # A single direction on the union of the micro-batches is a different thing.
    gradient16, theta = flat_gradient_fn(model, batch_of(data, 0, 16), loss_fn=lambda o, b: torch.nn.functional.cross_entropy(o["logits"], b["labels"]))
    assert relative_error(oracle_direction(gradient16, theta, **oracle_kwargs(args)), expected) > 1e-6

    assert relative_error(step_displacement(model, data, args), expected) < 1e-10


def test_label_smoothing_passes_labels_to_every_pass(tmp_path):
    """compute_loss pops "labels" when label smoothing is on: every pass needs its own copy of the batch."""
    torch.manual_seed(5)
    model = TinyClassifier()
    data = make_data(seed=5)
    args = sgd_args(tmp_path, label_smoothing_factor=0.1, **HPARAMS)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    assert trainer.label_smoother is not None

    def smoothed(outputs, batch):
        return trainer.label_smoother(outputs, batch["labels"])

    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 8), loss_fn=smoothed)
    expected = oracle_direction(gradient, theta, **oracle_kwargs(args))
    before = flat_params(model)
    trainer.train()
    assert relative_error(before - flat_params(model), expected) < 1e-10


def test_lr_schedule_scales_the_radii(tmp_path):
    """gam_rho_schedule="lr": both radii are multiplied by lr_now / learning_rate."""
    torch.manual_seed(6)
    model = TinyClassifier()
    data = make_data(n=8, seed=6)
    # Warm-up over 2 steps: step 0 runs at lr 0 (no move), step 1 at lr 0.5 with radii halved.
    args = sgd_args(tmp_path, gam_rho_schedule="lr", lr_scheduler_type="constant_with_warmup", warmup_steps=2,
                    max_steps=2, **HPARAMS)
    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 8))
    kwargs = oracle_kwargs(args)
    full_radii = 0.5 * oracle_direction(gradient, theta, **kwargs)
    kwargs["grad_rho"] *= 0.5
    kwargs["grad_norm_rho"] *= 0.5
    expected = 0.5 * oracle_direction(gradient, theta, **kwargs)
    assert relative_error(full_radii, expected) > 1e-4

    moved = step_displacement(model, data, args)
    assert relative_error(moved, expected) < 1e-10
