"""Lamina vs transformers vs llama.cpp on the same GGUF, prompt and thread count: one table.

Measures decode tokens/s (greedy, --new-tokens), prefill tokens/s and time to first token on a
--prompt-len token prompt (CPython's docs, each engine's own tokenizer of the same vocabulary).
Every measurement runs in a fresh subprocess (threads and memory don't leak between engines), the
engines alternate round by round (machine-load drift hits all of them), and the table shows
medians with ratios. llama.cpp runs when `llama-cpp-python` is installed (`pip install -e .[bench]`).

`--cpu avx2` runs every engine as on a CPU without AVX-512 (most laptops): Lamina's AVX2 kernels
(LAMINA_NATIVE_KERNELS=avx2), torch's AVX2 kernels (ATEN_CPU_CAPABILITY, oneDNN and MKL capped), and
llama.cpp from `--llama-cpp-dir`, a build without AVX-512, e.g.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        pip install --no-deps --target DIR llama-cpp-python
(the table header prints the features llama.cpp reports).

    python benchmarks/compare.py [--rounds 3] [--threads 2] [--prompt-len 512] [--new-tokens 128]
        [--lamina-args "" --lamina-args "--compile"] [--engines lamina,transformers,llama.cpp]
        [--cpu avx2 --llama-cpp-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

TRANSFORMERS = """
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(a["dir"], gguf_file=a["file"])
model = AutoModelForCausalLM.from_pretrained(a["dir"], gguf_file=a["file"], dtype=torch.float32).eval()
load_s = time.perf_counter() - t0

class Clock(BaseStreamer):
    def __init__(self):
        self.times = []
    def put(self, value):
        self.times.append(time.perf_counter())
    def end(self):
        pass

ids = tok(a["text"], return_tensors="pt", add_special_tokens=False).input_ids[:, : a["prompt_len"]]
model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
clock = Clock()
start = time.perf_counter()
n = a["new_tokens"]
out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt being handed over
print(json.dumps({"load_s": load_s, "ttft_s": first - start, "prefill_tps": ids.shape[1] / (first - start),
    "decode_tps": (n - 1) / (last - first), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "prompt_tokens": ids.shape[1], "first_ids": out[0, ids.shape[1]:ids.shape[1] + 16].tolist()}))
"""

LLAMA_CPP = """
import json, resource, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
n_ctx = a["prompt_len"] + a["new_tokens"] + 16  # n_batch = n_ctx: the logits buffer has n_batch rows
llm = Llama(model_path=a["path"], n_ctx=n_ctx, n_threads=a["threads"], n_threads_batch=a["threads"],
    n_batch=n_ctx, n_ubatch=512, verbose=False)
load_s = time.perf_counter() - t0
ids = llm.tokenize(a["text"].encode(), add_bos=False, special=False)[: a["prompt_len"]]
llm.eval(ids[:16]); llm.reset()  # warm-up
start = time.perf_counter()
llm.eval(ids)
prefill_s = time.perf_counter() - start
token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
ttft = time.perf_counter() - start
first_ids = [token]
begin = time.perf_counter()
for _ in range(a["new_tokens"] - 1):
    llm.eval([token])
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    first_ids.append(token)
decode_s = time.perf_counter() - begin
print(json.dumps({"load_s": load_s, "ttft_s": ttft, "prefill_tps": len(ids) / prefill_s,
    "decode_tps": (a["new_tokens"] - 1) / decode_s, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "prompt_tokens": len(ids), "first_ids": first_ids[:16],
    "system_info": llama_cpp.llama_print_system_info().decode()}))
