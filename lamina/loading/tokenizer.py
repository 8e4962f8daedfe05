"""The tokenizer a model ships: text <-> ids, special tokens, and its chat template.

Backed by Hugging Face `tokenizers`, loaded from `tokenizer.json` (+ `tokenizer_config.json`) in an
HF directory or rebuilt from a GGUF file's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from lamina.errors import CheckpointError, InvalidArgumentError, LaminaError
from lamina.loading.chat_template import Message, render_chat
from lamina.loading.checkpoint import Checkpoint, read_json


class Tokenizer:
    """Encode/decode text for one model and render its chat template."""

    def __init__(
        self,
        backend: Backend,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.add_bos = add_bos

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Tokenizer:
        """The tokenizer stored with `checkpoint` (an HF directory's files or GGUF metadata)."""
        from lamina.loading.gguf import GGUFCheckpoint

        if isinstance(checkpoint, GGUFCheckpoint):
            return cls.from_gguf_metadata(checkpoint.metadata, source=str(checkpoint.path))
        return cls.from_hf_dir(checkpoint.path)

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json; Lamina needs the fast-tokenizer file")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise CheckpointError(
                f"cannot read {file}: {exc}; re-download the model's tokenizer.json"
            ) from None
        config = _tokenizer_config(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # a list of named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            chat_template=template,
            add_bos=bool(config.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "the GGUF file") -> Tokenizer:
        """The tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes; metadata that cannot
        make one is a `CheckpointError` naming `source` (the file) and the key."""
        from lamina.loading.gguf_tokenizer import tokenizer_from_gguf

        try:  # checks the metadata first: the token list and the special-token ids used below
            backend = tokenizer_from_gguf(metadata, source)
        except LaminaError:
            raise
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. a merge of unknown tokens
            raise CheckpointError(
                f"{source}: cannot build the tokenizer from its metadata ({' '.join(str(exc).split())}); "
                "the file's metadata is damaged, re-download or re-convert it"
            ) from None
        tokens = metadata["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[token_id] if token_id is not None else None

        # BOS, when the file asks for it, is added by the backend's post-processor.
        return cls(
            backend,
            bos_token=token("bos"),
            eos_token=token("eos"),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:  # undecodable bytes (surrogate-escaped, as argv and stdin carry them) fail in the backend
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(
                f"the text is not valid UTF-8 (undecodable bytes at character {exc.start}); pass UTF-8 text"
            ) from None
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, in the model's own chat format."""
        if not self.chat_template:
            raise LaminaError("this model has no chat template; use plain generation instead of chat")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _tokenizer_config(file: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} where the model has none); a damaged one names the fix."""
    if not file.is_file():
        return {}
    try:
        return read_json(file)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; re-download the model's tokenizer_config.json") from None


def _token_text(token: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or {"content": ...} dicts."""
    if isinstance(token, dict):
        return token.get("content")
    return token
