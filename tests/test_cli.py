"""The `lamina` command: output on the right streams, and bad input as one line with a non-zero status."""

from __future__ import annotations

import json
import os
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
        (["--seed", str(10**23)], "seed must be an integer in [-2^63, 2^64)"),
        (["--threads", "100000"], "--threads 100000 is more than the"),  # torch's thread pool segfaults
        (
            ["--group-size", "64"],
            "--group-size applies to --quantize int4|int4-minmax|gptq, but nothing is quantized",
        ),
        (["--quantize", "int8", "--group-size", "64"], "--quantize int8 has no groups; drop --group-size"),
        (["--offload-dir", "/tmp/x"], "add a max memory budget (--max-memory) or drop the offload dir"),
        (["--model", ""], "the model path is empty"),
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


def _run_with_fd_closed(fd: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI started with standard input (0) or output (1) closed, as `<&-` / `>&-` start it."""
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args],
        capture_output=fd != 1,
        stderr=subprocess.PIPE if fd == 1 else None,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.close(fd),
    )


@pytest.mark.parametrize(
    ("fd", "args", "message"),
    [
        (0, ["generate"], "standard input is closed; pass the prompt with --prompt"),
        (0, ["chat"], "standard input is closed; chat reads your messages from it"),
        (1, ["generate", "--prompt", "hi"], "standard output is closed; lamina writes its results there"),
    ],
)
def test_closed_standard_streams_are_one_line_errors(tiny_llama_dir, fd, args, message):
    result = _run_with_fd_closed(fd, *args, "--model", str(tiny_llama_dir), "--max-new-tokens", "2")
    assert result.returncode == 2
    assert result.stderr.strip() == f"lamina: error: {message}"


def test_a_full_output_device_is_a_one_line_error(tiny_llama_dir):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "lamina", "generate", "--model", str(tiny_llama_dir), "--prompt", "hi"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == "lamina: error: No space left on device"


def test_invalid_utf8_on_stdin_is_a_one_line_error(tiny_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "lamina", "generate", "--model", str(tiny_llama_dir), "--max-new-tokens", "2"],
        input=b"hi \xff\xfe there",
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 2
    error = result.stderr.decode().strip()
    assert error.startswith("lamina: error: ") and "UTF-8" in error and "\n" not in error


def test_chat_drops_a_message_it_cannot_answer_and_goes_on(tiny_llama_dir, monkeypatch, chat_calls, capsys):
    import io

    too_long = "word " * 400  # the tiny model's context is 256 tokens
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n{too_long}\nagain\n"))
    args = ["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args) == 2  # piped input: the dropped message shows in the exit status
    assert [[m["content"] for m in call if m["role"] == "user"] for call in chat_calls] == [
        ["hello"],
        [too_long],  # older exchanges are dropped to make room, and still it does not fit
        ["hello", "again"],  # the history is as before the long message; the conversation went on
    ]
    assert "context window is 256; shorten the prompt (the message was dropped" in capsys.readouterr().err


def test_plan_creates_a_missing_offload_dir_and_refuses_a_file(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "new" / "offload"
    assert main(["plan", str(tiny_llama_dir), "--offload-dir", str(folder)]) == 0
    assert folder.is_dir()
    (tmp_path / "file").write_text("x")
    assert main(["plan", str(tiny_llama_dir), "--offload-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "0"], "--context must be >= 2 (tokens a window sees), got 0"),
        (["--context", "100", "--stride", "200"], "--stride must be in 1..--context (100), got 200"),
        (["--context", "300", "--stride", "100"], "--context 300 exceeds the model's context window (256)"),
    ],
)
def test_perplexity_window_options_are_checked(tiny_llama_dir, capsys, args, message):
    assert main(["perplexity", str(tiny_llama_dir), "--max-tokens", "16", *args]) == 2
    assert message in capsys.readouterr().err


def test_perplexity_windows_fit_a_short_context_by_default(tiny_llama_dir, capsys):
    """The tiny model's window is 256 tokens: the default 512 would be refused."""
    assert main(["perplexity", str(tiny_llama_dir), "--max-tokens", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 299


def test_bench_refuses_two_different_models(tiny_llama_dir, tmp_path, capsys):
    assert main(["bench", str(tiny_llama_dir), "--model", str(tmp_path)]) == 2
    assert "either as MODEL or as --model, not both" in capsys.readouterr().err


def test_max_memory_on_a_quantized_checkpoint_names_the_checkpoint(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["quantize", str(tiny_llama_dir), "--method", "bf16", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "x", "--max-memory", "cpu=1MB"]) == 2
    assert (
        f"{out} is a quantized checkpoint and --max-memory streams float weights only"
        in capsys.readouterr().err
    )


def test_chat_drops_a_message_that_is_not_utf8_and_goes_on(tiny_llama_dir, monkeypatch, chat_calls, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nbad \udcff bytes\nagain\n"))  # surrogate-escaped
    args = ["chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args) == 2
    assert [[m["content"] for m in call if m["role"] == "user"] for call in chat_calls] == [
        ["hello"],
        ["hello", "again"],
    ]
    assert "not valid UTF-8" in capsys.readouterr().err


def test_perplexity_text_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"text \xe7\xff\xfe more")
    assert main(["perplexity", "--text", str(tmp_path / "binary.txt")]) == 2
    assert "binary.txt is not UTF-8 (invalid continuation byte at byte 5); pass a UTF-8 text file" in (
        capsys.readouterr().err
    )


def test_chat_without_a_chat_template_stops_at_startup(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Every message would fail the same way; chat says so once instead of dropping each one."""
    import io
    import shutil

    model = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": None}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    assert main(["chat", "--model", str(model), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "this model has no chat template" in err and "dropped" not in err and err.count("\n") == 1


def test_the_command_starts_without_importing_torch():
    """So a Ctrl-C while it starts reaches `main`'s handler (exit 130, no traceback)."""
    probe = "import sys, lamina.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
