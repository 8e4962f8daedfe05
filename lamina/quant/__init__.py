"""Quantized linear layers behind one interface (`base.QuantizedLinear`), one file per scheme.

int8.py (per-channel weight-only int8), int4.py (group-wise int4 on the packed int4 kernels),
nf4.py (NF4/FP4 + double quant), llm_int8.py (LLM.int8() with float outlier columns), gptq.py
(GPTQ into the int4 layout), blocks.py (the native block kernel's tile layout), blockq.py (GGUF
blocks kept on the native kernel), gguf_convert.py (Q5_x, K-quants and IQ4 into those blocks),
gguf_formats.py (GGUF Q4_0/Q4_1/Q8_0 -> int4/int8 layouts, where the native kernel cannot run),
apply.py (`quantize_model`), checkpoint.py (save/load with a scheme file), load.py (quantize while
loading, used by `LLM.load`).
"""

from lamina.quant.apply import METHODS, quantize_model
from lamina.quant.base import QuantizedLinear
from lamina.quant.checkpoint import load_quantized_into, save_quantized

__all__ = ["METHODS", "QuantizedLinear", "load_quantized_into", "quantize_model", "save_quantized"]
