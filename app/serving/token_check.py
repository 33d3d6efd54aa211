"""FastChat's /api/v1/token_check: does each prompt plus max_tokens fit the context?"""
from __future__ import annotations

from functools import partial
from typing import Any

from app.errors import InvalidRequest, ModelNotFound
from app.serving.call import Call
from app.serving.concurrency import run_all
from app.serving.worker_calls import on_worker
from app.upstream.clients import Upstream
from schemas import TokenCheckRequest
from schemas.token_check import TokenCheckItem


def check_tokens(body: TokenCheckRequest, upstream: Upstream, call: Call) -> dict[str, Any]:
    for index, item in enumerate(body["prompts"]):
        if not call.may_use(item["model"]):
            raise ModelNotFound(f"The model '{item['model']}' does not exist or you do not "
                                "have access to it.", f"prompts[{index}].model")
        if upstream.openai.serves(item["model"]):
            raise InvalidRequest(
                f"token_check needs a FastChat worker; the model '{item['model']}' is served "
                "by an OpenAI-compatible upstream, which has no token counting endpoint.",
                f"prompts[{index}].model")
        upstream.controller.require_model(item["model"])
    if body["prompts"]:
        call.admit(body["prompts"][0]["model"], max_tokens=0)  # a request; none generated
    with call.waiting_upstream():
        results = run_all([partial(_check_one, upstream, call, item)
                           for item in body["prompts"]])
    return {"prompts": results}


def _check_one(upstream: Upstream, call: Call, item: TokenCheckItem) -> dict[str, Any]:
    model = item["model"]

    def attempt(address: str) -> tuple[int, int]:
        context_length = upstream.workers.details(address, model).context_length
        count = upstream.workers.count_tokens(address, model, item["prompt"], call.request_id)
        return count, context_length

    address, (count, context_length) = on_worker(upstream, model, attempt)
    upstream.controller.release(address)
    return {"fits": count + item["max_tokens"] <= context_length, "tokenCount": count,
            "contextLength": context_length}
