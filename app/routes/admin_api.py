"""The admin API, behind admin keys only: API keys (list, make, read, change, revoke) and
usage (totals by key, team, model or day; tokens per day per team for the chart); the
busy model servers' lines."""
from __future__ import annotations

from flask import Blueprint, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from app.access.reports import parse_since, tokens_per_team_per_day, usage_report
from app.errors import InvalidRequest, UpstreamUnavailable
from app.web.access import access, require_admin_key
from app.web.context import upstream
from app.web.handlers import error_response
from app.web.json_io import json_response, read_json_object
from app.web.validation import load
from schemas.admin import KeyCreateSchema, KeyUpdateSchema, UsageQuerySchema

bp = Blueprint("admin_api", __name__, url_prefix="/admin/v1")
bp.before_request(require_admin_key)
create_schema, update_schema, usage_schema = KeyCreateSchema(), KeyUpdateSchema(), \
    UsageQuerySchema()


@bp.errorhandler(SQLAlchemyError)
def database_unavailable(error: SQLAlchemyError) -> ResponseReturnValue:
    return error_response(UpstreamUnavailable(
        "The key and usage database cannot be reached; retry shortly.",
        headers={"Retry-After": "2"}))


@bp.get("/keys")
def list_keys() -> ResponseReturnValue:
    return json_response({"object": "list",
                          "data": [key.as_json() for key in access().keys.list()]})


@bp.post("/keys")
def create_key() -> ResponseReturnValue:
    fields = load(create_schema, read_json_object())
    name = fields.pop("name")
    key, secret = access().keys.create(name, fields.pop("expires_in", None), **fields)
    # The only time the secret is shown: only its hash is kept.
    return json_response({**key.as_json(), "secret": secret}, 201)


@bp.get("/keys/<ref>")
def get_key(ref: str) -> ResponseReturnValue:
    return json_response(access().keys.get(ref).as_json())


@bp.patch("/keys/<ref>")
def update_key(ref: str) -> ResponseReturnValue:
    fields = load(update_schema, read_json_object())
    clear_expiry = "expires_in" in fields and fields["expires_in"] is None
    expires_in = fields.pop("expires_in", None)
    if clear_expiry:
        fields["expires_at"] = None  # null: never expires
    return json_response(access().keys.update(ref, expires_in, **fields).as_json())


@bp.delete("/keys/<ref>")
def revoke_key(ref: str) -> ResponseReturnValue:
    """Revokes: the key stays listed (its usage keeps its name) and is refused
    everywhere within one refresh of the key directory."""
    return json_response(access().keys.revoke(ref).as_json())


@bp.get("/usage")
def get_usage() -> ResponseReturnValue:
    query = load(usage_schema, request.args.to_dict())
    try:
        since = parse_since(query["since"])
    except ValueError as exc:
        raise InvalidRequest(f"Invalid 'since': {exc}", "since") from None
    found = access()
    rows, more = usage_report(found.engine, query["group_by"], since, found.pruner.retention)
    return json_response({"object": "list", "group_by": query["group_by"],
                          "since": since.isoformat(timespec="seconds") + "Z", "data": rows,
                          "has_more": more})


@bp.get("/queues")
def get_queues() -> ResponseReturnValue:
    """Each model server whose capacity is known, as this process sees it: its capacity
    (this process's share), the slots in use, and who waits, by team and tier."""
    return json_response({"object": "list", "data": upstream().slots.snapshot()})


@bp.get("/usage/daily")
def get_daily_usage() -> ResponseReturnValue:
    """Tokens per day per team, the last ``days`` (1-366, default 30) days."""
    days = request.args.get("days", "30")
    if not days.isdigit() or not 1 <= int(days) <= 366:
        raise InvalidRequest("Invalid 'days': must be a whole number from 1 to 366.", "days")
    return json_response(tokens_per_team_per_day(access().engine, int(days)))
