"""Container health check: exit 0 when ``/v2/health/ready`` answers 200, else 1.

The image's ``HEALTHCHECK`` and the compose file run this with the image's own Python, so
the image needs no curl. Readiness (not liveness) is what orchestrators and the load
balancer should route on: it is 503 while models load and warm up, when
``KANMOE_REQUIRE_GPU=true`` and CUDA is not active, and while the server drains on SIGTERM.
The port comes from ``KANMOE_PORT`` (default 8000), like the server's own.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("KANMOE_PORT", "8000")
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while loading or draining
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, bad port
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
