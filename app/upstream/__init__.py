"""Every outbound call: the pooled Session and its transport, the upstream stream object,
the controller, FastChat worker and OpenAI-compatible clients, health marks and failover.
``clients.Upstream`` holds them for one app. (Nothing is imported here, so that the CLI
can check an upstreams file without loading requests before gevent patches.)"""
