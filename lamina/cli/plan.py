"""`lamina plan`: where each layer would go under --max-memory, and the decode time to expect.

Nothing is loaded: the model is built on the meta device from the checkpoint's metadata. The
prediction times one decoding step from the bytes on each tier and this machine's measured
bandwidths: resident weights are read once per token at memory speed; streamed layers arrive at
their tier's speed (disk read, or host-to-device) while the previous layer computes, so a token
takes the longer of the two. A GGUF is sized as it will run: its quantized blocks where they stay
quantized (budgets on CPU RAM and disk only, on the native kernel), float32 or --dtype elsewhere.
"""

from __future__ import annotations

import argparse
import tempfile

from lamina.placement.memory import Bandwidths, format_size
from lamina.placement.plan import STRATEGIES, Plan


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="show the placement under --max-memory", description=__doc__)
    parser.add_argument(
        "model", nargs="?", help="HF model directory or .gguf file (default: the bundled model)"
    )
    parser.add_argument(
        "--max-memory", metavar="SPEC", help="e.g. cpu=300MB,cuda:0=4GB (default: what is free)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES)
    parser.add_argument("--prefetch", type=int, default=1, metavar="K", help="layers read ahead (default: 1)")
    parser.add_argument(
        "--offload-dir", metavar="DIR", help="where disk-tier layers would live (bandwidth test)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lamina.api import resolve_dtype
    from lamina.default_model import model_path
    from lamina.errors import InvalidArgumentError
    from lamina.loading.checkpoint import open_checkpoint
    from lamina.loading.loader import build_empty
    from lamina.placement.memory import default_max_memory, measure_bandwidths, parse_max_memory
    from lamina.placement.offload_store import prepare_dir
    from lamina.placement.plan import plan
    from lamina.quant.gguf_stream import streamed_blocks
    from lamina.quant.load import prequantized_scheme

    budget = parse_max_memory(args.max_memory)  # a bad spec fails before anything is opened
    dtype = resolve_dtype(args.dtype)
    scratch = prepare_dir(args.offload_dir) if args.offload_dir is not None else tempfile.gettempdir()
    with open_checkpoint(model_path(args.model)) as checkpoint:
        scheme = prequantized_scheme(checkpoint)
        if scheme is not None:  # LLM.load refuses max_memory for it: a plan would promise what cannot run
            raise InvalidArgumentError(
                f"the checkpoint is quantized as {scheme.describe()}; placement plans float weights only "
                "yet and it loads whole, without --max-memory (`lamina info` shows its size)"
            )
        model, _ = build_empty(checkpoint)
        # a GGUF's blocks, sized as `LLM.load` keeps them (CPU and disk budgets)
        streamed_blocks(model, checkpoint, None, budget or default_max_memory(), dtype)
    the_plan = plan(model, budget, strategy=args.strategy, dtype=dtype, prefetch=args.prefetch)
    print(the_plan)
    print()
    print(prediction(the_plan, measure_bandwidths(scratch)))
    return 0


def prediction(the_plan: Plan, bw: Bandwidths) -> str:
    """Measured bandwidths and the predicted time per decoded token, cold disk and page cache."""
    totals = the_plan.totals()
    gpu_bytes = sum(n for t, n in totals.items() if t.startswith("cuda"))
    streamed = the_plan.streamed_bytes()
    lines = [f"bandwidth: RAM {bw.ram / 1e9:.1f} GB/s, disk read {bw.disk / 1e9:.2f} GB/s"]
    if bw.host_to_device:
        lines[0] += f", host-to-device {bw.host_to_device / 1e9:.1f} GB/s, GPU {bw.gpu / 1e9:.0f} GB/s"
    if the_plan.on_cpu:
        compute = sum(totals.values()) / bw.ram  # every weight is read from RAM (or page cache) once
        cold = max(compute, streamed.get("disk", 0) / bw.disk)
        warm = compute
    else:
        compute = (gpu_bytes + sum(streamed.values())) / bw.gpu
        h2d = sum(streamed.values()) / bw.host_to_device
        cold = max(compute, h2d, streamed.get("disk", 0) / bw.disk)
        warm = max(compute, h2d)
    lines.append(f"streamed per token: {format_size(sum(streamed.values()))}")
    lines.append(
        f"predicted decode: {cold * 1e3:.1f} ms/token ({1 / cold:.1f} tok/s) with disk-tier layers read from disk"
    )
    if streamed.get("disk"):
        lines.append(
            f"                  {warm * 1e3:.1f} ms/token ({1 / warm:.1f} tok/s) with them in the page cache"
        )
    return "\n".join(lines)
