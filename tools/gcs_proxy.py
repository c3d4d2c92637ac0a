"""HTTPS-terminating CONNECT proxy that sends TensorFlow's GCS traffic to a local emulator.

TensorFlow's GCS filesystem talks to the hard-coded hosts `www.googleapis.com` and
`storage.googleapis.com` over HTTPS through libcurl, which honours `https_proxy` and
`CURL_CA_BUNDLE`. This proxy answers `CONNECT` for those hosts, terminates TLS with a test
certificate and forwards plain HTTP/1.1 (Host header kept, so fake-gcs-server can tell JSON-API
requests from `storage.googleapis.com/<bucket>/<object>` downloads) to the emulator.

Standard library only, so the harness can run it as a fast subprocess:

    python tools/gcs_proxy.py --upstream 127.0.0.1:4443 --cert server.pem --key server.key

It prints `listening on 127.0.0.1:<port>` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import signal
import socket
import socketserver
import ssl
import sys
import threading

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_CHUNK = 1 << 16
# Hop-by-hop headers (RFC 9110 7.6.1) plus those this proxy re-frames itself.
_DROP_REQUEST = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",  # BaseHTTPRequestHandler has already answered `100 Continue`.
    # TF sends `identity` (fake-gcs-server answers 501) or `chunked`; bodies are re-framed.
    "transfer-encoding",
    "content-length",
}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade"}


class _UpstreamConnection(http.client.HTTPConnection):
    """Plain HTTP connection to the emulator, with Nagle off for small request/response pairs."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves CONNECT, then the HTTP/1.1 requests inside the TLS tunnel."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: Nagle + delayed ACK would add ~40 ms to each.
    disable_nagle_algorithm = True
    server: _ProxyServer
    tunnel_host = ""
    upstream: http.client.HTTPConnection | None = None

    def do_CONNECT(self) -> None:  # noqa: N802 (http.server naming)
        host, _, port = self.path.rpartition(":")
        if self.tunnel_host or host not in self.server.allowed_hosts or port != "443":
            self.send_error(403, f"this proxy only tunnels to {self.server.allowed_hosts} port 443")
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        try:
            tls = self.server.ssl_context.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.server.warn(
                f"TLS handshake for {host} failed ({e}); does the client trust the emulator CA "
                "(CURL_CA_BUNDLE)?"
            )
            self.close_connection = True
            return
        self.connection = self.request = tls
        self.rfile = tls.makefile("rb")
        self.wfile = socketserver._SocketWriter(tls)  # type: ignore[attr-defined]
        self.tunnel_host = host
        self.close_connection = False

    def _forward(self) -> None:
        if not self.tunnel_host:
            self.send_error(400, "send CONNECT first: this is an HTTPS proxy for GCS hosts only")
            return
        try:
            body = self._read_body()
        except ValueError as e:
            self.send_error(400, f"malformed request body framing: {e}")
            self.close_connection = True
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _DROP_REQUEST]
        # Makes fake-gcs-server build https:// resumable-upload `Location` URLs.
        headers.append(("X-Forwarded-Proto", "https"))
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        try:
            response = self._send_upstream(headers, body)
        except (OSError, http.client.HTTPException) as e:
            self.send_error(502, f"emulator at {self.server.upstream} unreachable: {e}")
            return
        self._relay(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # Trailers: nothing downstream needs them.
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_upstream(
        self, headers: list[tuple[str, str]], body: bytes
    ) -> http.client.HTTPResponse:
        # One upstream connection per tunnel; reconnect once when the emulator closed it.
        for attempt in range(2):
            if self.upstream is None:
                self.upstream = _UpstreamConnection(*self.server.upstream, timeout=120)
            try:
                self.upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in headers:
                    self.upstream.putheader(key, value)
                self.upstream.endheaders(body or None)
                return self.upstream.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.log_request(response.status)
        self.send_response_only(response.status, response.reason)
        has_body = self.command != "HEAD" and response.status not in (204, 304)
        length = response.getheader("Content-Length")
        for key, value in response.getheaders():
            if key.lower() not in _DROP_RESPONSE:
                self.send_header(key, value)
        chunked = has_body and length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while has_body:
            data = response.read(_CHUNK)
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            elif data:
                self.wfile.write(data)
            if not data:
                break
        response.close()
        if response.will_close and self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.upstream is not None:
                self.upstream.close()
            if self.tunnel_host:
                self.connection.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.server.verbose:
            sys.stderr.write(f"[gcs_proxy] {self.tunnel_host} {format % args}\n")


class _ProxyServer(http.server.ThreadingHTTPServer):
    """Threaded server: TF opens several connections and tf.data reads in parallel."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        ssl_context: ssl.SSLContext,
        allowed_hosts: tuple[str, ...],
        verbose: bool,
    ) -> None:
        super().__init__(listen, _Handler)
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.allowed_hosts = allowed_hosts
        self.verbose = verbose

    def warn(self, message: str) -> None:
        """Writes a one-line warning to stderr."""
        sys.stderr.write(f"[gcs_proxy] {message}\n")

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            return  # The client hung up mid-request; it retries on its own.
        super().handle_error(request, client_address)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    """Runs the proxy until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=_host_port, required=True, help="emulator HOST:PORT")
    parser.add_argument("--cert", required=True, help="PEM server certificate chain")
    parser.add_argument("--key", required=True, help="PEM server private key")
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0))
    parser.add_argument("--hosts", default=",".join(GCS_HOSTS), help="hosts CONNECT may reach")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        sys.exit(f"gcs_proxy: cannot load certificate {args.cert} / key {args.key}: {e}")
    try:
        server = _ProxyServer(
            args.listen, args.upstream, context, tuple(args.hosts.split(",")), args.verbose
        )
    except OSError as e:
        sys.exit(f"gcs_proxy: cannot listen on {args.listen[0]}:{args.listen[1]}: {e}")
    # serve_forever must stop from another thread; the signal handler runs in the main one.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
