"""Shared fixtures for the placement tests: a toy model (d=32) and its checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.placement.toy_models import Toy

D = 32


@pytest.fixture(scope="module")
def reference() -> Toy:
    torch.manual_seed(0)
    return Toy(d=D).eval()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, reference):
    """The toy's safetensors checkpoint, without the head tied to the embedding."""
    folder = tmp_path_factory.mktemp("ckpt")
    state = {k: v for k, v in reference.state_dict().items() if k != "head.weight"}  # tied
    save_file(state, str(folder / "model.safetensors"))
    return folder
