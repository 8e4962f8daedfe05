"""Bad arguments to the placement API: one-line LaminaErrors, never a raw TypeError/AttributeError."""

import pytest
import torch
from safetensors.torch import save_file

import lamina
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.placement import parse_max_memory
from lamina.placement.plan import to_dtype
from tests.placement.toy_models import Toy, block_bytes

D = 32
EMB = 50 * D * 4
BLOCK = block_bytes(D)


def empty_toy() -> Toy:
    with lamina.init_empty():
        return Toy(d=D)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    state = {k: v for k, v in Toy(d=D).state_dict().items() if k != "head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"model": None},
            r"plan needs the model as an nn\.Module \(built under lamina\.init_empty\(\)\), got NoneType",
        ),
        ({"model": "model"}, r"plan needs the model as an nn\.Module .*got str"),
        ({"dtype": 5}, r"unknown dtype 5; use one of float32, bfloat16, float16"),
        ({"dtype": "int8"}, r"unknown dtype 'int8'; use one of float32, bfloat16, float16"),
        ({"dtype": torch.int8}, r"dtype torch\.int8 cannot be used here; weights run in one of float32, bfl"),
        ({"dtype": torch.float64}, r"dtype torch\.float64 cannot be used here"),
        ({"prefetch": "1"}, r"prefetch must be a whole number of layers \(0 or more\), got '1'"),
        ({"prefetch": 1.5}, r"prefetch must be a whole number of layers \(0 or more\), got 1\.5"),
        ({"prefetch": True}, r"prefetch must be a whole number of layers"),
        ({"prefetch": -1}, r"prefetch must be 0 or more layers, got -1"),
        (
            {"no_split": [5]},
            r"no_split must list module class names or classes \(e\.g\. \['LlamaDecod.*got 5",
        ),
        ({"no_split": 5}, r"no_split must list module class names or classes .*got 5"),
        ({"max_memory": 5}, r"max_memory must be a string like 'cpu=300MB,cuda:0=4GB' or a dict .*got int 5"),
        ({"max_memory": ["cpu=1GB"]}, r"max_memory must be a string like .*got list \['cpu=1GB'\]"),
        ({"max_memory": {"cpu": float("nan")}}, r"memory size nan is not a finite number"),
        ({"max_memory": {"cpu": float("inf")}}, r"memory size inf is not a finite number"),
        ({"max_memory": {"cpu": "9" * 400 + "GB"}}, r"memory size '9+GB' is too large"),
    ],
)
def test_plan_arguments_are_checked(kwargs, message):
    kwargs = dict(kwargs)
    model = kwargs.pop("model") if "model" in kwargs else empty_toy()
    kwargs.setdefault("max_memory", {"cpu": "1MB"})
    with pytest.raises(InvalidArgumentError, match=message):
        lamina.plan(model, **kwargs)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), (torch.float16, torch.float16), ("float32", torch.float32), (None, None)],
)
def test_plan_takes_the_dtypes_load_and_dispatch_takes(dtype, expected):
    assert to_dtype(dtype) == expected
    size = lamina.plan(empty_toy(), {"cpu": "1MB"}, dtype=dtype).totals()["cpu"]
    assert size == (EMB + 4 * BLOCK) * (expected or torch.float32).itemsize // 4


def test_a_single_no_split_name_is_a_list_of_one():
    whole = lamina.plan(empty_toy(), {"cpu": "1MB"}, no_split="Block")
    assert [p.prefix for p in whole.placements if p.kind == "Block"] == [f"layers.{i}" for i in range(4)]
    assert lamina.plan(empty_toy(), {"cpu": "1MB"}, no_split=Toy).placements[0].prefix == ""


