"""Bodies the controller accepts (FastChat's controller protocol)."""
from __future__ import annotations

from typing import Any, TypedDict
from urllib.parse import urlsplit

from marshmallow import EXCLUDE, Schema, ValidationError, fields

from schemas.fields import Bool, Int, Number, Str


class WorkerStatus(TypedDict):
    model_names: list[str]
    speed: float
    queue_length: int


class RegisterWorkerRequest(TypedDict):
    worker_name: str
    check_heart_beat: bool
    worker_status: WorkerStatus | None
    multimodal: bool


class HeartbeatRequest(TypedDict):
    worker_name: str
    queue_length: int


def _worker_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValidationError("must be the worker's base URL, e.g. http://10.0.0.5:21002")


class _Strict(Schema):
    class Meta:
        unknown = EXCLUDE


class WorkerStatusSchema(_Strict):
    model_names = fields.List(Str(), required=True)
    speed = Number(load_default=1.0)
    queue_length = Int(load_default=0)
    # flaskchat's worker: generations it runs at once (gateways hold the excess)
    limit_worker_concurrency = Int(load_default=None, allow_none=True)


class RegisterWorkerSchema(_Strict):
    worker_name = Str(required=True, validate=_worker_url)
    check_heart_beat = Bool(load_default=True)
    worker_status = fields.Nested(WorkerStatusSchema, allow_none=True, load_default=None)
    multimodal = Bool(allow_none=True, load_default=False)


class HeartbeatSchema(_Strict):
    worker_name = Str(required=True)
    queue_length = Int(load_default=0)


class ModelQuerySchema(_Strict):
    model = Str(required=True)


def normalized_status(status: dict[str, Any]) -> WorkerStatus:
    return {"model_names": [str(m) for m in status["model_names"]],
            "speed": float(status.get("speed", 1.0)),
            "queue_length": int(status.get("queue_length", 0))}
