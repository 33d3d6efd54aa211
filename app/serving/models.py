"""/v1/models and /v1/models/{id}, from the controller's cached model list."""
from __future__ import annotations

import time
from typing import Any

from app.errors import ModelNotFound
from app.upstream import Upstream


def list_models(upstream: Upstream) -> dict[str, Any]:
    created = int(time.time())
    return {"object": "list",
            "data": [_card(model, created) for model in upstream.controller.directory().models]}


def retrieve_model(upstream: Upstream, model: str) -> dict[str, Any]:
    try:
        upstream.controller.require_model(model)
    except ModelNotFound:
        raise ModelNotFound(f"The model '{model}' does not exist.", "model") from None
    return _card(model, int(time.time()))


def _card(model: str, created: int) -> dict[str, Any]:
    # FastChat's fields, so clients that read root/permission keep working.
    return {"id": model, "object": "model", "created": created, "owned_by": "fastchat",
            "root": model, "parent": None,
            "permission": [{"id": f"modelperm-{model}", "object": "model_permission",
                            "created": created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": True, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}
