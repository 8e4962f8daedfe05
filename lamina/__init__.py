"""Lamina: run transformer language models on whatever memory a machine has.

from lamina import LLM
llm = LLM.load()                      # the bundled SmolLM2-135M-Instruct
print(llm.generate("The capital of France is", max_new_tokens=16, temperature=0))
"""

from lamina.api import LLM
from lamina.errors import LaminaError
from lamina.placement import init_empty, load_and_dispatch, plan

__all__ = ["LLM", "LaminaError", "init_empty", "load_and_dispatch", "plan"]
__version__ = "0.1.0"
