"""The command line of the recipes and the demo: dataclass defaults, then the script's defaults, then an optional
YAML/JSON file, then the flags. Flags are spelt in full, and a Hub token is refused wherever it appears, so it
never lands in the saved training arguments. A `RecipeError` ends the script with one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from .errors import RecipeError


def recipe_parser(*dataclass_types: type) -> Any:
    """An `HfArgumentParser` over `dataclass_types` that accepts only whole flag names (no `--hub_tok`)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types, allow_abbrev=False)


_TOKEN_MESSAGE = (
    "Do not pass a token as an argument (it would be saved with the training arguments in training_args.bin and "
    "uploaded with them): log in with `hf auth login` (`huggingface-cli login`) or set the HF_TOKEN environment "
    "variable."
)


def _is_token_name(name: str) -> bool:
    """`token`, `hub_token`, `push_to_hub_token`: the names `TrainingArguments.to_dict` redacts."""
    return name == "token" or name.endswith("_token")


def _looks_like_token_flag(arg: str) -> bool:
    """`--hub_token`, `--hub-token=...`, `--hub_tok`, `--HUB_TOKEN`: any spelling or prefix of a token flag."""
    if not arg.startswith("-"):
        return False
    name = arg.split("=", 1)[0].lstrip("-").replace("-", "_").lower()
    return _is_token_name(name) or (len(name) > len("hub_") and "hub_token".startswith(name))


def refuse_tokens(argv: Sequence[str], values: dict[str, Any]) -> None:
    """Raise `RecipeError` if `argv` or the config `values` carry a Hub token, whatever its spelling."""
    if any(_looks_like_token_flag(arg) for arg in argv) or any(_is_token_name(key.lower()) and value for key, value in values.items()):
        raise RecipeError(_TOKEN_MESSAGE)
    if any(re.fullmatch(r"hf_[A-Za-z0-9]{20,}", arg.split("=", 1)[-1]) for arg in argv):
        raise RecipeError("An argument looks like a Hub token. " + _TOKEN_MESSAGE)


def parse_recipe_args(parser: Any, defaults: dict[str, Any], argv: Sequence[str] | None = None) -> tuple:
    """Parse `argv` into the parser's dataclasses.

    Precedence, lowest first: the dataclass defaults, the recipe's `defaults`, a YAML/JSON file given as
    `--config FILE` (or as the only argument, as in the Transformers examples), then the command line.
    Unknown keys in the file are an error. Flags must be spelt in full (`--learning_r` is an error, not
    `--learning_rate`). A token on the command line (any spelling) or in the file is refused: log in with
    `hf auth login` or set HF_TOKEN, so the token never lands in saved arguments or logs.
    """
    import sys

    parser.allow_abbrev = False  # argparse reads it at parse time: `--hub_tok` must never become `--hub_token`
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_tokens(argv, {})
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, argv = pre.parse_known_args(argv)
    config_path = known.config
    if config_path is None and len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        config_path, argv = argv[0], []
    values = dict(defaults)
    if config_path is not None:
        values.update(load_config_file(config_path))
    refuse_tokens([], values)
    known_names = {f.name for dtype in parser.dataclass_types for f in fields(dtype) if f.init}
    unknown = sorted(set(values) - known_names)
    if unknown:
        raise RecipeError(f"Unknown option(s) in {config_path or 'recipe defaults'}: {', '.join(unknown)}.")
    parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise RecipeError(
            f"Unknown argument(s): {' '.join(remaining)}. Flags must be spelt in full; `--help` lists them."
        )
    return tuple(parsed)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a flat mapping of option names to values from a YAML or JSON file."""
    if not os.path.isfile(path):
        raise RecipeError(f"Config file {path!r} not found.")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise RecipeError(f"Config file {path!r} must hold a mapping of option names to values.")
    return values


def exit_on_recipe_error(main: Callable[[], Any]) -> Any:
    """Run `main`; print a `RecipeError` as one line on stderr and exit with status 2."""
    import sys

    try:
        return main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
