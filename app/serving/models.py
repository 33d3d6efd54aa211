"""/v1/models and /v1/models/{id}: the controller's cached model list, then the models of
the OpenAI-compatible upstreams (which win where a name is in both)."""
from __future__ import annotations

import time
from typing import Any

from app.errors import APIError, ModelNotFound
from app.serving.call import Call
from app.upstream.clients import Upstream

OPENAI_OWNER = "flaskchat-upstream"  # served by an OpenAI-compatible upstream


def list_models(upstream: Upstream, call: Call) -> dict[str, Any]:
    """The models the request's key may use."""
    created = int(time.time())
    relayed = upstream.openai.models()
    try:
        workers = upstream.controller.directory().models
    except APIError:
        if not relayed:
            raise
        workers = []  # the controller is down, but these models do not need it
    cards = [_card(model, created) for model in workers if model not in relayed]
    cards += [_card(model, created, OPENAI_OWNER) for model in relayed]
    if call.allowed_models is not None:
        cards = [card for card in cards if card["id"] in call.allowed_models]
    return {"object": "list", "data": cards}


def retrieve_model(upstream: Upstream, call: Call, model: str) -> dict[str, Any]:
    call.use_model(model)
    if upstream.openai.serves(model):
        return _card(model, int(time.time()), OPENAI_OWNER)
    try:
        upstream.controller.require_model(model)
    except ModelNotFound:
        raise ModelNotFound(f"The model '{model}' does not exist.", "model") from None
    return _card(model, int(time.time()))


def _card(model: str, created: int, owner: str = "fastchat") -> dict[str, Any]:
    # FastChat's fields, so clients that read root/permission keep working.
    return {"id": model, "object": "model", "created": created, "owned_by": owner,
            "root": model, "parent": None,
            "permission": [{"id": f"modelperm-{model}", "object": "model_permission",
                            "created": created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": True, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}
