"""Sizes, --max-memory specs and device checks."""

import pytest
import torch

from lamina.errors import InvalidArgumentError
from lamina.placement.memory import module_nbytes, parse_max_memory, parse_size
from tests.placement.toy_models import Toy, block_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300MB", 300 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512mib", 512 * 2**20),
        ("1024", 1024),
        (" 10 KB ", 10_000),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "12 parsecs", "-3MB", "1.2.3GB", -5, True])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(InvalidArgumentError, match="size"):
        parse_size(bad)


def test_parse_max_memory_spec():
    assert parse_max_memory("cpu=300MB, disk=2GiB") == {"cpu": 300 * 10**6, "disk": 2 * 2**30}
    assert parse_max_memory({"CPU": 10}) == {"cpu": 10}
    assert parse_max_memory(None) is None


@pytest.mark.parametrize("bad", ["cpu", "cpu=", "=3GB", "cpu=3GB,cpu=1GB", "tpu=3GB", ","])
def test_parse_max_memory_rejects_bad_specs(bad):
    with pytest.raises(InvalidArgumentError):
        parse_max_memory(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "0"])
def test_cuda_on_cpu_only_machine_is_a_clear_error(device):
    with pytest.raises(InvalidArgumentError, match="no CUDA GPU"):
        parse_max_memory(f"{device}=1GB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_missing_gpu_index_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        parse_max_memory(f"cuda:{torch.cuda.device_count()}=1GB")


def test_module_nbytes_counts_tied_weights_once():
    with torch.device("meta"):
        model = Toy(d=8, n=2, vocab=10)
    assert module_nbytes(model) == 10 * 8 * 4 + 2 * block_bytes(8)
    assert module_nbytes(model, torch.bfloat16) == (10 * 8 * 4 + 2 * block_bytes(8)) // 2