"""

#: environment for `--cpu avx2`: every engine's kernels as on a CPU without AVX-512
AVX2_ENV = {
    "LAMINA_NATIVE_KERNELS": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
_env: dict[str, str] = dict(os.environ)  # what the subprocesses run with (main sets it)


def run_lamina(a: dict) -> dict:
    command = [sys.executable, "-m", "lamina", "bench", a["path"], "--json", "--repeat", "1"]
    command += ["--threads", str(a["threads"]), "--prompt-len", str(a["prompt_len"])]
    command += ["--new-tokens", str(a["new_tokens"]), *shlex.split(a["lamina_args"])]
    r = json.loads(_run(command).splitlines()[-1])
    return {
        "load_s": r["load_s"],
        "ttft_s": r["ttft_s"],
        "prefill_tps": r["prefill_tokens_per_s"],
        "decode_tps": r["decode_tokens_per_s"],
        "peak_rss": r["peak_rss_bytes"],
        "prompt_tokens": r["prompt_tokens"],
        "kernels": r["kernels"],
    }


def run_script(script: str, a: dict) -> dict:
    return json.loads(_run([sys.executable, "-c", script, json.dumps(a)]).splitlines()[-1])


def _run(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True, env=_env)
    if out.returncode != 0:
        sys.exit(f"benchmark subprocess failed: {shlex.join(command[:4])} ...\n{out.stderr[-3000:]}")
    return out.stdout.strip()


ENGINES = {
    "transformers": lambda a: run_script(TRANSFORMERS, a),
    "llama.cpp": lambda a: run_script(LLAMA_CPP, a),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a .gguf file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--lamina-args",
        action="append",
        default=None,
        help="extra `lamina bench` options, e.g. '--compile'; repeat for several Lamina rows (default: '')",
    )
    parser.add_argument("--engines", default="lamina,transformers,llama.cpp")
    parser.add_argument(
        "--cpu", choices=["native", "avx2"], default="native", help="run the engines as on an AVX2-only CPU"
    )
    parser.add_argument("--llama-cpp-dir", help="import llama_cpp from this directory (a build for --cpu)")
    opts = parser.parse_args()
    if opts.cpu == "avx2":  # what the environment already sets wins, e.g. LAMINA_NATIVE_KERNELS=0
        _env.update({key: value for key, value in AVX2_ENV.items() if key not in os.environ})
    if opts.llama_cpp_dir:
        _env["PYTHONPATH"] = os.pathsep.join(filter(None, [opts.llama_cpp_dir, _env.get("PYTHONPATH")]))
    from pydoc_data.topics import topics

    from lamina.default_model import default_model_path

    path = os.path.abspath(opts.model) if opts.model else str(default_model_path())
    engines = [e for e in opts.engines.split(",") if e]
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None and not opts.llama_cpp_dir:
        print(
            "llama-cpp-python is not installed (pip install -e .[bench]): skipping llama.cpp", file=sys.stderr
        )
        engines.remove("llama.cpp")
    if "llama.cpp" in engines and opts.cpu == "avx2" and not opts.llama_cpp_dir:
        print(
            "--cpu avx2 needs an AVX2 build of llama.cpp (--llama-cpp-dir): skipping llama.cpp",
            file=sys.stderr,
        )
        engines.remove("llama.cpp")
    lamina_rows = {f"lamina {extra}".strip(): extra for extra in opts.lamina_args or [""]}
    if "lamina" in engines:  # one row per Lamina configuration
        at = engines.index("lamina")
        engines[at : at + 1] = list(lamina_rows)
    args = {
        "path": path,
        "dir": os.path.dirname(path),
        "file": os.path.basename(path),
        "text": " ".join(topics[key] for key in sorted(topics))[: opts.prompt_len * 8],  # as `lamina bench`
        "threads": opts.threads,
        "prompt_len": opts.prompt_len,
        "new_tokens": opts.new_tokens,
    }
    load = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for round_ in range(opts.rounds):
        for name in engines:
            r = (
                run_lamina({**args, "lamina_args": lamina_rows[name]})
                if name in lamina_rows
                else ENGINES[name](args)
            )
            results[name].append(r)
            print(
                f"round {round_ + 1} {name:12s} decode {r['decode_tps']:6.1f} tok/s, "
                f"prefill {r['prefill_tps']:6.0f} tok/s",
                file=sys.stderr,
            )
    _print_table(results, opts, path, (load, os.getloadavg()[0]))


def _print_table(results: dict[str, list[dict]], opts: argparse.Namespace, path: str, load: tuple) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(
        f"\n{os.path.basename(path)}: greedy, {opts.new_tokens} new tokens after a {opts.prompt_len}-token "
        f"prompt, {opts.threads} threads, medians of {opts.rounds} alternating rounds"
    )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {_cpu_name()}, "
        f"load average {load[0]:.1f} at start, {load[1]:.1f} at end"
    )
    if opts.cpu == "avx2":
        print(f"as on an AVX2-only CPU: {' '.join(f'{k}={_env[k]}' for k in AVX2_ENV)}")
    lamina = [r["kernels"] for rows in results.values() for r in rows if "kernels" in r]
    if lamina:
        print(f"Lamina's kernels: {', '.join(sorted(set(lamina)))}")
    if "llama.cpp" in results:
        print(f"llama.cpp: {results['llama.cpp'][0]['system_info'].strip()}")
    print()
    base = "transformers" if "transformers" in results else None
    ref = "llama.cpp" if "llama.cpp" in results else None
    print(
        "| engine | decode tok/s | prefill tok/s | TTFT | load | peak RSS | decode vs transformers | decode vs llama.cpp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in results:
        vs_base = f"{med(name, 'decode_tps') / med(base, 'decode_tps'):.2f}x" if base else "-"
        vs_ref = f"{med(name, 'decode_tps') / med(ref, 'decode_tps'):.2f}x" if ref else "-"
        print(
            f"| {name} | {med(name, 'decode_tps'):.1f} | {med(name, 'prefill_tps'):.0f} | "
            f"{med(name, 'ttft_s') * 1000:.0f} ms | {med(name, 'load_s'):.1f} s | "
            f"{med(name, 'peak_rss') / 2**20:.0f} MiB | {vs_base} | {vs_ref} |"
        )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{len(os.sched_getaffinity(0))}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
