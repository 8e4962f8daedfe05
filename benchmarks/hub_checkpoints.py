"""Checkpoints other tools quantized, loaded by Lamina: weights, perplexity, decode speed.

    python benchmarks/hub_checkpoints.py [--model PATH.gguf] [--group-size 128] [--max-tokens 1024]
                                         [--decode-tokens 32] [--threads 1] [--work DIR] [--kinds ...]

No GPTQ or AWQ tool runs on this machine (GPTQModel needs a CUDA torch), so those checkpoints are
written here with the reference packers (`tests/quant/hub_packers.py`, GPTQModel's and AutoAWQ's
layouts) from the default model's weights, round-to-nearest: GPTQ v1 symmetric, GPTQ v1 symmetric
with an act-order g_idx (inputs ordered by decreasing weight-column norm, a stand-in for diag(H)),
AWQ GEMM asymmetric, GPTQ v1 8-bit symmetric, all at --group-size, and compressed-tensors
pack-quantized symmetric at group size 64 (packed by compressed-tensors itself, which needs groups that
divide 576), int-quantized W8A8 (int8 weights per channel, int8 activations per token declared) and
NVFP4 and MXFP4 (compressed-tensors' own compressors: E2M1 with an e4m3 scale per 16 and a global
scale, or a power-of-two scale per 32); and FP8 in transformers' FineGrainedFP8 layout (e4m3 weights, a float32 scale per 128 x 128 block).
Their other
tensors are fp16, as those tools save them. Each has a twin with the projections in float32 holding
s (q - z), the weights the tools themselves dequantize to: what a dequantizing loader computes.
Same perplexity text and windows as `benchmarks/quant.py`. Perplexity shows the load is exact
(against the twin), not GPTQ's quality: round-to-nearest of SmolLM2's already-4-bit weights at group
size 128 loses ~40% (NOTES finding 17).

transformers + compressed-tensors also runs the compressed-tensors checkpoints (it decompresses the
int4 one to float, and quantizes W8A8's activations per token). Then bitsandbytes checkpoints made by the tool itself: transformers + bitsandbytes quantize
the float model on the CPU (NF4 double-quantized, and LLM.int8) and `save_pretrained` it; each is run
by transformers + bitsandbytes (the reference, "vs ref" is against it) and by Lamina.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository root: benchmarks.quant, tests.quant

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from benchmarks.quant import PROMPT
from benchmarks.quant import measure as quant_row
from lamina import LLM
from lamina.default_model import default_model_path
from lamina.engine.perplexity import default_text, perplexity
from tests.quant.hub_packers import (
    FP4_WEIGHTS,
    PROJECTIONS,
    dequantized,
    pack_awq,
    pack_fp4,
    pack_fp8_blocks,
    pack_gptq,
    quantize,
)

#: The checkpoints written here (`write_pair`), then the ones bitsandbytes writes.
KINDS = ("gptq", "gptq-act-order", "awq", "gptq-8bit", "compressed-tensors", "w8a8", "nvfp4", "mxfp4", "fp8")
BNB_VARIANTS = ("nf4-dq", "int8")
#: Kinds transformers + compressed-tensors runs too, and the dtype it runs them in (its NVFP4 layers
#: hand a CPU matmul bf16 weights, which float32 activations fail against).
TRANSFORMERS_DTYPES = {
    "compressed-tensors": torch.float32,
    "w8a8": torch.float32,
    "nvfp4": torch.bfloat16,
    "mxfp4": torch.bfloat16,
}


def float_checkpoint(gguf: Path, out: Path) -> None:
    """The GGUF dequantized to a float32 HF directory, by transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # the weights are float now
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)  # a GGUF load won't save
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


