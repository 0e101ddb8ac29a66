"""`hyperparameter_search` with Optuna over the gam_* fields: each trial trains a fresh model with the radii it
sampled, short trials run the stated fraction of the budget, and the objective is the metric asked for."""

import math

import pytest
from transformers import TrainerCallback

from hf_gam import GAMTrainer, gam_hp_space, gam_hp_space_for, metric_objective, short_budget

from tiny import TinyClassifier, make_data, sgd_args

optuna = pytest.importorskip("optuna")

GRAD_RHO = (0.003, 0.03)
GRAD_NORM_RHO = (0.05, 0.5)
# Outside both ranges: a trial that kept them would show.
START = dict(gam_grad_rho=0.5, gam_grad_norm_rho=5.0)


class TrialRecorder(TrainerCallback):
    """Per trial: the trial's sampled values, the arguments and model the training ran with, whether GAM's
    parameter list was the model's own at every step, the logged GAM metrics and the evaluation metrics."""

    def __init__(self):
        self.trainer = None
        self.trials = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trials.append(dict(
            params=dict(self.trainer._trial.params), model=model, grad_rho=args.gam_grad_rho,
            grad_norm_rho=args.gam_grad_norm_rho, method=args.gam_method, max_steps=None, gam_on_model=[],
            logs=[], metrics=[],
        ))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad]
        params = self.trainer._gam_step.params
        self.trials[-1]["gam_on_model"].append(len(params) == len(trainable)
                                               and all(a is b for a, b in zip(params, trainable)))

    def on_train_end(self, args, state, control, **kwargs):
        self.trials[-1]["max_steps"] = state.max_steps
        self.trials[-1]["global_step"] = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trials and "loss" in logs:
            self.trials[-1]["logs"].append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.trials[-1]["metrics"].append(dict(metrics))


def search_args(tmp_path, **overrides):
    """SGD on the tiny float64 classifier, two steps per trial unless overridden, a log at every step."""
    values = dict(max_steps=2, learning_rate=0.1, logging_strategy="steps", logging_steps=1, **START)
    values.update(overrides)
    return sgd_args(tmp_path, **values)


def search(args, hp_space, n_trials=3, direction="minimize", compute_metrics=None, compute_objective=None):
    """A real hyperparameter search on the tiny classifier with 32 training and 16 evaluation examples."""
    models = []

    def model_init():
        models.append(TinyClassifier())
        return models[-1]

    recorder = TrialRecorder()
    trainer = GAMTrainer(model_init=model_init, args=args, train_dataset=make_data(n=32),
                         eval_dataset=make_data(n=16, seed=1), compute_metrics=compute_metrics, callbacks=[recorder])
    recorder.trainer = trainer
    models.clear()  # the model built by the constructor trains in no trial
    best = trainer.hyperparameter_search(
        backend="optuna", hp_space=hp_space, n_trials=n_trials, direction=direction,
        compute_objective=compute_objective, sampler=optuna.samplers.RandomSampler(seed=0),
    )
    return best, recorder.trials, models


