"""Chat templates render like transformers and cannot reach Python internals."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidArgumentError, LaminaError
from lamina.loading.chat_template import render_chat


def test_renders_messages_and_generation_prompt():
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    out = render_chat(template, [{"role": "user", "content": "hi"}], True)
    assert out == "[user]hi[assistant]"


def test_template_raise_exception_becomes_clear_error():
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LaminaError, match="roles must alternate"):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals():
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LaminaError):
        render_chat(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}]])
def test_malformed_messages_are_rejected(messages):
    with pytest.raises(InvalidArgumentError):
        render_chat("{{ messages }}", messages)
