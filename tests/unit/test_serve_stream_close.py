"""A stream's decoder call is cancelled as soon as its client leaves, not when the garbage collector
gets to the abandoned generators (orchestration/serve/app.py: `_sse`, `_cancel_unless_finished`).

The response runs under Starlette's real StreamingResponse machinery, on an ASGI 2.3 scope, where a
client's disconnect cancels the response wherever it waits. The decoder call is Serve's response
reduced to the one method the front calls on it.
"""
from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from orchestration.serve.app import _cancel_unless_finished, _sse


class Call:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def events(call: Call, closed: list, count: int):
    with _cancel_unless_finished(call):
        try:
            for i in range(count):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(True)


async def serve_once(count: int, leave_mid_send: bool):
    """Run one streamed response; the client leaves while the first event is being sent, or
    reads to the end. Returns (events closed, call cancelled, body chunks sent), read before
    anything could finalise the generators."""
    call, closed, chunks = Call(), [], []
    sent_first = asyncio.Event()

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            sent_first.set()
            if leave_mid_send:
                await asyncio.Event().wait()  # the client is gone: this send never completes

    async def receive():
        await sent_first.wait()
        if not leave_mid_send:
            await asyncio.Event().wait()  # a client that stays
        return {"type": "http.disconnect"}

    response = _sse(events(call, closed, count))
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return bool(closed), call.cancelled, len(chunks)


def test_a_client_gone_mid_send_closes_the_events_and_cancels_the_call_at_once():
    closed, cancelled, sent = asyncio.run(serve_once(1000, leave_mid_send=True))
    assert sent == 1
    assert closed and cancelled


def test_a_stream_read_to_its_end_does_not_cancel_its_call():
    closed, cancelled, sent = asyncio.run(serve_once(3, leave_mid_send=False))
    assert sent == 3 + 1  # the events and [DONE]
    assert closed and not cancelled


def test_a_call_whose_replica_died_is_not_cancelled_and_the_error_goes_on():
    call = Call()
    with pytest.raises(RayActorError):
        with _cancel_unless_finished(call):
            raise RayActorError()
    assert not call.cancelled


def test_any_other_way_out_cancels_the_call():
    call = Call()
    with pytest.raises(asyncio.CancelledError):
        with _cancel_unless_finished(call):
            raise asyncio.CancelledError()
    assert call.cancelled
