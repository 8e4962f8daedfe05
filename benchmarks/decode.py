"""Decode speed, time to first token and peak memory: Lamina vs transformers on the default model.

Each measurement runs in a fresh subprocess (so peak RSS belongs to one engine), the engines
alternate round by round (so drift in machine load hits both), and the table shows medians.

    python benchmarks/decode.py [--rounds 3] [--new-tokens 128] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."

LAMINA = """
import json, resource, sys, time, torch
from lamina import LLM
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = LLM.load(dtype=args["dtype"], device="cpu", quantize="none")  # dequantized, like transformers
load_s = time.perf_counter() - t0
llm.stop_ids = frozenset()  # a fixed number of new tokens: ignore end-of-sequence
llm.generate(args["prompt"], max_new_tokens=8, temperature=0)  # warm-up
text = llm.generate(args["prompt"], max_new_tokens=args["new_tokens"], temperature=0)
s = llm.last_stats
print(json.dumps({"load_s": load_s, "ttft_s": s.ttft_s, "decode_tps": s.decode_tokens_per_s,
    "new_tokens": s.new_tokens, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "threads": torch.get_num_threads(), "text": text}))
"""

TRANSFORMERS = """
import json, resource, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from lamina.default_model import default_model_path
args = json.loads(sys.argv[1])
path = default_model_path()
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, args["dtype"])).eval()
load_s = time.perf_counter() - t0

class Clock(BaseStreamer):
    def __init__(self):
        self.times = []
    def put(self, value):
        self.times.append(time.perf_counter())
    def end(self):
        pass

ids = tok(args["prompt"], return_tensors="pt").input_ids
model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)  # warm-up
clock = Clock()
start = time.perf_counter()
out = model.generate(ids, max_new_tokens=args["new_tokens"], do_sample=False, eos_token_id=None, streamer=clock)
new = out.shape[1] - ids.shape[1]
first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt being handed over
print(json.dumps({"load_s": load_s, "ttft_s": first - start, "decode_tps": (new - 1) / (last - first),
    "new_tokens": new, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "threads": torch.get_num_threads(), "text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}))
"""


def run(script: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    opts = parser.parse_args()
    args = {"prompt": PROMPT, "new_tokens": opts.new_tokens, "dtype": opts.dtype}
    results: dict[str, list[dict]] = {"lamina": [], "transformers": []}
    for round_ in range(opts.rounds):
        for name, script in (("lamina", LAMINA), ("transformers", TRANSFORMERS)):
            results[name].append(run(script, args))
            r = results[name][-1]
            print(f"round {round_ + 1} {name:12s} decode {r['decode_tps']:6.1f} tok/s", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(
        f"\nDefault model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to {opts.dtype} by both engines), greedy, "
        f"{opts.new_tokens} new tokens, medians of {opts.rounds} alternating rounds"
    )
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {_cpu_name()}, "
        f"{results['lamina'][0]['threads']} torch threads\n"
    )
    print("| engine | decode tokens/s | time to first token | load | peak RSS |")
    print("|---|---|---|---|---|")
    for name in results:
        print(
            f"| {name} | {med(name, 'decode_tps'):.1f} | {med(name, 'ttft_s') * 1000:.0f} ms | "
            f"{med(name, 'load_s'):.1f} s | {med(name, 'peak_rss') / 2**20:.0f} MiB |"
        )
    ratio = med("lamina", "decode_tps") / med("transformers", "decode_tps")
    same = results["lamina"][0]["text"] == results["transformers"][0]["text"]
    print(f"\nLamina / transformers decode: {ratio:.2f}x; identical greedy text: {same}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{_cores()}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
