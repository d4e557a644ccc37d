"""
A stdlib HTTP server that is safe to leave running on a laptop whose user browses the web: what
serve.py stands on. Server caps open connections (a 503 beyond) and cuts those that do not send a
whole request in time. GuardedHandler refuses what a web page can make a browser send (a foreign
Host: DNS rebinding; a cross-origin POST; a non-JSON body), reads bodies strictly (one
Content-Length of ASCII digits, no Transfer-Encoding; JSON at most MAX_DEPTH deep; an error before
the body closes the connection, no smuggling, after discarding a bounded part of what is still
arriving so the client reads the answer), and writes JSON (NaN as null) and server-sent events.
Errors are ApiError, in OpenAI's error body. Server caps each client's requests running at once.
"""
import ipaddress
import json
import select
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nanolab.files import dumps

MAX_BODY = 1 << 20  # request bodies over 1 MB get 413
MAX_DEPTH = 64      # JSON nested deeper gets 400
DRAIN_BYTES, DRAIN_SECONDS = 4 << 20, 5.0  # what an early error discards before it closes


class ApiError(Exception):
    """A 4xx (or 5xx) answer with OpenAI's error body."""
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        kind = 'server_error' if self.status >= 500 else 'invalid_request_error'
        return {'error': {'message': str(self), 'type': kind, 'param': self.param,
                          'code': self.code}}


