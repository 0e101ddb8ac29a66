"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .config import CHEAP_GAM, RELEASED_GAM, GAMConfig, gam_config_class
from .flatness import FlatnessCallback
from .search import gam_hp_space, gam_hp_space_for, metric_objective, short_budget
from .trainer import GAMMixin, GAMTrainer

__all__ = [
    "CHEAP_GAM",
    "RELEASED_GAM",
    "FlatnessCallback",
    "GAMConfig",
    "GAMMixin",
    "GAMTrainer",
    "gam_config_class",
    "gam_hp_space",
    "gam_hp_space_for",
    "metric_objective",
    "short_budget",
]
__version__ = "0.1.0"
