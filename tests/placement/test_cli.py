"""`lamina plan` and `--max-memory` / `--offload-dir` on `lamina generate`."""

import pytest

from lamina import LLM
from lamina.cli import main
from lamina.cli.plan import prediction
from lamina.placement.memory import Bandwidths


def test_plan_prints_placement_and_prediction(tiny_llama_dir, capsys):
    assert main(["plan", str(tiny_llama_dir), "--max-memory", "cpu=350KB"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1" in out and "disk" in out and "stream buffers" in out
    assert "predicted decode" in out and "page cache" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [("cpu=lots", "cannot read memory size"), ("cpu300MB", "DEVICE=SIZE"), ("tpu=1GB", "unknown device")],
)
def test_bad_max_memory_is_one_line_error(tiny_llama_dir, capsys, spec, message):
    assert main(["plan", str(tiny_llama_dir), "--max-memory", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_generate_under_a_cap_matches_uncapped(tiny_llama_dir, tmp_path, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_llama_dir),
        "-p",
        "hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]
    assert main([*args, "--no-stream"]) == 0
    expected = capsys.readouterr().out
    capped = [
        *args,
        "--max-memory",
        "cpu=350KB",
        "--offload-dir",
        str(tmp_path / "off"),
        "--dtype",
        "float32",
    ]
    assert main([*capped, "--no-stream"]) == 0
    assert capsys.readouterr().out == expected


def test_llm_load_with_max_memory_streams_layers(tiny_llama_dir, tmp_path):
    llm = LLM.load(tiny_llama_dir, max_memory={"cpu": "350KB"}, offload_dir=tmp_path / "off")
    assert "disk" in llm.model.lamina_plan.device_map.values()
    reference = LLM.load(tiny_llama_dir)
    prompt = "The capital"
    assert llm.generate(prompt, max_new_tokens=8, temperature=0) == reference.generate(
        prompt, max_new_tokens=8, temperature=0
    )


def test_prediction_takes_the_slower_of_compute_and_disk(tiny_llama_dir):
    from lamina.loading.checkpoint import open_checkpoint
    from lamina.loading.loader import build_empty
    from lamina.placement import plan

    with open_checkpoint(tiny_llama_dir) as ckpt:
        model, _ = build_empty(ckpt)
    p = plan(model, {"cpu": "350KB"})
    total, disk = sum(p.totals().values()), p.streamed_bytes()["disk"]
    text = prediction(p, Bandwidths(ram=total * 1000.0, disk=disk * 10.0, host_to_device=None, gpu=None))
    assert "100.0 ms/token (10.0 tok/s) with disk-tier layers read from disk" in text
    assert "1.0 ms/token (1000.0 tok/s) with them in the page cache" in text
