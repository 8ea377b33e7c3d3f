"""Structured pruning: remove whole Conv filters and Dense units, and rebuild a narrower model.

Zeros scattered through a kernel (magnitude pruning) do not make dense CPU kernels any
faster; a narrower layer does. For every Conv1D/Conv2D/Dense layer except the one that
produces the model's output, the filters (units) with the smallest L1 norm are dropped, the
next layer's matching input weights with them, and the model is rebuilt from the layers'
configurations with the smaller widths. Only simple chains are handled (a Sequential model,
or a functional model whose layers each feed only the next): in a graph with branches a
channel removed on one path would have to be removed on every path that meets it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .prune import ChannelChange, PruneError

PRUNED_KINDS = {"Conv1D": "filters", "Conv2D": "filters", "Dense": "units"}
# Layers without weights that keep the channel (last) axis as it is.
CHANNEL_PRESERVING = {
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
    "ZeroPadding1D", "ZeroPadding2D", "UpSampling1D", "UpSampling2D", "Cropping1D", "Cropping2D", "Identity",
    "ActivityRegularization",
}


def chain_layers(model) -> list:
    """The model's layers in order, or PruneError when it is not a simple chain."""
    import keras
    where = f"model {model.name!r}"
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise PruneError(f"{where}: structured pruning handles single-input, single-output chains; the model has "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    nested = [layer.name for layer in layers if isinstance(layer, keras.Model)]
    if nested:
        raise PruneError(f"{where}: structured pruning cannot rebuild nested models ({', '.join(nested)}); "
                         "use --prune without --prune-structured")
    if isinstance(model, keras.Sequential):
        return layers
    previous = None
    for layer in layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        parents = nodes[0].parent_nodes if len(nodes) == 1 else None
        source = parents[0].operation if parents and len(parents) == 1 else None
        expected_input = previous is None and type(source).__name__ == "InputLayer"
        if parents is None or len(parents) != 1 or not (expected_input or source is previous):
            raise PruneError(f"{where}: structured pruning handles simple chains only, and layer {layer.name!r} "
                             "does not just take the previous layer's output (branches or shared layers); "
                             "use --prune without --prune-structured")
        previous = layer
    output_layer = getattr(getattr(model.outputs[0], "_keras_history", None), "operation", None)
    if output_layer is not previous:
        raise PruneError(f"{where}: the model's output is not its last layer; structured pruning handles simple "
                         "chains only")
    return layers


def _keep(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (sorted) of the output channels with the largest L1 norm, keeping 1 - fraction of them."""
    channels = kernel.shape[-1]
    count = max(1, int(round(channels * (1.0 - fraction))))
    norms = np.abs(kernel).reshape(-1, channels).sum(axis=0)
    return np.sort(np.argsort(-norms, kind="stable")[:count])


def narrow(model, fraction: float) -> tuple[Any, list[ChannelChange]]:
    """A narrower copy of ``model`` with ``fraction`` of each prunable layer's channels removed."""
    import keras
    layers = chain_layers(model)
    where = f"model {model.name!r}"
    weighted = [i for i, layer in enumerate(layers) if type(layer).__name__ in PRUNED_KINDS]
    if len(weighted) < 2:
        raise PruneError(f"{where}: structured pruning needs at least two Conv/Dense layers (the last one makes the "
                         f"output and keeps its width); the model has {len(weighted)}")
    last = weighted[-1]
    refused = [f"{layer.name} ({type(layer).__name__})" for layer in layers
               if type(layer).__name__ not in {*PRUNED_KINDS, "DepthwiseConv2D", "BatchNormalization", "Flatten"}
               and (layer.weights or type(layer).__name__ not in CHANNEL_PRESERVING)]
    if refused:
        raise PruneError(f"{where}: structured pruning cannot narrow through layer(s) {', '.join(refused)}; it "
                         "handles Conv1D/Conv2D/Dense, DepthwiseConv2D, BatchNormalization, Flatten, pooling, "
                         "activation and dropout layers (use --prune without --prune-structured)")
    keep: np.ndarray | None = None          # kept channels of the tensor flowing into the next layer
    built: list[tuple[Any, list[np.ndarray]]] = []
    changes: list[ChannelChange] = []
    for index, layer in enumerate(layers):
        kind = type(layer).__name__
        config = layer.get_config()
        weights = layer.get_weights()
        if kind in PRUNED_KINDS:
            kernel = weights[0] if keep is None else np.take(weights[0], keep, axis=-2)
            rest = weights[1:]
            if index != last:
                chosen = _keep(kernel, fraction)
                kernel = kernel[..., chosen]
                rest = [w[chosen] for w in rest]
                config[PRUNED_KINDS[kind]] = int(len(chosen))
                changes.append(ChannelChange(layer.name, kind, int(weights[0].shape[-1]), int(len(chosen))))
                keep = chosen
            else:
                keep = None
            weights = [kernel, *rest]
        elif kind == "DepthwiseConv2D" and keep is not None:
            multiplier = weights[0].shape[-1]
            weights = [weights[0][:, :, keep, :]] + [w.reshape(-1, multiplier)[keep].ravel() for w in weights[1:]]
            keep = np.array([c * multiplier + m for c in keep for m in range(multiplier)])
        elif kind == "BatchNormalization" and keep is not None:
            axis = config.get("axis", -1)
            rank = len(layer.input.shape)
            if (axis if isinstance(axis, int) else axis[0]) not in (-1, rank - 1):
                raise PruneError(f"{where}: layer {layer.name!r} normalises axis {axis}, not the channel axis; "
                                 "structured pruning cannot narrow it")
            weights = [w[keep] for w in weights]
        elif kind == "Flatten" and keep is not None:
            shape = layer.input.shape
            channels, positions = int(shape[-1]), int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
            keep = np.array([p * channels + c for p in range(positions) for c in keep])
        built.append((layer.__class__.from_config(config), weights))
    input_tensor = model.inputs[0]
    narrowed = keras.Sequential([keras.Input(shape=tuple(input_tensor.shape[1:]), dtype=input_tensor.dtype,
                                             name=input_tensor.name), *[b[0] for b in built]], name=model.name)
    for new, weights in built:
        if weights:
            new.set_weights(weights)
    return narrowed, changes
