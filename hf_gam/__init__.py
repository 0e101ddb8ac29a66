"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .compression import CompressionCallback, compression_report
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

