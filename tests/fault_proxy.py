"""A small HTTP proxy in front of moto's S3 server that injects faults and records what was sent.

boto3 talks to the proxy (AWS_ENDPOINT_URL); the proxy forwards each request to moto unless a
fault rule matches it, in which case it answers 500/503 or drops the connection half way through
the request body. It records every request (method, path, body bytes), so a test can tell which
objects a publish really sent.
"""
from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    method: str
    path_contains: str  # e.g. the object key, plus "partNumber=2" for one part of a multipart upload
    action: str | int  # "drop" or an HTTP status (500, 503)
    times: int | None = 1  # None: every matching request, for good
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        live = self.times is None or self.hits < self.times
        return live and method == self.method and all(p in path for p in self.path_contains.split("&"))


@dataclass
class Sent:
    method: str
    path: str
    body_bytes: int
    status: int | str


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.sent: list[Sent] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def inject(self, method: str, path_contains: str, action: str | int, times: int | None = 1) -> Fault:
        fault = Fault(method, path_contains, action, times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.sent.clear()

    def bytes_sent_to(self, key_part: str) -> int:
        """Object bytes (PUT bodies: whole objects and parts) moto accepted for paths containing `key_part`."""
        return sum(s.body_bytes for s in self.sent
                   if key_part in s.path and s.method == "PUT" and isinstance(s.status, int) and s.status < 300)

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, sent: Sent) -> None:
        with self.lock:
            self.sent.append(sent)

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects

            def log_message(self, *args) -> None:  # quiet: tests read `proxy.sent` instead
                pass

            def _read_body(self, limit: int | None = None) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length", 0))
                return self.rfile.read(length if limit is None else min(limit, length))

            def _handle(self) -> None:
                fault = proxy._fault_for(self.command, self.path)
                if fault is not None and fault.action == "drop":
                    # Half the body arrives, then the connection dies: no response at all.
                    partial = self._read_body(limit=int(self.headers.get("Content-Length", 0)) // 2)
                    proxy._record(Sent(self.command, self.path, len(partial), "dropped"))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = self._read_body()
                if fault is not None:
                    proxy._record(Sent(self.command, self.path, len(body), fault.action))
                    message = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"
                    self.send_response(fault.action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                finally:
                    upstream.close()
                proxy._record(Sent(self.command, self.path, len(body), response.status))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