#: Projections that read the same input, so GPTQ's act-order (from that input's Hessian) orders alike.
SHARED_INPUT = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def norm_rank(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Each input's place [K] when the columns of `name`'s weight, and those of the projections reading
    the same input, are sorted by decreasing norm: act-order's order, with the column norm standing
    in for diag(H), shared as the Hessian is."""
    module, _, _ = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    group = SHARED_INPUT.get(leaf)
    siblings = [
        n for n in state if group and SHARED_INPUT.get(n.rpartition(".")[0].rpartition(".")[2]) == group
    ]
    siblings = [n for n in siblings if n.startswith(f"{parent}.") and n.endswith(".weight")] or [name]
    norms = torch.stack([state[n].norm(dim=0) for n in siblings]).norm(dim=0)  # [K]
    rank = torch.empty(norms.numel(), dtype=torch.long)
    rank[norms.argsort(descending=True)] = torch.arange(norms.numel())
    return rank


def write_pair(src: Path, quantized: Path, twin: Path, kind: str, group_size: int) -> None:
    """`quantized`: src's decoder projections packed as `kind` (a `KINDS` entry) and its other tensors
    in fp16, as those tools save them; `twin`: the same with the projections in float32, set to
    s (q - z)."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    packed, twin_state = {}, {}
    for name, w in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
            packed[name] = twin_state[name] = w.half()
            continue
        if kind == "fp8":  # transformers' FineGrainedFP8 layout, 128 x 128 blocks
            packed[name], packed[f"{module}.weight_scale_inv"], twin_state[name] = pack_fp8_blocks(
                w, 128, 128
            )
            continue
        if kind in FP4_WEIGHTS:  # compressed-tensors' own NVFP4 / MXFP4 compressor
            parts, twin_state[name] = pack_fp4(w, kind)
            packed.update({f"{module}.{part}": t for part, t in parts.items()})
            continue
        k = w.shape[1]
        bits = 8 if kind in ("gptq-8bit", "w8a8") else 4
        group = k if kind == "w8a8" else group_size  # W8A8: a scale per output channel
        rank = norm_rank(state, name) if kind == "gptq-act-order" else torch.arange(k)
        order = rank.argsort()  # the inputs in group order
        q, s, z = quantize(w[:, order], group, sym=kind != "awq", bits=bits)
        q = q[:, rank]  # back to the stored input order
        g_idx = rank // group
        twin_state[name] = dequantized(q, s, z, g_idx)
        if kind == "compressed-tensors":  # q - 8 in -8..7 with llm-compressor's own packer; symmetric
            parts = {"weight_packed": pack_to_int32((q - 8).to(torch.int8), 4), "weight_scale": s.to(w.dtype)}
            parts["weight_shape"] = torch.tensor(list(w.shape))
        elif kind == "w8a8":  # int-quantized: q - 128 as int8, an fp16 scale per row
            parts = {"weight": (q - 128).to(torch.int8), "weight_scale": s.half()}
        elif kind == "awq":
            parts = pack_awq(q, s, z)
        else:
            parts = pack_gptq(q, s, z, g_idx, v1=True, bits=bits)
        packed.update({f"{module}.{part}": t for part, t in parts.items()})
    for directory, tensors in ((quantized, packed), (twin, twin_state)):
        shutil.copytree(src, directory)
        save_file(tensors, str(directory / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    w8a8 = {
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        },
    }
    config["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        if kind == "fp8"
        else {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "version": "gemm",
            "zero_point": True,
        }
        if kind == "awq"
        else {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        }
        if kind == "compressed-tensors"
        else {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], **w8a8}},
            "ignore": ["lm_head"],
        }
        if kind == "w8a8"
        else {
            "quant_method": "compressed-tensors",
            "format": f"{kind}-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": FP4_WEIGHTS.get(kind)}},
            "ignore": ["lm_head"],
        }
        if kind in FP4_WEIGHTS
        else {
            "quant_method": "gptq",
            "bits": 8 if kind == "gptq-8bit" else 4,
            "group_size": group_size,
            "desc_act": kind == "gptq-act-order",
            "sym": True,
            "checkpoint_format": "gptq",
        }
    )
    (quantized / "config.json").write_text(json.dumps(config))


