"""How long int4 takes to quantize a layer: Lamina's zero-point choices against the hqq package, one run.

    python benchmarks/int4_quantize_speed.py [--rows 4096] [--cols 14336] [--group-size 128]
                                             [--threads 2] [--repeats 3] [--json]

A bfloat16 layer of Student-t weights (3 degrees of freedom, std 0.02, as a trained layer's tails
look) quantized whole by each row's method; the best of --repeats runs. Lamina's rows are
`quantize_rtn` (codes, scales and zeros in its layout): HQQ's zero points with the native steps
(`kernels/hqq.c`, the default on x86-64 CPUs), with the torch steps (as on other CPUs), and min/max.
hqq's row is its own `Quantizer.quantize` (4 bits, its default optimization, float32 compute, no
bit packing) on the same weights, when the package is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lamina.kernels import native
from lamina.quant.int4 import quantize_rtn


def best_time(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def with_torch_steps(run: Callable[[], object]) -> Callable[[], object]:
    """`run` as on a CPU without the native kernels."""

    def wrapped() -> object:
        library = native.library
        native.library = lambda: None
        try:
            return run()
        finally:
            native.library = library

    return wrapped


def hqq_run(weight: torch.Tensor, group_size: int) -> Callable[[], object] | None:
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        return None
    return lambda: Quantizer.quantize(
        weight, nbits=4, group_size=group_size, axis=1, bitpack=False, optimize=True,
        compute_dtype=torch.float32, device="cpu",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = (torch.distributions.StudentT(3.0).sample((args.rows, args.cols)) * 0.02).bfloat16()
    runs: dict[str, Callable[[], object] | None] = {
        "Lamina int4, native steps": (
            (lambda: quantize_rtn(weight, args.group_size, "hqq")) if native.library() else None
        ),
        "Lamina int4, torch steps": with_torch_steps(lambda: quantize_rtn(weight, args.group_size, "hqq")),
        "Lamina int4-minmax": lambda: quantize_rtn(weight, args.group_size, "minmax"),
        "hqq Quantizer.quantize": hqq_run(weight, args.group_size),
    }
    rows = []
    for label, run in runs.items():
        if run is None:
            rows.append({"label": label, "seconds": None})
            continue
        seconds = best_time(run, args.repeats)
        rows.append({"label": label, "seconds": seconds, "m_weights_per_s": weight.numel() / seconds / 1e6})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"int4 quantization of a {args.rows} x {args.cols} bf16 layer, group size {args.group_size}, "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    print(f"{'quantizer':<28}{'seconds':>9}{'M weights/s':>13}")
    for row in rows:
        if row["seconds"] is None:
            print(f"{row['label']:<28}{'(not available here)':>22}")
            continue
        print(f"{row['label']:<28}{row['seconds']:>9.2f}{row['m_weights_per_s']:>13.1f}")


if __name__ == "__main__":
    main()
