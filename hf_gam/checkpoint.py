"""Load a Trainer checkpoint's weights into a live model, with the key conversion of `from_pretrained`.

Transformers 5.x `save_pretrained` writes checkpoints in the original key format (a ViT saves
`vit.encoder.layer.0.attention.attention.query.weight` while the module holds `vit.layers.0.attention.q_proj.weight`).
`from_pretrained` converts the names back; the stock `Trainer` resumes and loads its best model with a raw
`load_state_dict` that only warns about the keys it could not place, so the renamed weights keep their random
values. `load_checkpoint_weights` reads the checkpoint (one safetensors file, safetensors shards with an index, or
`pytorch_model.bin` with or without an index), converts it with Transformers' own conversion (the mapping of
`get_model_conversion_mapping`, applied by `convert_and_load_state_dict_in_model`), copies every value into the
model's existing parameters and buffers (so optimizers and anything else holding them stay valid), and raises
`CheckpointMismatchError` when a key still matches nothing.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig, load_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

__all__ = ["CheckpointMismatchError", "checkpoint_weight_files", "load_checkpoint_weights"]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's weights do not fit the model, even after the key conversion of `from_pretrained`."""


def checkpoint_weight_files(checkpoint_dir: str) -> list[str] | None:
    """The full-model weight files of `checkpoint_dir`, safetensors first; None when it holds none."""
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if os.path.isfile(os.path.join(checkpoint_dir, single)):
            return [os.path.join(checkpoint_dir, single)]
        index_file = os.path.join(checkpoint_dir, index)
        if os.path.isfile(index_file):
            with open(index_file, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(checkpoint_dir, shard) for shard in shards]
    return None


def load_checkpoint_weights(model: nn.Module, checkpoint_dir: str) -> None:
    """Load every weight of the checkpoint in `checkpoint_dir` into `model`, in place, bit for bit.

    A `PreTrainedModel` goes through the key conversion `from_pretrained` applies; any other module gets a plain
    `load_state_dict`. Afterwards every parameter and persistent buffer of the model must have been loaded, except
    what `from_pretrained` itself tolerates (a tied weight whose partner was loaded, keys matching the model's
    `_keys_to_ignore_on_load_missing` / `_keys_to_ignore_on_load_unexpected`), and every checkpoint key must have been
    used: otherwise `CheckpointMismatchError` names the keys.
    """
    files = checkpoint_weight_files(checkpoint_dir)
    if files is None:
        raise FileNotFoundError(f"No model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or an index) in {checkpoint_dir}.")
    state_dict = {}
    for file in files:
        state_dict.update(load_state_dict(file, map_location="cpu"))
    if isinstance(model, PreTrainedModel):
        missing, unexpected, mismatched = _load_converted(model, state_dict)
    else:
        missing, unexpected, mismatched = _load_plain(model, state_dict)
    if missing or unexpected or mismatched:
        lines = [f"The checkpoint {checkpoint_dir} does not fit {type(model).__name__}, even after the key conversion "
                 "of `from_pretrained`:"]
        if missing:
            lines.append(f"  model weights not in the checkpoint: {sorted(missing)}")
        if unexpected:
            lines.append(f"  checkpoint keys that match no model weight: {sorted(unexpected)}")
        if mismatched:
            lines.append(f"  shapes that differ (key, checkpoint, model): {sorted(mismatched)}")
        raise CheckpointMismatchError("\n".join(lines))


def _load_converted(model: PreTrainedModel, state_dict: dict) -> tuple[set, set, set]:
    """Transformers' conversion and loading, then the loaded values copied into the model's own tensors."""
    originals = _named_tensors(model)
    previous_conversions = getattr(model, "_weight_conversions", None)
    config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), device_map={"": "cpu"})
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state_dict, config)
    finally:
        # Loading replaces the module attributes with new tensors: put the original ones back with the loaded values.
        _restore_tensors(model, originals)
        model._weight_conversions = previous_conversions  # keep saving in the format it saved in before
    if info.conversion_errors or info.error_msgs:
        raise CheckpointMismatchError(f"Converting the checkpoint failed: {info.conversion_errors or info.error_msgs}")
    missing = set(info.missing_keys)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        # A tied pair shares one tensor: loading either name loaded both.
        if _shares_tensor(model, target, source):
            if source not in missing:
                missing.discard(target)
            elif target not in missing:
                missing.discard(source)
    info.missing_keys = missing
    model._adjust_missing_and_unexpected_keys(info)  # the model's own ignore patterns, as in `from_pretrained`
    return info.missing_keys, info.unexpected_keys, {(k, tuple(a), tuple(b)) for k, a, b in info.mismatched_keys}


def _load_plain(model: nn.Module, state_dict: dict) -> tuple[set, set, set]:
    own = model.state_dict()
    mismatched = {(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape}
    if mismatched:
        return set(), set(), mismatched
    result = model.load_state_dict(state_dict, strict=False)
    return set(result.missing_keys), set(result.unexpected_keys), set()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


@torch.no_grad()
def _restore_tensors(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Copy what now sits at each name into the tensor that sat there before, and put that tensor back."""
    for name, original in originals.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attribute)
        if current is original or current is None:
            continue
        if current.shape == original.shape:
            original.copy_(current)
        setattr(module, attribute, original)


def _shares_tensor(model: nn.Module, a: str, b: str) -> bool:
    try:
        return model.get_parameter(a) is model.get_parameter(b)
    except AttributeError:
        return False
