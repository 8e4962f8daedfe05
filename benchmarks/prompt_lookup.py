"""Prompt lookup on the default model, as shipped (GGUF kept 4-bit): which texts it speeds up.

Four kinds of prompt: continuing a document (512 tokens of CPython's docs, the prompt
`benchmarks/compare.py` uses), summarizing a document (chat template), a story, and code. For each,
plain greedy decoding and prompt lookup at K = 2 and 4, configurations rotated round by round;
the table shows median decode tok/s, the speedup, the share of proposals kept, and the first
position where the tokens differ from plain greedy decoding ("-" = none, which is what greedy
verification attending one row at a time should give: `sdpa.decode_order_attention`).

    python benchmarks/prompt_lookup.py [--rounds 3] [--new-tokens 128] [--ks 2,4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lamina import LLM
from lamina.engine.generate import GenerationStats, generate_tokens
from lamina.engine.perplexity import default_text
from lamina.engine.prompt_lookup import PromptLookupDrafter
from lamina.engine.sampling import SamplingParams
from lamina.engine.speculative import speculative_tokens

GREEDY = SamplingParams(temperature=0)


def prompts(llm: LLM) -> dict[str, list[int]]:
    text = default_text()
    summary = llm.chat_prompt([{"role": "user", "content": "Summarize this text:\n" + text[5000:7000]}])
    return {
        "document (512 tokens)": llm.tokenizer.encode(text, add_special_tokens=False)[:512],
        "summary of a document": llm.tokenizer.encode(summary, add_special_tokens=False),
        "story": llm.tokenizer.encode("Once upon a time, in a land far away,"),
        "code": llm.tokenizer.encode("def fibonacci(n):"),
    }


def run(llm: LLM, ids: list[int], k: int, new_tokens: int) -> tuple[list[int], GenerationStats]:
    """Plain greedy decoding (k == 0) or prompt lookup proposing up to k tokens."""
    stats = GenerationStats()
    if k == 0:
        tokens = generate_tokens(llm.model, ids, new_tokens, GREEDY, stats=stats)
    else:
        tokens = speculative_tokens(llm.model, PromptLookupDrafter(), ids, new_tokens, GREEDY, k, stats=stats)
    return list(tokens), stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ks", default="2,4", help="proposal lengths to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started, load_before = time.strftime("%Y-%m-%d %H:%M %Z"), os.getloadavg()[0]
    llm = LLM.load(device="cpu")
    configs = [0, *(int(k) for k in args.ks.split(","))]
    rows = []
    for name, ids in prompts(llm).items():
        rates: dict[int, list[float]] = {k: [] for k in configs}
        kept, outputs = {}, {}
        for round_ in range(args.rounds):
            for k in configs[round_ % len(configs) :] + configs[: round_ % len(configs)]:
                outputs[k], stats = run(llm, ids, k, args.new_tokens)
                rates[k].append(stats.decode_tokens_per_s)
                kept[k] = stats.acceptance_rate
        plain = statistics.median(rates[0])
        for k in configs:
            first = next(
                (i for i, (a, b) in enumerate(zip(outputs[0], outputs[k], strict=True)) if a != b), None
            )
            rows.append(
                f"| {name} | {'plain' if k == 0 else f'K={k}'} | {statistics.median(rates[k]):.1f} | "
                f"{statistics.median(rates[k]) / plain:.2f}x | {'-' if k == 0 else f'{kept[k]:.0%}'} | "
                f"{'-' if first is None else first} |"
            )
    print(
        f"\nSmolLM2-135M-Instruct Q4_1 (kept 4-bit), greedy, {args.new_tokens} new tokens, {args.threads} threads,"
    )
    print(
        f"medians of {args.rounds} rotated rounds; {started}, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| prompt | decoding | decode tok/s | vs plain | proposals kept | first token differing from plain |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
