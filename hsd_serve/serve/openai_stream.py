"""Answering one OpenAI request from an engine stream (see ``openai_api``): the pump that steps
the engine, the response shapes (completion, chat, their chunks), one JSON body or SSE events.

Each engine step runs as its own task; when the handler is cancelled (client gone) the step is
cancelled with plain asyncio semantics and the engine stream is closed inside a shielded scope, so
the engine's ``finally`` (which frees the KV caches on both workers) always runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from hsd_serve.engine.types import Chunk, GenerationRequest, GenerationResult, RequestError
from hsd_serve.serve.openai_errors import engine_error, failure, json_response

log = logging.getLogger(__name__)

# Statistics reported in each response's ``hsd`` block.
HSD_STAT_KEYS = ("method", "rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round",
                 "wall_s", "tokens_per_s", "fallback_rounds", "ttft_s")


class Pump:
    """Steps an engine stream one chunk at a time, each step in its own task.

    A cancelled caller (client gone) cancels the running step with ordinary one-shot asyncio
    cancellation, so the engine's ``finally`` can still await its cache frees; :meth:`aclose`
    runs shielded for the same reason.
    """

    def __init__(self, agen: AsyncIterator[Chunk]):
        self.agen = agen

    async def _step(self) -> Optional[Chunk]:
        try:
            return await self.agen.__anext__()
        except StopAsyncIteration:
            return None

    async def next(self) -> Optional[Chunk]:
        task = asyncio.ensure_future(self._step())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            with anyio.CancelScope(shield=True):
                try:
                    await task
                except BaseException:  # noqa: BLE001 - the step's own cancellation/failure
                    pass
            raise

    async def aclose(self) -> None:
        aclose = getattr(self.agen, "aclose", None)
        if aclose is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await aclose()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the answer
                log.warning("closing an engine stream failed: %s", exc)


def _hsd_block(result: GenerationResult, seed: int) -> dict:
    d = result.stats.as_dict()
    out = {k: d[k] for k in HSD_STAT_KEYS}
    out["seed"] = seed
    return out


def _usage(result: GenerationResult) -> dict:
    p = int(result.stats.prompt_tokens)
    c = len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=True, allow_nan=False,
                                  separators=(",", ":")).encode("ascii") + b"\n\n"


DONE = b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """SSE response that always closes its event generator (hence the engine stream) at once,
    even when the handler is cancelled while a chunk is being sent."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class Shape:
    """Builds the OpenAI objects for one request (completions or chat)."""

    def __init__(self, chat: bool, model: str, seed: int):
        self.chat = chat
        self.model = model
        self.seed = seed
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, result: GenerationResult) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None,
                      "finish_reason": result.finish_reason}
            out = self._head("text_completion")
        out.update(choices=[choice], usage=_usage(result), hsd=_hsd_block(result, self.seed))
        return out

    def piece(self, text: Optional[str], finish: Optional[str] = None, *,
              role: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._head("text_completion")
        out["choices"] = [choice]
        return out

    def last(self, result: GenerationResult, text: str) -> dict:
        out = self.piece(text if text or not self.chat else None, result.finish_reason)
        out.update(usage=_usage(result), hsd=_hsd_block(result, self.seed))
        return out


async def answer(request: Request, backend: Any, req: GenerationRequest, shape: Shape,
                 stream: bool, kinds: tuple) -> Response:
    """Run ``req`` on ``backend`` (a ``GenerationBackend``) and answer: an error before the first
    chunk is a plain 400/503/500; then SSE events (``stream``) or one JSON body."""
    pump = Pump(backend.stream(req))
    first = await _first_chunk(pump, shape, kinds)
    if isinstance(first, Response):
        return first
    if stream:
        return EventStream(_events(request, pump, first, shape, kinds),
                           media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, pump, first, shape, kinds)


async def _first_chunk(pump: Pump, shape: Shape, kinds: tuple) -> Union[Chunk, Response]:
    """The first chunk, or the error answer (the engine stream closed)."""
    try:
        first = await pump.next()
        if first is None:
            raise RuntimeError("the engine stream ended without a result")
        return first
    except RequestError as exc:
        await pump.aclose()
        return engine_error(exc, shape.chat).response()
    except Exception as exc:  # noqa: BLE001
        await pump.aclose()
        return failure(exc, kinds).response()
    except BaseException:  # cancelled: the client is gone
        await pump.aclose()
        raise


async def _collect(request: Request, pump: Pump, first: Chunk, shape: Shape,
                   kinds: tuple) -> Response:
    """The whole completion as one JSON body (499 when the client left first)."""
    try:
        chunk = first
        while chunk.result is None:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody to answer; finally frees caches
            chunk = await pump.next()
            if chunk is None:
                raise RuntimeError("the engine stream ended without a result")
        return json_response(shape.full(chunk.result))
    except RequestError as exc:
        return engine_error(exc, shape.chat).response()
    except Exception as exc:  # noqa: BLE001
        return failure(exc, kinds).response()
    finally:
        await pump.aclose()


async def _events(request: Request, pump: Pump, first: Chunk, shape: Shape,
                  kinds: tuple) -> AsyncIterator[bytes]:
    """SSE: a chunk per engine chunk with text, the last with usage and ``hsd``; an error after
    the start is an ``error`` event; always ``[DONE]`` at the end."""
    try:
        chunk: Optional[Chunk] = first
        if shape.chat:
            yield sse(shape.piece("", role=True))
        while True:
            if chunk is None:
                raise RuntimeError("the engine stream ended without a result")
            if chunk.result is not None:
                yield sse(shape.last(chunk.result, chunk.text))
                break
            if chunk.text:
                yield sse(shape.piece(chunk.text))
            if await request.is_disconnected():
                return  # finally closes the engine stream
            chunk = await pump.next()
    except RequestError as exc:
        yield sse(engine_error(exc, shape.chat).body())
    except Exception as exc:  # noqa: BLE001
        yield sse(failure(exc, kinds, "generation failed mid-stream").body())
    finally:
        await pump.aclose()
    yield DONE
