"""The recipes spell out the steps of a run, and `hf_gam.vision.run_image_classification` runs the same steps in
one call: both must call them in the same order, so neither can lose or reorder a step (the resume check before
any data is loaded, the test split evaluated once after training)."""

import ast
import inspect
from pathlib import Path

import pytest

from hf_gam.vision import run

REPO = Path(__file__).resolve().parents[1]
STEPS = {"set_seed", "resolve_resume", "resolve_data"} | {
    name for name, value in vars(run).items() if inspect.isfunction(value) and value.__module__ == run.__name__
}
"""The functions of `hf_gam.vision.run`, and the ones it calls from elsewhere."""


def step_calls(function: ast.FunctionDef) -> list[str]:
    """The names of the steps `function` calls (`step(...)` or `vision.step(...)`), in source order."""
    calls = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in STEPS:
                calls.append((node.lineno, node.col_offset, name))
    return [name for _, _, name in sorted(calls)]


def function_named(source: str, name: str) -> ast.FunctionDef:
    return next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == name)


def test_the_run_calls_every_step_once():
    steps = step_calls(function_named(inspect.getsource(run), "run_image_classification"))
    assert steps[:3] == ["setup_logging", "resolve_resume", "set_seed"]
    assert steps.index("resolve_resume") < steps.index("load_splits")  # refused before any data is loaded
    assert steps[-1] == "create_model_card_or_push"
    assert sorted(steps) == sorted(STEPS - {"run_image_classification", "with_test_results_card"})


@pytest.mark.parametrize("recipe", ["vit_imagenet", "vit_finegrained"])
def test_recipe_calls_the_steps_of_run_image_classification_in_order(recipe):
    expected = step_calls(function_named(inspect.getsource(run), "run_image_classification"))
    main = function_named((REPO / "recipes" / f"{recipe}.py").read_text(), "main")
    assert step_calls(main) == expected
