"""Speculative decoding on the default model: float32 target, its own 4-bit blocks as the draft.

The target is SmolLM2-135M-Instruct expanded to float32 (`quantize="none"`); the draft is the same
GGUF kept quantized (`quantize=None`: Q4_1 blocks on the native kernel where it runs, else int4),
~4x faster a token and nearly always in agreement. Greedy,
same prompt, a fixed number of new tokens (end-of-sequence ignored). Per round every configuration
runs once, in an order rotated each round so drift in machine load hits all; the table shows
medians and whether every run's tokens equal the target's own greedy tokens.

    python benchmarks/speculative.py [--rounds 3] [--new-tokens 128] [--ks 2,4,6] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lamina import LLM
from lamina.engine.generate import GenerationStats, generate_tokens
from lamina.engine.sampling import SamplingParams
from lamina.engine.speculative import speculative_tokens

PROMPT = "Write a short story about a robot who learns to paint."
GREEDY = SamplingParams(temperature=0)


def run(
    target: LLM, draft: LLM, config: str, ids: list[int], new_tokens: int
) -> tuple[list[int], GenerationStats]:
    """One greedy generation of `config`: "target", "draft" or "K=<k>"."""
    stats = GenerationStats()
    if config == "target":
        tokens = generate_tokens(target.model, ids, new_tokens, GREEDY, stats=stats)
    elif config == "draft":
        tokens = generate_tokens(draft.model, ids, new_tokens, GREEDY, stats=stats)
    else:
        k = int(config.removeprefix("K="))
        tokens = speculative_tokens(target.model, draft.model, ids, new_tokens, GREEDY, k, stats=stats)
    return list(tokens), stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ks", default="2,4,6", help="draft lengths to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    target = LLM.load(device="cpu", quantize="none")  # float32 weights
    draft = LLM.load(device="cpu")  # the GGUF's Q4_1 blocks, kept quantized
    ids = target.tokenizer.encode(PROMPT)
    configs = ["target", "draft", *(f"K={k}" for k in args.ks.split(","))]
    reference = run(target, draft, "target", ids, args.new_tokens)[0]
    for config in configs:  # warm-up: allocator, kernels, the verify pass's shapes
        run(target, draft, config, ids, 16)

    rates: dict[str, list[float]] = {config: [] for config in configs}
    acceptance: dict[str, list[float]] = {config: [] for config in configs}
    identical = {config: True for config in configs}
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            tokens, stats = run(target, draft, config, ids, args.new_tokens)
            rates[config].append(stats.decode_tokens_per_s)
            acceptance[config].append(stats.acceptance_rate)
            identical[config] &= tokens == reference
        print(
            f"round {round_index + 1}: " + ", ".join(f"{c} {rates[c][-1]:.1f}" for c in configs), flush=True
        )

    base = statistics.median(rates["target"])
    print(
        f"\n{started}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, {args.rounds} rounds; "
        f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n"
    )
    print("| configuration | decode tok/s | vs target | draft tokens accepted | greedy tokens = target's |")
    print("|---|---|---|---|---|")
    names = {"target": "target float32 alone", "draft": "draft 4-bit alone"}
    for config in configs:
        rate = statistics.median(rates[config])
        accepted = f"{statistics.median(acceptance[config]):.0%}" if config.startswith("K=") else "-"
        same = "yes" if identical[config] else "no"
        name = names.get(config, f"target + 4-bit draft, {config}")
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {accepted} | {same} |")


if __name__ == "__main__":
    main()
