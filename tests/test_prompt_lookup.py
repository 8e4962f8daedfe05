"""Prompt lookup: the n-gram index against a brute-force search, the loop against plain greedy
decoding on a tiny random Llama, the API and CLI, and the bundled model on a repetitive text."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from lamina import LLM
from lamina.api import PROMPT_LOOKUP
from lamina.cli import main
from lamina.engine.generate import GenerationStats, generate_tokens
from lamina.engine.kv_cache import KVCache
from lamina.engine.perplexity import default_text
from lamina.engine.prompt_lookup import DEFAULT_LOOKUP_K, NgramIndex, PromptLookupDrafter
from lamina.engine.sampling import SamplingParams
from lamina.engine.speculative import speculative_tokens
from lamina.errors import InvalidArgumentError
from lamina.models.layers import cached_attend
from lamina.models.sdpa import decode_order_attention
from tests.test_speculative import PROMPT, _save, _tiny_llama

GREEDY = SamplingParams(temperature=0)

# --- the n-gram index ---------------------------------------------------------------------------


def _proposal(tokens: list[int], k: int) -> list[int]:
    index = NgramIndex()
    index.extend(tokens)
    return index.propose(k)


def test_proposes_what_followed_the_latest_earlier_occurrence():
    assert _proposal([2, 3, 4, 2, 3, 5, 9, 2, 3], 3) == [5, 9, 2]  # the later of two (2, 3)s


def test_longer_matches_win_over_later_shorter_ones():
    # (1, 2, 3) last ended at 3; (2, 3) later, at 7: the 3-gram's continuation is proposed.
    assert _proposal([1, 2, 3, 4, 6, 2, 3, 5, 1, 2, 3], 3) == [4, 6, 2]


def test_no_proposal_without_a_repeated_ngram():
    assert _proposal([1, 2, 3, 4], 4) == []
    assert _proposal([7, 1, 8, 1], 4) == []  # a single repeated token is not enough
    assert _proposal([5], 4) == []


def test_proposals_stop_at_the_end_of_the_sequence():
    assert _proposal([1, 2, 1, 2], 4) == [1, 2]
    assert _proposal([4, 4, 4], 4) == [4]  # a run continues itself


def _brute_force(tokens: list[int], k: int, min_n: int = 2, max_n: int = 3) -> list[int]:
    end = len(tokens)
    for n in range(min(max_n, end), min_n - 1, -1):
        for stop in range(end - 1, n - 1, -1):  # latest earlier occurrence first
            if tokens[stop - n : stop] == tokens[end - n :]:
                return tokens[stop : stop + k]
    return []


def test_growing_index_agrees_with_brute_force_search():
    rng = random.Random(0)
    for _ in range(50):
        index, tokens = NgramIndex(), []
        for _ in range(30):
            chunk = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]  # small alphabet: many repeats
            tokens += chunk
            index.extend(chunk)
            k = rng.randrange(1, 6)
            assert index.propose(k) == _brute_force(tokens, k), tokens


# --- the loop on a tiny random Llama --------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> LLM:
    return LLM.load(_save(_tiny_llama(), tmp_path_factory.mktemp("lookup") / "target"), device="cpu")


@pytest.fixture(scope="module")
def repetitive_ids(target) -> list[int]:
    """The prompt, its greedy continuation, then the prompt again: the model tends to repeat itself."""
    ids = target.tokenizer.encode(PROMPT)
    return ids + list(generate_tokens(target.model, ids, 24, GREEDY)) + ids


def _lookup(target: LLM, ids: list[int], n: int, k: int, **kw) -> list[int]:
    params = kw.pop("params", GREEDY)
    return list(speculative_tokens(target.model, PromptLookupDrafter(), ids, n, params, k, **kw))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_tokens_equal_plain_greedy(target, repetitive_ids, k):
    stats = GenerationStats()
    got = _lookup(target, repetitive_ids, 40, k, stats=stats)
    assert got == list(generate_tokens(target.model, repetitive_ids, 40, GREEDY))
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # some proposals kept, some not


def test_max_new_tokens_and_stop_ids_are_exact(target, repetitive_ids):
    full = list(generate_tokens(target.model, repetitive_ids, 20, GREEDY))
    for n in range(1, 12):
        assert _lookup(target, repetitive_ids, n, 4) == full[:n]
    for i in (3, 8):
        assert _lookup(target, repetitive_ids, 20, 4, stop_ids={full[i]}) == full[: full.index(full[i]) + 1]


def test_sampling_keeps_the_distribution_path_exact(target, repetitive_ids):
    # top-k 1 makes p one-hot: a proposal survives only if it is the argmax, and a rejection draws
    # from p with the proposal removed, which is the argmax again. Output = greedy, through the
    # one-hot q of deterministic proposals.
    params = SamplingParams(temperature=0.7, top_k=1)
    stats = GenerationStats()
    got = _lookup(target, repetitive_ids, 30, 3, params=params, seed=0, stats=stats)
    assert got == list(generate_tokens(target.model, repetitive_ids, 30, GREEDY))
    assert 0 < stats.accepted < stats.drafted
    sampled = SamplingParams(temperature=1.0)
    runs = [_lookup(target, repetitive_ids, 30, 3, params=sampled, seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


class FixedDistribution(torch.nn.Module):
    """A stand-in model whose next-token distribution is always `p`, whatever came before."""

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(len(p), 1)
        self.register_buffer("logits", p.log())
        self.config = SimpleNamespace(max_position_embeddings=4096, vocab_size=len(p))

    def input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def decoder_layers(self) -> list:
        return []

    def cache_layout(self) -> list:
        return []

    def forward(self, ids: torch.Tensor, cache=None, start_pos=0, last_only=False) -> torch.Tensor:
        return self.logits.expand(ids.shape[0], 1 if last_only else ids.shape[1], -1)  # [B, T, V]


def test_sampled_tokens_agree_with_proposals_only_as_often_as_p_says():
    """Tokens drawn i.i.d. from p equal the lookup's proposal with probability sum(p^2) = 0.46; a rule
    that kept proposals too readily would copy the text's past far more often."""
    p = torch.tensor([0.6, 0.3, 0.1])
    prompt = [0, 1, 2, 0, 0, 1, 2, 1, 0, 2]
    params = SamplingParams(temperature=1.0)
    out = list(
        speculative_tokens(FixedDistribution(p), PromptLookupDrafter(), prompt, 1500, params, 3, seed=0)
    )
    text = prompt + out
    matches = [
        text[i] == proposal[0]
        for i in range(len(prompt) + 1, len(text))
        if (proposal := _brute_force(text[:i], 1))
    ]
    assert len(matches) > 1000
    assert sum(matches) / len(matches) == pytest.approx(0.46, abs=0.04)
    torch.testing.assert_close(
        torch.bincount(torch.tensor(out), minlength=3) / len(out), p, atol=0.03, rtol=0
    )


