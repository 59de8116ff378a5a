"""A fault-injecting HTTP proxy for tests, on loopback only, in front of the test S3 endpoint.

Each request is forwarded to the upstream endpoint; at the configured rates (a seeded RNG) the
proxy instead answers 503 SlowDown or 500, resets the connection before answering, or sends a
response whose body is cut short after half of its Content-Length. Counters say what it did.

    with FaultProxy(s3_server.endpoint_url, truncate=0.3, seed=1) as proxy:
        store = S3Store(endpoint_url=proxy.url)
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "transfer-encoding", "host"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code></Error>'
# What S3 answers once an access key is deleted or deactivated (`proxy.revoked = True`).
_REVOKED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
            b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, *, slowdown: float = 0.0, error500: float = 0.0, reset: float = 0.0,
                 truncate: float = 0.0, only_get: bool = False, seed: int = 0):
        self.upstream = urlparse(upstream)
        self.rates = {"slowdown": slowdown, "error500": error500, "reset": reset, "truncate": truncate}
        self.only_get = only_get  # inject into GETs only (reads), or into every request
        self.revoked = False  # set True mid-run: every request is refused as with a deleted access key
        # `hold("COMMITTED.json")`: the next PUT whose key ends so waits in the proxy (`held` is set,
        # `held_path` names it) until `release` is set, then is dropped unanswered, never stored.
        self.hold_suffix: str | None = None
        self.held, self.release = threading.Event(), threading.Event()
        self.held_path = ""
        # `refuse = lambda path: ...`: every PUT whose path it accepts is answered 503 SlowDown (a
        # retryable error that never ends: the same failure at the same point, every time)
        self.refuse = None
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def hold(self, suffix: str) -> None:
        self.hold_suffix = suffix

    def _hold(self, method: str, path: str) -> bool:
        with self.lock:
            if not (self.hold_suffix and method == "PUT" and urlparse(path).path.endswith(self.hold_suffix)):
                return False
            self.hold_suffix, self.held_path = None, urlparse(path).path
        self.held.set()
        self.release.wait()
        return True

    def _fault(self, method: str) -> str | None:
        if self.revoked:
            with self.lock:
                self.counts["revoked"] += 1
            return "revoked"
        if self.only_get and method != "GET":
            return None
        with self.lock:
            self.counts["requests"] += 1
            roll, edge = self.rng.random(), 0.0
            for name, rate in self.rates.items():
                edge += rate
                if roll < edge and (name != "truncate" or method == "GET"):
                    self.counts[name] += 1
                    return name
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = "reset" if proxy._hold(self.command, self.path) else proxy._fault(self.command)
                if self.command == "PUT" and proxy.refuse is not None and proxy.refuse(urlparse(self.path).path):
                    with proxy.lock:
                        proxy.counts["refused"] += 1
                    fault = "slowdown"
                if fault == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in ("slowdown", "error500", "revoked"):
                    status, payload = {"slowdown": (503, _SLOWDOWN), "error500": (500, _INTERNAL),
                                       "revoked": (403, _REVOKED)}[fault]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # (a HEAD answer has no body)
                        self.wfile.write(payload)
                    return
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Host"] = proxy.upstream.netloc
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                up.close()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # no body: keep the object's own Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "truncate" and len(data) > 1 and self.command == "GET":
                    self.wfile.write(data[: len(data) // 2])  # then hang up: the body is cut short
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
