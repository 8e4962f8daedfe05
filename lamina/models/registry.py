"""Which model class runs which checkpoint, keyed by HF `architectures`.

An entry is the family's model class plus config values the architecture implies but its
`config.json` does not spell out (Qwen2's q/k/v biases, for example).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lamina.config import ModelConfig
from lamina.errors import UnsupportedModelError
from lamina.models.bloom import BloomForCausalLM
from lamina.models.falcon import FalconForCausalLM
from lamina.models.gemma import GemmaForCausalLM
from lamina.models.gpt2 import GPT2LMHeadModel
from lamina.models.gpt_neox import GPTNeoXForCausalLM
from lamina.models.llama import LlamaForCausalLM
from lamina.models.opt import OPTForCausalLM
from lamina.models.phi import PhiForCausalLM
from lamina.models.phi3 import Phi3ForCausalLM
from lamina.models.t5 import T5ForConditionalGeneration


@dataclass(frozen=True)
class Architecture:
    model_class: type[nn.Module]
    config_overrides: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(LlamaForCausalLM),
    "MistralForCausalLM": Architecture(LlamaForCausalLM),
    "Qwen2ForCausalLM": Architecture(LlamaForCausalLM, {"qkv_bias": True, "attention_bias": False}),
    "Qwen3ForCausalLM": Architecture(LlamaForCausalLM, {"qk_norm": True}),
    "GemmaForCausalLM": Architecture(GemmaForCausalLM),
    # Gemma 2 slides on every other layer; its first config.json files predate `layer_types`
    "Gemma2ForCausalLM": Architecture(
        GemmaForCausalLM, {"sandwich_norms": True, "sliding_window_pattern": 2}
    ),
    "Gemma3ForCausalLM": Architecture(GemmaForCausalLM, {"sandwich_norms": True, "qk_norm": True}),
    "Phi3ForCausalLM": Architecture(Phi3ForCausalLM),
    "PhiForCausalLM": Architecture(PhiForCausalLM),
    "GPT2LMHeadModel": Architecture(GPT2LMHeadModel),
    "GPTNeoXForCausalLM": Architecture(GPTNeoXForCausalLM),
    "FalconForCausalLM": Architecture(FalconForCausalLM),
    "BloomForCausalLM": Architecture(BloomForCausalLM),
    "OPTForCausalLM": Architecture(OPTForCausalLM),
    "T5ForConditionalGeneration": Architecture(T5ForConditionalGeneration),
}


def resolve(hf_config: dict[str, Any]) -> tuple[type[nn.Module], ModelConfig]:
    """The model class and its parsed config for an HF config dict."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            arch = ARCHITECTURES[name]
            config = arch.model_class.config_class.from_hf_dict(
                hf_config, architecture=name, **arch.config_overrides
            )
            return arch.model_class, config
    found = ", ".join(names) if names else f"none (model_type {hf_config.get('model_type')!r})"
    raise UnsupportedModelError(
        f"unsupported architecture: {found}; supported: {', '.join(sorted(ARCHITECTURES))}"
    )
