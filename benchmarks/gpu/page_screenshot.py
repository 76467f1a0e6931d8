"""A screenshot of the live quality page showing a saved status (e.g. the H200 run's).

    python3 benchmarks/gpu/page_screenshot.py STATUS.json OUT.png

The page is one static file that draws ``GET /kvproxy/v1/status``; here a loopback server answers
``/ui`` with kvproxy's page and the status route with the saved JSON, and Debian's Chromium renders
it headless. The numbers are the saved run's, untouched.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from kvproxy.api.ui import page_html


def main() -> None:
    status, out = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
    page = page_html()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, ctype = (page, "text/html") if self.path.startswith("/ui") else (status, "application/json")
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ui"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                "--window-size=1280,560", "--virtual-time-budget=4000", f"--screenshot={out}", url,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
    server.shutdown()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
