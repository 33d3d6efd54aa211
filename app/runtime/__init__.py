"""Running the processes: gunicorn, its gevent worker, the shared state, flaskchat up."""
