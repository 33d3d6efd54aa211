"""A chat completion stream (the chat path's SSE bytes) as the Responses API's named
events, each with a rising ``sequence_number``: response.created, .in_progress, the output
items, their text or arguments deltas and dones, then response.completed (or .incomplete,
or .failed on an error after the first byte)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import orjson

from app.responses.output import finish, function_call_item, message_item, skeleton
from app.serving.ids import new_id
from schemas import ResponsesRequest


class ResponseEvents:
    def __init__(self, body: ResponsesRequest, response_id: str,
                 on_done: Callable[[dict[str, Any]], None]) -> None:
        self.response = skeleton(body, response_id, "in_progress")
        self._on_done = on_done
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_calls index -> open item
        self._arguments: dict[int, list[str]] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        # The text delta event as a byte template (sequence number, delta), made when the
        # message opens: the per-token path formats it and does nothing else.
        self._delta_template: bytes | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._sequence += 1
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def start(self) -> bytes:
        return self._event("response.created", response=self.response) + \
            self._event("response.in_progress", response=self.response)

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return out

    def text(self, text: str) -> bytes:
        """A text delta, from a byte template made once per message: the per-token path."""
        if self._delta_template is None:
            return self._text_delta(text)
        self._text.append(text)
        self._sequence += 1
        return self._delta_template % (self._sequence, orjson.dumps(text))

    def calls(self, deltas: list[dict[str, Any]]) -> bytes:
        """Chat tool_calls deltas as function_call items and their arguments' events."""
        return b"".join(self._call_delta(delta) for delta in deltas)

    def finished(self, reason: str | None, usage: dict[str, Any] | None) -> None:
        self._finish_reason = reason or self._finish_reason
        self._usage = usage or self._usage

    def _text_delta(self, text: str) -> bytes:
        out = b""
        if self._message is None:
            self._message = message_item("", "in_progress")
            self._message["content"] = []
            self._output.append(self._message)
            out += self._event("response.output_item.added", output_index=self._index(
                self._message), item=self._message)
            out += self._event("response.content_part.added", item_id=self._message["id"],
                               output_index=self._index(self._message), content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
            kind = b"response.output_text.delta"
            item_id = orjson.dumps(self._message["id"]).replace(b"%", b"%%")
            self._delta_template = (
                b"event: " + kind + b'\ndata: {"type":"' + kind + b'","sequence_number":%d'
                + b',"item_id":' + item_id + b',"output_index":'
                + str(self._index(self._message)).encode()
                + b',"content_index":0,"delta":%b,"logprobs":[]}\n\n')
        self._text.append(text)
        return out + self._event("response.output_text.delta", item_id=self._message["id"],
                                 output_index=self._index(self._message), content_index=0,
                                 delta=text, logprobs=[])

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            item = function_call_item(call.get("id") or new_id("call_"),
                                      function.get("name") or "", "", "in_progress")
            self._calls[index] = item
            self._arguments[index] = []
            self._output.append(item)
            out += self._event("response.output_item.added", output_index=self._index(item),
                               item=item)
        elif function.get("name"):
            item["name"] += function["name"]
        arguments = function.get("arguments")
        if arguments:
            self._arguments[index].append(arguments)
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self._index(item), delta=arguments)
        return out

    def _index(self, item: dict[str, Any]) -> int:
        for position, candidate in enumerate(self._output):
            if candidate is item:
                return position
        raise ValueError("not an output item")

    def end(self) -> bytes:
        out = b""
        if self._message is not None:
            text = "".join(self._text)
            part = {"type": "output_text", "text": text, "annotations": []}
            index = self._index(self._message)
            out += self._event("response.output_text.done", item_id=self._message["id"],
                               output_index=index, content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=self._message["id"],
                               output_index=index, content_index=0, part=part)
            self._message["content"] = [part]
            self._message["status"] = "completed"
            out += self._event("response.output_item.done", output_index=index,
                               item=self._message)
        for position, item in self._calls.items():
            item["arguments"] = "".join(self._arguments[position])
            item["status"] = "completed"
            index = self._index(item)
            out += self._event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=index, name=item["name"],
                               arguments=item["arguments"])
            out += self._event("response.output_item.done", output_index=index, item=item)
        if not self._output:
            self._output.append(message_item(""))
        response = finish(self.response, self._output, self._finish_reason, self._usage)
        self._on_done(response)  # stored before the client can ask for it
        kind = "response.incomplete" if response["status"] == "incomplete" \
            else "response.completed"
        return out + self._event(kind, response=response)

    def fail(self, error: dict[str, Any]) -> bytes:
        self.response["status"] = "failed"
        self.response["output"] = self._output
        self.response["error"] = {"code": error.get("code") or error.get("type")
                                  or "server_error",
                                  "message": error.get("message") or "The model failed."}
        return self._event("response.failed", response=self.response)


def translate(chat_events: Iterator[bytes | None], events: ResponseEvents
              ) -> Iterator[bytes | None]:
    """``None`` items (the SSE Response's chances to send a keep-alive) pass through. The
    chat stream is read to its end even after its last event, so that it finishes as it
    would for a chat client (its worker connection goes back to the pool)."""
    yield events.start()
    pending = b""
    finished = False
    for piece in chat_events:
        if piece is None:
            if not finished:
                yield None
            continue
        if finished:
            continue
        pending += piece
        while not finished and b"\n\n" in pending:
            raw, pending = pending.split(b"\n\n", 1)
            out = _event(raw, events)
            if out is not None:
                finished = out[1]
                if out[0]:
                    yield out[0]
    if not finished:
        yield events.end()  # the chat stream ended without [DONE]


def _event(raw: bytes, events: ResponseEvents) -> tuple[bytes, bool] | None:
    """What one chat event becomes, and whether the response is over."""
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: "):
            continue  # comments (keep-alives) and blank lines
        data = line[6:]
        if data == b"[DONE]":
            return events.end(), True
        chunk = orjson.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            return events.fail(error if isinstance(error, dict)
                               else {"message": str(error)}), True
        return events.feed(chunk), False
    return None


class EventChunks:
    """The chat path's chunk format (``app.serving.stream_driver.ChunkFormat``) writing the
    Responses API's events directly, for streams from FastChat workers: no chat chunk is
    made and parsed again per token, and no generator wraps the driver's."""

    closing = b""  # the Responses API sends no [DONE]

    def __init__(self, events: ResponseEvents) -> None:
        self._events = events

    def opening(self, index: int) -> bytes:
        # response.created and .in_progress; the message item opens with its first text
        return self._events.start()

    def delta(self, index: int, text: str, frame: Any) -> bytes:
        return self._events.text(text) if text else b""

    def tool_calls(self, index: int, deltas: list[dict[str, Any]]) -> bytes:
        return self._events.calls(deltas)

    def finish(self, index: int, reason: str) -> bytes:
        self._events.finished(reason, None)
        return b""

    def usage(self, usage: dict[str, int]) -> bytes:
        self._events.finished(None, usage)
        return self._events.end()
