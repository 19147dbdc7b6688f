"""A fast OpenAI-compatible upstream for the tests and the benchmark (a real HTTP server).

Behaviour is steered per request by an ``x_test`` object in the JSON body (the gate passes
the body through), so one server covers every case:
  {"x_test": {"prompt": 7, "completion": 5}}      usage numbers (defaults 7 and 5)
  {"x_test": {"status": 500}}                       an upstream error with no output
  {"x_test": {"usage": "none" | "garbled" | {...}}} missing, garbled or literal usage
  {"x_test": {"chunks": 3, "abort_after": 2}}       SSE chunks; drop the connection midway
  {"x_test": {"delay": 0.5}}                        wait before answering
  {"x_test": {"json_list": true}}                   a 2xx whose JSON body is a list
  {"x_test": {"abort_before_usage": true}}          SSE: a finish_reason "stop" chunk, then
                                                    drop the connection before the usage event
  {"x_test": {"tool_call": true}}                   the answer is a tool call, no text (JSON, SSE)
  {"x_test": {"body_delay": 1.0}}                   JSON: the headers at once, the body that much later
Keep x_test values numeric or boolean where exactness matters: the gate bills the strings
of unknown keys (x_test included) as prompt text.
Every request body is recorded in ``requests`` so tests can assert what reached it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

REQUESTS = web.AppKey("requests", list)


def _usage(spec: dict[str, Any]) -> Any:
    usage = spec.get("usage")
    if usage == "none":
        return None
    if usage == "garbled":
        return {"prompt_tokens": "many", "completion_tokens": -3}
    if isinstance(usage, dict):
        return usage
    prompt, completion = int(spec.get("prompt", 7)), int(spec.get("completion", 5))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"_raw": raw.decode("utf-8", "replace")}
    request.app[REQUESTS].append({"path": request.path, "headers": dict(request.headers),
                                  "body": body})
    spec = body.get("x_test") or {}
    if spec.get("delay"):
        await asyncio.sleep(float(spec["delay"]))
    if spec.get("status"):
        return web.json_response({"error": {"message": "upstream exploded", "type": "server_error"}},
                                 status=int(spec["status"]))
    usage = _usage(spec)
    model = body.get("model", "fake")
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = int(spec.get("chunks", 3))
        for i in range(chunks):
            if spec.get("abort_after") is not None and i >= int(spec["abort_after"]):
                assert request.transport is not None
                request.transport.close()  # the upstream dies mid-stream
                return resp
            delta: dict[str, Any] = {"content": f"word{i} "}
            if spec.get("tool_call"):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": "{}" if i == 0 else ""}}]}
            event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": delta}]}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if spec.get("chunk_delay"):
                await asyncio.sleep(float(spec["chunk_delay"]))
        if spec.get("abort_before_usage"):
            stop = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(b"data: " + json.dumps(stop).encode() + b"\n\n")
            await asyncio.sleep(0.05)  # let the stop chunk through before the cut
            assert request.transport is not None
            request.transport.close()  # the upstream dies before the usage event
            return resp
        include = (body.get("stream_options") or {}).get("include_usage")
        if include and usage is not None:
            final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                     "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    answer: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": spec.get("text", "hello there")},
                     "finish_reason": "stop"}],
    }
    if spec.get("tool_call"):
        answer["choices"][0].update(finish_reason="tool_calls", message={
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"q\": 1}"}}]})
    if request.path.endswith("embeddings"):
        answer = {"object": "list", "model": model,
                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]}
    if usage is not None:
        answer["usage"] = usage
    if spec.get("json_list"):
        return web.json_response([answer])  # a 2xx whose usage cannot be read
    if spec.get("body_delay"):
        data = json.dumps(answer).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
        await resp.prepare(request)  # the headers leave now: a model still writing its answer
        await asyncio.sleep(float(spec["body_delay"]))
        await resp.write(data)
        await resp.write_eof()
        return resp
    return web.json_response(answer)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


def build_app() -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[REQUESTS] = []
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions",
                 "/v1/embeddings", "/v1/responses"):
        app.router.add_post(path, completions)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/v1/images/generations", models)
    return app


class Upstream:
    """Runs the app on a free port in the current event loop."""

    def __init__(self) -> None:
        self.app = build_app()
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = 0

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.app[REQUESTS]

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build_app()
    app[REQUESTS] = _Discard()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


class _Discard(list):  # the benchmark does not keep request bodies
    def append(self, item: Any) -> None:
        pass


if __name__ == "__main__":
    main()