def bitsandbytes_checkpoint(src: Path, out: Path, variant: str) -> None:
    """src quantized by transformers + bitsandbytes on the CPU (`variant`: nf4, nf4-dq, int8), saved."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = (
        {"load_in_8bit": True}
        if variant == "int8"
        else {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": variant == "nf4-dq",
        }
    )
    config = BitsAndBytesConfig(**options, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    for tokenizer_file in src.glob("tokenizer*"):
        shutil.copy(tokenizer_file, out)


class _Logits(torch.nn.Module):
    """A transformers model as `perplexity` takes it: ids [1, T] -> logits [1, T, V]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def measure_transformers(
    label: str, path: Path, ids: list[int], decode_tokens: int, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """The same numbers for transformers (+ bitsandbytes where the checkpoint says so) on the CPU, in
    `dtype` (None: transformers' default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    options = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **options).eval()
    load_s = time.perf_counter() - started
    with torch.no_grad():
        ppl = perplexity(_Logits(model), ids, context=512, stride=256)
        prompt = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
        times = []
        for new_tokens in (1, decode_tokens + 1):  # decode rate: the difference, without the prefill
            started = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - started)
    return {
        "label": label,
        "weight_bytes": model.get_memory_footprint(),
        "perplexity": ppl.perplexity,
        "tokens": ppl.tokens,
        "decode_tok_s": decode_tokens / (times[1] - times[0]),
        "load_s": load_s,
    }


def measure(label: str, path: Path, ids: list[int], decode_tokens: int) -> dict[str, Any]:
    """`benchmarks/quant.py`'s row for the checkpoint at `path`, loaded by Lamina as stored."""
    return quant_row(label, SimpleNamespace(model=path, device="cpu", decode_tokens=decode_tokens), ids)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a .gguf (default: bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--kinds", nargs="*", default=[*KINDS, *BNB_VARIANTS], help="rows to measure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="lamina-hub-"))
    src = work / "float"
    if not src.exists():
        float_checkpoint(args.model or default_model_path(), src)

    ids = LLM.load(src).tokenizer.encode(default_text(), add_special_tokens=False)[: args.max_tokens]
    rows = []
    for kind in [k for k in KINDS if k in args.kinds]:
        quantized, twin = work / kind, work / f"{kind}-dequantized"
        # compressed-tensors needs groups that divide the layer (SmolLM2's 576 does not divide by 128)
        group_size = 64 if kind == "compressed-tensors" else args.group_size
        if not quantized.exists():
            write_pair(src, quantized, twin, kind, group_size)
        twin_row = measure(f"{kind} as float32", twin, ids, args.decode_tokens)
        label = {
            "fp8": f"{kind} 128x128 blocks",
            "w8a8": "w8a8 per channel",
            "nvfp4": "nvfp4 g16",
            "mxfp4": "mxfp4 g32",
        }.get(kind, f"{kind} g{group_size}")
        row = measure(label, quantized, ids, args.decode_tokens)
        row["ppl_vs_twin_pct"] = 100 * (row["perplexity"] / twin_row["perplexity"] - 1)
        twin_row["ppl_vs_twin_pct"] = 0.0
        rows += [twin_row, row]
        if kind in TRANSFORMERS_DTYPES:  # transformers + compressed-tensors reads these too
            dtype = TRANSFORMERS_DTYPES[kind]
            label = f"{kind}, transformers ({str(dtype).removeprefix('torch.')})"
            reference = measure_transformers(label, quantized, ids, args.decode_tokens, dtype)
            reference["ppl_vs_twin_pct"] = 100 * (reference["perplexity"] / twin_row["perplexity"] - 1)
            rows.append(reference)
    for variant in [v for v in BNB_VARIANTS if v in args.kinds]:
        saved = work / f"bnb-{variant}"
        if not saved.exists():
            bitsandbytes_checkpoint(src, saved, variant)
        reference = measure_transformers(f"bnb {variant}, transformers", saved, ids, args.decode_tokens)
        row = measure(f"bnb {variant}, Lamina", saved, ids, args.decode_tokens)
        reference["ppl_vs_twin_pct"] = 0.0
        row["ppl_vs_twin_pct"] = 100 * (row["perplexity"] / reference["perplexity"] - 1)
        rows += [reference, row]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"perplexity over {rows[0]['tokens']} tokens, decode {args.decode_tokens} tokens, {args.threads} thread(s)"
    )
    print(
        f"{'checkpoint':<34}{'weights MB':>11}{'perplexity':>12}{'vs ref':>10}{'decode tok/s':>14}{'load s':>8}"
    )
    for r in rows:
        print(
            f"{r['label']:<34}{r['weight_bytes'] / 1e6:>11.1f}{r['perplexity']:>12.3f}"
            f"{r['ppl_vs_twin_pct']:>+9.3f}%{r['decode_tok_s']:>14.1f}{r['load_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