def test_each_trial_trains_a_fresh_model_with_the_radii_it_sampled(tmp_path):
    def learning_rate(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 0.01, 0.05, log=True)}

    space = gam_hp_space_for(grad_rho=GRAD_RHO, grad_norm_rho=GRAD_NORM_RHO, extra=learning_rate)
    best, trials, models = search(search_args(tmp_path), space)

    assert len(trials) == 3 and len(models) == 3
    assert len({id(m) for m in models}) == 3
    for trial, model in zip(trials, models):
        assert trial["model"] is model  # the trial trained the model `model_init` built for it
        assert trial["gam_on_model"] == [True, True]  # GAM's state was rebuilt on that model at every step
        sampled = trial["params"]
        assert set(sampled) == {"gam_grad_rho", "gam_grad_norm_rho", "learning_rate"}
        assert GRAD_RHO[0] <= sampled["gam_grad_rho"] <= GRAD_RHO[1]
        assert GRAD_NORM_RHO[0] <= sampled["gam_grad_norm_rho"] <= GRAD_NORM_RHO[1]
        assert (trial["grad_rho"], trial["grad_norm_rho"]) == (sampled["gam_grad_rho"], sampled["gam_grad_norm_rho"])
        assert len(trial["logs"]) == 2
        for logs in trial["logs"]:  # the radii the GAM step used
            assert logs["gam/grad_rho"] == sampled["gam_grad_rho"]
            assert logs["gam/grad_norm_rho"] == sampled["gam_grad_norm_rho"]
            assert logs["gam/passes"] == 4
            assert logs["learning_rate"] == sampled["learning_rate"]  # `extra` values apply too
    ratios = {t["params"]["gam_grad_norm_rho"] / t["params"]["gam_grad_rho"] for t in trials}
    assert len(ratios) == 3  # two independent axes, not one radius and a fixed ratio

    # The default objective without compute_metrics: the evaluation loss after training, minimised.
    losses = [t["metrics"][-1]["eval_loss"] for t in trials]
    assert best.objective == min(losses)
    assert best.hyperparameters == trials[int(best.run_id)]["params"]
    assert losses[int(best.run_id)] == min(losses)


def test_default_space_samples_both_radii_log_uniformly_in_the_documented_ranges():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = [gam_hp_space(study.ask()) for _ in range(400)]
    grad_rho = [s["gam_grad_rho"] for s in samples]
    grad_norm_rho = [s["gam_grad_norm_rho"] for s in samples]
    assert all(s["gam_method"] == "gam" for s in samples)
    assert 1e-3 <= min(grad_rho) and max(grad_rho) <= 1e-1
    assert 1e-2 <= min(grad_norm_rho) and max(grad_norm_rho) <= 1.0
    # Log-uniform: a quarter of the samples in each quarter of the log range (a uniform draw puts ~1% in the lowest).
    lowest = sum(r < 10 ** -2.5 for r in grad_rho) / len(grad_rho)
    assert 0.15 < lowest < 0.35
    # Independent axes: rho' says nothing about rho.
    high_rho_given_low = [n for r, n in zip(grad_rho, grad_norm_rho) if r < 1e-2]
    assert 0.3 < sum(n > 0.1 for n in high_rho_given_low) / len(high_rho_given_low) < 0.7


def test_space_arguments_are_checked():
    with pytest.raises(ValueError, match="grad_rho"):
        gam_hp_space_for(grad_rho=(0.0, 0.1))
    with pytest.raises(ValueError, match="grad_norm_rho"):
        gam_hp_space_for(grad_norm_rho=(0.5, 0.1))
    with pytest.raises(ValueError, match="method"):
        gam_hp_space_for(method=("gam", "asam"))


def test_short_budget_is_a_fraction_of_the_steps_or_epochs(tmp_path):
    assert short_budget(sgd_args(tmp_path, max_steps=40, warmup_steps=8), 0.25) == {"max_steps": 10, "warmup_steps": 2}
    assert short_budget(sgd_args(tmp_path, max_steps=3), 0.1) == {"max_steps": 1}
    epochs = sgd_args(tmp_path, max_steps=-1, num_train_epochs=3, warmup_steps=0.1)
    assert short_budget(epochs, 0.5) == {"num_train_epochs": 1.5}
    # The Trainer casts a trial's value to the current value's type: 1.5 must not become int(1.5).
    assert type(epochs.num_train_epochs) is float and epochs.num_train_epochs == 3
    with pytest.raises(ValueError, match="fraction"):
        short_budget(sgd_args(tmp_path), 0.0)


