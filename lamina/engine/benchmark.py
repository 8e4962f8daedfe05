"""Measure a loaded model: time to first token, prefill and decode rates, memory, bandwidth.

Decode of one stream is bound by memory bandwidth (every weight is read once per step), so the
report sets the achieved weight bandwidth against the machine's own mat-vec bandwidth, measured
in the same process with the same threads.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lamina.engine.compiled import CompiledDecoder
from lamina.engine.generate import GenerationStats, input_device_dtype, prefill
from lamina.engine.kv_cache import KVCache
from lamina.engine.sampling import SamplingParams
from lamina.engine.speculative import Drafter, speculative_tokens
from lamina.kernels import native


@dataclass
class BenchResult:
    """One run's numbers; `as_dict` is the stable `lamina bench --json` schema."""

    model: str
    device: str
    dtype: str
    threads: int
    compiled: bool
    batch: int
    prompt_tokens: int
    new_tokens: int
    load_s: float
    compile_s: float
    ttft_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    decode_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    weight_bytes: int
    weight_bytes_per_token: int
    achieved_gb_per_s: float
    machine_gb_per_s: float
    bandwidth_share: float
    kernels: str = "torch"  # "native" (Lamina's CPU kernels), or "torch" with the reason on a CPU
    draft: str | None = None  # speculative decoding's draft model (path), or None
    speculative_k: int | None = None
    acceptance_rate: float | None = None  # share of drafted tokens the model accepted

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all weights, bytes read per decode step): the second leaves out embedding tables,
    of which a step reads one row, unless the same storage also serves as the output layer."""
    seen: dict[int, tuple[int, bool]] = {}  # storage pointer -> (bytes, used outside an embedding)
    for module in model.modules():
        is_embedding = "Embedding" in type(module).__name__
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            size, used = seen.get(key, (tensor.untyped_storage().nbytes(), False))
            seen[key] = (size, used or not is_embedding)
    total = sum(size for size, _ in seen.values())
    return total, sum(size for size, used in seen.values() if used)


def matvec_bandwidth(device: torch.device, repeats: int = 7) -> float:
    """GB/s of a large mat-vec (a 256 MB float32 matrix on CPU, 1 GB bf16 on GPU): the machine's limit.
    On CPU the faster of torch's product and Lamina's native one (torch's float32 mat-vec reaches
    about half the memory bandwidth on the development VMs)."""
    rows, dtype = (16384, torch.float32) if device.type == "cpu" else (32768, torch.bfloat16)
    matrix = torch.randn(rows, 4096, dtype=dtype, device=device)  # [rows, 4096]
    vector = torch.randn(4096, 1, dtype=dtype, device=device)
    products = [lambda: torch.mm(matrix, vector)]
    if device.type == "cpu" and native.library() is not None:
        products.append(lambda: native.dense_linear(vector.t(), matrix, None))
    times = []
    for product in products:
        for i in range(repeats):
            _sync(device)
            started = time.perf_counter()
            product()
            _sync(device)
            if i:  # the first run pays first-touch costs
                times.append(time.perf_counter() - started)
    return matrix.numel() * matrix.element_size() / min(times) / 1e9


def run_benchmark(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    decoder: CompiledDecoder | None,
) -> dict[str, float]:
    """Greedy generation of `new_tokens` after `prompt` [B, P], timed by phase (no stop tokens)."""
    device, dtype = input_device_dtype(model)
    batch, length = prompt.shape
    total = length + new_tokens
    compile_s = 0.0
    with torch.inference_mode():
        if decoder is not None:
            cache = decoder.cache(batch, total, dtype)  # compiles (or loads) before the clock starts
            compile_s = decoder.compile_s
            token = torch.zeros(batch, 1, dtype=torch.long, device=device)
            position = torch.zeros(1, dtype=torch.long, device=device)
        else:
            cache = KVCache.for_model(model, batch, total, dtype)
        _sync(device)
        started = time.perf_counter()
        logits = prefill(model, prompt, cache)
        _sync(device)
        prefill_s = time.perf_counter() - started
        next_ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        next_ids.tolist()  # the host sync that hands the first token out
        ttft_s = time.perf_counter() - started
        for step in range(1, new_tokens):
            pos = length + step - 1
            if decoder is not None:
                token.copy_(next_ids)
                position.fill_(pos)
                next_ids = decoder.step(token, position, cache).argmax(-1, keepdim=True)
            else:
                next_ids = model(next_ids, cache, pos)[:, -1].argmax(-1, keepdim=True)
            next_ids.tolist()  # one host sync per token, as in generation
        decode_s = time.perf_counter() - started - ttft_s
    return {"compile_s": compile_s, "prefill_s": prefill_s, "ttft_s": ttft_s, "decode_s": decode_s}


def run_speculative_benchmark(
    model: nn.Module, draft: nn.Module | Drafter, prompt: torch.Tensor, new_tokens: int, k: int
) -> dict[str, float]:
    """`run_benchmark` with `draft` (a draft model or a `Drafter`) proposing up to `k` tokens at a time;
    prompt [1, P].

    The speculative loop times prefill and the first token together, so `prefill_s` is `ttft_s`.
    """
    stats = GenerationStats()
    tokens = speculative_tokens(
        model, draft, prompt[0].tolist(), new_tokens, SamplingParams(0.0), k, stats=stats
    )
    for _ in tokens:
        pass
    return {
        "compile_s": 0.0,
        "prefill_s": stats.ttft_s,
        "ttft_s": stats.ttft_s,
        "decode_s": stats.decode_s,
        "acceptance_rate": stats.acceptance_rate,
    }


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(peak resident set of this process, peak GPU memory allocated) in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return rss, gpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
