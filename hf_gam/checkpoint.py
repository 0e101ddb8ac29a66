"""Load a Trainer checkpoint whose key names are not the model's: the key conversion of `from_pretrained`, then the
model's own `load_state_dict`.

Transformers 5.x `save_pretrained` writes checkpoints in the original key format (a ViT saves
`vit.encoder.layer.0.attention.attention.query.weight` while the module holds `vit.layers.0.attention.q_proj.weight`).
`from_pretrained` converts the names back; the stock `Trainer` resumes and loads its best model with a raw
`model.load_state_dict(state_dict, strict=False)` that only warns about the keys it could not place, so the renamed
weights keep their values (upstream issues 43701 / 48805).

- `needs_key_conversion(model, checkpoint_dir)`: whether the checkpoint holds a key that is not a name of the model's
  state dict (only a `PreTrainedModel` is converted; for any other module the raw names are the module's own).
- `KeyConversion(model)`: while it is active, `model.load_state_dict` takes checkpoint names. Each state dict handed
  to it is converted with Transformers' own conversion (the mapping of `get_model_conversion_mapping`) and passed on,
  under the model's names and with the caller's other arguments, to the model's own `load_state_dict`: a module's
  override, its `_load_from_state_dict` and its load hooks run as they would for any state dict. A key the conversion
  places nowhere is passed on under its checkpoint name, for the model to use or report. Tensors that a converter
  combines (an MoE layer's experts) are converted together when the conversion ends, from every shard. `check()`
  then raises `CheckpointMismatchError` naming any key the model reported unexpected, and any weight that no call
  loaded, except what `from_pretrained` itself tolerates (a tied weight whose partner was loaded, keys matching the
  model's `_keys_to_ignore_on_load_missing` / `_keys_to_ignore_on_load_unexpected`) and what the model's load hooks
  declared optional.
- `load_checkpoint_weights(model, checkpoint_dir)`: all of it for one checkpoint directory (one safetensors file,
  safetensors shards with an index, or `pytorch_model.bin` with or without an index).
"""

from __future__ import annotations

import json
import os
import types

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig, load_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

__all__ = [
    "CheckpointMismatchError",
    "KeyConversion",
    "checkpoint_weight_files",
    "load_checkpoint_weights",
    "needs_key_conversion",
]


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


def needs_key_conversion(model: nn.Module, checkpoint_dir: str) -> bool:
    """Whether `model` is a `PreTrainedModel` and the full-model weights of `checkpoint_dir` hold a key that is not a
    name of its state dict (the raw `load_state_dict` of the stock Trainer would leave that weight out)."""
    if not isinstance(model, PreTrainedModel):
        return False
    files = checkpoint_weight_files(checkpoint_dir)
    if files is None:
        return False
    own = model.state_dict()
    return any(key not in own for file in files for key in _keys_of(file))


def _keys_of(file: str) -> list[str]:
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(file, map_location="cpu", mmap=True, weights_only=True))


_NOTHING = object()


class KeyConversion:
    """While active (`with KeyConversion(model) as conversion:`), `model.load_state_dict` converts checkpoint names to
    the model's before it loads; `conversion.check(source)` afterwards reports what did not fit. See the module
    docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls = 0
        self.missing: set[str] = set()  # the weights that every call left out
        self.unexpected: set[str] = set()
        self._combined: dict[str, torch.Tensor] = {}  # checkpoint tensors that a converter combines
        self._own_load_state_dict = None
        self._replaced = _NOTHING  # an instance attribute `load_state_dict` the model had before, if any

    def __enter__(self) -> "KeyConversion":
        self._replaced = vars(self.model).get("load_state_dict", _NOTHING)
        self._own_load_state_dict = self.model.load_state_dict
        self.model.load_state_dict = self._load_state_dict  # an instance attribute: hides the method until __exit__
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._replaced is _NOTHING:
            del self.model.load_state_dict
        else:
            self.model.load_state_dict = self._replaced
        if exc_type is None and self._combined:
            combined, self._combined = self._combined, {}
            self._load(_converted_by_converters(self.model, combined), strict=False)

    def _load_state_dict(self, state_dict, *args, **kwargs):
        """The model's `load_state_dict`, given the checkpoint's tensors under the model's names."""
        named, combined = _renamed(self.model, state_dict)
        self._combined.update(combined)
        return self._load(named, *args, **kwargs)

    def _load(self, state_dict, *args, **kwargs):
        result = self._own_load_state_dict(state_dict, *args, **kwargs)
        missing = set(result.missing_keys)
        self.missing = missing if self.calls == 0 else self.missing & missing
        self.unexpected |= set(result.unexpected_keys)
        self.calls += 1
        return result

    def check(self, source: str) -> None:
        """Raise `CheckpointMismatchError` when a checkpoint key matched nothing or a weight was left out."""
        if self.calls == 0:
            return
        missing, unexpected = _tolerated_removed(self.model, self.missing, self.unexpected)
        if not (missing or unexpected):
            return
        lines = [f"The checkpoint {source} does not fit {type(self.model).__name__}, even after the key conversion "
                 "of `from_pretrained`:"]
        if missing:
            lines.append(f"  model weights not in the checkpoint: {sorted(missing)}")
        if unexpected:
            lines.append(f"  checkpoint keys that match no model weight: {sorted(unexpected)}")
        raise CheckpointMismatchError("\n".join(lines))


