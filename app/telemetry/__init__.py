"""What the gateway tells its operators: metrics, the access log, log formatting."""
