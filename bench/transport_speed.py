"""CPU per backend call on the gateway's Session: a non-stream /worker_generate and a
32-frame /worker_generate_stream against the fast fake worker, sequentially, so that the
figure is the client's own cost (the worker runs in another process).

    python bench/transport_speed.py [--calls 3000] [--streams 1000] [--urllib3]

``--urllib3`` mounts requests' own HTTPAdapter instead of flaskchat's transport, for the
comparison. Run it on two commits to compare transports. Not part of the tests.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.upstream.session import build_session, post_json  # noqa: E402

PARAMS = {"model": "bench-model", "prompt": "Hello", "temperature": 0.7, "top_p": 1.0,
          "max_new_tokens": 64, "stop": [], "echo": False}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--urllib3", action="store_true",
                        help="requests' HTTPAdapter (urllib3) instead of our transport")
    args = parser.parse_args()
    worker = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_worker.py")],
                              stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        url = f"http://127.0.0.1:{int(worker.stdout.readline().split()[1])}"
        session = build_session(pool_size=8)
        if args.urllib3:
            from requests.adapters import HTTPAdapter
            session.mount("http://", HTTPAdapter(pool_maxsize=8, max_retries=0))
        for _ in range(200):  # warm-up: connection, caches, branch predictors
            post_json(session, url + "/worker_generate", PARAMS, (5, 5)).content
        started = time.process_time()
        for _ in range(args.calls):
            post_json(session, url + "/worker_generate", PARAMS, (5, 5)).content
        call = (time.process_time() - started) / args.calls
        started = time.process_time()
        for _ in range(args.streams):
            response = post_json(session, url + "/worker_generate_stream", PARAMS, (5, 5),
                                 stream=True)
            for _chunk in response.iter_content(chunk_size=None):
                pass
        stream = (time.process_time() - started) / args.streams
        print(f"non-stream call: {call * 1e6:.0f} us CPU; 32-frame stream: "
              f"{stream * 1e6:.0f} us CPU")
    finally:
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    main()
