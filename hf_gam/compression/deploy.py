"""The compressions that make a smaller model a user can deploy: integer weights through torchao, and MLP blocks with
fewer neurons.

* `quantize_int8_weights`, `quantize_dynamic_int8`, `quantize_int4_weights`: `torchao.quantization.quantize_` on
  every `nn.Linear` with `Int8WeightOnlyConfig`, `Int8DynamicActivationInt8WeightConfig` or a 4-bit weight-only
  configuration that runs on the CPU (`INT4_GROUP_SIZE` weights per scale). The weights become torchao tensors that
  `save_pretrained` stores as integers when the model was quantized through Transformers' `TorchAoConfig` (as
  `export` does), and `from_pretrained` reads them back. Convolutions (a ViT's patch embedding) stay in
  floating point.
* `shrink_mlp(model, fraction)`: structured pruning of the MLP of every layer of a ViT-style model: the same number
  of neurons (the rounded `fraction` of `config.intermediate_size`) is removed from every layer, the ones with the
  smallest score `||W_in[j, :]|| * ||W_out[:, j]||` (the norm of the neuron's input row times the norm of its output
  column: a bound on how much the neuron can move the layer's output for a unit input). The layers' weights are
  replaced by smaller ones and `config.intermediate_size` is updated, so the saved model is smaller and loads with
  `from_pretrained`.

torchao is an optional dependency (`pip install "hf-gam[deploy]"`); everything else here needs only torch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "INT4_GROUP_SIZE",
    "INTEGER_FORMATS",
    "check_int4_widths",
    "MLP_ARCHITECTURES",
    "MLP_PATTERNS",
    "is_quantized",
    "mlp_blocks",
    "mlp_keep_indices",
    "quantize_int4_weights",
    "quantize_dynamic_int8",
    "quantize_int8_weights",
    "require_torchao",
    "shrink_mlp",
    "torchao_config",
]

INTEGER_FORMATS = ("int8", "int8_dynamic", "int4")
"""The integer formats, each through torchao."""

INT4_GROUP_SIZE = 32
"""Weights per scale in the 4-bit format (per output channel, groups along the input dimension)."""

MLP_ARCHITECTURES = (
    "ViT-style encoders whose config has `intermediate_size` and whose layers hold their MLP as `mlp.fc1`/`mlp.fc2` "
    "or `intermediate.dense`/`output.dense` (hidden -> intermediate -> hidden): ViT, DeiT, BEiT, Data2VecVision, "
    "BERT-style encoders"
)
"""What `mlp:F` recognises, as the error for another architecture names it."""


def require_torchao():
    """The `torchao` module, or an ImportError that names the install command."""
    try:
        import torchao  # noqa: F401
        import torchao.quantization
    except ImportError as error:
        raise ImportError(
            "The integer formats (int8, int8_dynamic, int4) quantize through torchao, which is not installed: "
            'pip install "hf-gam[deploy]"  (or: pip install torchao)'
        ) from error
    return torchao


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` already holds quantized weights: loaded with a `quantization_config`, or with a parameter
    that is a torchao tensor or a `torch.ao` quantized module."""
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return True
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    for module in model.modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            return True
    for tensor in list(model.parameters()) + list(model.buffers()):
        if type(tensor).__module__.startswith("torchao") or tensor.is_quantized:
            return True
    return False


def torchao_config(format_name: str):
    """The `torchao.quantization` configuration of one of `INTEGER_FORMATS`: what `quantize_` applies and what
    `transformers.TorchAoConfig(quant_type=...)` records in a saved model's config."""
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if format_name == "int8":
        return Int8WeightOnlyConfig()
    if format_name == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if format_name == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))
    raise ValueError(f"Unknown integer format {format_name!r}; known: {', '.join(INTEGER_FORMATS)}.")


