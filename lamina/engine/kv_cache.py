"""A preallocated key/value cache: fixed shapes, one `update` method.

Each layer gets [batch, kv_heads, max_len, head_dim] tensors on that layer's device, allocated once
per generation. Attention writes the new positions and reads back the filled prefix, so nothing is
reallocated per token and the decode step has static shapes (which `torch.compile` needs).
"""

from __future__ import annotations

import torch
from torch import nn


class LayerKV:
    """One layer's keys and values [B, Hkv, max_len, D]: what a compiled layer step is given.

    It answers `update` like the whole `KVCache` does, so attention code is the same either way;
    the layer index it is passed is not needed (the slot already is that layer's) and is not read,
    so one compiled layer serves every layer without specializing on the index.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.max_len = keys.shape[2]

    def update(
        self, layer_idx: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at positions start_pos..; return all keys/values so far [B, Hkv, L, D].

        With a tensor `start_pos` (the compiled decode step) the write is an index_copy_ and the
        whole cache comes back ([B, Hkv, max_len, D]), so shapes never depend on the position;
        attention reads only the filled part.
        """
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(k.shape[2], device=start_pos.device)  # [T]
            self.keys.index_copy_(2, positions, k)
            self.values.index_copy_(2, positions, v)
            return self.keys, self.values
        end = start_pos + k.shape[2]
        self.keys[:, :, start_pos:end] = k
        self.values[:, :, start_pos:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def layer_tensors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole keys and values tensors [B, Hkv, max_len, D], for code that writes them itself."""
        return self.keys, self.values


class KVCache:
    """Keys and values of every layer for up to `max_len` positions."""

    def __init__(
        self,
        layout: list[tuple[int, int]],
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        devices: list[torch.device],
    ) -> None:
        self.max_len = max_len
        self.layers = []
        for (heads, dim), device in zip(layout, devices, strict=True):
            keys = torch.zeros(batch, heads, max_len, dim, dtype=dtype, device=device)
            self.layers.append(LayerKV(keys, torch.zeros_like(keys)))

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        """A cache shaped for `model`, each layer's tensors on the device its weights compute on."""
        layers = model.decoder_layers()
        devices = [_compute_device(layer) for layer in layers]
        return cls(model.cache_layout(), batch, max_len, dtype, devices)

    def update(
        self, layer_idx: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s `LayerKV.update`."""
        return self.layers[layer_idx].update(layer_idx, start_pos, k, v)

    def layer_tensors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s whole keys and values [B, Hkv, max_len, D] (the native decoder layer
        writes and reads them itself)."""
        return self.layers[layer_idx].layer_tensors(layer_idx)

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's key and value tensors."""
        return [t for layer in self.layers for t in (layer.keys, layer.values)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _compute_device(module: nn.Module) -> torch.device:
    """Where a layer runs: the device placement recorded on it, else where its weights live."""
    device = getattr(module, "compute_device", None)
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device