@pytest.mark.parametrize(
    ("model", "checkpoint", "kwargs", "message"),
    [
        (None, "ckpt", {}, r"load_and_dispatch needs the model as an nn\.Module .*got NoneType"),
        ("toy", 5, {}, r"checkpoint must be the path of a \.safetensors or \.bin file, .*; got int"),
        ("toy", b"model.safetensors", {}, r"checkpoint must be the path .*; got bytes"),
        ("toy", "ckpt", {"offload_dir": 5}, r"offload_dir must be a folder path, got int"),
        ("toy", "ckpt", {"dtype": torch.int8}, r"dtype torch\.int8 cannot be used here"),
        ("toy", "ckpt", {"device_map": ["cpu"]}, r"device_map must be 'auto' or a Plan, got \['cpu'\]"),
        ("toy", "ckpt", {"max_memory": 5}, r"max_memory must be a string like"),
        ("toy", "ckpt", {"prefetch": 1.5}, r"prefetch must be a whole number"),
    ],
)
def test_load_and_dispatch_arguments_are_checked(ckpt, model, checkpoint, kwargs, message):
    model = empty_toy() if model == "toy" else model
    checkpoint = ckpt if checkpoint == "ckpt" else checkpoint
    with pytest.raises(InvalidArgumentError, match=message):
        lamina.load_and_dispatch(model, checkpoint, **kwargs)


def test_init_empty_checks_include_buffers():
    with pytest.raises(InvalidArgumentError, match="include_buffers must be True or False, got 5"):  # noqa: SIM117
        with lamina.init_empty(5):
            pass


def test_max_memory_string_and_dict_still_parse():
    assert parse_max_memory("cpu=300MB, disk=1GiB") == {"cpu": 300 * 10**6, "disk": 2**30}
    assert parse_max_memory({"cpu": 1.5e9}) == {"cpu": 1_500_000_000}


# A checkpoint whose shapes do not fit the model fails while loading, on every tier.


def _bad_shape(tmp_path, bin_file=False):
    torch.manual_seed(0)
    state = {k: v for k, v in Toy(d=D).state_dict().items() if k != "head.weight"}
    state["layers.1.up.weight"] = torch.zeros(16, D)  # the model has (32, 32)
    if bin_file:
        torch.save(state, tmp_path / "pytorch_model.bin")
        return tmp_path / "pytorch_model.bin"
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


SHAPE = r"tensor layers\.1\.up\.weight has shape \(16, 32\) in {} but the model config implies \(32, 32\); the config and the weights disagree"


@pytest.mark.parametrize(
    ("cpu_budget", "dtype", "bin_file"),
    [
        (10**6, None, False),  # resident
        (2 * BLOCK + 100, None, False),  # streamed in place from the checkpoint
        ((EMB + 4 * BLOCK) // 2 - 1, "bfloat16", False),  # converted into the offload folder
        (10**6, None, True),  # a .bin: no header to read, checked as each tensor arrives
        (2 * BLOCK + 100, "bfloat16", True),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_refused_while_loading(tmp_path, cpu_budget, dtype, bin_file):
    file = _bad_shape(tmp_path, bin_file)
    off = tmp_path / "off"
    with pytest.raises(CheckpointError, match=SHAPE.format(file)):
        lamina.load_and_dispatch(
            empty_toy(), tmp_path, max_memory={"cpu": cpu_budget}, offload_dir=off, dtype=dtype
        )
    assert not any(p.suffix == ".safetensors" for p in off.glob("*")) if off.exists() else True


def test_checkpoint_tensors_the_model_ignores_are_skipped(tmp_path):
    class Recomputes(Toy):
        ignored_checkpoint_keys = (r"\.cache$",)

    torch.manual_seed(0)
    reference = Toy(d=D).eval()
    state = {k: v for k, v in reference.state_dict().items() if k != "head.weight"}
    state["layers.0.cache"] = torch.zeros(3)  # stored, not a tensor of the model
    save_file(state, str(tmp_path / "model.safetensors"))
    with lamina.init_empty():
        model = Recomputes(d=D)
    model = lamina.load_and_dispatch(model, tmp_path, max_memory={"cpu": 2 * BLOCK + 100}).eval()
    ids = torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cpu_budget", [10**6, 3 * BLOCK])  # the cpu tier (pinned), then also disk
def test_a_tensor_of_the_wrong_shape_is_refused_on_the_gpu_tiers(tmp_path, cpu_budget):
    file = _bad_shape(tmp_path)
    with pytest.raises(CheckpointError, match=SHAPE.format(file)):
        lamina.load_and_dispatch(
            empty_toy(), tmp_path, max_memory={"cuda:0": EMB + 3 * BLOCK, "cpu": cpu_budget}
        )