def _quantize(model: nn.Module, format_name: str, what: str) -> nn.Module:
    config = torchao_config(format_name)
    from torchao.quantization import quantize_

    if not any(isinstance(module, nn.Linear) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer for {what}.")
    quantize_(model, config)
    return model


def quantize_int8_weights(model: nn.Module) -> nn.Module:
    """int8 weight-only quantization of every `nn.Linear` (per output channel scales), in place; returns `model`."""
    return _quantize(model, "int8", "int8 weight-only quantization")


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """int8 weights and int8 activations quantized on the fly (per token) in every `nn.Linear`, in place; returns
    `model`."""
    return _quantize(model, "int8_dynamic", "int8 dynamic quantization")


def check_int4_widths(model: nn.Module) -> None:
    """Raise ValueError naming the `nn.Linear` layers whose input width `INT4_GROUP_SIZE` does not divide (the 4-bit
    format quantizes groups of that many weights along the input dimension)."""
    uneven = [f"{name} ({module.in_features})" for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module.in_features % INT4_GROUP_SIZE]
    if uneven:
        raise ValueError(f"int4 quantizes groups of {INT4_GROUP_SIZE} input weights; these layers' input widths are not "
                         f"multiples of {INT4_GROUP_SIZE}: {', '.join(uneven[:5])}" + (" ..." if len(uneven) > 5 else ""))


def quantize_int4_weights(model: nn.Module) -> nn.Module:
    """4-bit weight-only quantization of every `nn.Linear` (asymmetric groups of `INT4_GROUP_SIZE` weights along the
    input dimension, a form with a CPU kernel), in place; returns `model`. Every input width must be a multiple of
    `INT4_GROUP_SIZE` (`check_int4_widths`)."""
    check_int4_widths(model)
    return _quantize(model, "int4", "4-bit weight-only quantization")


# --------------------------------------------------------------------------------------------------
# Smaller MLPs


MLP_PATTERNS = (("intermediate.dense", "output.dense"), ("mlp.fc1", "mlp.fc2"))
"""Where a layer keeps its MLP: (the layer into the intermediate width, the layer out of it), relative to the layer."""


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def mlp_blocks(model: nn.Module) -> list[tuple[str, str, str]]:
    """`(layer name, path of the layer into the MLP, path of the layer out of it)` of every MLP of a ViT-style
    `model` (`MLP_PATTERNS`): the first maps the hidden size to `config.intermediate_size`, the second maps it
    back. Raises ValueError naming the supported architectures when the model has none, or when some Linear layer of
    width `intermediate_size` is left unmatched (its width could not be changed with the others)."""
    width = getattr(getattr(model, "config", None), "intermediate_size", None)
    if not isinstance(width, int):
        raise ValueError(f"mlp:F shrinks the MLP blocks of {MLP_ARCHITECTURES}; {type(model).__name__}'s config has "
                         "no integer `intermediate_size`.")
    blocks, matched = [], set()
    for name, module in model.named_modules():
        for up_path, down_path in MLP_PATTERNS:
            up, down = _submodule(module, up_path), _submodule(module, down_path)
            if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and up.out_features == down.in_features == width:
                blocks.append((name, up_path, down_path))
                matched |= {id(up), id(down)}
    if not blocks:
        raise ValueError(f"mlp:F shrinks the MLP blocks of {MLP_ARCHITECTURES}; {type(model).__name__} has none.")
    stray = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in matched
             and width in (m.in_features, m.out_features)]
    if stray:
        raise ValueError(f"mlp:F found MLP blocks in {type(model).__name__}, but also layers of width "
                         f"{width} it does not recognise ({', '.join(stray[:3])}); it shrinks {MLP_ARCHITECTURES}.")
    return blocks


def _kept_count(width: int, fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"mlp:F removes the fraction F of the MLP neurons; F must lie in [0, 1); got {fraction!r}.")
    keep = width - int(round(fraction * width))
    if keep < 1:
        raise ValueError(f"mlp:{fraction:g} would remove all {width} neurons of each MLP.")
    return keep


@torch.no_grad()
def mlp_keep_indices(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """`{block name: sorted indices of the neurons kept}` for `shrink_mlp(model, fraction)`: in every block the
    `intermediate_size - round(fraction * intermediate_size)` neurons with the largest `||W_in[j, :]|| *
    ||W_out[:, j]||` (ties to the lower index)."""
    return _keep_indices(model, mlp_blocks(model), fraction)


def _keep_indices(model: nn.Module, blocks: list[tuple[str, str, str]], fraction: float) -> dict[str, torch.Tensor]:
    keep = _kept_count(model.config.intermediate_size, fraction)
    kept = {}
    for name, up_path, down_path in blocks:
        layer = model.get_submodule(name)
        up, down = layer.get_submodule(up_path), layer.get_submodule(down_path)
        score = up.weight.double().norm(dim=1) * down.weight.double().norm(dim=0)
        order = sorted(range(score.numel()), key=lambda j: (-float(score[j]), j))
        kept[name] = torch.tensor(sorted(order[:keep]), dtype=torch.long)
    return kept


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if columns is not None:
        weight = weight[:, columns.to(weight.device)]
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                        dtype=weight.dtype)
    smaller.weight.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        smaller.bias.copy_(bias[rows.to(bias.device)] if rows is not None else bias)
    smaller.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        smaller.bias.requires_grad_(linear.bias.requires_grad)
    return smaller


@torch.no_grad()
def shrink_mlp(model: nn.Module, fraction: float) -> nn.Module:
    """Remove the fraction `fraction` of the neurons of every MLP of `model` (`mlp_keep_indices`), in place: smaller
    layers into and out of each MLP (`MLP_PATTERNS`) and a smaller `config.intermediate_size`; returns `model`. The
    result computes what the full model computes with the removed neurons' output columns set to zero."""
    blocks = mlp_blocks(model)
    kept = _keep_indices(model, blocks, fraction)
    for name, up_path, down_path in blocks:
        layer, index = model.get_submodule(name), kept[name]
        for path, rows, columns in ((up_path, index, None), (down_path, None, index)):
            parent, _, attribute = path.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, attribute, _sliced_linear(getattr(owner, attribute), rows=rows, columns=columns))
    model.config.intermediate_size = int(next(iter(kept.values())).numel())
    return model
