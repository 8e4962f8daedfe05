"""Calibration-free int4 at group size 128: Lamina against the reference tools, same model and text, one run.

    python benchmarks/int4_references.py [--model PATH.gguf] [--max-tokens 1024] [--decode-tokens 32]
                                         [--threads 1] [--work DIR] [--json]

Lamina's rows are `benchmarks/quant.py`'s (`--quantize int4`, `int4-minmax` and the calibrated `gptq`
for comparison, from the GGUF, real layers on its kernels). Each reference tool quantizes the linears
of the same float32 model (the GGUF dequantized by transformers' loader; the tied head stays as it is)
with its own calibration-free int4:

- hqq (`Quantizer.quantize`, 4 bits, its default zero-point optimization), with Lamina's groups and
  with its own (groups of 128 over the flattened weight, so a 576-wide row's groups straddle rows);
- torchao (`IntxWeightOnlyConfig(int4, PerGroup)`, asymmetric and symmetric);
- optimum-quanto (`qint4`, its fixed groups of 128 over the flattened weight).

"Lamina's groups" means 128 where it divides the layer and the largest of 64 / 32 that does elsewhere
(SmolLM2's 576-wide layers: 64), as `--group-size 128` does. The tools' rows are perplexity only: the
model runs in float32 on each tool's dequantized weights (what their CPU paths compute), so neither
their memory nor their speed is measured. A tool that is not installed is left out with a note
(`pip install hqq torchao optimum-quanto`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.hub_checkpoints import _Logits, float_checkpoint
from benchmarks.quant import measure
from lamina import LLM
from lamina.default_model import default_model_path
from lamina.engine.perplexity import default_text, perplexity

GROUP_SIZE = 128


def lamina_group(in_features: int) -> int:
    """The group `--group-size 128` gives a layer this wide."""
    group = GROUP_SIZE
    while in_features % group:
        group //= 2
    return group


def hqq_weight(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    group = group or GROUP_SIZE  # None: hqq's own grouping, over the flattened weight
    q, meta = Quantizer.quantize(
        weight, nbits=4, group_size=group, axis=1, bitpack=False, optimize=True,
        compute_dtype=torch.float32, device="cpu",
    )  # fmt: skip
    return Quantizer.dequantize(q, meta).reshape(weight.shape).float()


def torchao_weight(weight: torch.Tensor, symmetric: bool) -> torch.Tensor:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(lamina_group(weight.shape[1])), mapping_type=mapping
    )
    holder = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    holder[0].weight.data = weight.clone()
    quantize_(holder, config)
    return holder[0].weight.dequantize().float()


def quanto_weight(weight: torch.Tensor) -> torch.Tensor:
    from optimum.quanto import freeze, qint4, quantize

    holder = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    holder[0].weight.data = weight.clone()
    quantize(holder, weights=qint4)
    freeze(holder)
    return holder[0].qweight.dequantize().float()


#: label -> (module the tool needs, weight [N, K] -> its int4 weight dequantized)
TOOLS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "hqq, Lamina's groups": ("hqq", lambda w: hqq_weight(w, lamina_group(w.shape[1]))),
    "hqq, its groups": ("hqq", lambda w: hqq_weight(w, None)),
    "torchao asymmetric": ("torchao", lambda w: torchao_weight(w, symmetric=False)),
    "torchao symmetric": ("torchao", lambda w: torchao_weight(w, symmetric=True)),
    "quanto qint4, its groups": ("optimum.quanto", quanto_weight),
}


def tool_row(label: str, float_dir: Path, ids: list[int], requantize: Callable | None) -> dict[str, Any]:
    """Perplexity of transformers' float32 model with each linear but the head through `requantize`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if requantize is not None and isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(requantize(module.weight.detach()))
        ppl = perplexity(_Logits(model), ids, context=512, stride=256)
    return {"label": label, "perplexity": ppl.perplexity, "tokens": ppl.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a .gguf (default: bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="perplexity tokens")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="where the float32 checkpoint is written (default: temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = args.model or default_model_path()
    float_dir = (args.work or Path(tempfile.mkdtemp(prefix="lamina-int4-"))) / "float"
    if not float_dir.exists():
        float_checkpoint(gguf, float_dir)
    ids = LLM.load(gguf).tokenizer.encode(default_text(), add_special_tokens=False)[: args.max_tokens]

    lamina = SimpleNamespace(model=gguf, device="cpu", decode_tokens=args.decode_tokens)
    rows = [tool_row("float32, transformers", float_dir, ids, None)]
    for method in ("int4", "int4-minmax", "gptq"):
        row = measure(f"Lamina {method}", lamina, ids, quantize=method, group_size=GROUP_SIZE)
        rows.append(row)
    missing = set()
    for label, (module, requantize) in TOOLS.items():
        if importlib.util.find_spec(module.split(".")[0]) is None:
            missing.add(module)
            continue
        rows.append(tool_row(label, float_dir, ids, requantize))
    base = rows[0]["perplexity"]
    for row in rows:
        row["ppl_delta_pct"] = 100 * (row["perplexity"] / base - 1)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"int4, group size {GROUP_SIZE}: perplexity over {rows[0]['tokens']} tokens, {args.threads} thread(s)"
    )
    print(
        f"{'quantizer':<28}{'weights MB':>11}{'perplexity':>12}{'vs f32':>9}{'decode tok/s':>14}{'load s':>8}"
    )
    for r in rows:
        mb, speed, load = (
            f"{r[key] * scale:.1f}" if key in r else "-"
            for key, scale in (("weight_bytes", 1e-6), ("decode_tok_s", 1), ("load_s", 1))
        )
        print(
            f"{r['label']:<28}{mb:>11}{r['perplexity']:>12.3f}{r['ppl_delta_pct']:>+8.2f}%{speed:>14}{load:>8}"
        )
    for module in sorted(missing):
        print(f"(not installed, left out: {module})")


if __name__ == "__main__":
    main()
