"""The admin API's bodies and queries: keys made and changed, usage asked for.

Stricter than the model routes: an unknown field is an error (a misspelt ``rmp`` must not
leave a key unlimited), and so is a null where a value is needed. A key's weight and tiers
are checked here for their type only: their ranges, and that the default tier is one the
key may use (on a change, against what is kept), are the key store's to check, once for
this API and the CLI (``app.access.keys``).
"""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Mapping, TypedDict

from marshmallow import RAISE, Schema, ValidationError, fields, validates_schema

from app.config import parse_duration  # the one duration format (flags, CLI, this API)
from schemas.fields import Int, Number, Str

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@:/+-]{0,199}$")
PERIODS = ("day", "month")
GROUPS = ("key", "team", "model", "day")


def lifetime(text: str) -> timedelta:
    """A key's lifetime from now, in the duration format (``30d``, ``12h``, ``2w``...)."""
    return timedelta(seconds=parse_duration(text))


def check_name(text: str, what: str = "name") -> str:
    if not NAME.match(text):
        raise ValueError(f"{what} must be 1-200 letters, digits, spaces or ._@:/+- and "
                         f"start with a letter or digit, not {text!r}")
    return text


class Duration(fields.Field[timedelta]):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> timedelta:
        if not isinstance(value, str):
            raise ValidationError("must be a duration string such as 30d, 12h or 90m")
        try:
            return lifetime(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class Name(Str):
    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return check_name(text, attr or "name")
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class ModelList(fields.Field[list[str]]):
    """A non-empty list of model names (or null: every model)."""

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> list[str]:
        if not isinstance(value, list) or not value \
                or not all(isinstance(item, str) and 0 < len(item) <= 200 for item in value):
            raise ValidationError("must be a non-empty list of model names, or null for "
                                  "every model")
        if len(value) > 1000:
            raise ValidationError("must not name more than 1000 models")
        return value


def _positive(name: str) -> Any:
    def check(value: Any) -> None:
        if value is not None and value <= 0:
            raise ValidationError(f"{value} is less than the minimum of 1 - '{name}'")
    return check


class KeyFields(TypedDict, total=False):
    name: str
    team: str | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    budget_tokens: int | None
    budget_period: str | None
    weight: float
    max_tier: str
    default_tier: str | None
    expires_in: timedelta | None


class _KeySchema(Schema):
    class Meta:
        unknown = RAISE

    team = Name(allow_none=True)
    models = ModelList(allow_none=True)
    rpm = Int(allow_none=True, validate=_positive("rpm"))
    tpm = Int(allow_none=True, validate=_positive("tpm"))
    max_parallel = Int(allow_none=True, validate=_positive("max_parallel"))
    budget_tokens = Int(allow_none=True, validate=_positive("budget_tokens"))
    budget_period = Str(allow_none=True)
    weight = Number()
    max_tier = Str()
    default_tier = Str(allow_none=True)  # null or "auto": the key's max tier decides
    expires_in = Duration(allow_none=True)

    @validates_schema
    def _check_period(self, data: dict[str, Any], **kwargs: Any) -> None:
        period = data.get("budget_period")
        if period is not None and period not in PERIODS:
            raise ValidationError("must be day or month", "budget_period")


class KeyCreateSchema(_KeySchema):
    """POST /admin/v1/keys."""

    name = Name(required=True)

    @validates_schema
    def _check_budget(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("budget_tokens") is None) != (data.get("budget_period") is None):
            raise ValidationError("a budget needs both budget_tokens and budget_period",
                                  "budget_tokens")


class KeyUpdateSchema(_KeySchema):
    """PATCH /admin/v1/keys/{id}: the fields given change (null clears a limit)."""

    @validates_schema
    def _check_not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError("nothing to change: send at least one of team, models, "
                                  "rpm, tpm, max_parallel, budget_tokens, budget_period, "
                                  "weight, max_tier, default_tier, expires_in")


class UsageQuery(TypedDict):
    group_by: str
    since: str


class UsageQuerySchema(Schema):
    """GET /admin/v1/usage?group_by=key|team|model|day&since=7d."""

    class Meta:
        unknown = RAISE

    group_by = Str(load_default="key", validate=lambda v: _one_of(v, GROUPS, "group_by"))
    since = Str(load_default="7d")


def _one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValidationError(f"must be one of {', '.join(choices)}")
