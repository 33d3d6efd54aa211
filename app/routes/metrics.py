"""GET /metrics: Prometheus text format, summed over the gateway's worker processes.
Unauthenticated like /health (it holds counts and model names, never keys or content);
turn it off with --metrics off."""
from __future__ import annotations

from flask import Blueprint, Response

from app.telemetry import metrics

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
