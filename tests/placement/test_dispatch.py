"""load_and_dispatch on toy modules: outputs identical to the in-memory model on every tier mix."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lamina
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.placement.offload_store import INDEX, LOCK
from tests.placement.toy_models import Toy, block_bytes

D = 32
EMB = 50 * D * 4
BLOCK = block_bytes(D)
BUDGETS = {  # cpu budget -> what it exercises
    "all-cpu": 10**6,
    "part-disk": EMB + 4 * BLOCK - 1,
    "all-disk": 2 * BLOCK + 100,
}


def load(ckpt, cpu_budget, **kw):
    with lamina.init_empty():
        model = Toy(d=D)
    return lamina.load_and_dispatch(model, ckpt, max_memory={"cpu": cpu_budget}, **kw).eval()


@pytest.mark.parametrize("mix", list(BUDGETS))
def test_identical_outputs_streaming_in_place(reference, ckpt_dir, mix, tmp_path):
    model = load(ckpt_dir, BUDGETS[mix], offload_dir=tmp_path / "off")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = reference(ids)
        assert torch.equal(model(ids), expected)
        assert torch.equal(model(ids), expected)  # a second pass reuses the same streamed weights
    assert not (tmp_path / "off").exists()  # float32 safetensors are streamed in place, not copied
    tiers = set(model.lamina_plan.device_map.values())
    assert tiers == ({"cpu"} if mix == "all-cpu" else {"disk"} if mix == "all-disk" else {"cpu", "disk"})


def test_streamed_weights_are_file_pages_not_copies(ckpt_dir):
    model = load(ckpt_dir, BUDGETS["all-disk"])
    weight = model.layers[0].up.weight
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    start = weight.data_ptr()
    mapped = [line for line in maps.splitlines() if "model.safetensors" in line]
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    assert any(lo <= start < hi for lo, hi in ranges)


def test_dtype_cast_writes_offload_folder_once_and_reuses_it(reference, ckpt_dir, tmp_path):
    off = tmp_path / "off"
    budget = (EMB + 4 * BLOCK) // 2 - 1
    model = load(ckpt_dir, budget, offload_dir=off, dtype="bfloat16")
    ids = torch.randint(0, 50, (1, 5))
    in_memory = Toy(d=D).to(torch.bfloat16).eval()
    in_memory.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected = in_memory(ids)
        assert torch.equal(model(ids), expected)
    index = json.loads((off / INDEX).read_text())
    files = sorted(p.name for p in off.iterdir())
    assert files == sorted([INDEX, LOCK, *(f"{u}.safetensors" for u in index["units"])])
    stamp = {p: p.stat().st_mtime_ns for p in off.iterdir()}
    again = load(ckpt_dir, budget, offload_dir=off, dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(again(ids), expected)
    assert {p: p.stat().st_mtime_ns for p in off.iterdir()} == stamp  # reused, not rewritten


def test_a_damaged_offload_file_is_written_again_or_named(reference, ckpt_dir, tmp_path):
    off = tmp_path / "off"
    budget = (EMB + 4 * BLOCK) // 2 - 1
    load(ckpt_dir, budget, offload_dir=off, dtype="bfloat16")
    index = json.loads((off / INDEX).read_text())
    victim = off / f"{next(iter(index['units']))}.safetensors"
    intact = victim.read_bytes()
    victim.write_bytes(intact[: len(intact) // 2])  # truncated: the index's size no longer matches
    ids = torch.randint(0, 50, (1, 5))
    in_memory = Toy(d=D).to(torch.bfloat16).eval()
    in_memory.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert torch.equal(load(ckpt_dir, budget, offload_dir=off, dtype="bfloat16")(ids), in_memory(ids))
    assert victim.read_bytes() == intact  # written again
    victim.write_bytes(b"\0" * len(intact))  # same size, unreadable header: named, not a traceback
    with pytest.raises(CheckpointError, match=rf"offload file {victim} is damaged.*delete {off} to have it"):
        load(ckpt_dir, budget, offload_dir=off, dtype="bfloat16")


def test_sharded_index_and_bin_checkpoints(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if k != "head.weight"}
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(tmp_path / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "pytorch_model.bin")
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        expected = reference(ids)
        for ckpt in (tmp_path, tmp_path / "model.safetensors.index.json", bin_dir):
            model = load(ckpt, BUDGETS["part-disk"], offload_dir=tmp_path / "off-bin")
            assert torch.equal(model(ids), expected), ckpt


def test_unwritable_offload_dir_is_a_clear_error(ckpt_dir, tmp_path):
    blocker = tmp_path / "a-file"  # a folder under a regular file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(InvalidArgumentError, match=r"offload dir .* not writable"):
        load(ckpt_dir, BUDGETS["all-disk"], offload_dir=blocker / "off", dtype="bfloat16")


def test_failed_offload_write_leaves_nothing_half_written(ckpt_dir, tmp_path, monkeypatch):
    from lamina.placement import offload_store

    calls = []

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save_file(tensors, path)

    monkeypatch.setattr(offload_store, "save_file", failing_save)
    off = tmp_path / "off"
    with pytest.raises(InvalidArgumentError, match="No space left"):
        load(ckpt_dir, BUDGETS["all-disk"], offload_dir=off, dtype="bfloat16")
    assert [p.name for p in off.iterdir()] == [LOCK]  # only the (empty) lock file


def test_offload_dir_required_when_conversion_is_needed(ckpt_dir):
    with pytest.raises(InvalidArgumentError, match="offload_dir"):
        load(ckpt_dir, 3 * BLOCK // 2, dtype="bfloat16")


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no place in the model"):
        load(tmp_path, 10**6)


def test_missing_tensor_is_rejected(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if k not in ("head.weight", "layers.1.up.bias")}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no tensor 'layers\.1\.up\.bias'"):
        load(tmp_path, 10**6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cpu_budget", [10**6, 3 * BLOCK])
def test_gpu_streaming_from_cpu_and_disk(reference, ckpt_dir, cpu_budget):
    budget = {"cuda:0": EMB + 3 * BLOCK, "cpu": cpu_budget}
    with lamina.init_empty():
        model = Toy(d=D)
    model = lamina.load_and_dispatch(model, ckpt_dir, max_memory=budget).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = reference(ids)
        for _ in range(3):
            out = model(ids)  # CPU input: output comes back to the CPU
            assert out.device.type == "cpu"
            torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_layers_not_in_page_cache_are_read_into_reused_buffers(reference, ckpt_dir, prefetch):
    calls = []

    def alternate():  # cached, then not: exercises reads, O_DIRECT re-reads and re-binding in place
        calls.append(1)
        return len(calls) % 3 == 0

    model = load(ckpt_dir, 2 * BLOCK + 100 + prefetch * BLOCK, prefetch=prefetch)
    model.lamina_streamer.resident = [alternate] * len(model.lamina_streamer.layers)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = reference(ids)
        for _ in range(3):
            assert torch.equal(model(ids), expected)
    streamer = model.lamina_streamer
    assert streamer.missed  # some layers were read twice: the second time with O_DIRECT
    assert 1 <= len(streamer.buffers) <= prefetch + 1
    first = [b.data_ptr() for b in streamer.buffers]
    with torch.no_grad():
        model(ids)
    assert [b.data_ptr() for b in streamer.buffers] == first  # reused, not reallocated
