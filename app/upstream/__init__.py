"""Every outbound call: the Session, its transport, the clients, health, failover.

``clients.Upstream`` holds them for one app. Nothing is imported here, so that the CLI
can check an upstreams file without loading requests before gevent patches."""
