"""The Python API: `LLM.load(...)` once, then `generate`, `stream` and `chat` as often as needed."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lamina.config import ModelConfig
from lamina.default_model import default_model_path, model_path
from lamina.engine.compiled import CompiledDecoder, should_compile
from lamina.engine.fusion import attach_native, fuse_projections
from lamina.engine.generate import GenerationStats, generate_tokens, input_device_dtype
from lamina.engine.prompt_lookup import DEFAULT_LOOKUP_K, PromptLookupDrafter
from lamina.engine.sampling import SamplingParams, check_seed
from lamina.engine.seq2seq import generate_seq2seq_tokens
from lamina.engine.speculative import DEFAULT_K, Drafter, speculative_tokens
from lamina.engine.text_stream import IncrementalDetokenizer, StopStrings
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.heap import release_free_heap
from lamina.kernels import native
from lamina.loading.chat_template import Message
from lamina.loading.checkpoint import open_checkpoint
from lamina.loading.loader import build_empty, load_weights
from lamina.loading.tokenizer import Tokenizer
from lamina.placement import load_and_dispatch
from lamina.placement.offload_store import default_offload_dir
from lamina.placement.plan import DTYPES, to_dtype
from lamina.quant.apply import DEFAULT_GROUP_SIZE
from lamina.quant.checkpoint import is_quantized_dir
from lamina.quant.gguf_stream import streamed_blocks
from lamina.quant.load import (
    check_prequantized,
    check_quantize_arg,
    default_quantize,
    finish_loading,
    load_saved_quantized,
    loading_claim,
    loading_hook,
    prequantized_scheme,
    weight_footprint,
)

#: The `draft` that drafts by prompt lookup (n-grams of the prompt and output) instead of a model.
PROMPT_LOOKUP = "prompt-lookup"
# Text both tokenizers must encode alike for a draft to be usable: words, digits, spacing, accents.
TOKENIZER_PROBE = "Speculative decoding: 12 drafts, 3.5 accepted!\n  Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A run dtype by name or as a torch dtype: float32, bfloat16 or float16 (`placement.to_dtype`)."""
    if dtype is None:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got None")
    return to_dtype(dtype)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first GPU if there is one, else the CPU; a named CUDA device must exist."""
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgumentError(f"device must be a str such as 'cpu' or 'cuda:0', got {device!r}")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r} requested but no CUDA GPU is available; use device cpu (or auto)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif resolved.type != "cpu":
        raise InvalidArgumentError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return resolved


class LLM:
    """A loaded model with its tokenizer, ready to generate."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config: ModelConfig, source: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.load_seconds = 0.0
        self.decoder: CompiledDecoder | None = None  # the compiled decode step, when enabled
        self.draft: LLM | str | None = None  # speculative decoding's draft model or PROMPT_LOOKUP, when set
        self.speculative_k = DEFAULT_K
        self.last_stats = GenerationStats()
        self.stop_ids = frozenset(config.eos_token_id) | (
            {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        )

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        quantize: str | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        max_memory: str | dict[str, str | int] | None = None,
        offload_dir: str | Path | None = None,
        compile: bool | None = None,
        fuse: bool = True,
        draft: LLM | str | Path | None = None,
        draft_quantize: str | None = None,
        speculative_k: int | None = None,
    ) -> LLM:
        """Load a model directory or .gguf file (default: the bundled SmolLM2-135M-Instruct).

        `quantize`: int8, int4, int4-minmax, nf4, fp4, nf4-dq, fp4-dq, llm.int8, gptq, fp8, bf16 or fp16, applied
        layer by layer while loading (`group_size` for int4/int4-minmax/gptq, the draft's too). A GGUF keeps its Q4_0/Q4_1/Q8_0 blocks quantized
        unless `quantize` says otherwise ("none" expands it to float); on a CPU in float32, linears
        stored in 16 bits stay 16-bit (`bf16`/`fp16`: exact) unless `quantize="none"`. See
        `lamina.quant.load`.

        With `max_memory` (`{"cpu": "300MB"}` or `"cpu=300MB,cuda:0=4GB"`) layers are placed on
        GPU / CPU / disk within those budgets and the rest streamed; `offload_dir` holds converted
        disk-tier layers (default: a folder under ~/.cache/lamina/offload). A GGUF keeps its blocks
        (placed, offloaded and streamed at its stored size) where the budgets are CPU RAM and disk
        and the native kernel runs; elsewhere, or with `quantize="none"`, it is expanded to float.

        `compile`: run each new token through a `torch.compile`d step; None = where it pays off
        (see `lamina.engine.compiled.should_compile`). `fuse`: merge q/k/v and gate/up projections
        after loading for speed; False keeps the checkpoint's module layout, for code that saves the model.

        `draft`: a small model with the same tokenizer (an `LLM`, a path, or "default" for the bundled
        model) that proposes `speculative_k` tokens (None: 4) for this one to verify in one pass, or
        "prompt-lookup" to propose up to `speculative_k` (None: 2) tokens that followed earlier
        occurrences of the last tokens; output is unchanged in distribution (see `set_draft`). A path
        is loaded like this model, quantized by `draft_quantize`. With a draft both models decode
        eagerly: `compile` is not used.
        """
        check_quantize_arg(quantize, group_size)
        _check_draft_options(draft, draft_quantize, speculative_k)
        _check_flags(compile=compile, fuse=fuse)
        if offload_dir is not None and not isinstance(offload_dir, (str, os.PathLike)):
            raise InvalidArgumentError(f"offload_dir must be a path, got {type(offload_dir).__name__}")
        torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
        source = model_path(path)
        saved_quantized = is_quantized_dir(source)
        if offload_dir is not None and max_memory is None:
            raise InvalidArgumentError(
                "the offload dir holds layers placed on disk under a memory budget; "
                "add a max memory budget (--max-memory) or drop the offload dir"
            )
        if max_memory is not None and compile:
            raise InvalidArgumentError("--compile cannot be combined with --max-memory yet; drop one of them")
        if max_memory is not None and saved_quantized:
            raise InvalidArgumentError(
                f"{source} is a quantized checkpoint and --max-memory streams float weights only yet; "
                "use the float checkpoint it was made from, or drop --max-memory"
            )
        if max_memory is not None and quantize not in (None, "none"):
            raise InvalidArgumentError(
                "--max-memory streams float weights and cannot be combined with quantization yet; "
                "drop --quantize (or use a float checkpoint)"
            )
        started = time.perf_counter()
        with open_checkpoint(source) as checkpoint:
            model, config = build_empty(checkpoint)
            tokenizer = Tokenizer.from_checkpoint(checkpoint)
            _check_tokenizer_fits(tokenizer, config, source)
            prequantized = prequantized_scheme(checkpoint)
            if prequantized is not None:
                check_prequantized(prequantized, quantize, max_memory)
            if quantize is None and max_memory is None and not saved_quantized and prequantized is None:
                quantize = default_quantize(model, checkpoint, torch_device, torch_dtype)
            if max_memory is not None:
                blocks = streamed_blocks(model, checkpoint, quantize, max_memory, torch_dtype)
                folder = offload_dir or default_offload_dir(source, torch_dtype, blocks=blocks is not None)
                load_and_dispatch(
                    model, blocks or checkpoint, max_memory=max_memory, offload_dir=folder, dtype=torch_dtype
                )
            elif saved_quantized:
                load_saved_quantized(model, source, quantize, torch_dtype, torch_device)
            else:
                hook = loading_hook(model, checkpoint, quantize, group_size)
                claim = loading_claim(
                    model, checkpoint, quantize, torch_device, torch_dtype, prequantized=prequantized
                )
                load_weights(model, checkpoint, torch_dtype, torch_device, on_loaded=hook, claim=claim)
                finish_loading(model, checkpoint, tokenizer.encode, quantize, group_size)
        model.eval()
        llm = cls(model, tokenizer, config, source)
        if max_memory is None and fuse:  # fusing streamed layers would pull them back into resident memory
            fuse_projections(model, release=release_free_heap)
        if torch_device.type == "cpu":  # after fusing, which merges plain nn.Linear modules only
            attach_native(model)
            _warn_without_native_kernels()
        if max_memory is None and draft is None and should_compile(model, torch_device, compile):
            llm.decoder = CompiledDecoder(model)
        if draft is not None:
            llm.set_draft(draft, k=speculative_k, quantize=draft_quantize, group_size=group_size)
        llm.load_seconds = time.perf_counter() - started
        return llm

    def set_draft(
        self,
        draft: LLM | str | Path | None,
        k: int | None = None,
        quantize: str | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        """Decode speculatively: `draft` proposes `k` tokens at a time and this model verifies them.

        Greedy output stays identical to this model's own; sampled output keeps its distribution
        (the speculative-sampling rule). The draft must be a decoder-only model with the same
        vocabulary and tokenization, on the same device. A path (or "default", the bundled model)
        is loaded on this model's device and activation dtype, quantized by `quantize` (None keeps
        a GGUF's blocks; `group_size` for int4/int4-minmax/gptq). A draft is resident even when this model
        streams under `max_memory`, and its weights are not counted in that budget. "prompt-lookup"
        drafts without a model (see `lamina.engine.prompt_lookup`). `k` None: 4 for a model, 2 for
        prompt lookup. None as `draft` turns speculative decoding off.
        """
        if draft is None:
            self.draft = None
            return
        _check_draft_options(draft, quantize, k)
        _check_decoder_only(self, "target")
        if str(draft) == PROMPT_LOOKUP:
            self.draft, self.speculative_k = PROMPT_LOOKUP, DEFAULT_LOOKUP_K if k is None else k
            return
        if not isinstance(draft, LLM):
            path = default_model_path() if str(draft) == "default" else draft
            device, dtype = input_device_dtype(self.model)
            draft = LLM.load(
                path, dtype=dtype, device=device, quantize=quantize, group_size=group_size, compile=False
            )
        self._check_draft(draft)
        self.draft, self.speculative_k = draft, DEFAULT_K if k is None else k

    def _check_draft(self, draft: LLM) -> None:
        """Refuse a draft whose tokens would not mean the same as this model's, or that runs elsewhere."""
        _check_decoder_only(draft, "draft")
        if draft.config.vocab_size != self.config.vocab_size:
            raise InvalidArgumentError(
                f"the draft's vocabulary has {draft.config.vocab_size} tokens but the target's has "
                f"{self.config.vocab_size}; use a draft from the target's model family (same tokenizer)"
            )
        probe = [llm.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False) for llm in (draft, self)]
        if probe[0] != probe[1]:
            raise InvalidArgumentError(
                "the draft's tokenizer encodes text differently from the target's; "
                "use a draft from the target's model family (same tokenizer)"
            )
        if draft.device != self.device:
            raise InvalidArgumentError(
                f"the draft is on {draft.device} but the target on {self.device}; load both on the same device"
            )

    def drafter(self) -> nn.Module | Drafter | None:
        """What proposes tokens for speculative decoding: the draft model, a prompt-lookup drafter, or None."""
        if isinstance(self.draft, LLM):
            return self.draft.model
        return PromptLookupDrafter() if self.draft == PROMPT_LOOKUP else None

    @property
    def draft_name(self) -> str | None:
        """The draft as reports name it: its checkpoint path, "prompt-lookup", or None."""
        return str(self.draft.source) if isinstance(self.draft, LLM) else self.draft

    @property
    def device(self) -> torch.device:
        return input_device_dtype(self.model)[0]

    def memory_footprint(self) -> dict[str, int]:
        """Bytes of weights (parameters and buffers) per device, e.g. {"cpu": 98000000}; under
        `max_memory` the disk tier's as "disk" (read from their files each step, not resident)."""
        return weight_footprint(self.model)

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        add_special_tokens: bool = True,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is decoded (whole characters only).

        Stops at the model's end-of-sequence token, at the first of `stop` (not included), or after
        `max_new_tokens`. Timings of the run land in `self.last_stats`.
        """
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        _check_request(prompt, max_new_tokens, seed)
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgumentError(f"stop must be a str or a list of str, got {stop!r}")
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        self.last_stats = GenerationStats()
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(stop)
        if getattr(self.model, "is_encoder_decoder", False):
            tokens = generate_seq2seq_tokens(
                self.model, prompt_ids, max_new_tokens, params, self.stop_ids, seed, self.last_stats
            )
        elif self.draft is not None:
            tokens = speculative_tokens(
                self.model,
                self.drafter(),
                prompt_ids,
                max_new_tokens,
                params,
                self.speculative_k,
                self.stop_ids,
                seed,
                self.last_stats,
            )
        else:
            tokens = generate_tokens(
                self.model,
                prompt_ids,
                max_new_tokens,
                params,
                self.stop_ids,
                seed,
                self.last_stats,
                self.decoder,
            )
        try:
            for token in tokens:
                if token in self.stop_ids:
                    break
                text = stops.feed(detokenizer.push(token))
                if text:
                    yield text
                if stops.stopped:
                    return
            tail = stops.feed(detokenizer.flush()) + stops.flush()
            if tail:
                yield tail
        finally:
            tokens.close()

    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The whole continuation of `prompt` as one string; takes the same options as `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def chat_prompt(self, messages: list[Message]) -> str:
        """The prompt text for a conversation in the model's chat template, ready for the reply."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat_stream(self, messages: list[Message], **kwargs: Any) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        # The template writes any special tokens itself; don't add a second BOS.
        return self.stream(self.chat_prompt(messages), add_special_tokens=False, **kwargs)

    def chat(self, messages: list[Message], **kwargs: Any) -> str:
        """The assistant's reply to `messages` as one string."""
        return "".join(self.chat_stream(messages, **kwargs))


