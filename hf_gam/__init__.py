"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .config import CHEAP_GAM, FINETUNE_GAM, PRETRAIN_GAM, RELEASED_GAM, GAMConfig, gam_config_class
from .flatness import FlatnessCallback
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


def __getattr__(name):
    # The compression names load on first use, so that `python -m hf_gam.compression` runs a module that the
    # package has not imported already (runpy warns otherwise).
    if name in ("CompressionCallback", "compression_report"):
        from . import compression

        return getattr(compression, name)
    raise AttributeError(f"module 'hf_gam' has no attribute {name!r}")
