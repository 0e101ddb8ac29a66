"""The docs name only ready settings and `gam_*` fields that exist, and state their values as the code has them.

Read: README.md, docs/*.md, the module docstrings of recipes/*.py and recipes/configs/*.yaml.

- Every `NAME_GAM` named there is a ready setting: a module-level dict of `hf_gam.config` or `hf_gam` whose name
  ends in `_GAM` (found by that rule, not by a list); written `hf_gam.NAME_GAM`, it is importable as such.
- Every `gam_<name>` named there is a `GAMConfig` field or another name the code defines (a function such as
  `gam_hp_space`, a benchmark arm such as `gam_default`); as a flag (`--gam_x`), a keyword (`gam_x=...`) or a
  config file key it must be a field.
- The ready-settings tables (README.md and docs/configuration.md, header `| setting | for | keyword values |
  passes per step (run average) |`) have one row per ready setting and one for the defaults; each row's keyword
  values are exactly the setting's dict, and its passes per step are what the formula of docs/configuration.md
  gives for those values.
- The field table of docs/configuration.md (header `| field | default | meaning |`) has one row per `gam_*` field
  of `GAMConfig`, and each row's default is exactly the dataclass default, type included.
"""

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import yaml

import hf_gam
from hf_gam import config as config_module
from hf_gam.config import GAMConfig

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RECIPE_FILES = sorted((REPO / "recipes").glob("*.py"))
CONFIG_FILES = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
TABLES_OF_READY_SETTINGS = [REPO / "README.md", REPO / "docs" / "configuration.md"]
FIELD_TABLE = REPO / "docs" / "configuration.md"

READY_SETTINGS_HEADER = ["setting", "for", "keyword values", "passes per step (run average)"]
FIELD_HEADER = ["field", "default", "meaning"]

FIELDS = {f.name: f for f in dataclasses.fields(GAMConfig) if f.name.startswith("gam_")}
SETTING_NAME = re.compile(r"(?<!\w)(hf_gam\.)?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_GAM)\b")
GAM_NAME = re.compile(r"(?<![\w-])(--)?(gam_[a-z][a-z0-9_]*)\b(\s*=)?")


def ready_settings() -> dict[str, dict]:
    """Every module-level `*_GAM` dict of `hf_gam.config` and `hf_gam`."""
    found = {}
    for module in (config_module, hf_gam):
        for name, value in vars(module).items():
            if name.endswith("_GAM") and isinstance(value, dict):
                found[name] = value
    return found


def defined_gam_names() -> set[str]:
    """`gam_*` names the code defines besides the fields: attributes of the package's modules and classes, and the
    arms and sweeps of `benchmarks/generalization.py` (`gam_default`, `gam_sweep`)."""
    names = set()
    modules = [hf_gam] + [importlib.import_module(info.name)
                          for info in pkgutil.walk_packages(hf_gam.__path__, "hf_gam.")]
    for module in modules:
        for name, value in vars(module).items():
            names.add(name)
            if inspect.isclass(value):
                names.update(dir(value))
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import generalization
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    arms, sweeps = generalization.builtin_arms(generalization.SETTINGS["full"])
    names.update(arms)
    names.update(f"{group}_sweep" for group in sweeps)
    return {name for name in names if name.startswith("gam_")}


def documents() -> dict[str, str]:
    """{where: text} for every doc, recipe docstring and recipe config file."""
    texts = {path.name if path.parent == REPO else f"docs/{path.name}": path.read_text(encoding="utf-8")
             for path in DOC_FILES}
    for path in RECIPE_FILES:
        texts[f"recipes/{path.name} (docstring)"] = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    for path in CONFIG_FILES:
        texts[f"recipes/configs/{path.name}"] = path.read_text(encoding="utf-8")
    return texts


def markdown_tables(text: str, header: list[str]) -> list[list[list[str]]]:
    """The body rows (lists of stripped cells) of every table in `text` whose header is `header`."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and cells(line) == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
            tables.append(rows)
    return tables


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def code_span(cell: str) -> str:
    """The content of a cell that is exactly one code span (`...`)."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one `code span`, got {cell!r}"
    return match.group(1)


def keyword_values(cell: str) -> dict:
    """`gam_a=1, gam_b="x"` as a dict of Python literals."""
    call = ast.parse(f"dict({code_span(cell)})", mode="eval").body
    assert isinstance(call, ast.Call) and not call.args, f"expected keyword values, got {cell!r}"
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}


