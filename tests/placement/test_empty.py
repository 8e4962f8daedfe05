"""init_empty builds skeletons on the meta device."""

import torch
from torch import nn

from lamina.placement import init_empty
from tests.placement.toy_models import Toy


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_everything_on_meta():
    with init_empty():
        model = WithBuffers()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def test_buffers_can_stay_real():
    with init_empty(include_buffers=False):
        model = WithBuffers()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(model.table, torch.arange(4.0))
    plain = WithBuffers()
    assert all(p.device.type == "cpu" for p in plain.parameters())  # the hook is gone afterwards


def test_ties_survive():
    with init_empty():
        model = Toy()
    assert model.head.weight is model.emb.weight
