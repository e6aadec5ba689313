"""The base's chat template, applied in one place for training data, `generate` and `serve`.

A template is the model author's code, and many refuse conversations on purpose (Mistral's and
Llama 2's ``raise_exception('Conversation roles must alternate ...')``, no system role, ...). Such a
refusal is the user's input meeting the template's rules, so it is a ``ChatTemplateRefused`` naming
the template's own words: a bad row in training data, a 400 in `serve`, one error line in
`generate`, never a traceback or a 500."""

from __future__ import annotations

from typing import Any

from flora_train.errors import UserError


class ChatTemplateRefused(UserError, ValueError):
    """The chat template could not render a conversation; the message is the template's reason."""


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                        tokenize: bool) -> Any:
    """``tokenizer.apply_chat_template``, with a refusal raised as ``ChatTemplateRefused``."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(_roles_it_knows(tokenizer, messages),
                                             add_generation_prompt=add_generation_prompt, tokenize=tokenize)
    except jinja2.TemplateError as exc:  # the template's raise_exception(), or a template bug it met
        raise ChatTemplateRefused(f"the chat template refuses this conversation: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:  # template code evaluated on these messages
        raise ChatTemplateRefused(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None


def _roles_it_knows(tokenizer: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's ``developer`` role (what its newer clients send in place of ``system``) as ``system``
    for a template that does not name it: ChatML templates (SmolLM2's, Qwen's) would otherwise write a
    ``developer`` header the model never saw. A template naming it (gpt-oss's) gets it as it is."""
    if not any(m.get("role") == "developer" for m in messages) or "developer" in str(tokenizer.chat_template):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def text_of_parts(content: str | list[dict[str, Any]]) -> str:
    """OpenAI's message ``content``: a string, or a list of content parts. Text parts are joined with
    newlines (as vLLM does for a text-only model); any other kind is refused by name."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"content[{i}] is {part!r:.40}, not a content part ({{'type': 'text', 'text': ...}})")
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"of type {kind!r}" if kind != "text" else "a text part without a 'text' string"
            raise ValueError(f"content[{i}] is {what}: this model reads text only (parts of type 'text')")
        texts.append(part["text"])
    return "\n".join(texts)
