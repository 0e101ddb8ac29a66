"""What a recipe does with an `--output_dir` that already holds checkpoints: resume only when asked
(`--resume_from_checkpoint last` or a path), start over only when asked (`--overwrite_output_dir`), refuse
otherwise, before any data is loaded."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

from .errors import RecipeError

logger = logging.getLogger(__name__)


def checkpoint_step(checkpoint: str) -> int | None:
    """The global step recorded in `checkpoint/trainer_state.json` (`None` if unreadable)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError):
        return None


def existing_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-<step>` folders in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name)]
    names = [name for name in names if os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for name in sorted(names, key=lambda name: int(name.split("-")[1]))]


def resolve_resume(training_args: Any) -> str | None:
    """The checkpoint to resume from, or `None` for a fresh run; never a checkpoint nobody asked for.

    `--resume_from_checkpoint PATH` resumes from PATH, `--resume_from_checkpoint last` from the newest checkpoint in
    `--output_dir`. Without it, an `--output_dir` that already holds checkpoints is refused (resuming them silently
    would report the old run under the new settings), unless `--overwrite_output_dir` is given: the old checkpoints
    are then deleted (by the main process) so they cannot mix with the new run's.
    """
    output_dir = training_args.output_dir
    requested = training_args.resume_from_checkpoint
    if requested is not None and training_args.do_train:
        if requested == "last":
            found = existing_checkpoints(output_dir)
            if not found:
                raise RecipeError(
                    f"`--resume_from_checkpoint last`: there is no checkpoint-* folder in {output_dir!r} to resume from."
                )
            checkpoint = found[-1]
        elif os.path.isdir(requested):
            checkpoint = requested
        else:
            raise RecipeError(f"`--resume_from_checkpoint {requested}`: no such checkpoint folder.")
        logger.info("Resuming from checkpoint %s (global step %s).", checkpoint, checkpoint_step(checkpoint))
        return checkpoint
    found = existing_checkpoints(output_dir)
    if not found or not training_args.do_train:
        return None
    if not getattr(training_args, "overwrite_output_dir", False):
        raise RecipeError(
            f"Output directory {output_dir!r} already holds checkpoints ({os.path.basename(found[-1])}). Pass "
            "`--resume_from_checkpoint last` to continue that run, `--overwrite_output_dir` to start over there, or "
            "another `--output_dir`."
        )
    if training_args.process_index == 0:
        logger.warning("--overwrite_output_dir: deleting %s.", ", ".join(os.path.basename(path) for path in found))
        for path in found:
            shutil.rmtree(path)
    return None
