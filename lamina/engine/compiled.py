"""The decode step under `torch.compile`: one token in, next-token logits out, static shapes.

Eager PyTorch spends 5-20 us of Python and dispatch per op; a 30-layer model has ~1600 ops per
token, milliseconds that dwarf the mat-vecs of a small model. Compiling fuses the norms, RoPE,
activations and residuals into a few generated C++ (CPU) or Triton (GPU) kernels.

What is compiled differs by device. On a GPU it is the whole step, replayed as one CUDA graph
(mode "reduce-overhead"): launch overhead, not Python, is what a GPU step loses. On a CPU it is one
decoder layer, reused for every layer (they share code and shapes): the per-layer call costs about
what the whole step saves in guard checks, while tracing one layer instead of thirty takes the
warm-up from minutes to seconds (benchmarks/NOTES.md, finding 12).

Shapes must not change from token to token, so the step takes the position as a tensor and a
static cache whose length is rounded up to a bucket: one compiled graph serves every generation of
similar length. Compiled code is cached on disk by inductor's FX graph cache, so later processes
skip most of the work.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from torch import nn
from torch.torch_version import TorchVersion

from lamina.engine.generate import input_device_dtype
from lamina.engine.kv_cache import KVCache, LayerKV

BUCKET = 256  # cache lengths are rounded up to a multiple of this: fewer graphs, little waste


def should_compile(model: nn.Module, device: torch.device, requested: bool | None) -> bool:
    """Whether to compile the decode step: as requested, else on CUDA only; never for a model
    family whose forward lacks the static-shape form (`supports_static_decode`).

    On CUDA the step becomes one graph replay, several times faster for small models. On CPU it
    saves ~15% of a step (~1.7 ms a token on the default model) for a warm-up of ~15 s the first
    time on a machine and ~3.5 s in every later process (benchmarks/NOTES.md, finding 12): it pays
    back only after a couple of thousand tokens, so eager is the CPU default and `--compile` opts in.
    A model whose every decoder layer runs natively (`lamina.models.native_layer`) is never compiled:
    the native step has none of the per-op overhead compiling removes, and the compiled step (which
    cannot call it) measured 82-84 against 120-124 tokens/s (finding 16). Nor is a model with a
    layer whose forward cannot be traced (`QuantizedLinear.compiles`: LLM.int8's data-dependent outlier
    columns), where compiling would only fail after a minute of trying.
    """
    if not getattr(model, "supports_static_decode", False) or getattr(model, "is_encoder_decoder", False):
        if requested:
            warnings.warn(
                f"{type(model).__name__} has no compiled decode step; decoding eagerly", stacklevel=3
            )
        return False
    if any(not getattr(module, "compiles", True) for module in model.modules()):
        if requested:
            warnings.warn(
                "compiling is skipped: this model's quantized layers cannot be traced", stacklevel=3
            )
        return False
    layers = model.decoder_layers()
    if device.type == "cpu" and all(getattr(layer, "native", None) is not None for layer in layers):
        if requested:
            warnings.warn(
                "compiling is skipped: this model decodes on native layers, which are faster", stacklevel=3
            )
        return False
    return requested if requested is not None else device.type == "cuda"


def bucket_length(length: int, limit: int) -> int:
    """`length` rounded up to a multiple of BUCKET, but never past the model's context `limit`."""
    return min(-(-length // BUCKET) * BUCKET, max(limit, length))


def _run_layer(
    layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, ...], slot: LayerKV, position: torch.Tensor
) -> torch.Tensor:
    """One decoder layer's decode step: the region a CPU compile traces once for all layers."""
    return layer(x, rope, slot, position)


class CompiledDecoder:
    """Compiled decode steps for one model, with one static KV cache per (batch, bucket, dtype)."""

    def __init__(self, model: nn.Module, verbose: bool = True) -> None:
        self.model = model
        self.device = input_device_dtype(model)[0]
        self.verbose = verbose
        # One graph for all layers needs dynamo to treat a layer's weights as inputs rather than
        # constants of one module (always from torch 2.5, a flag before: newer versions warn when it
        # is read); without it, compile the whole step.
        inlines_modules = (
            torch.__version__ >= TorchVersion("2.5") or torch._dynamo.config.inline_inbuilt_nn_modules
        )
        self.per_layer = self.device.type != "cuda" and inlines_modules
        # CUDA graphs on GPU (what mode="reduce-overhead" sets). emulate_precision_casts: round
        # bf16/fp16 intermediates where eager does, so greedy tokens match the eager path (fused
        # kernels otherwise keep them in float32 and the two drift apart within tens of tokens).
        options = {"emulate_precision_casts": True, "triton.cudagraphs": self.device.type == "cuda"}
        compiled = _run_layer if self.per_layer else self._forward
        self._compiled = torch.compile(compiled, fullgraph=True, dynamic=False, options=options)
        self._caches: dict[tuple[int, int, torch.dtype], KVCache] = {}
        self._warm: set[tuple[int, int, torch.dtype]] = set()
        self.compile_s = 0.0  # warm-up time of the last new bucket (0 when nothing was compiled)
        self.failed = False  # compilation failed (e.g. an op inductor cannot lower): decode eagerly

    def cache(self, batch: int, length: int, dtype: torch.dtype) -> KVCache:
        """A zeroed static cache of at least `length` positions, reused across generations."""
        key = (batch, bucket_length(length, self.model.config.max_position_embeddings), dtype)
        cache = self._caches.get(key)
        if cache is None:
            cache = KVCache.for_model(self.model, batch, key[1], dtype)
            if self.device.type == "cuda":  # CUDA graphs need fixed addresses for mutated inputs
                for tensor in cache.tensors():
                    torch._dynamo.mark_static_address(tensor)
            self._caches[key] = cache
        self.compile_s = 0.0
        if key not in self._warm:
            self._warm_up(cache, key)
        return cache

    def step(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token [B, 1] at `position` (a 1-element long tensor) -> logits [B, V]."""
        if self.per_layer or self.failed:  # compiled layers inside, or the same step eagerly
            return self._forward(token, position, cache)
        logits = self._compiled(token, position, cache)
        return logits.clone() if self.device.type == "cuda" else logits  # graph outputs get reused

    def _forward(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The static-shape step: the model's embed -> layers -> head, each layer compiled when per_layer."""
        run_layer = self._compiled if self.per_layer and not self.failed else _run_layer
        x, rope = self.model.embed(token, position)
        for layer, slot in zip(self.model.decoder_layers(), cache.layers, strict=True):
            x = run_layer(layer, x, rope, slot, position)
        return self.model.head(x)[:, -1]  # [B, 1, V] -> [B, V]

    def _warm_up(self, cache: KVCache, key: tuple[int, int, torch.dtype]) -> None:
        """Compile (or load from the on-disk cache) by running steps on dummy input; prints progress."""
        if self.verbose:
            print(
                f"lamina: compiling the decode step for batch {key[0]}, cache {key[1]} "
                "(once per shape; reused from the on-disk cache later)...",
                file=sys.stderr,
                flush=True,
            )
        started = time.perf_counter()
        with torch.inference_mode():  # the same tensor kind as in generation, or guards recompile
            token = torch.zeros(key[0], 1, dtype=torch.long, device=self.device)
            position = torch.zeros(1, dtype=torch.long, device=self.device)
            try:
                for _ in range(3 if self.device.type == "cuda" else 1):  # CUDA graphs record later
                    self.step(token, position, cache)
            except Exception as exc:  # a backend failure must not stop generation
                self.failed = True
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                print(f"lamina: compiling failed ({reason}); decoding eagerly", file=sys.stderr, flush=True)
        self.compile_s = time.perf_counter() - started
        self._warm.add(key)
        if self.verbose and not self.failed:
            print(f"lamina: decode step ready in {self.compile_s:.1f} s", file=sys.stderr, flush=True)
