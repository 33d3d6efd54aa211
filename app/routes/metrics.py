"""GET /metrics: Prometheus text format, summed over the gateway's worker processes. It
holds counts, model names and key names (never keys or content): open by default, behind
an admin key with --metrics-require-admin (Prometheus sends it with the scrape config's
``authorization``), or kept off the public side by the proxy (docs/deploy.md); turn it off
with --metrics off."""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from app.telemetry import metrics
from app.web.access import require_admin_key

bp = Blueprint("metrics", __name__)
ADMIN_ONLY = "flaskchat.metrics_admin_only"


@bp.before_request
def guard() -> None:
    if current_app.extensions.get(ADMIN_ONLY):
        require_admin_key()


@bp.get("/metrics")
def scrape() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
