"""Speculative decoding: the acceptance rules, the draft/verify loop, the API and the CLI.

The rules are checked on hand-made distributions (their output must be distributed as the target's
p), the loop on tiny random Llamas against plain greedy decoding of the target, and one test runs
the bundled model: float32 target, its own int4 blocks as the draft.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lamina import LLM
from lamina.cli import main
from lamina.engine.acceptance import greedy_accept, residual_distribution, speculative_accept
from lamina.engine.generate import GenerationStats, generate_tokens
from lamina.engine.sampling import SamplingParams
from lamina.engine.speculative import speculative_tokens
from lamina.errors import InvalidArgumentError
from tests.conftest import VOCAB, save_tiny_tokenizer
from tests.test_cli import run_cli

GREEDY = SamplingParams(temperature=0)
PROMPT = "The quick brown fox"

# --- acceptance rules on hand-made distributions ------------------------------------------------


def test_greedy_accept_counts_the_matching_prefix():
    draft = torch.tensor([3, 1, 4])
    assert greedy_accept(draft, torch.tensor([3, 1, 5, 9])) == (2, 5)  # correction at the mismatch
    assert greedy_accept(draft, torch.tensor([3, 1, 4, 7])) == (3, 7)  # all kept: bonus token
    assert greedy_accept(draft, torch.tensor([2, 1, 4, 7])) == (0, 2)  # a later match does not count
    assert greedy_accept(draft[:0], torch.tensor([6])) == (0, 6)  # nothing drafted: a plain step


def test_residual_is_normalized_positive_excess():
    p = torch.tensor([[0.4, 0.4, 0.2, 0.0], [0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.2, 0.5, 0.3, 0.0]])
    expected = torch.tensor([[0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(residual_distribution(p, q), expected)


def _emitted(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int = 0) -> list[list[int]]:
    """The tokens one round emits, `trials` times: drafts drawn from q [K, V], verified against p [K+1, V]."""
    generator = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(trials):
        draft = torch.stack([torch.multinomial(row, 1, generator=generator)[0] for row in q])  # [K]
        n, follow = speculative_accept(draft, q, p, generator)
        rounds.append([*draft[:n].tolist(), follow])
    return rounds


def _frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


UNIFORM = [0.25, 0.25, 0.25, 0.25]
PAIRS = {  # (p, q): the output must follow p whatever q is
    "q peaks where p is low": ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]),
    "q has no mass where p has": (UNIFORM, [0.5, 0.5, 0.0, 0.0]),
    "p has no mass where q has": ([0.6, 0.4, 0.0, 0.0], UNIFORM),
    "one-hot, different tokens": ([0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_speculative_sampling_output_follows_target_distribution(pair):
    p_row, q_row = (torch.tensor(values) for values in PAIRS[pair])
    bonus = torch.tensor([0.7, 0.1, 0.1, 0.1])
    trials = 6000
    rounds = _emitted(torch.stack([p_row, bonus]), q_row[None], trials)
    # First token ~ p; after an accepted draft the bonus token ~ the target's next distribution.
    torch.testing.assert_close(_frequencies([r[0] for r in rounds], 4), p_row, atol=0.025, rtol=0)
    after_accept = [r[1] for r in rounds if len(r) == 2]
    if after_accept:
        torch.testing.assert_close(_frequencies(after_accept, 4), bonus, atol=0.04, rtol=0)
    accept_rate = torch.minimum(p_row, q_row).sum().item()  # P(accept) = sum_x min(p(x), q(x))
    assert len(after_accept) / trials == pytest.approx(accept_rate, abs=0.025)


def test_second_position_follows_target_given_first_accepted():
    p = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.1, 0.6, 0.0, 0.3], UNIFORM])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.1, 0.4, 0.0]])
    rounds = _emitted(p, q, 6000, seed=1)
    second = [r[1] for r in rounds if len(r) >= 2]
    assert len(second) > 3000
    torch.testing.assert_close(_frequencies(second, 4), p[1], atol=0.03, rtol=0)


def test_equal_distributions_accept_every_draft():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], UNIFORM])
    rounds = _emitted(probs, probs[:2], 500)
    assert all(len(r) == 3 for r in rounds)


# --- the loop on tiny random models ---------------------------------------------------------------


def _tiny_llama(**overrides: object) -> torch.nn.Module:
    """A tiny random Llama whose weights are large enough that greedy text varies (initializer 0.1)."""
    import transformers

    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=1,
        initializer_range=0.1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**values | overrides)
    ).eval()


def _save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """target; other (its weights plus noise: a different model, same vocabulary); wide_vocab
    (384 embedding rows); retokenized (the target with two token ids swapped in its tokenizer)."""
    root = tmp_path_factory.mktemp("speculative")
    target = _tiny_llama()
    other = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    made = {"target": _save(target, root / "target"), "other": _save(other, root / "other")}
    made["wide_vocab"] = _save(_tiny_llama(vocab_size=384), root / "wide_vocab")
    retokenized = _save(target, root / "retokenized")
    tokenizer = json.loads((retokenized / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    (retokenized / "tokenizer.json").write_text(json.dumps(tokenizer))
    made["retokenized"] = retokenized
    return made


@pytest.fixture(scope="module")
def target(dirs) -> LLM:
    return LLM.load(dirs["target"], device="cpu")


@pytest.fixture(scope="module")
def drafts(dirs) -> dict[str, LLM]:
    """Drafts for the target: itself, its int4 quantization (partial acceptance), a noisy copy."""
    return {
        "same": LLM.load(dirs["target"], device="cpu"),
        "int4": LLM.load(dirs["target"], device="cpu", quantize="int4", group_size=32),
        "other": LLM.load(dirs["other"], device="cpu"),
    }


@pytest.fixture(scope="module")
def prompt_ids(target) -> list[int]:
    return target.tokenizer.encode(PROMPT)


def _plain(target: LLM, prompt_ids: list[int], n: int, params: SamplingParams = GREEDY, **kw) -> list[int]:
    return list(generate_tokens(target.model, prompt_ids, n, params, **kw))


def _speculative(target: LLM, draft: LLM, prompt_ids: list[int], n: int, k: int, **kw) -> list[int]:
    params = kw.pop("params", GREEDY)
    return list(speculative_tokens(target.model, draft.model, prompt_ids, n, params, k, **kw))


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("draft", ["int4", "other"])
def test_greedy_tokens_equal_plain_greedy(target, drafts, prompt_ids, draft, k):
    expected = _plain(target, prompt_ids, 40)
    assert len(set(expected)) > 5  # the text varies, so a wrong token would show
    stats = GenerationStats()
    assert _speculative(target, drafts[draft], prompt_ids, 40, k, stats=stats) == expected
    assert stats.new_tokens == 40 and stats.drafted > 0
    assert 0 < stats.acceptance_rate < 1  # both accepted and rejected proposals were exercised


def test_identical_draft_accepts_everything(target, drafts, prompt_ids):
    stats = GenerationStats()
    assert _speculative(target, drafts["same"], prompt_ids, 40, 4, stats=stats) == _plain(
        target, prompt_ids, 40
    )
    assert stats.drafted >= 30 and stats.accepted == stats.drafted and stats.acceptance_rate == 1.0


@pytest.mark.parametrize("n", range(1, 13))
def test_max_new_tokens_is_exact_even_mid_block(target, drafts, prompt_ids, n):
    expected = _plain(target, prompt_ids, 12)[:n]
    for draft in ("same", "int4"):
        assert _speculative(target, drafts[draft], prompt_ids, n, 4) == expected


def test_stop_id_mid_block_ends_generation_right_after_it(target, drafts, prompt_ids):
    full = _plain(target, prompt_ids, 30)
    # With a draft that is always right and K=4 the rounds are tokens 1-5, 6-10, ... after the first.
    firsts = [i for i in range(2, 14) if full[i] not in full[:i] and i % 5 != 0]
    assert len(firsts) >= 2
    for i in firsts:
        for draft in ("same", "int4"):
            got = _speculative(target, drafts[draft], prompt_ids, 30, 4, stop_ids={full[i]})
            assert got == full[: i + 1], (i, draft)


def test_repetition_penalty_greedy_matches_plain_path(target, drafts, prompt_ids):
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    expected = _plain(target, prompt_ids, 40, params)
    assert expected != _plain(target, prompt_ids, 40)  # the penalty changes the text
    for draft in ("int4", "other"):
        assert _speculative(target, drafts[draft], prompt_ids, 40, 3, params=params) == expected


def test_sampling_path_with_top_k_1_reproduces_greedy(target, drafts, prompt_ids):
    """top-k 1 makes p and q one-hot: the acceptance rule and residual must then give greedy output."""
    params = SamplingParams(temperature=1.0, top_k=1)
    stats = GenerationStats()
    got = _speculative(target, drafts["int4"], prompt_ids, 40, 4, params=params, seed=0, stats=stats)
    assert got == _plain(target, prompt_ids, 40)
    assert 0 < stats.acceptance_rate < 1


def test_seeded_sampling_is_reproducible(target, drafts, prompt_ids):
    params = SamplingParams(temperature=1.0, top_p=0.9)
    runs = [_speculative(target, drafts["int4"], prompt_ids, 30, 4, params=params, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# --- API ----------------------------------------------------------------------------------------


def test_load_with_draft_path_matches_plain_generation(dirs, target):
    llm = LLM.load(dirs["target"], device="cpu", draft=dirs["other"], speculative_k=3)
    assert llm.draft is not None and llm.speculative_k == 3
    options = {"max_new_tokens": 24, "temperature": 0}
    assert llm.generate(PROMPT, **options) == target.generate(PROMPT, **options)
    assert llm.last_stats.drafted > 0 and "draft accepted" in llm.last_stats.summary()


def test_set_draft_attaches_and_detaches(dirs, target, drafts):
    llm = LLM.load(dirs["target"], device="cpu")
    llm.set_draft(drafts["int4"], k=2)
    options = {"max_new_tokens": 20, "temperature": 0}
    assert llm.generate(PROMPT, **options) == target.generate(PROMPT, **options)
    assert llm.last_stats.drafted > 0
    llm.set_draft(None)
    llm.generate(PROMPT, **options)
    assert llm.last_stats.drafted == 0


def test_draft_quantize_loads_the_draft_quantized(dirs, target):
    llm = LLM.load(dirs["target"], device="cpu", draft=dirs["target"], draft_quantize="int8")
    assert type(llm.draft.model.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    assert llm.generate(PROMPT, max_new_tokens=16, temperature=0) == target.generate(
        PROMPT, max_new_tokens=16, temperature=0
    )


def test_group_size_reaches_a_draft_quantized_to_int4(dirs, capsys):
    """--group-size serves --draft-quantize too (it was refused: "nothing is quantized")."""
    llm = LLM.load(dirs["target"], device="cpu", draft=dirs["target"], draft_quantize="int4", group_size=32)
    assert llm.draft.model.model.layers[0].mlp.down_proj.group_size == 32
    args = ["generate", "--model", str(dirs["target"]), "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert (
        main([*args, "--draft", str(dirs["target"]), "--draft-quantize", "int4", "--group-size", "32"]) == 0
    )
    assert "error" not in capsys.readouterr().err


def test_streamed_target_takes_a_resident_draft(dirs, target, drafts, tmp_path):
    llm = LLM.load(dirs["target"], max_memory={"cpu": "350KB"}, offload_dir=tmp_path / "offload")
    llm.set_draft(drafts["int4"], k=4)
    options = {"max_new_tokens": 20, "temperature": 0}
    assert llm.generate(PROMPT, **options) == target.generate(PROMPT, **options)
    assert llm.last_stats.accepted > 0


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    from tests.models.test_t5 import tiny_t5

    return _save(tiny_t5("flan_t5"), tmp_path_factory.mktemp("t5"))


@pytest.mark.parametrize(
    ("target_name", "draft_name", "message"),
    [
        ("target", "wide_vocab", "vocabulary has 384 tokens but the target's has 320"),
        ("target", "retokenized", "tokenizer encodes text differently"),
        ("target", "t5", "the draft t5"),
        ("t5", "target", "the target t5"),
    ],
)
def test_incompatible_drafts_are_refused(dirs, t5_dir, target_name, draft_name, message):
    paths = {**dirs, "t5": t5_dir}
    with pytest.raises(InvalidArgumentError, match=message):
        LLM.load(paths[target_name], device="cpu", draft=paths[draft_name])


def test_draft_on_another_device_is_refused(dirs, target):
    draft = LLM.load(dirs["target"], device="cpu")
    draft.model.to("meta")  # stands in for a GPU: any device other than the target's
    with pytest.raises(InvalidArgumentError, match="the draft is on meta but the target on cpu"):
        LLM.load(dirs["target"], device="cpu", draft=draft)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft": "x", "speculative_k": 0}, "speculative k must be >= 1"),
        ({"draft_quantize": "int8"}, "draft_quantize needs a draft model"),
        ({"draft": "x", "draft_quantize": "int3"}, "unknown quantization method"),
    ],
)
def test_bad_draft_options_fail_before_loading(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        LLM.load("/does/not/exist", **kwargs)


def test_draft_quantize_with_a_loaded_draft_is_refused(target):
    with pytest.raises(InvalidArgumentError, match="draft_quantize applies to a draft loaded from a path"):
        target.set_draft(target, quantize="int8")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_generate_with_draft_prints_plain_greedy_text(dirs, capsys):
    argv = ["generate", "--model", str(dirs["target"]), "-p", PROMPT, "--temperature", "0"]
    argv += ["--max-new-tokens", "20", "--device", "cpu", "--no-stream"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--draft", str(dirs["other"]), "--speculative-k", "3", "--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "--compile is ignored with --draft" in captured.err and "draft accepted" in captured.err


def test_cli_chat_with_draft_runs(dirs):
    result = run_cli(
        "chat", "--model", str(dirs["target"]), "--draft", str(dirs["target"]), "--max-new-tokens", "5",
        "--device", "cpu", stdin="hi\n",
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_cli_bench_json_reports_the_draft(dirs, capsys):
    threads = str(torch.get_num_threads())
    argv = [
        "bench",
        str(dirs["target"]),
        "--json",
        "--prompt-len",
        "12",
        "--new-tokens",
        "9",
        "--repeat",
        "1",
    ]
    argv += ["--threads", threads, "--device", "cpu"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plain["draft"], plain["speculative_k"], plain["acceptance_rate"]) == (None, None, None)
    assert main([*argv, "--draft", str(dirs["target"]), "--speculative-k", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == set(plain)
    assert result["draft"] == str(dirs["target"]) and result["speculative_k"] == 2
    assert result["acceptance_rate"] == 1.0  # the model drafting for itself
    assert result["decode_tokens_per_s"] == pytest.approx(8 / result["decode_s"])
    assert main([arg for arg in argv if arg != "--json"] + ["--draft", str(dirs["target"])]) == 0
    assert "K=4, 100% accepted" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--speculative-k", "3"], "--speculative-k needs --draft MODEL"),
        (["--draft-quantize", "int8"], "--draft-quantize needs --draft MODEL"),
        (["--draft", "{target}", "--speculative-k", "0"], "speculative k must be >= 1"),
        (["--draft", "{wide_vocab}"], "vocabulary has 384 tokens"),
        (["--draft", "{retokenized}"], "tokenizer encodes text differently"),
    ],
)
def test_cli_bad_draft_input_is_one_line_error(dirs, capsys, extra, message):
    extra = [arg.format(**{name: str(path) for name, path in dirs.items()}) for arg in extra]
    assert main(["generate", "--model", str(dirs["target"]), "-p", "hi", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lamina: error: ") and message in err
    assert err.count("\n") == 1


def test_cli_bench_refuses_batched_draft(dirs, capsys):
    assert main(["bench", str(dirs["target"]), "--draft", str(dirs["target"]), "--batch", "2"]) == 2
    assert "--draft decodes one sequence at a time" in capsys.readouterr().err


def test_cli_bad_draft_exits_non_zero_without_traceback(dirs):
    result = run_cli(
        "generate", "--model", str(dirs["target"]), "-p", "hi", "--draft", str(dirs["wide_vocab"])
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "vocabulary has 384 tokens" in result.stderr


# --- the bundled model ------------------------------------------------------------------------


def test_real_model_int4_self_draft_gives_float32_greedy_tokens(default_gguf):
    llm = LLM.load(default_gguf, device="cpu", quantize="none", draft="default", speculative_k=4)
    assert llm.draft.source == default_gguf
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = llm.tokenizer.encode(prompt)
        expected = list(generate_tokens(llm.model, ids, 32, GREEDY))
        stats = GenerationStats()
        got = list(speculative_tokens(llm.model, llm.draft.model, ids, 32, GREEDY, 4, stats=stats))
        assert got == expected, prompt
        assert stats.acceptance_rate > 0.5, prompt
