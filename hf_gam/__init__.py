"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .config import CHEAP_GAM, FINETUNE_GAM, PRETRAIN_GAM, RELEASED_GAM, GAMConfig, gam_config_class
from .search import gam_hp_space, gam_hp_space_for, metric_objective, short_budget
from .trainer import GAMMixin, GAMTrainer

__all__ = [
    "CHEAP_GAM",
    "FINETUNE_GAM",
    "PRETRAIN_GAM",
    "RELEASED_GAM",
    "CompressionCallback",
    "FlatnessCallback",
    "GAMConfig",
    "GAMMixin",
    "GAMTrainer",
    "compression_report",
    "gam_config_class",
    "gam_hp_space",
    "gam_hp_space_for",
    "metric_objective",
    "short_budget",
]
__version__ = "0.1.0"


# The names of modules that also run as commands (`python -m hf_gam.compression`, `python -m hf_gam.flatness`) load
# on first use: runpy warns when the package has imported the module it is asked to run.
_ON_FIRST_USE = {"CompressionCallback": "compression", "compression_report": "compression",
                 "FlatnessCallback": "flatness"}


def __getattr__(name):
    if name in _ON_FIRST_USE:
        import importlib

        return getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    raise AttributeError(f"module 'hf_gam' has no attribute {name!r}")
