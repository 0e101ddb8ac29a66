"""Gradient norm Aware Minimization (GAM) for the Hugging Face Trainer."""

from .config import GAMConfig
from .flatness import FlatnessCallback
from .trainer import GAMMixin, GAMTrainer

__all__ = ["FlatnessCallback", "GAMConfig", "GAMMixin", "GAMTrainer"]
__version__ = "0.1.0"