def load_checkpoint_weights(model: nn.Module, checkpoint_dir: str) -> None:
    """Load every weight of the checkpoint in `checkpoint_dir` into `model` through its own `load_state_dict`
    (`strict=False`), with the key conversion of `from_pretrained`; `CheckpointMismatchError` when a checkpoint key
    matches nothing or a weight is left out (see `KeyConversion.check`)."""
    files = checkpoint_weight_files(checkpoint_dir)
    if files is None:
        raise FileNotFoundError(f"No model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or an index) in {checkpoint_dir}.")
    with KeyConversion(model) as conversion:
        for file in files:
            model.load_state_dict(load_state_dict(file, map_location="cpu"), strict=False)
    conversion.check(checkpoint_dir)


def _renamed(model: nn.Module, state_dict) -> tuple[dict, dict]:
    """(tensors under the model's names, tensors a converter combines). A key that names no weight of the model
    after the conversion keeps its checkpoint name."""
    if not isinstance(model, PreTrainedModel):
        return dict(state_dict), {}
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    own = model.state_dict()
    named, combined = {}, {}
    for key, tensor in state_dict.items():
        name, converter_pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if name not in own:
            named[key] = tensor
        elif converter_pattern is None:
            named[name] = tensor
        else:
            combined[key] = tensor
    return named, combined


def _converted_by_converters(model: PreTrainedModel, state_dict: dict) -> dict:
    """The tensors that the model's converters build from `state_dict`, under the model's names.

    Transformers' loading builds them and puts them in the model as new tensors: they are taken out, and the model's
    own tensors (held by the optimizer and anything else) put back, untouched."""
    originals = _named_tensors(model)
    previous_conversions = getattr(model, "_weight_conversions", None)
    config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), device_map={"": "cpu"})
    try:
        info, _ = convert_and_load_state_dict_in_model(model, state_dict, config)
    finally:
        built = _put_back(model, originals)
        model._weight_conversions = previous_conversions  # keep saving in the format it saved in before
    failures = [*info.conversion_errors.items(), *info.error_msgs, *sorted(info.mismatched_keys), *info.unexpected_keys]
    if failures:
        raise CheckpointMismatchError(f"Converting the checkpoint's tensors for {type(model).__name__} failed: "
                                      f"{failures}")
    return built


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _put_back(model: nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put each original tensor back at its name; return the tensors that had replaced them."""
    replaced = {}
    for name, original in originals.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attribute)
        if current is not original:
            if current is not None:
                replaced[name] = current.detach()
            setattr(module, attribute, original)
    return replaced


def _tolerated_removed(model: nn.Module, missing: set[str], unexpected: set[str]) -> tuple[set[str], set[str]]:
    """`missing` and `unexpected` without what `from_pretrained` tolerates: one of two tied weights (they share a
    tensor, so loading either loaded both) and the model's ignore patterns."""
    missing = set(missing)
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if _shares_tensor(model, target, source):
            if source not in missing:
                missing.discard(target)
            elif target not in missing:
                missing.discard(source)
    info = types.SimpleNamespace(missing_keys=missing, unexpected_keys=set(unexpected))
    if isinstance(model, PreTrainedModel):
        model._adjust_missing_and_unexpected_keys(info)
    return info.missing_keys, info.unexpected_keys


def _shares_tensor(model: nn.Module, a: str, b: str) -> bool:
    try:
        return model.get_parameter(a) is model.get_parameter(b)
    except AttributeError:
        return False
