"""What the OpenAI-compatible API (see ``openai_api``) runs on: the ``GenerationBackend`` protocol,
its implementation over a ``Coordinator``, and chat prompt rendering.

:func:`render_chat` uses the target tokenizer's ``chat_template`` when it has one
(``add_generation_prompt=True``; a leading BOS string is dropped when the tokenizer adds BOS
itself, so the model never sees two); otherwise :func:`fallback_chat_prompt` writes one
``"{role}: {content}"`` line per message and ends with ``"assistant:"``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

from hsd_serve.engine.types import Chunk, GenerationRequest, RequestError


@runtime_checkable
class GenerationBackend(Protocol):
    """What the HTTP layer needs from the engine."""

    model_name: str

    def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        """Chunks of one request, the last carrying ``result``; raises :class:`RequestError`
        before the first chunk for a bad request.  Closing the iterator (``aclose``) must free
        whatever the request holds."""
        ...

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt text for chat ``messages`` (``[{"role", "content"}]``, content a string);
        may raise :class:`RequestError` (field ``messages``)."""
        ...

    async def health(self) -> dict:
        """``{"status": "ok", ...}`` when able to serve; any other status answers 503."""
        ...


def fallback_chat_prompt(messages: list[dict]) -> str:
    """``"system: ...\\nuser: ...\\nassistant:"``: one ``role: content`` line per message, then the
    generation prompt ``assistant:`` (the model writes the reply after it)."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    lines.append("assistant:")
    return "\n".join(lines)


def render_chat(tokenizer: Any, messages: list[dict]) -> str:
    """Render ``messages`` with the tokenizer's chat template, or :func:`fallback_chat_prompt`.

    ``tokenizer`` is a :class:`hsd_serve.models.tokenizer.TokenizerAdapter` (or a bare Hugging Face
    tokenizer).  Template errors (e.g. a template that insists on alternating roles) raise
    :class:`RequestError` on ``messages``.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if not getattr(hf, "chat_template", None):
        return fallback_chat_prompt(messages)
    try:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and friends: the messages
        if type(exc).__module__.split(".")[0] == "jinja2":
            raise RequestError("messages", f"the chat template rejects these messages: {exc}") \
                from exc
        raise
    if not isinstance(text, str):  # some versions return a list for a single conversation
        first = text[0] if isinstance(text, list) and text else None
        text = first if isinstance(first, str) else str(text)
    bos = getattr(hf, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos) and _adds_bos(tokenizer, hf):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer: Any, hf: Any) -> bool:
    """Does encoding a prompt already put BOS in front (so a template's BOS would double it)?"""
    bos_id = getattr(hf, "bos_token_id", None)
    if not isinstance(bos_id, int):
        return False
    try:
        if hasattr(tokenizer, "encode_prompt"):
            ids = tokenizer.encode_prompt("a")
        else:
            ids = list(hf.encode("a", add_special_tokens=True))
    except Exception:  # noqa: BLE001
        return False
    return bool(ids) and ids[0] == bos_id


class CoordinatorBackend:
    """:class:`GenerationBackend` over a :class:`hsd_serve.engine.engine.Coordinator`.

    ``tokenizer`` is the target's :class:`TokenizerAdapter` (its chat template renders chat
    prompts).
    """

    def __init__(self, coordinator: Any, tokenizer: Any, model_name: str):
        self.coordinator = coordinator
        self.tokenizer = tokenizer
        self.model_name = model_name

    def stream(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        return self.coordinator.stream(req)

    def chat_prompt(self, messages: list[dict]) -> str:
        return render_chat(self.tokenizer, messages)

    async def health(self) -> dict:
        c = self.coordinator
        drafter = getattr(c, "drafter", None)
        if drafter is None:  # a deployment wrapping a Coordinator: its drafter handle
            drafter = getattr(c, "drafter_handle", None)
        return {"status": "ok", "model": self.model_name, "drafter": drafter is not None}
