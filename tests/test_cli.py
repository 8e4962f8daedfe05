"""The `lamina` command: output on the right streams, and bad input as one line with a non-zero status."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lamina.cli import main


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_generate_prints_completion_and_summary(tiny_llama_dir):
    result = run_cli(
        "generate",
        "--model",
        str(tiny_llama_dir),
        "--prompt",
        "The",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    summary = result.stderr.strip().splitlines()[-1]
    assert "prompt tokens:" in summary and "new tokens: 5" in summary and "tokens/s" in summary


def test_generate_is_deterministic_when_greedy_and_matches_api(tiny_llama_dir, capsys):
    from lamina.api import LLM

    args = [
        "generate",
        "--model",
        str(tiny_llama_dir),
        "--prompt",
        "The cat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main([*args, "--no-stream"]) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    expected = LLM.load(tiny_llama_dir).generate("The cat", max_new_tokens=8, temperature=0)
    assert first == expected + "\n"


def test_generate_default_model_real_text():
    result = run_cli(
        "generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.fixture
def chat_calls(monkeypatch):
    """Record the conversation `lamina chat` sends to the model at each turn."""
    from lamina.api import LLM

    calls = []
    original = LLM.chat_stream

    def spy(self, messages, **kwargs):
        calls.append([dict(m) for m in messages])
        return original(self, messages, **kwargs)

    monkeypatch.setattr(LLM, "chat_stream", spy)
    return calls


def test_chat_keeps_history_and_handles_commands(tiny_llama_dir, monkeypatch, chat_calls, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nmore\n/reset\nagain\n/exit\nnot read\n"))
    args = ["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3", "--temperature", "0"]
    assert main([*args, "--system", "Be brief."]) == 0
    assert [[m["content"] for m in call if m["role"] != "assistant"] for call in chat_calls] == [
        ["Be brief.", "hello"],
        ["Be brief.", "hello", "more"],
        ["Be brief.", "again"],  # /reset kept the system message only; /exit stopped reading
    ]
    assert chat_calls[1][2]["role"] == "assistant"  # the first reply is part of the history
    assert "conversation cleared" in capsys.readouterr().err


def test_chat_multiline_message_ends_at_blank_line(tiny_llama_dir, monkeypatch, chat_calls):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n\nsecond\n"))
    args = [
        "chat",
        "--model",
        str(tiny_llama_dir),
        "--multiline",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    assert [call[-1]["content"] for call in chat_calls] == [
        "line one\nline two",
        "second",
    ]  # EOF ends the last


def test_chat_runs_as_a_process(tiny_llama_dir):
    result = run_cli("chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3", stdin="hi\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/does/not/exist"], "does not exist"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--top-p", "2"], "top-p must be in (0, 1]"),
        (["--top-k", "-3"], "top-k must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_one_line_error(args, message, capsys):
    assert main(["generate", "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lamina: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_prompt_longer_than_context_is_rejected(tiny_llama_dir, capsys):
    long_prompt = "word " * 400  # the tiny model's context is 256 tokens
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "context window is 256" in err and "Traceback" not in err


def test_cuda_on_cpu_only_machine_is_rejected(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_process_exit_status_and_no_traceback_for_broken_model(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    result = run_cli("generate", "--model", str(tmp_path / "model.gguf"), "--prompt", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "not a valid GGUF" in result.stderr


def test_max_memory_with_quantize_is_a_clear_error(tiny_llama_dir, capsys):
    args = ["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--max-memory", "cpu=1MB"]
    assert main([*args, "--quantize", "int8"]) == 2
    assert "cannot be combined with quantization" in capsys.readouterr().err