# --- API and CLI ----------------------------------------------------------------------------------


def test_load_with_prompt_lookup_matches_plain_generation(target):
    plain = target.generate(PROMPT * 3, max_new_tokens=24, temperature=0)
    llm = LLM.load(target.source, device="cpu", draft="prompt-lookup")
    assert (llm.draft, llm.draft_name, llm.speculative_k) == (
        PROMPT_LOOKUP,
        "prompt-lookup",
        DEFAULT_LOOKUP_K,
    )
    assert llm.generate(PROMPT * 3, max_new_tokens=24, temperature=0) == plain
    assert llm.last_stats.drafted > 0
    llm.set_draft("prompt-lookup", k=5)
    assert llm.speculative_k == 5 and isinstance(llm.drafter(), PromptLookupDrafter)
    llm.set_draft(None)
    assert llm.drafter() is None


def test_prompt_lookup_has_no_model_to_quantize(target):
    with pytest.raises(InvalidArgumentError, match="prompt lookup has none"):
        LLM.load(target.source, device="cpu", draft="prompt-lookup", draft_quantize="int8")


def test_cli_generate_and_bench_with_prompt_lookup(target, capsys):
    argv = ["generate", "--model", str(target.source), "-p", PROMPT * 3, "--temperature", "0"]
    argv += ["--max-new-tokens", "20", "--device", "cpu", "--no-stream"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--draft", "prompt-lookup"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "draft accepted" in captured.err
    bench = ["bench", str(target.source), "--json", "--prompt-len", "24", "--new-tokens", "12"]
    bench += ["--repeat", "1", "--device", "cpu", "--threads", str(torch.get_num_threads())]
    assert main([*bench, "--draft", "prompt-lookup"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["draft"], result["speculative_k"]) == ("prompt-lookup", DEFAULT_LOOKUP_K)
    assert 0.0 <= result["acceptance_rate"] <= 1.0


def test_cli_prompt_lookup_with_draft_quantize_is_one_line_error(target, capsys):
    argv = ["generate", "--model", str(target.source), "-p", "hi", "--device", "cpu"]
    assert main([*argv, "--draft", "prompt-lookup", "--draft-quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt lookup has none" in err and len(err.splitlines()) == 1


# --- the bundled model ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4])
def test_decode_order_attention_equals_one_token_steps(window):
    """Several new tokens attended under `decode_order_attention` give bit-for-bit what attending
    them one decode step at a time gives (the greedy verify pass relies on it)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 16, generator=generator)  # 5 new tokens, 4 query heads
    k, v = (torch.randn(1, 2, 305, 16, generator=generator) for _ in range(2))  # 2 KV heads, 300 cached

    def cache_with_past() -> KVCache:
        cache = KVCache([(2, 16)], batch=1, max_len=305, dtype=torch.float32, devices=[torch.device("cpu")])
        cache.update(0, 0, k[:, :, :300], v[:, :, :300])
        return cache

    stepped = cache_with_past()
    steps = [
        cached_attend(q[:, :, t : t + 1], k[:, :, 300 + t : 301 + t], v[:, :, 300 + t : 301 + t], stepped, 0, 300 + t, window)
        for t in range(5)
    ]  # fmt: skip
    with decode_order_attention():
        together = cached_attend(q, k[:, :, 300:], v[:, :, 300:], cache_with_past(), 0, 300, window)
    assert torch.equal(together, torch.cat(steps, dim=2))


def test_real_model_prompt_lookup_gives_the_plain_greedy_tokens(default_gguf):
    """The story prompt's plain greedy text has near-ties a multi-row attention call flipped (at
    token 17) before the verify pass attended row by row."""
    llm = LLM.load(default_gguf, device="cpu")
    document = llm.tokenizer.encode(default_text(), add_special_tokens=False)[:256]  # CPython's docs
    story = llm.tokenizer.encode("Once upon a time, in a land far away,")
    for ids, kept in ((document, 0.3), (story, 0.0)):
        stats = GenerationStats()
        got = list(speculative_tokens(llm.model, PromptLookupDrafter(), ids, 64, GREEDY, 2, stats=stats))
        assert got == list(generate_tokens(llm.model, ids, 64, GREEDY))
        assert stats.drafted > 0 and stats.acceptance_rate >= kept