def typed(values: dict) -> dict:
    """Values with their types, so that `0` and `0.0` or `1` and `True` differ."""
    return {key: (type(value), value) for key, value in values.items()}


def passes_per_step(values: dict) -> float:
    """The run average of docs/configuration.md: gam_start * 1 + (1 - gam_start) * (P + k - 1) / k."""
    args = {name: field.default for name, field in FIELDS.items()} | values
    fraction = args["gam_batch_fraction"]
    full = {"gam": 1 + 4 * fraction if fraction < 1 else 4, "sam": 1 + 2 * fraction if fraction < 1 else 2,
            "none": 1}[args["gam_method"]]
    k = max(args["gam_interval"], args["gam_reuse_interval"])
    return args["gam_start"] + (1 - args["gam_start"]) * (full + k - 1) / k


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return documents()


def test_the_checks_read_something(docs):
    assert ready_settings(), "no *_GAM dict found in hf_gam.config or hf_gam"
    assert set(docs) >= {"README.md", "docs/configuration.md", "recipes/vit_finegrained.py (docstring)",
                         "recipes/configs/vit_cars.yaml"}
    assert all(docs.values())


def test_every_ready_setting_named_exists(docs):
    settings = ready_settings()
    wrong = []
    for where, text in docs.items():
        for prefix, name in SETTING_NAME.findall(text):
            if name not in settings or (prefix and not hasattr(hf_gam, name)):
                wrong.append(f"{where}: {prefix}{name}")
    assert not wrong, f"ready settings the code does not define: {wrong}"


def test_every_gam_name_is_a_field_or_defined_by_the_code(docs):
    defined = defined_gam_names()
    wrong = []
    for where, text in docs.items():
        for flag, name, keyword in GAM_NAME.findall(text):
            if name in FIELDS:
                continue
            if flag or keyword or name not in defined:
                wrong.append(f"{where}: {flag}{name}{keyword.strip()}")
    assert not wrong, f"gam_* names that are not GAMConfig fields: {wrong}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_file_keys_are_fields(path):
    keys = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = [key for key in keys if key.startswith("gam_") and key not in FIELDS]
    assert not unknown, f"{path.name}: {unknown}"


@pytest.mark.parametrize("path", TABLES_OF_READY_SETTINGS, ids=lambda path: path.name)
def test_ready_settings_table_states_every_setting_exactly(path):
    tables = markdown_tables(path.read_text(encoding="utf-8"), READY_SETTINGS_HEADER)
    assert len(tables) == 1, f"{path.name}: expected one ready-settings table, found {len(tables)}"
    settings = ready_settings()
    documented = {}
    for setting, _, values, passes in tables[0]:
        if setting == "defaults":
            assert values == "(none)", f"{path.name}: the defaults row names keyword values"
            name, stated = "defaults", {}
        else:
            name = re.fullmatch(r"`hf_gam\.(\w+_GAM)`", setting)
            assert name, f"{path.name}: a row's first cell must be `hf_gam.NAME_GAM` or defaults; got {setting!r}"
            name, stated = name.group(1), keyword_values(values)
            assert name in settings, f"{path.name}: hf_gam.{name} does not exist"
            assert typed(stated) == typed(settings[name]), f"{path.name}: {name} is {settings[name]}, not {stated}"
        assert name not in documented, f"{path.name}: {name} has two rows"
        documented[name] = stated
        assert float(passes) == pytest.approx(passes_per_step(stated), abs=1e-9), (
            f"{path.name}: {name} runs {passes_per_step(stated):g} passes per step on average, not {passes}"
        )
    assert set(documented) == {"defaults", *settings}, f"{path.name}: rows {sorted(documented)}"


def test_field_table_states_every_default_exactly():
    tables = markdown_tables(FIELD_TABLE.read_text(encoding="utf-8"), FIELD_HEADER)
    assert len(tables) == 1, f"expected one field table in {FIELD_TABLE.name}, found {len(tables)}"
    documented = {}
    for field_cell, default, _ in tables[0]:
        name = code_span(field_cell)
        assert name in FIELDS, f"{name} is not a field of GAMConfig"
        assert name not in documented, f"{name} has two rows"
        documented[name] = ast.literal_eval(code_span(default))
        expected = FIELDS[name].default
        assert (type(documented[name]), documented[name]) == (type(expected), expected), (
            f"{name}: GAMConfig's default is {expected!r}, the table says {default}"
        )
    assert sorted(documented) == sorted(FIELDS), f"fields without a row: {sorted(set(FIELDS) - set(documented))}"

