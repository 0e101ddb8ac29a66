"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .config import GAMConfig, gam_config_class
from .flatness import FlatnessCallback
from .trainer import GAMMixin, GAMTrainer

__all__ = ["FlatnessCallback", "GAMConfig", "GAMMixin", "GAMTrainer", "gam_config_class"]
__version__ = "0.1.0"
