"""Pruning in PyTorch: structured (fewer neurons and channels) and unstructured (zeros).

Structured pruning really removes the least important output neurons of each
hidden ``Linear`` and output channels of each hidden ``Conv2d`` (smallest L1
norm of their weights), and the matching inputs of the layer after, so the
exported ONNX graph has smaller tensors: a smaller file and less arithmetic.
(``torch.nn.utils.prune`` only multiplies by a mask; the file stays as big.)
It works on a model whose layers form an ``nn.Sequential`` (the model, or its
``body``), with only element-wise layers, pooling, dropout and flatten between
the weighted ones; anything else is refused with the reason.

Unstructured pruning zeroes the smallest weights across all layers (global
magnitude). ONNX stores dense tensors and ONNX Runtime on CPU runs dense
kernels, so the file is exactly as large and no faster: what it buys is a
smaller *compressed* file (zeros deflate well), which is reported as such.

Both fine-tune the pruned model with the one training loop.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import prune as torch_prune

from common.errors import InvalidInputError

logger = logging.getLogger(__name__)

_WEIGHTED = (nn.Linear, nn.Conv2d)
# Layers that keep the channel (or feature) layout of their input, so a pruned output
# channel of the layer before maps to the same position after them.
_PASS_THROUGH = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Identity,
    nn.Flatten,
)


def sequential_of(model: nn.Module) -> nn.Sequential:
    body = model if isinstance(model, nn.Sequential) else getattr(model, "body", None)
    if not isinstance(body, nn.Sequential):
        raise InvalidInputError(
            "structured pruning needs the model's layers as an nn.Sequential "
            "(the model itself or its .body)"
        )
    return body


def load_onnx_weights(model: nn.Module, onnx_path: Path) -> nn.Module:
    """Load the weights of an ONNX file exported from this architecture (by parameter
    name), resizing Linear/Conv2d layers to the file's shapes, so a pruned model loads
    back into its unpruned architecture. Raises InvalidInputError on any mismatch."""
    proto = onnx.load(str(onnx_path))
    tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, _WEIGHTED) and f"{name}.weight" in tensors:
            shape = tensors[f"{name}.weight"].shape
            if tuple(module.weight.shape) != tuple(shape):
                _replace(model, name, _resized(module, tuple(shape)))
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise InvalidInputError(
            f"{onnx_path} was not exported from this architecture: no weights for {missing[:4]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tensors[key].shape:
            raise InvalidInputError(f"{onnx_path}: {key} has shape {tensors[key].shape}")
    model.load_state_dict({k: torch.from_numpy(tensors[k].copy()) for k in state})
    return model.eval()


def _resized(module: nn.Module, shape: tuple[int, ...]) -> Weighted:
    if isinstance(module, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=module.bias is not None)
    assert isinstance(module, nn.Conv2d)
    return nn.Conv2d(
        shape[1],
        shape[0],
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        bias=module.bias is not None,
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _pairs(body: nn.Sequential) -> list[tuple[int, int]]:
    """(index of a hidden weighted layer, index of the weighted layer it feeds)."""
    weighted = [i for i, layer in enumerate(body) if isinstance(layer, _WEIGHTED)]
    if not weighted:
        return []
    for i, layer in enumerate(body):
        if not isinstance(layer, (*_WEIGHTED, *_PASS_THROUGH)) and i > weighted[0]:
            raise InvalidInputError(
                f"structured pruning cannot see through layer {i} ({type(layer).__name__})"
            )
    return list(itertools.pairwise(weighted))


Weighted = nn.Linear | nn.Conv2d


def _keep(layer: Weighted, amount: float) -> torch.Tensor:
    """Indices of the output units to keep: the largest L1 norms, in their order."""
    w = layer.weight.detach()
    norms = w.abs().reshape(w.shape[0], -1).sum(dim=1)
    keep = max(1, round(w.shape[0] * (1.0 - amount)))
    return torch.sort(torch.topk(norms, keep).indices).values


def prune_structured(model: nn.Module, amount: float) -> nn.Module:
    """Remove ``amount`` (0..1) of every hidden layer's outputs, in place; returns it."""
    if not 0.0 < amount < 1.0:
        raise InvalidInputError(f"amount must be between 0 and 1, got {amount}")
    body = sequential_of(model)
    pairs = _pairs(body)
    if not pairs:
        raise InvalidInputError("the model has no hidden Linear/Conv2d layer to prune")
    for cur, nxt in pairs:
        layer, after = body[cur], body[nxt]
        assert isinstance(layer, _WEIGHTED) and isinstance(after, _WEIGHTED)  # by _pairs
        keep = _keep(layer, amount)
        body[cur] = _slice(layer, keep, dim=0)
        if isinstance(layer, nn.Conv2d) and isinstance(after, nn.Linear):
            per_channel = after.in_features // layer.out_channels
            columns = (keep[:, None] * per_channel + torch.arange(per_channel)).reshape(-1)
            body[nxt] = _slice(after, columns, dim=1)
        else:
            body[nxt] = _slice(after, keep, dim=1)
    return model


def _slice(layer: Weighted, index: torch.Tensor, dim: int) -> Weighted:
    """A new layer with the weights of ``layer`` at ``index`` along ``dim`` (0 out, 1 in)."""
    weight = layer.weight.detach().index_select(dim, index).clone()
    shape = tuple(weight.shape)
    new = _resized(layer, shape)
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None and new.bias is not None:
            bias = layer.bias.detach()
            new.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    return new


def prune_unstructured(model: nn.Module, amount: float) -> list[tuple[nn.Module, str]]:
    """Mask ``amount`` of all Linear/Conv2d weights (smallest magnitude, globally).

    The masks stay on (``torch.nn.utils.prune``) so fine-tuning keeps the zeros;
    ``make_permanent`` bakes them in before export.
    """
    if not 0.0 < amount < 1.0:
        raise InvalidInputError(f"amount must be between 0 and 1, got {amount}")
    params: list[tuple[nn.Module, str]] = [
        (m, "weight") for m in model.modules() if isinstance(m, _WEIGHTED)
    ]
    if not params:
        raise InvalidInputError("the model has no Linear/Conv2d weights to prune")
    torch_prune.global_unstructured(
        params, pruning_method=torch_prune.L1Unstructured, amount=amount
    )
    return params


def make_permanent(params: list[tuple[nn.Module, str]]) -> None:
    for module, name in params:
        torch_prune.remove(module, name)


def sparsity(model: nn.Module) -> float:
    """The share of Linear/Conv2d weights that are exactly zero."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, _WEIGHTED)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
