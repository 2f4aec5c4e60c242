"""A stand-in for huggingface.co on 127.0.0.1 that speaks the hub's download protocol.

`HEAD/GET /{repo}/resolve/{revision}/{file}` answers like the real hub: `X-Repo-Commit` names the
commit, small files come back directly with their git blob sha1 as ETag, large (LFS) files answer
with a redirect to a signed CDN URL plus `X-Linked-Etag` (their sha256) and `X-Linked-Size`, and
failures carry the `X-Error-Code` header that huggingface_hub turns into typed errors. The CDN honours
`Range`, so interrupted transfers can resume; like the real one it is another host (127.0.0.2, where
the hub is 127.0.0.1), so the client stops at the redirect and reads the metadata from it, and must not
send the user's token there. Every request is recorded in `requests`, and who sent which
`Authorization` header in `authorization`.

Faults to inject, only inside `with hub.faults(...)` so that none outlives its test: `throttle` (bytes per
second for file bodies), `drop_after` (the next body from offset 0 stops after that many bytes and the
connection closes), `expire_on_drop` (that drop also expires every signed URL handed out so far: they
answer 403, as the real CDN's do after an hour), `refuse` (the CDN answers 403 to every link), `hang`
(accept every connection, never answer).
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_THRESHOLD = 10 * 1024 * 1024  # the hub stores files this big (and every *.gguf) in LFS


@dataclass(repr=False)
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    gated: bool = False

    def __post_init__(self) -> None:
        if not self.commit:
            contents = sorted((name, hashlib.sha256(data).hexdigest()) for name, data in self.files.items())
            self.commit = hashlib.sha1(repr(contents).encode()).hexdigest()


@dataclass(repr=False)
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    authorization: list[tuple[str, str | None]] = field(default_factory=list)  # (hub or cdn, the header's value)
    sent: int = 0  # bytes of file bodies sent from the CDN, over all requests
    blobs: dict[str, bytes] = field(default_factory=dict)
    url: str = ""
    cdn_url: str = ""
    throttle: float = 0.0
    drop_after: int | None = None
    expire_on_drop: bool = False
    refuse: bool = False
    signature: int = 0  # what the CDN's URLs are signed with now; older signatures have expired
    hang: bool = False
    stopped: threading.Event = field(default_factory=threading.Event)

    def add(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> Repo:
        repo = Repo(files, gated=gated)
        self.repos[repo_id] = repo
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    @contextlib.contextmanager
    def faults(self, *, throttle: float = 0.0, drop_after: int | None = None, expire_on_drop: bool = False,
               refuse: bool = False, hang: bool = False) -> Iterator[None]:
        """Misbehave as told inside the block; behave again when it ends, however it ends."""
        self.throttle, self.drop_after, self.expire_on_drop, self.refuse, self.hang = (
            throttle, drop_after, expire_on_drop, refuse, hang)
        try:
            yield
        finally:
            self.throttle, self.drop_after, self.expire_on_drop, self.refuse, self.hang = 0.0, None, False, False, False

    def start(self) -> Hub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def do_HEAD(self) -> None:
                hub.requests.append(("HEAD", self.path))
                self.answer(body=False)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                self.answer(body=True)

            def send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def fail(self, status: int, code: str, message: str, body: bool, commit: str = "") -> None:
                headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
                if commit:
                    headers["X-Repo-Commit"] = commit
                self.send(status, headers, f'{{"error": "{message}"}}'.encode(), body)

            def answer(self, body: bool) -> None:
                while hub.hang and not hub.stopped.wait(0.1):
                    pass  # a hub that accepted the connection and never answers
                url = urllib.parse.urlsplit(self.path)
                path, on_cdn = url.path, self.server is hub.servers[1]
                hub.authorization.append(("cdn" if on_cdn else "hub", self.headers.get("Authorization")))
                cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
                if on_cdn:
                    if not cdn or cdn.group(1) not in hub.blobs:
                        return self.send(404, {}, b"NoSuchKey", body)
                    signed = urllib.parse.parse_qs(url.query).get("X-Amz-Signature") == [str(hub.signature)]
                    if hub.refuse or not signed:
                        return self.send(403, {}, b"<Error><Code>AccessDenied</Code>Request has expired</Error>", body)
                    return self.serve_blob(hub.blobs[cdn.group(1)], body)
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not match:
                    return self.fail(404, "EntryNotFound", "Not found", body)
                repo_id, revision, name = (urllib.parse.unquote(g) for g in match.groups())
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self.fail(401, "RepoNotFound", "Repository not found", body)
                if repo.gated and "authorization" not in {k.lower() for k in self.headers.keys()}:
                    return self.fail(401, "GatedRepo", "Access to this model is restricted", body)
                if revision not in ("main", repo.commit):
                    return self.fail(404, "RevisionNotFound", "Invalid rev id", body)
                if name not in repo.files:
                    return self.fail(404, "EntryNotFound", "Entry not found", body, commit=repo.commit)
                data = repo.files[name]
                if len(data) >= LFS_THRESHOLD or name.endswith(".gguf"):
                    sha = hashlib.sha256(data).hexdigest()
                    signed = f"{hub.cdn_url}/cdn/{sha}?X-Amz-Expires=3600&X-Amz-Signature={hub.signature}"
                    return self.send(302, {"Location": signed, "X-Repo-Commit": repo.commit,
                                           "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}, b"", body)
                self.send(200, {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_sha1(data)}"',
                                "Accept-Ranges": "bytes"}, data, body)

            def serve_blob(self, data: bytes, body: bool) -> None:
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start = int(ranged.group(1)) if ranged else 0
                end = int(ranged.group(2)) if ranged and ranged.group(2) else len(data) - 1
                headers = {"Accept-Ranges": "bytes", "Content-Length": str(end + 1 - start)}
                if ranged:
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self.send(206 if ranged else 200, headers, b"", body=False)
                if not body:
                    return
                stop_at = end + 1
                if hub.drop_after is not None and start == 0:
                    stop_at, hub.drop_after = hub.drop_after, None
                for offset in range(start, stop_at, 65536):
                    chunk = data[offset : min(offset + 65536, stop_at)]
                    try:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    except OSError:  # the client went away
                        return
                    hub.sent += len(chunk)
                    if hub.throttle:
                        time.sleep(len(chunk) / hub.throttle)
                if stop_at <= end:  # cut the connection mid-body, as a flaky network does
                    if hub.expire_on_drop:
                        hub.signature += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.servers = [ThreadingHTTPServer((host, 0), Handler) for host in ("127.0.0.1", "127.0.0.2")]
        self.url, self.cdn_url = (f"http://{host}:{port}" for host, port in (s.server_address for s in self.servers))
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
