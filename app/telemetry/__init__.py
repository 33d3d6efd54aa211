"""What the gateway tells its operators: Prometheus metrics, the access log, log
formatting."""
