"""Running the processes: gunicorn and its gevent worker class, the state directory the
workers share, and flaskchat up's launcher."""
