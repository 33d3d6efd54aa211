"""How many tokens a generation may make: the request's max_tokens, clamped to the room
the prompt leaves in the model's context."""
from __future__ import annotations

from app.errors import ContextLengthExceeded
from app.protocol.capabilities import LENGTH_CHECK
from app.serving.call import Call
from app.upstream.clients import Upstream
from app.upstream.worker import WorkerDetails


def token_budget(upstream: Upstream, call: Call, address: str, model: str,
                 details: WorkerDetails, prompt: str, max_tokens: int | None,
                 param: str) -> tuple[int, int | None]:
    """``(max_new_tokens, prompt_tokens)``. A worker that checks the length itself gets the
    request's limit unchecked (one fewer round trip); otherwise the prompt is counted and
    the limit clamped to the room left."""
    if LENGTH_CHECK in details.capabilities:
        return (max_tokens or details.context_length), None
    with call.waiting_upstream():
        prompt_tokens = upstream.workers.count_tokens(address, model, prompt, call.request_id)
    return clamp_to_context(details.context_length, prompt_tokens, max_tokens, param), \
        prompt_tokens


def clamp_to_context(context_length: int, prompt_tokens: int, max_tokens: int | None,
                     param: str) -> int:
    # One token is kept back: FastChat's worker keeps the last context - max_new_tokens - 1
    # prompt tokens, so a budget of context - prompt would silently drop the first one.
    room = context_length - prompt_tokens - 1
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the "
            "messages.", param)
    return min(max_tokens, room) if max_tokens else room
