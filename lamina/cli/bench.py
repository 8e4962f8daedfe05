"""`lamina bench`: load time, time to first token, prefill and decode rates, memory and bandwidth.

Greedy, no stop tokens, a prompt of real text (CPython's docs) cut to --prompt-len tokens. A short
warm-up generation runs first (and compiles the decode step with --compile), then --repeat timed
runs; the median run is reported. --json prints one object (schema: BenchResult in
lamina/engine/benchmark.py).

With --draft the model decodes speculatively (one sequence, eagerly) and the report adds the share
of drafted tokens accepted. Weight bytes and bandwidth stay the model's own: the achieved figure is
then an effective one (tokens/s times the model's bytes a token) and may exceed the machine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch

from lamina.cli.common import add_draft_args, add_model_args
from lamina.errors import InvalidArgumentError
from lamina.kernels import native


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure load, prefill and decode speed", description=__doc__
    )
    parser.add_argument("model_path", nargs="?", metavar="MODEL", help="same as --model")
    parser.add_argument(
        "--prompt-len", type=int, default=512, metavar="N", help="prompt tokens (default: 512)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default: 128)"
    )
    parser.add_argument(
        "--batch", type=int, default=1, metavar="B", help="sequences decoded together (default: 1)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, metavar="R", help="timed runs; the median is shown (default: 3)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_model_args(parser)
    add_draft_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lamina.api import resolve_device
    from lamina.cli.common import load_model_from_args
    from lamina.engine.benchmark import (
        BenchResult,
        matvec_bandwidth,
        peak_memory,
        run_benchmark,
        run_speculative_benchmark,
        weight_bytes,
    )

    for flag in ("prompt_len", "batch", "repeat"):
        if getattr(args, flag) < 1:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.new_tokens < 2:  # the first new token comes from the prefill: decoding starts at the second
        raise InvalidArgumentError(f"--new-tokens must be >= 2 to time decoding, got {args.new_tokens}")
    if args.model_path is not None and args.model is not None and args.model != args.model_path:
        raise InvalidArgumentError("give the model either as MODEL or as --model, not both")
    args.model = args.model_path or args.model
    if args.draft is not None and args.batch != 1:
        raise InvalidArgumentError("--draft decodes one sequence at a time; use --batch 1")
    started = time.perf_counter()
    llm = load_model_from_args(args)
    load_s = time.perf_counter() - started
    context = llm.config.max_position_embeddings
    if args.prompt_len + args.new_tokens > context:
        raise InvalidArgumentError(
            f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the context {context}"
        )
    device = resolve_device(args.device)
    prompt = _prompt_ids(llm, args.prompt_len, args.batch, llm.device)
    if llm.draft is not None:
        measure = partial(run_speculative_benchmark, llm.model, llm.drafter(), k=llm.speculative_k)
    else:
        measure = partial(run_benchmark, llm.model, decoder=llm.decoder)
    measure(prompt[:, :16], 4)  # warm-up: allocator, kernels, compile
    compile_s = llm.decoder.compile_s if llm.decoder is not None else 0.0
    runs = sorted((measure(prompt, args.new_tokens) for _ in range(args.repeat)), key=lambda r: r["decode_s"])
    timing = runs[len(runs) // 2]
    total_bytes, step_bytes = weight_bytes(llm.model)
    decode_rate = (args.new_tokens - 1) * args.batch / timing["decode_s"]
    achieved = step_bytes * decode_rate / args.batch / 1e9
    rss, gpu = peak_memory(device)  # before the bandwidth probe, whose 256 MB matrix is not the model's
    machine = matvec_bandwidth(device)
    result = BenchResult(
        model=str(llm.source),
        device=str(llm.device),
        dtype=str(llm.model.model.norm.weight.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        compiled=llm.decoder is not None,
        batch=args.batch,
        prompt_tokens=args.prompt_len,
        new_tokens=args.new_tokens,
        load_s=load_s,
        compile_s=compile_s,
        ttft_s=timing["ttft_s"],
        prefill_s=timing["prefill_s"],
        prefill_tokens_per_s=args.prompt_len * args.batch / timing["prefill_s"],
        decode_s=timing["decode_s"],
        decode_tokens_per_s=decode_rate,
        peak_rss_bytes=rss,
        peak_gpu_bytes=gpu,
        weight_bytes=total_bytes,
        weight_bytes_per_token=step_bytes,
        achieved_gb_per_s=achieved,
        machine_gb_per_s=machine,
        bandwidth_share=achieved / machine,
        kernels=_kernels(llm.device),
        draft=llm.draft_name,
        speculative_k=llm.speculative_k if llm.draft is not None else None,
        acceptance_rate=timing.get("acceptance_rate"),
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        _print_table(result)
    return 0


def _prompt_ids(llm: object, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """[batch, length] token ids of CPython's documentation text, repeated if it is too short."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))[: length * 8]
    ids = llm.tokenizer.encode(text, add_special_tokens=False)[:length]
    ids = (ids * (length // max(len(ids), 1) + 1))[:length]
    return torch.tensor([ids] * batch, dtype=torch.long, device=device)


def _kernels(device: torch.device) -> str:
    """Which kernels a CPU run uses: Lamina's native ones and their build, or torch's and why."""
    if device.type != "cpu":
        return "torch"
    reason = native.unavailable_reason()
    return f"native ({native.selected_isa()})" if reason is None else f"torch ({reason})"


def _print_table(r: object) -> None:
    rows = [
        ("model", r.model),
        ("device / dtype / threads", f"{r.device} / {r.dtype} / {r.threads}"),
        ("kernels", r.kernels),
        ("compiled decode step", f"{r.compiled} (warm-up {r.compile_s:.1f} s)"),
        ("load", f"{r.load_s:.2f} s"),
        ("time to first token", f"{r.ttft_s * 1000:.0f} ms ({r.prompt_tokens} prompt tokens x {r.batch})"),
        ("prefill", f"{r.prefill_tokens_per_s:.0f} tokens/s"),
        ("decode", f"{r.decode_tokens_per_s:.1f} tokens/s ({r.new_tokens} new tokens x {r.batch})"),
        ("peak memory", f"{r.peak_rss_bytes / 2**20:.0f} MiB RSS, {r.peak_gpu_bytes / 2**20:.0f} MiB GPU"),
        ("weights", f"{r.weight_bytes / 1e6:.0f} MB, {r.weight_bytes_per_token / 1e6:.0f} MB read per step"),
        (
            "weight bandwidth",
            f"{r.achieved_gb_per_s:.1f} GB/s = {r.bandwidth_share:.0%} of this machine's "
            f"mat-vec {r.machine_gb_per_s:.1f} GB/s",
        ),
    ]
    if r.draft is not None:
        speculative = f"draft {r.draft}, K={r.speculative_k}, {r.acceptance_rate:.0%} accepted"
        rows.insert(7, ("speculative decoding", speculative))  # after decode
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stdout)
