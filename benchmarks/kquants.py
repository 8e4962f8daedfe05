"""A llama.cpp K-quant, IQ or MXFP4 file (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, IQ4_XS, IQ3_M, MXFP4) kept vs
expanded to float32: weights, perplexity and decode tokens/s in one run.

    python benchmarks/kquants.py [--preset Q2_K|Q3_K_M|Q4_K_M|Q5_K_M|IQ4_XS|IQ3_M|MXFP4 | --gguf FILE]
                                 [--max-tokens 1024] [--decode-tokens 32] [--threads 2]

Without --gguf, the bundled SmolLM2-135M-Instruct (Q4_1) is re-quantized to --preset with llama.cpp's
own quantizer (`llama-cpp-python`, `pip install -e .[bench]`) into ~/.cache/lamina/bench/. SmolLM2's
576-wide matrices are not a multiple of 256, so llama.cpp stores most of them as Q4_0 / Q5_0 / Q5_1
(IQ4_NL for IQ4_XS); ffn_down (1536 wide) gets the K-quants (IQ4_XS) and attn_v Q8_0. (Q3_K_M's
Q3_K matrices are all 576 wide, so its file holds no Q3_K; the Q2_K preset's ffn_down are Q3_K; IQ3_M's are
IQ3_S. IQ2 and IQ1 presets need an importance matrix, which llama.cpp's quantizer is not given here.)
MXFP4 is made by gguf-py's quantizer instead (every matrix, the embedding included). For
llama.cpp's and transformers' speed on the same
file: `python benchmarks/compare.py --model FILE`.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

from lamina import LLM
from lamina.default_model import default_model_path
from lamina.engine.perplexity import default_text, perplexity
from lamina.loading.gguf_header import read_gguf

PROMPT = "The Python language reference describes"


def make_kquant(preset: str) -> Path:
    """The bundled model re-quantized to `preset` by llama.cpp (once; reused while it exists)."""
    out = Path.home() / f".cache/lamina/bench/smollm2-135m-{preset.lower()}.gguf"
    if out.exists():
        return out
    if preset == "MXFP4":
        return make_mxfp4(out)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize = True  # the source is Q4_1: llama.cpp dequantizes it first
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(default_model_path()).encode(), str(partial).encode(), params):
        raise SystemExit("llama.cpp's quantizer failed")
    partial.rename(out)
    return out


def make_mxfp4(out: Path) -> Path:
    """The bundled model with every quantized matrix re-quantized to MXFP4 by gguf-py's quantizer (the
    reference implementation): llama.cpp's quantizer has no dense MXFP4 type (its MXFP4_MOE preset
    turns a dense model's matrices into Q8_0)."""
    import gguf

    reader = gguf.GGUFReader(default_model_path())
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(out.with_suffix(".part"), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the header's own counts, and what the writer adds itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, columns] float32
        mxfp4 = gguf.quants.quantize(values, gguf.GGMLQuantizationType.MXFP4)
        writer.add_tensor(tensor.name, mxfp4, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_suffix(".part").rename(out)
    return out


def measure(label: str, path: Path, ids: list[int], args: argparse.Namespace, **load) -> dict:
    started = time.perf_counter()
    llm = LLM.load(str(path), device="cpu", **load)
    load_s = time.perf_counter() - started
    ppl = perplexity(llm.model, ids, context=512, stride=256)
    llm.generate(PROMPT, max_new_tokens=4, temperature=0)  # warm-up
    text = llm.generate(PROMPT, max_new_tokens=args.decode_tokens, temperature=0)
    return {
        "label": label,
        "weight_mb": sum(llm.memory_footprint().values()) / 1e6,
        "perplexity": ppl.perplexity,
        "decode_tok_s": llm.last_stats.decode_tokens_per_s,
        "load_s": load_s,
        "text": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, help="a K-quant GGUF (default: make SmolLM2 --preset)")
    parser.add_argument(
        "--preset",
        choices=("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "IQ4_XS", "IQ3_M", "MXFP4"),
        default="Q4_K_M",
    )
    parser.add_argument("--max-tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or make_kquant(args.preset)

    _, tensors = read_gguf(path)
    types = collections.Counter(t.ggml_type.name for t in tensors.values() if len(t.dims) == 2)
    print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB; matrices by type: {dict(types.most_common())}")
    probe = LLM.load(str(path), device="cpu", quantize="none")
    ids = probe.tokenizer.encode(default_text(), add_special_tokens=False)[: args.max_tokens]
    del probe
    rows = [
        measure("kept quantized (default)", path, ids, args),
        measure("expanded to float32", path, ids, args, quantize="none"),
    ]
    print(
        f"perplexity over {len(ids) - 1} tokens, decode {args.decode_tokens} tokens, {args.threads} thread(s)"
    )
    print(f"{'load':26} {'weights MB':>10} {'perplexity':>11} {'decode tok/s':>13} {'load s':>7}")
    for row in rows:
        print(
            f"{row['label']:26} {row['weight_mb']:10.1f} {row['perplexity']:11.4f} "
            f"{row['decode_tok_s']:13.1f} {row['load_s']:7.2f}"
        )
    print("same greedy text:", rows[0]["text"] == rows[1]["text"])


if __name__ == "__main__":
    main()
