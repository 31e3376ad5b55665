"""Bounded HTTP GETs with urllib, for hub.py: what it takes to hold against a server that
misbehaves, by accident or on purpose.

urllib alone trusts the server. Its timeout bounds each read, not a request (a byte every few
seconds holds it forever); it reads a body to wherever the server stops; a redirect keeps
the Authorization header, wherever it leads; and its errors quote the server, line breaks
and all. Here every request has these limits:
  deadline   in all, redirects and headers included: JSON_DEADLINE seconds for a JSON
             document, FILE_DEADLINE + (its size) / MIN_RATE seconds for a file. Reads take
             at most CHUNK bytes, and each waits no longer than the time left (nor than
             TIMEOUT); a watchdog thread shuts the connection when the time is up, for the
             reads urllib makes itself (the status line and headers, which can come a byte at
             a time too).
  file size  a download is never written past the size it should have: a server that sends
             more is refused, and the partial file deleted.
  JSON       at most MAX_JSON bytes; nested deeper than Python's parser goes, it is refused.
  redirects  at most MAX_REDIRECTS, to http or https only; the token (Authorization header)
             goes only to the scheme, host and port it was given for.
Errors are one line, any text the server chose cleaned by clean(), and of two kinds:
  Refused      the server answered, with nothing to keep (HTTP 4xx, a redirect loop, too
               much data, not JSON): trying again will not help. Its message names `what`
               (the caller's name for the request) and its `code` is the HTTP status, if any.
  Unreachable  (a ConnectionError) no answer, or not in time, broken HTTP or HTTP 5xx: worth
               trying again, or falling back on a cache. Its message says only what went
               wrong, for the caller to place.
"""
import contextlib
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

CHUNK = 1 << 20          # bytes read at a time
TIMEOUT = 30             # seconds one read may wait
JSON_DEADLINE = 60       # seconds for a whole JSON answer
FILE_DEADLINE = 60       # seconds for a file, plus 1 s per MIN_RATE bytes:
MIN_RATE = 100_000       #   the slowest download (bytes/s) that is let finish
MAX_JSON = 16 << 20      # bytes of a JSON answer
MAX_REDIRECTS = 10
BAR_FROM = 10 << 20      # a progress bar for files of 10 MiB and more
USER_AGENT = "steering-vector-distillation (urllib)"


class Refused(Exception):
    """The server answered, but nothing in the answer is worth keeping or asking again for."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Unreachable(ConnectionError):
    """No (usable) answer: the network, a slow or broken server; worth another try."""


def clean(text, limit=200):
    """Text a server chose, fit for a one-line message: control characters and line breaks
    become spaces, runs of spaces one, and it is cut to `limit` characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def size_field(text):
    """An HTTP header's byte count (Content-Length), or None if it has none or a bad one."""
    return int(text) if text and re.fullmatch(r"[0-9]{1,20}", text) else None


def origin(url):
    """(scheme, host, port) of an http(s) url: who gets to see what is sent to it; None if
    url is not one (another scheme, or a port that is not a number from 0 to 65535)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, (parts.hostname or "").lower(), port) if port else None


def bad_redirect(what, code, url):
    return Refused(f"{what}: HTTP {code} redirects to {clean(repr(url), 100)}, not a usable "
                   f"http or https address", code)


# ------------------------------------------------------------------------------ the deadline
class Watchdog:
    """The deadline of one request (`what`), its redirects included: it shuts the
    request's connections when the time is up, which ends any read that is waiting."""

    def __init__(self, seconds, what):
        self.seconds, self.end, self.what = seconds, time.monotonic() + seconds, what
        self.sockets, self.fired, self.lock = [], False, threading.Lock()
        self.timer = threading.Timer(min(seconds, threading.TIMEOUT_MAX), self.fire)
        self.timer.daemon = True
        self.timer.start()

    def left(self):
        return self.end - time.monotonic()

    def watch(self, sock):
        """Watch a connection: `sock` is a second handle on its socket (socket.dup()), still
        good once TLS has taken the first over, and closed by stop()."""
        with self.lock:
            self.sockets.append(sock)
            if self.fired:
                self.shut(sock)

    def fire(self):
        with self.lock:
            self.fired = True
            for sock in self.sockets:
                self.shut(sock)

    @staticmethod
    def shut(sock):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # (for every handle on the socket: reads end)

    def stop(self):
        self.timer.cancel()
        with self.lock:
            for sock in self.sockets:
                sock.close()

    @contextlib.contextmanager
    def errors(self):
        """Turn what urllib and http.client raise into one-line Refused or Unreachable."""
        try:
            yield
        except Refused:
            raise
        except urllib.error.HTTPError as e:
            if e.fp:
                e.fp.close()
            where = "{}://{}".format(*urllib.parse.urlsplit(e.filename or "")[:2])
            detail = clean((e.headers and e.headers.get("X-Error-Message")) or e.reason)
            if e.code >= 500:
                raise Unreachable(f"HTTP {e.code} from {where} ({detail})") from None
            if 300 <= e.code < 400 and origin(e.filename) is None:  # (urllib's own check)
                raise bad_redirect(self.what, e.code, e.filename) from None
            if 300 <= e.code < 400:  # (what urllib's redirect handler gives up on)
                loop = str(e.reason).startswith(urllib.request.HTTPRedirectHandler.inf_msg)
                detail = (f"a redirect loop, or more than {MAX_REDIRECTS} redirects" if loop
                          else "a redirect that cannot be followed")
            raise Refused(f"{self.what}: HTTP {e.code} from {where} ({detail})", e.code) from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            if self.fired or self.left() <= 0:  # (a shut socket ends reads in many ways)
                raise Unreachable(f"no whole answer within {self.seconds:g} s") from None
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            text = clean(reason) or "no detail"
            if isinstance(reason, http.client.HTTPException | ValueError):  # (name the kind:
                text = f"{type(reason).__name__}: {text}"  # BadStatusLine, LineTooLong...)
            raise Unreachable(text) from None


