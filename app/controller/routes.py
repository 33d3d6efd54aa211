"""The controller's HTTP API: FastChat's endpoints plus /list_workers for gateways."""
from __future__ import annotations

import hmac
from typing import Any, Iterator

import requests
from flask import Blueprint, Response, current_app, request, stream_with_context
from flask.typing import ResponseReturnValue

from app.controller.registry import Registry
from app.errors import AuthenticationFailed
from app.protocol.error_codes import CONTROLLER_NO_WORKER, CONTROLLER_WORKER_TIMEOUT
from app.protocol.frames import encode_frame
from app.web.json_io import json_response, read_json_object
from app.web.validation import load
from schemas.controller import HeartbeatSchema, ModelQuerySchema, RegisterWorkerSchema

bp = Blueprint("controller", __name__)
REGISTRY = "flaskchat.registry"
SESSION = "flaskchat.controller_session"

_register = RegisterWorkerSchema()
_heartbeat = HeartbeatSchema()
_model_query = ModelQuerySchema()


def registry() -> Registry:
    found: Registry = current_app.extensions[REGISTRY]
    return found


def require_worker_secret() -> None:
    """With --worker-secret set, only holders of the secret may change the registry."""
    secret: bytes = current_app.config["WORKER_SECRET"]
    if not secret:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), secret):
        raise AuthenticationFailed("This controller needs the worker secret "
                                   "(Authorization: Bearer) to change its registry.")


@bp.post("/register_worker")
def register_worker() -> ResponseReturnValue:
    require_worker_secret()
    body = load(_register, read_json_object())
    registry().register(body["worker_name"], body["check_heart_beat"], body["worker_status"],
                        bool(body["multimodal"]))
    return json_response(None)


@bp.post("/receive_heart_beat")
def receive_heart_beat() -> ResponseReturnValue:
    require_worker_secret()
    body = load(_heartbeat, read_json_object())
    return json_response({"exist": registry().heartbeat(body["worker_name"],
                                                        body["queue_length"])})


@bp.post("/refresh_all_workers")
def refresh_all_workers() -> ResponseReturnValue:
    require_worker_secret()
    registry().refresh_all()
    return json_response(None)


@bp.post("/list_models")
def list_models() -> ResponseReturnValue:
    return json_response({"models": registry().models()})


@bp.post("/list_multimodal_models")
def list_multimodal_models() -> ResponseReturnValue:
    return json_response({"models": registry().models(multimodal=True)})


@bp.post("/list_language_models")
def list_language_models() -> ResponseReturnValue:
    return json_response({"models": registry().models(multimodal=False)})


@bp.post("/list_workers")
def list_workers() -> ResponseReturnValue:
    """flaskchat extension: every live worker, so gateways can balance without a call."""
    return json_response({"workers": [r.as_dict() for r in registry().live_workers()]})


@bp.post("/get_worker_address")
def get_worker_address() -> ResponseReturnValue:
    body = load(_model_query, read_json_object())
    return json_response({"address": registry().pick(body["model"])})


@bp.post("/worker_get_status")
def worker_get_status() -> ResponseReturnValue:
    return json_response(registry().status())


@bp.get("/test_connection")
def test_connection() -> ResponseReturnValue:
    return json_response("success")


@bp.post("/worker_generate_stream")
def worker_generate_stream() -> ResponseReturnValue:
    """Proxies a generation to a chosen worker (FastChat's controller can do this too)."""
    params = read_json_object()
    address = registry().pick(str(params.get("model", "")))
    if not address:
        return Response(encode_frame({"text": "No available worker for this model.",
                                      "error_code": CONTROLLER_NO_WORKER}))
    session: requests.Session = current_app.extensions[SESSION]
    return Response(stream_with_context(_proxy(session, address, params)))


def _proxy(session: requests.Session, address: str, params: dict[str, Any]) -> Iterator[bytes]:
    try:
        with session.post(address + "/worker_generate_stream", json=params, stream=True,
                          timeout=(5, current_app.config["WORKER_TIMEOUT"])) as response:
            yield from response.iter_content(chunk_size=None)
    except requests.RequestException as exc:
        yield encode_frame({"text": f"The worker did not answer: {type(exc).__name__}.",
                            "error_code": CONTROLLER_WORKER_TIMEOUT})
