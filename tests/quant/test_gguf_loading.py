"""Loading a GGUF kept quantized builds its linears straight from the stored blocks."""

from __future__ import annotations

from lamina.api import LLM
from lamina.loading.gguf import GGUFCheckpoint
from lamina.quant.base import QuantizedLinear


def test_quantized_linears_are_never_expanded_to_float(monkeypatch):
    read_as_float = []
    original = GGUFCheckpoint.read

    def spy(self, name):
        read_as_float.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFCheckpoint, "read", spy)
    llm = LLM.load(device="cpu")
    quantized = [name for name, m in llm.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) >= 4 * llm.config.num_hidden_layers  # qkv, o, gate_up, down (fused)
    # Only norms (and the embedding, turned int8 after loading) are read as float.
    assert not [n for n in read_as_float if n.endswith("_proj.weight")]
    assert "Paris" in llm.generate("The capital of France is", max_new_tokens=6, temperature=0)
