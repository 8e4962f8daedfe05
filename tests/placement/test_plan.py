"""The planner on toy modules with known sizes."""

import pytest
import torch
from torch import nn

from lamina.placement import PlacementError, plan
from tests.placement.toy_models import Toy, block_bytes

D = 32
EMB = 50 * D * 4  # 6400 bytes
BLOCK = block_bytes(D)  # 8704 bytes


def empty_toy(**kw) -> Toy:
    with torch.device("meta"):
        return Toy(d=D, **kw)


def tiers(p):
    return {pl.prefix: pl.tier for pl in p.placements}


def test_everything_fits_in_cpu():
    p = plan(empty_toy(), {"cpu": EMB + 4 * BLOCK})
    assert set(tiers(p).values()) == {"cpu"}
    assert p.reserved == 0
    assert p.totals()["cpu"] == EMB + 4 * BLOCK


def test_fills_cpu_first_in_module_order_and_reserves_stream_buffers():
    budget = EMB + 4 * BLOCK - 1  # one byte short of everything: one block plus two stream buffers
    p = plan(empty_toy(), {"cpu": budget})
    assert tiers(p) == {
        "emb": "cpu",
        "layers.0": "cpu",
        "layers.1": "disk",
        "layers.2": "disk",
        "layers.3": "disk",
        "head": "cpu",  # tied to emb, so it goes with it
    }
    assert p.reserved == 2 * BLOCK
    assert p.totals()["cpu"] + p.reserved <= budget
    assert p.streamed_bytes() == {"disk": 3 * BLOCK}


def test_prefetch_depth_changes_the_reservation():
    p = plan(empty_toy(), {"cpu": EMB + 4 * BLOCK - 1}, prefetch=2)
    assert p.reserved == 3 * BLOCK
    assert sum(t == "cpu" for t in tiers(p).values()) == 2  # emb and head only


def test_no_split_blocks_stay_whole_and_others_split():
    budget = EMB + 4 * BLOCK - 1
    whole = plan(empty_toy(), {"cpu": budget})
    assert all(pl.prefix.count(".") <= 1 for pl in whole.placements)
    split = plan(empty_toy(), {"cpu": budget}, no_split=[])
    assert "layers.0.up" in tiers(split)
    assert all(pl.kind != "Block" for pl in split.placements)


def test_tied_weights_are_placed_together():
    p = plan(empty_toy(), {"cpu": BLOCK * 3})  # the embedding does not fit after reservations
    t = tiers(p)
    assert t["emb"] == t["head"]
    untied = plan(empty_toy(tie=False), {"cpu": 10**6})
    assert untied.totals()["cpu"] == 2 * EMB + 4 * BLOCK


def test_disk_limit_error_names_sizes():
    with pytest.raises(PlacementError, match=r"needs .* kB.*raise --max-memory"):
        plan(empty_toy(), {"cpu": 20_000, "disk": 1000})


def test_unsplittable_block_larger_than_compute_device_is_an_error():
    with pytest.raises(PlacementError, match=r"block layers\.\d \(Block, 8\.7 kB\) cannot be split"):
        plan(empty_toy(), {"cpu": BLOCK - 1})


def test_a_budget_without_the_computing_device_is_an_error():
    with pytest.raises(PlacementError, match=r"gives cpu, where the model computes, no budget; add cpu=SIZE"):
        plan(empty_toy(), {"disk": "1GB"})


def test_bad_strategy_is_an_error():
    with pytest.raises(PlacementError, match="strategy"):
        plan(empty_toy(), {"cpu": "1MB"}, strategy="random")


def test_dtype_halves_sizes():
    p = plan(empty_toy(), {"cpu": "1MB"}, dtype=torch.bfloat16)
    assert p.totals()["cpu"] == (EMB + 4 * BLOCK) // 2