@pytest.mark.parametrize("length", [dict(max_steps=8), dict(max_steps=-1, num_train_epochs=2)])
def test_short_trials_train_the_fraction_and_the_best_run_holds_only_searched_values(tmp_path, length):
    # 32 examples in batches of 8: 4 steps per epoch, so both lengths are 8 steps and a quarter is 2.
    args = search_args(tmp_path, **length)
    space = gam_hp_space_for(grad_rho=GRAD_RHO, grad_norm_rho=GRAD_NORM_RHO, fixed=short_budget(args, 0.25))
    best, trials, _ = search(args, space, n_trials=2)
    assert [(t["max_steps"], t["global_step"]) for t in trials] == [(2, 2), (2, 2)]
    assert set(best.hyperparameters) == {"gam_grad_rho", "gam_grad_norm_rho"}


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def test_accuracy_objective_is_maximised(tmp_path):
    space = gam_hp_space_for(grad_rho=GRAD_RHO, grad_norm_rho=GRAD_NORM_RHO)
    best, trials, _ = search(search_args(tmp_path), space, direction="maximize", compute_metrics=accuracy,
                             compute_objective=metric_objective("accuracy"))
    accuracies = [t["metrics"][-1]["eval_accuracy"] for t in trials]
    assert best.objective == max(accuracies)
    assert accuracies[int(best.run_id)] == max(accuracies)


def test_metric_objective_picks_one_metric_and_names_the_missing_one():
    metrics = {"eval_loss": 0.7, "eval_accuracy": 0.8, "eval_f1": 0.6, "eval_runtime": 1.0, "epoch": 1.0}
    assert metric_objective("accuracy")(metrics) == 0.8
    assert metric_objective("eval_f1")(metrics) == 0.6
    with pytest.raises(KeyError, match="eval_top5.*eval_accuracy"):
        metric_objective("top5")(metrics)


def test_sam_trials_run_sam_and_sample_only_its_radius(tmp_path):
    space = gam_hp_space_for(grad_rho=GRAD_RHO, method=("gam", "sam"))
    _, trials, _ = search(search_args(tmp_path), space, n_trials=4)
    methods = [t["params"]["gam_method"] for t in trials]
    assert set(methods) == {"gam", "sam"}  # the seeded sampler draws both
    for trial, method in zip(trials, methods):
        assert trial["method"] == method
        assert ("gam_grad_norm_rho" in trial["params"]) == (method == "gam")
        for logs in trial["logs"]:
            assert logs["gam/grad_rho"] == trial["params"]["gam_grad_rho"]
            assert logs["gam/passes"] == (4 if method == "gam" else 2)


def test_momentum_sam_trials_run_one_pass_with_the_radius_they_sampled(tmp_path):
    """The search of docs/search.md for SAM along the momentum: rho' sampled, the perturbation fixed, so every trial
    runs one pass per step (SAM's ascent pass would make 2) and the best run holds the radius alone."""
    space = gam_hp_space_for(grad_rho=(0.05, 5.0), method="sam", fixed={"gam_perturbation": "momentum"})
    best, trials, _ = search(search_args(tmp_path, optim="adamw_torch", learning_rate=1e-3), space)
    assert set(best.hyperparameters) == {"gam_grad_rho"}
    for trial in trials:
        assert trial["method"] == "sam" and 0.05 <= trial["params"]["gam_grad_rho"] <= 5.0
        assert [logs["gam/passes"] for logs in trial["logs"]] == [1, 1]
        assert all(logs["gam/grad_rho"] == trial["params"]["gam_grad_rho"] for logs in trial["logs"])


def test_a_trial_with_a_bad_gam_value_is_refused(tmp_path):
    """The trial's values are checked like the config's: a negative radius stops the search with the field named."""
    data = make_data()
    trainer = GAMTrainer(model_init=lambda: TinyClassifier(), args=search_args(tmp_path), train_dataset=data,
                         eval_dataset=data)
    with pytest.raises(ValueError, match="gam_grad_rho"):
        trainer.hyperparameter_search(hp_space=lambda trial: {"gam_grad_rho": -0.1}, backend="optuna", n_trials=1)
