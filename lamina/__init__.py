"""Lamina: run transformer language models on whatever memory a machine has.

from lamina import LLM
llm = LLM.load()                      # the bundled SmolLM2-135M-Instruct
print(llm.generate("The capital of France is", max_new_tokens=16, temperature=0))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError

if TYPE_CHECKING:
    from lamina.api import LLM
    from lamina.placement import init_empty, load_and_dispatch, plan

__all__ = ["LLM", "LaminaError", "init_empty", "load_and_dispatch", "plan"]
__version__ = "0.1.0"

# The API, imported on first use (PEP 562): `lamina.cli` then starts without importing torch, so a
# Ctrl-C during the command's startup reaches its handler instead of printing a traceback.
_LAZY = {
    "LLM": "lamina.api",
    "init_empty": "lamina.placement",
    "load_and_dispatch": "lamina.placement",
    "plan": "lamina.placement",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lamina' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
