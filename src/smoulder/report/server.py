"""``smoulder review OUT``: serve the reports on the loopback interface and save decisions.

GET serves files under the output folder only (no path outside it, no hidden files); POST
``/api/review/<subject>`` with ``{"rows": [...]}`` merges the rows into the subject's review
table (:func:`smoulder.report.review.merge_review`: atomic, locked, per rater).
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import re
import socket
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from smoulder.errors import InputError
from smoulder.report.review import merge_review, review_path

SUBJECT = re.compile(r"^sub-[A-Za-z0-9]+$")
MAX_BODY = 1_000_000


def is_loopback(host: str) -> bool:
    """Return whether ``host`` names only loopback addresses.

    Examples:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def safe_path(root: Path, url_path: str) -> Path | None:
    """Return the file ``url_path`` names under ``root``, or None if it leaves ``root``.

    Examples:
        >>> safe_path(Path("/out"), "/../etc/passwd") is None
        True
        >>> safe_path(Path("/out"), "/%2e%2e/secret") is None
        True
        >>> str(safe_path(Path("/out"), "/sub-01.html"))
        '/out/sub-01.html'
    """
    rel = unquote(urlsplit(url_path).path).lstrip("/") or "index.html"
    parts = Path(rel).parts
    if any(p in ("..", "") or p.startswith(".") for p in parts) or "\\" in rel or "\x00" in rel:
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


class ReviewHandler(BaseHTTPRequestHandler):
    """Serve ``root``'s files; accept review rows."""

    server_version = "smoulder-review"

    def __init__(self, *args, root: Path, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:  # type: ignore[no-untyped-def]  # noqa: A002
        pass  # quiet; errors go to the client

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def do_GET(self) -> None:  # noqa: N802
        path = safe_path(self.root, self.path)
        if path is None:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the output folder")
        if not path.is_file():
            return self._error(HTTPStatus.NOT_FOUND, "no such file")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".tsv":
            ctype = "text/tab-separated-values; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), ctype)

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path).path.split("/")
        if (
            len(parts) != 4
            or parts[1:3] != ["api", "review"]
            or not SUBJECT.match(unquote(parts[3]))
        ):
            return self._error(HTTPStatus.NOT_FOUND, "POST /api/review/<sub-label> only")
        subject = unquote(parts[3])
        subject_dir = self.root / subject
        if not subject_dir.is_dir():
            return self._error(HTTPStatus.NOT_FOUND, f"no subject {subject}")
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, "expected a JSON body under 1 MB")
        try:
            rows = json.loads(self.rfile.read(length))["rows"]
            saved = merge_review(review_path(subject_dir, subject), rows)
        except (ValueError, KeyError, TypeError, InputError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        self._send(HTTPStatus.OK, json.dumps({"rows": saved}).encode())


def make_server(
    root: str | Path, host: str = "127.0.0.1", port: int = 8765, *, allow_remote: bool = False
) -> ThreadingHTTPServer:
    """Return the (not yet serving) review server for ``root``.

    Raises:
        InputError: ``host`` is not a loopback address and ``allow_remote`` is False.
    """
    if not allow_remote and not is_loopback(host):
        raise InputError(
            f"--host {host}",
            expected="a loopback address (127.0.0.1, ::1, localhost)",
            found="an address other machines can reach",
            hint="add --allow-remote to serve it on purpose (there is no authentication)",
        )
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError(str(root), expected="the smoulder output folder", found="no folder")
    return ThreadingHTTPServer((host, port), partial(ReviewHandler, root=root))
