"""Chat templates: the Jinja template a model ships, rendered in a sandbox.

Templates come from `tokenizer_config.json`, `chat_template.jinja` or GGUF `tokenizer.chat_template`.
They are rendered with Jinja's immutable sandbox, the same way transformers renders them, so a
template can format messages but cannot reach Python objects or the file system.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from lamina.errors import InvalidArgumentError, LaminaError

Message = dict[str, str]


def validate_messages(messages: Any) -> list[Message]:
    """Messages as a list of {"role": str, "content": str}, or a clear error."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidArgumentError(
                f'message {i} must be a dict with string "role" and "content", got {m!r}'
            )
    return messages


def render_chat(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = True,
    **special_tokens: str | None,
) -> str:
    """The prompt text for `messages` under `template` (bos_token/eos_token passed as variables)."""
    import jinja2

    try:
        return _compile(template).render(
            messages=validate_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.TemplateError as exc:
        raise LaminaError(f"the model's chat template failed: {exc}") from None


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise LaminaError(f"the model's chat template is not valid Jinja: {exc}") from None
