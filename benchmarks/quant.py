"""Quantization benchmark: per method, resident weight bytes, perplexity and decode tokens/s, in one run.

    python benchmarks/quant.py [--model PATH] [--methods ...] [--max-tokens 2048] [--decode-tokens 32]
                               [--group-size 128] [--threads 1] [--json]

Rows: the float32 model (a GGUF dequantized), bfloat16, the GGUF kept quantized (when the model is a
GGUF), then each `--quantize` method applied to the float32 weights while loading. Perplexity is over
the first --max-tokens tokens of CPython's English docs (windows of 512, stride 256); gptq calibrates
on the last 4096 tokens of the same text, so the two do not overlap. Deltas are vs float32.
A group size that does not divide a layer's width falls back to the largest one that does (SmolLM2's
576-wide layers run g64 under --group-size 128; its 1536-wide down_proj runs g128), with a warning.
Weight bytes include what the methods leave alone: from a GGUF, the token embedding and head as the
file stores them (SmolLM2: its tied Q8_0 table, 30 MB).

Timings: one process, CPU, --threads torch threads (default 1: on a shared machine extra threads
spin against other work and distort the result badly). Memory is `LLM.memory_footprint()`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from lamina import LLM
from lamina.engine.perplexity import default_text, perplexity
from lamina.quant.apply import GROUPED_METHODS

PROMPT = "The Python language reference describes"
DEFAULT_METHODS = (
    "int8", "int4", "int4-minmax", "gptq", "nf4", "nf4-dq", "fp4", "llm.int8", "fp8", "bf16", "fp16",
)  # fmt: skip


def measure(label: str, args: argparse.Namespace, ids: list[int], **load: Any) -> dict[str, Any]:
    started = time.perf_counter()
    llm = LLM.load(args.model, device=args.device, **load)
    load_s = time.perf_counter() - started
    ppl = perplexity(llm.model, ids, context=512, stride=256)
    llm.generate(PROMPT, max_new_tokens=args.decode_tokens, temperature=0)
    return {
        "label": label,
        "weight_bytes": sum(llm.memory_footprint().values()),
        "perplexity": ppl.perplexity,
        "tokens": ppl.tokens,
        "decode_tok_s": llm.last_stats.decode_tokens_per_s,
        "load_s": load_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="HF directory or .gguf (default: bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=2048, help="perplexity tokens (run length)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    probe = LLM.load(args.model, device="cpu", quantize="none")  # the tokenizer
    ids = probe.tokenizer.encode(default_text(), add_special_tokens=False)[: args.max_tokens]
    is_gguf = str(probe.source).endswith(".gguf")
    del probe

    rows = [
        measure("float32", args, ids, quantize="none"),
        measure("bfloat16", args, ids, quantize="none", dtype="bfloat16"),
    ]
    if is_gguf:
        rows.append(measure("gguf (kept quantized)", args, ids))
    for method in args.methods:
        grouped = method in GROUPED_METHODS
        label = f"{method} g{args.group_size}" if grouped else method
        rows.append(measure(label, args, ids, quantize=method, group_size=args.group_size))

    base = rows[0]
    for row in rows:
        row["ppl_delta_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        row["memory_ratio"] = row["weight_bytes"] / base["weight_bytes"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"perplexity over {rows[0]['tokens']} tokens, decode {args.decode_tokens} tokens, {args.threads} thread(s)"
    )
    print(
        f"{'method':<24}{'weights MB':>11}{'x f32':>7}{'perplexity':>12}{'vs f32':>9}{'decode tok/s':>14}{'load s':>8}"
    )
    for r in rows:
        print(
            f"{r['label']:<24}{r['weight_bytes'] / 1e6:>11.1f}{r['memory_ratio']:>7.2f}{r['perplexity']:>12.3f}"
            f"{r['ppl_delta_pct']:>+8.2f}%{r['decode_tok_s']:>14.1f}{r['load_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