def _check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, source: Path) -> None:
    """A tokenizer whose vocabulary outgrows the model's belongs to another model: its ids would index
    past the embedding (an IndexError at the first prompt)."""
    size = tokenizer.backend.get_vocab_size(with_added_tokens=False)
    if size > config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {size} tokens but the model's vocabulary has {config.vocab_size}; "
            "the tokenizer belongs to another model, use the model's own tokenizer.json"
        )


def _warn_without_native_kernels() -> None:
    """Say so when a CPU that could run the native kernels runs without them (no compiler, a failed
    build, a forced build it lacks): decoding is then about half as fast, which should not go
    unnoticed. Turning them off on purpose (LAMINA_NATIVE_KERNELS=0) is not warned about."""
    if native.library() is None and native.cpu_supported() and not native.turned_off():
        warnings.warn(
            f"Lamina's native CPU kernels are unavailable ({native.unavailable_reason()}); "
            "decoding runs on torch's slower kernels",
            stacklevel=3,
        )


def _check_flags(**flags: object) -> None:
    """Yes/no options must be bools (None where it means "decide"): a string like "no" is truthy."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")


def _check_request(prompt: object, max_new_tokens: object, seed: object) -> None:
    """Reject what the tokenizer and torch would fail on with a traceback: a prompt that is not text,
    a token count that is not a positive integer, a seed torch cannot hold."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"the prompt must be a str, got {type(prompt).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max new tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_seed(seed)


def _check_draft_options(draft: object, quantize: str | None, k: int | None) -> None:
    """Validate the speculative-decoding arguments before anything is loaded."""
    if draft is not None and not isinstance(draft, (LLM, str, os.PathLike)):
        raise InvalidArgumentError(
            f"draft must be an LLM, a path or 'prompt-lookup', got {type(draft).__name__}"
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise InvalidArgumentError(f"speculative k must be an integer (tokens drafted per step), got {k!r}")
    if k is not None and k < 1:
        raise InvalidArgumentError(f"speculative k must be >= 1 (tokens drafted per step), got {k}")
    if quantize is not None and draft is None:
        raise InvalidArgumentError("draft_quantize needs a draft model; pass draft=PATH (or drop it)")
    if quantize is not None and str(draft) == PROMPT_LOOKUP:
        raise InvalidArgumentError("draft_quantize needs a draft model; prompt lookup has none (drop it)")
    if quantize is not None and isinstance(draft, LLM):
        raise InvalidArgumentError(
            "draft_quantize applies to a draft loaded from a path; pass the path, or load the draft quantized"
        )
    check_quantize_arg(quantize, None)


def _check_decoder_only(llm: LLM, role: str) -> None:
    if getattr(llm.model, "is_encoder_decoder", False):
        raise InvalidArgumentError(
            f"speculative decoding needs decoder-only models but the {role} {llm.source.name} is "
            "encoder-decoder; drop the draft"
        )
