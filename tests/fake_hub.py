"""A local stand-in for the Hugging Face hub (the parts huggingface_hub uses to resolve and download files and to
look up repositories), and an HTTP forward proxy, both on loopback in threads of the test process.

FakeHub(files={"org/model": {"config.json": b"..."}}, datasets={"org/data"}) serves
HEAD/GET /<repo>/resolve/<revision>/<file> (X-Repo-Commit, ETag, Content-Length; 404 EntryNotFound / RepoNotFound
as the hub answers) and GET /api/<models|datasets>/<repo>[/revision/<rev>]; `requests` counts what was asked.
Proxy(routes={"hub.invalid": port}) forwards absolute-URI requests for those hosts to 127.0.0.1:<port>.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Server:
    def __init__(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, body: bytes | None, status: int = 200, headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _route(self, head: bool):
        hub = self.server.owner
        path = urlsplit(self.path).path
        hub.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 4:  # /api/<kind>/<org>/<name>[/revision/<rev>]
            repo, kind = "/".join(parts[2:4]), parts[1]
            known = repo in hub.datasets if kind == "datasets" else repo in hub.files
            if not known:
                return self._answer(b'{"error":"Repository not found"}', 404, {"X-Error-Code": "RepoNotFound"}, head)
            return self._answer(json.dumps({"id": repo, "sha": COMMIT, "siblings": []}).encode(), 200,
                                {"Content-Type": "application/json"}, head)
        if parts[0] == "datasets":
            parts = parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":  # /<org>/<name>/resolve/<rev>/<file>
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in hub.files:
                return self._answer(b"Repository not found", 404, {"X-Error-Code": "RepoNotFound"}, head)
            if filename not in hub.files[repo]:
                return self._answer(b"Entry not found", 404, {"X-Error-Code": "EntryNotFound"}, head)
            content = hub.files[repo][filename]
            return self._answer(content, 200, {"X-Repo-Commit": COMMIT,
                                               "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}, head)
        return self._answer(b"not found", 404, {}, head)

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)


class FakeHub(_Server):
    def __init__(self, files: dict[str, dict[str, bytes]] | None = None, datasets: set[str] | None = None):
        self.files, self.datasets, self.requests = files or {}, datasets or set(), []
        super().__init__(_HubHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _forward(self):
        proxy = self.server.owner
        url = urlsplit(self.path)  # a proxy is sent the absolute URI
        proxy.requests.append((self.command, url.hostname, url.path))
        if url.hostname not in proxy.routes:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.routes[url.hostname], timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        upstream.request(self.command, url.path + (f"?{url.query}" if url.query else ""), headers=headers)
        response = upstream.getresponse()
        body = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        # a HEAD answer has no body but the upstream's length (the client sizes its download by it)
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _forward


class Proxy(_Server):
    def __init__(self, routes: dict[str, int]):
        self.routes, self.requests = routes, []
        super().__init__(_ProxyHandler)