# ------------------------------------------------------------------------------ connections
class Watched:
    """An HTTP(S) connection that its request's watchdog can shut."""

    def __init__(self, *args, watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        create = self._create_connection  # (http.client's hook: socket.create_connection)

        def create_watched(address, *more):
            sock = create(address, *more)
            watchdog.watch(sock.dup())
            return sock
        self._create_connection = create_watched


class WatchedHTTP(Watched, http.client.HTTPConnection):
    pass


class WatchedHTTPS(Watched, http.client.HTTPSConnection):
    pass


class HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(WatchedHTTP, req, watchdog=req.watchdog)


class HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(WatchedHTTPS, req, context=self._context, watchdog=req.watchdog)


class Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (to http or https only) under the same deadline, sending the token
    only to the scheme, host and port it was given for: a large file redirects to a storage
    server, which must not see it, and https must not turn into http with it."""
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) is None:
            fp.close()
            raise bad_redirect(getattr(req, "what", req.full_url), code, newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            fp.close()  # (urllib would read the redirect's body, as long as it may be)
            new.watchdog, new.what = getattr(req, "watchdog", None), getattr(req, "what", "")
            if origin(newurl) != origin(req.full_url):
                new.remove_header("Authorization")
        return new


OPENER = urllib.request.build_opener(HTTPHandler, HTTPSHandler, Redirects)


# ------------------------------------------------------------------------------ requests
class Response:
    """An answer, to be read with chunks() before its deadline; a context manager."""

    def __init__(self, response, watchdog):
        self.response, self.watchdog = response, watchdog
        self.status, self.headers = response.status, response.headers

    def chunks(self):
        """The body, CHUNK bytes at most at a time, each read waiting only for the time left."""
        dog = self.watchdog
        while True:
            with dog.errors():
                if dog.left() <= 0:
                    raise TimeoutError
                # (http.client keeps the socket there, with no public way to it)
                sock = getattr(getattr(self.response.fp, "raw", None), "_sock", None)
                if sock is not None:
                    sock.settimeout(min(TIMEOUT, dog.left()))
                chunk = self.response.read1(CHUNK)  # (read() would wait for all CHUNK bytes)
                if not chunk and dog.fired:
                    raise TimeoutError
            if not chunk:
                return
            yield chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.response.close()
        self.watchdog.stop()


def get(url, what, seconds, start=0):
    """The Response to GET url (from byte `start` on), to be read within `seconds` from now.
    $HF_TOKEN goes with it as `Authorization: Bearer ...` (see Redirects)."""
    headers = {"User-Agent": USER_AGENT}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    if start:
        headers["Range"] = f"bytes={start}-"
    dog = Watchdog(seconds, what)
    try:
        with dog.errors():
            request = urllib.request.Request(url, headers=headers)
            request.watchdog, request.what = dog, what  # (handed on to redirects)
            return Response(OPENER.open(request, timeout=min(TIMEOUT, seconds)), dog)
    except BaseException:
        dog.stop()
        raise


def get_json(url, what):
    """The JSON document at url, of MAX_JSON bytes at most, within JSON_DEADLINE seconds."""
    too_big = Refused(f"{what}: the server's answer is larger than {MAX_JSON} bytes")
    with get(url, what, JSON_DEADLINE) as r:
        length = size_field(r.headers.get("Content-Length"))
        if (length or 0) > MAX_JSON:
            raise too_big
        body = bytearray()
        for chunk in r.chunks():
            body += chunk
            if len(body) > MAX_JSON:
                raise too_big
    if length is not None and len(body) < length:  # (network trouble, not bad JSON)
        raise Unreachable(f"the connection closed after {len(body)} of {length} bytes")
    try:
        return json.loads(body)
    except RecursionError:
        raise Refused(f"{what}: the server's JSON is nested too deep") from None
    except ValueError as e:
        raise Refused(f"{what}: the server's answer is not JSON ({clean(e)})") from None


def download(url, partial, size, what):
    """Download url, a file of `size` bytes, into the file `partial`, continuing what is there
    already (with a Range request), within FILE_DEADLINE + size / MIN_RATE seconds.
    Unreachable if the answer ends early or late (partial keeps what came, to resume from);
    Refused, and partial deleted, if the server sends more than `size` bytes."""
    start = partial.stat().st_size if partial.exists() else 0
    if start > size:
        start = 0
    if start == size:
        return  # whole already (the caller checks whether it is right)
    with get(url, what, FILE_DEADLINE + size / MIN_RATE, start) as r:
        if start and not (r.status == 206 and  # the server may ignore Range: start over
                          r.headers.get("Content-Range", "").startswith(f"bytes {start}-")):
            start = 0
        got, length = start, size_field(r.headers.get("Content-Length"))
        too_much = length is not None and start + length > size  # (said so before sending it)
        if not too_much:
            with open(partial, "ab" if start else "wb") as f, \
                    tqdm(total=size, initial=start, unit="B", unit_scale=True,
                         unit_divisor=1024, desc=partial.stem, disable=size < BAR_FROM) as bar:
                for chunk in r.chunks():
                    if got + len(chunk) > size:  # (not one byte past the size is written)
                        too_much = True
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    if too_much:
        partial.unlink(missing_ok=True)
        raise Refused(f"{what}: the server sends more than the {size} bytes the file has; "
                      f"the download was deleted")
    if got < size:
        raise Unreachable(f"the connection closed after {got} of {size} bytes")