class GuardedHandler(BaseHTTPRequestHandler):
    """Reads and checks one request at a time (handle_one_request), for a subclass's do_GET /
    do_POST."""
    protocol_version = 'HTTP/1.1'  # keep-alive: an evaluation client sends thousands of requests
    timeout = 300                  # an idle connection gives its thread back after 5 minutes
    server_version = 'nanolab'

    def handle_one_request(self):
        # the next request must come in time
        self.server.deadline(self.connection, self.server.read_timeout)
        self.cors, self.body_read = None, False
        try:
            super().handle_one_request()
        except OSError:
            # the client has gone, or was cut at its deadline: nothing to answer, nothing to log
            self.close_connection = True

    def check_request(self, method):
        """Once the headers are in (call it first in do_GET/do_POST): a request without a body to
        read has met its deadline; a body it will not read closes the connection after the answer
        (never the next request); then check_browser."""
        self.started = False  # set by start_sse: the status line has gone out
        if method != 'POST':
            # read in time; the answer may take as long as it needs
            self.server.deadline(self.connection, None)
            if self.headers.get('Content-Length', '0') != '0' \
                    or 'Transfer-Encoding' in self.headers:
                self.close_connection = True
        self.check_browser(method)

    def check_browser(self, method):
        """Refuse what a web page can make the user's browser send. A Host that is not this
        server's is DNS rebinding (a page whose name now resolves to 127.0.0.1): 403. A POST from
        another origin (Origin, or Sec-Fetch-Site) unless --cors_origins allows it: 403. Plain
        clients (curl, openai, lm-eval) send neither. Cross-site GETs are left alone: without CORS
        headers the page cannot read the answer."""
        host, allowed = self.headers.get('Host'), self.server.allowed_hosts
        name = (host or '').rsplit(':', 1)[0] if not (host or '').endswith(']') else host
        name = name.strip('[]').lower()
        if host is not None and '*' not in allowed and name not in allowed and not _is_ip(name):
            raise ApiError(403,
                           f"this server does not answer to the Host {host[:80]!r}; if that is "
                           f"its name, start it with --allowed_hosts={name[:80]}",
                           None, 'host_not_allowed')
        origin, site = self.headers.get('Origin'), self.headers.get('Sec-Fetch-Site', '')
        if origin and (origin in self.server.cors_origins or '*' in self.server.cors_origins):
            self.cors = origin
        elif method != 'GET' and (site in ('cross-site', 'same-site') or origin
                                  and origin != f'http://{host}'):
            raise ApiError(403,
                           f"cross-origin request from {(origin or site)[:80]!r} refused; to let "
                           "that page call the API, start the server with --cors_origins=ORIGIN",
                           None, 'origin_not_allowed')

    def content_length(self):
        """The body's size from its one Content-Length header: ASCII digits, at most 10 of them
        (int() alone takes '²' and a 4,301-digit number is a ValueError). Two headers are refused,
        even when they agree (RFC 9112): a proxy may have read the other one."""
        values = self.headers.get_all('Content-Length') or ['0']
        if len(values) > 1:
            raise ApiError(400, "the request has more than one Content-Length header; send one",
                           None, 'bad_length')
        n = values[0].strip()
        if not (n.isascii() and n.isdigit() and len(n) <= 10):
            raise ApiError(400, f"Content-Length {n[:40]!r} is not a byte count", None,
                           'bad_length')
        return int(n)

    def body(self):
        """The JSON object of a POST: Content-Length bytes, Content-Type application/json, nested
        at most MAX_DEPTH deep."""
        # with Content-Length too, the two could disagree: smuggling
        if 'Transfer-Encoding' in self.headers:
            raise ApiError(400,
                           "Transfer-Encoding is not accepted; send the body "
                           "with a Content-Length header",
                           None, 'bad_length')
        n = self.content_length()
        if n > MAX_BODY:
            raise ApiError(413,
                           f"request body of {n} bytes is over the {MAX_BODY} byte limit; send "
                           "fewer or shorter prompts per request",
                           None, 'request_too_large')
        ctype = self.headers.get('Content-Type', '').split(';')[0].strip().lower()
        # also what keeps a page's no-preflight text/plain POST out
        if ctype != 'application/json':
            raise ApiError(415, f"Content-Type {ctype[:60]!r}: send the body as JSON, with the "
                           "header 'Content-Type: "
                           "application/json'", None, 'unsupported_media_type')
        data, self.body_read = self.rfile.read(n), True
        self.server.deadline(self.connection, None)
        too_deep = ApiError(400, f"the body nests arrays or objects more than {MAX_DEPTH} deep",
                            None, 'invalid_json')
        try:
            body = json.loads(data)
        except RecursionError:  # the parser recurses: a megabyte of '[' is deeper than its stack
            raise too_deep from None
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object", None,
                           'invalid_json') from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object {...}", None, 'invalid_json')
        if _depth(body) > MAX_DEPTH:  # every reader after this one may recurse too
            raise too_deep
        return body

    def drain(self):
        """Discard what is left of a request body we will not read, before closing: a client
        still sending (http.client sends the whole body before it reads) would get a broken pipe
        instead of our answer. Bounded: DRAIN_BYTES and DRAIN_SECONDS, and never parsed."""
        end, left = time.monotonic() + DRAIN_SECONDS, DRAIN_BYTES
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees EOF
            while left > 0 and (wait := end - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    def check_client(self):
        """Raise ConnectionResetError if the client has hung up (its socket reads as EOF): a
        poll(), microseconds."""
        try:
            p = select.poll()  # not select(): it fails on descriptors >= 1024
            p.register(self.connection, select.POLLIN)
            gone = bool(p.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            gone = True
        if gone:
            raise ConnectionResetError('client went away')

    def send_response(self, code, message=None):
        super().send_response(code, message)
        if self.cors:  # an origin in --cors_origins may read the answer
            for k, v in [('Access-Control-Allow-Origin', self.cors), ('Vary', 'Origin'),
                         ('Access-Control-Allow-Methods', 'GET, POST'),
                         ('Access-Control-Allow-Headers', 'Content-Type, Authorization')]:
                self.send_header(k, v)

    def send(self, status, data, ctype):
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status, obj):
        self.send(status, dumps(obj).encode(), 'application/json')

    def start_sse(self):  # chunked: with HTTP/1.1 the connection stays usable afterwards
        self.send_response(200)
        for k, v in [('Content-Type', 'text/event-stream'), ('Cache-Control', 'no-cache'),
                     ('Transfer-Encoding', 'chunked')]:
            self.send_header(k, v)
        self.end_headers()
        self.started = True

    def sse(self, obj):
        """One server-sent event, as one HTTP chunk."""
        data = b'data: ' + (obj if isinstance(obj, str) else dumps(obj)).encode() + b'\n\n'
        self.wfile.write(b'%x\r\n%s\r\n' % (len(data), data))

    def end_sse(self):
        self.wfile.write(b'0\r\n\r\n')


def _depth(obj):
    """How deep lists and dicts nest in a parsed JSON value (a loop: no recursion to exhaust)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (obj.values() if isinstance(obj, dict) else obj))
    return deepest


def _is_ip(name):
    try:
        return bool(ipaddress.ip_address(name))  # an address cannot be a rebound name
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    """One thread per connection, at most max_connections of them (beyond: a 503 straight from the
    accept loop), and every request read within read_timeout seconds of the handler starting to
    wait for it: a reaper thread shuts the sockets that are late, so idle or trickling connections
    cannot hold every thread (slowloris). At most max_client_requests of one client's requests run
    at once (turn). subtle: socketserver's listen backlog of 5 reset 32
    clients connecting at once, so it is raised."""
    request_queue_size = 256
    daemon_threads = True
    # make_server sets them (sets: tests add)
    allowed_hosts, cors_origins = frozenset({'localhost'}), frozenset()
    max_connections, read_timeout, max_client_requests = 256, 10.0, 16
    BUSY = (b'HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n'
            b'Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s')

    def server_activate(self):
        super().server_activate()
        # socket -> time its request must be in by (None: it is)
        self.deadlines, self.lock = {}, threading.Lock()
        # client -> its requests running; waiters wait on the condition
        self.clients, self.turns = Counter(), threading.Condition()
        threading.Thread(target=self.reap, daemon=True, name='reaper').start()

    def process_request(self, request, client_address):
        with self.lock:
            full = len(self.deadlines) >= self.max_connections
            if not full:
                self.deadlines[request] = time.monotonic() + self.read_timeout
        if not full:
            return super().process_request(request, client_address)
        body = dumps(ApiError(503,
                              f"the server has {self.max_connections} connections open; retry in "
                              "a second (serve.py --max_connections)",
                              None, 'too_many_connections').body()).encode()
        try:
            # a short answer into an empty socket buffer; never wait on the client
            request.setblocking(False)
            request.send(self.BUSY % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    @contextmanager
    def turn(self, client, check):
        """Hold one of client's max_client_requests places while a request runs; its requests
        beyond wait here for one, calling check() between waits (it raises when the client hung
        up). A client is an address and the key it sends: one client opening many connections
        gets no more of the server than one that opens a few."""
        with self.turns:
            while self.clients[client] >= self.max_client_requests:
                self.turns.wait(0.25)
                check()
            self.clients[client] += 1
        try:
            yield
        finally:
            with self.turns:
                self.clients[client] -= 1
                if not self.clients[client]:
                    del self.clients[client]
                self.turns.notify_all()

    def deadline(self, sock, seconds):
        with self.lock:
            if sock in self.deadlines:
                self.deadlines[sock] = None if seconds is None else time.monotonic() + seconds

    def shutdown_request(self, request):
        with self.lock:
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def reap(self):
        while True:
            time.sleep(min(0.5, self.read_timeout / 4))
            now = time.monotonic()
            with self.lock:
                late = [sock for sock, t in self.deadlines.items() if t is not None and t < now]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns: the handler ends
                except OSError:
                    pass