def test_module_with_own_parameters_and_children():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 3)

    with torch.device("meta"):
        model = Scaled()
    p = plan(model, {"cpu": "1MB"})
    assert [(pl.prefix, pl.whole) for pl in p.placements] == [("", False), ("lin", True)]


def test_table_lists_modules_tiers_and_totals():
    text = str(plan(empty_toy(), {"cpu": EMB + 4 * BLOCK - 1}))
    assert "layers.3" in text and "disk" in text and "stream buffers" in text
    assert text.splitlines()[0].split() == ["module", "kind", "tier", "size"]


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Plan for a two-GPU machine on any machine: the planner only needs device names and budgets."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_sequential_fills_first_gpu_then_second_then_cpu(two_fake_gpus):
    budget = {"cuda:0": EMB + 2 * BLOCK, "cuda:1": 2 * BLOCK, "cpu": "1MB"}
    p = plan(empty_toy(), budget, strategy="sequential")
    assert p.compute_device == "cuda:0"
    t = tiers(p)
    assert [t["emb"], t["layers.0"], t["layers.1"], t["layers.2"], t["layers.3"]] == [
        "cuda:0",
        "cuda:0",
        "cuda:0",
        "cuda:1",
        "cuda:1",
    ]
    assert p.reserved == 0


def test_balanced_spreads_layers_over_gpus(two_fake_gpus):
    budget = {"cuda:0": "1MB", "cuda:1": "1MB", "cpu": "1MB"}
    assert set(tiers(plan(empty_toy(), budget, strategy="sequential")).values()) == {"cuda:0"}
    balanced = plan(empty_toy(), budget, strategy="balanced")
    on = [pl.tier for pl in balanced.placements]
    assert on.count("cuda:0") >= 2 and on.count("cuda:1") >= 2
    assert plan(empty_toy(), budget).device_map == balanced.device_map  # auto = balanced with 2 GPUs


def test_cpu_tier_is_streamed_to_the_gpu_and_room_is_reserved_there(two_fake_gpus):
    p = plan(empty_toy(), {"cuda:0": EMB + 3 * BLOCK, "cpu": "1MB"})
    assert p.reserved == 2 * BLOCK
    assert p.is_streamed("cpu") and p.execution_device("cpu") == "cuda:0"
    assert p.streamed_bytes() == {"cpu": 3 * BLOCK}


def test_a_prefetch_deeper_than_the_streamed_layers_counts_one_buffer_per_streamed_layer():
    """Reading every streamed unit ahead needs one buffer each, however large the prefetch: the
    figures stay real (the audit saw "needs 3008102400000000000.0 GB") and name prefetch as the cause."""
    for prefetch in (5, 1000, 10**20):  # 6 units (emb, 4 blocks, the tied head), all streamed
        with pytest.raises(
            PlacementError,
            match=rf"^prefetch {prefetch} keeps 6 stream buffers of the largest streamed block \(layers\.0, "
            r"8\.7 kB\) on cpu: 52\.2 kB, more than its budget of 30\.0 kB; lower prefetch to at most 2 or "
            r"raise the cpu budget to at least 52\.2 kB$",
        ):
            plan(empty_toy(), {"cpu": 30_000}, prefetch=prefetch)
    assert plan(empty_toy(), {"cpu": 30_000}, prefetch=2).reserved == 3 * BLOCK  # what the message offers
    fits = plan(empty_toy(), {"cpu": "1MB"}, prefetch=10**20)  # nothing streamed: nothing reserved
    assert fits.reserved == 0 and fits.stream_buffers == 0


def test_the_table_counts_the_buffers_the_streamer_allocates():
    p = plan(empty_toy(), {"cpu": EMB + 4 * BLOCK - 1})  # 3 blocks streamed
    assert p.stream_buffers == 2 and "for 2 stream buffers" in str(p)
    p.prefetch = 1000  # an edited plan: the streamer keeps one buffer per streamed block, no more
    assert p.stream_buffers == 3 and "for 3 stream buffers" in str(p)
