"""Loading keeps peak memory near the size of the weights (no second copy of the state dict)."""

from __future__ import annotations

import json
import subprocess
import sys

MEASURE = """
import json, resource, torch
from lamina import LLM
torch.ones(1)  # torch's and Lamina's import-time memory belongs to the baseline, and so do
torch.empty(2, device="meta").normal_()  # the ~80 MB torch spends once on meta-device init ops
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
llm = LLM.load(device="cpu", quantize="none")  # the float32 path; the default keeps GGUF blocks
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
print(json.dumps({"base": base, "peak": peak, "weights": weights}))
"""


def test_default_model_load_peak_is_near_weight_size():
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["weights"] > 500e6  # float32 SmolLM2-135M
    # Weights + the GGUF file's mapped pages (~100 MB) + the tokenizer come to ~1.57x (measured);
    # a second full copy of the weights (a state dict beside the model) would be >= 2x.
    assert m["peak"] - m["base"] < 1.65 * m["weights"], m
