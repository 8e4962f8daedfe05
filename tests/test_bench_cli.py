"""`lamina bench --json`: a stable schema, positive numbers, rates that match tokens / seconds."""

from __future__ import annotations

import json

import pytest
import torch

from lamina.cli import main
from lamina.kernels import native

KEYS = {
    "load_s",
    "compile_s",
    "ttft_s",
    "prefill_s",
    "prefill_tokens_per_s",
    "decode_s",
    "decode_tokens_per_s",
    "peak_rss_bytes",
    "weight_bytes",
    "weight_bytes_per_token",
    "achieved_gb_per_s",
    "machine_gb_per_s",
    "bandwidth_share",
}


@pytest.mark.parametrize("batch", [1, 2])
def test_bench_json_schema_and_consistency(tiny_llama_dir, capsys, batch):
    threads = str(torch.get_num_threads())  # keep the session's thread count
    argv = ["bench", str(tiny_llama_dir), "--json", "--prompt-len", "12", "--new-tokens", "5"]
    argv += ["--batch", str(batch), "--repeat", "1", "--threads", threads, "--device", "cpu", "--no-compile"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= KEYS
    for key in KEYS - {"compile_s"}:
        assert result[key] > 0, key
    assert result["compile_s"] == 0 and result["compiled"] is False
    assert (result["prompt_tokens"], result["new_tokens"], result["batch"]) == (12, 5, batch)
    assert result["decode_tokens_per_s"] == pytest.approx(4 * batch / result["decode_s"])
    assert result["prefill_tokens_per_s"] == pytest.approx(12 * batch / result["prefill_s"])
    assert result["ttft_s"] >= result["prefill_s"]
    assert result["weight_bytes_per_token"] <= result["weight_bytes"]
    reason = native.unavailable_reason()
    assert result["kernels"] == (
        f"native ({native.selected_isa()})" if reason is None else f"torch ({reason})"
    )


def test_bench_rejects_bad_sizes(tiny_llama_dir, capsys):
    assert main(["bench", str(tiny_llama_dir), "--new-tokens", "0"]) == 2
    assert "--new-tokens must be >= 2 to time decoding, got 0" in capsys.readouterr().err
    assert main(["bench", str(tiny_llama_dir), "--new-tokens", "1"]) == 2  # reported 0.0 tok/s as measured
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
