"""Serving the dashboard: the listen address, systemd socket activation, uvicorn.

Guarantees: the default address is loopback (127.0.0.1:8765); a non-loopback address,
given or received from systemd, is refused unless a web token is configured (writes are
then possible only with it, and reads are exposed to the network on purpose). A socket
passed by systemd (``LISTEN_FDS``/``LISTEN_PID``, fd 3: harness-web.socket) is used instead
of binding. SIGTERM and SIGINT end every live stream and stop within
:data:`GRACEFUL_S` seconds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from types import FrameType
from typing import Any

from coordination.errors import HarnessError, UsageError
from coordination.paths import Home

DEFAULT_LISTEN = "127.0.0.1:8765"
SD_LISTEN_FDS_START = 3
GRACEFUL_S = 2


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> ``(host, port)``; port 0 picks a free one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--listen: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--listen: port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def activation_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The first socket systemd passed to this process, None when none was."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS"):
        return None
    if int(env["LISTEN_FDS"]) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for children
    return sock


@dataclass
class Listener:
    sock: socket.socket
    host: str
    port: int
    activated: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def open_listener(listen: str, *, token: str | None,
                  environ: dict[str, str] | None = None) -> Listener:
    """The socket to serve on (systemd's, else a new one bound to ``listen``), after the
    loopback rule of the module docstring."""
    sock = activation_socket(environ)
    if sock is not None:
        host, port = sock.getsockname()[:2]
        if not is_loopback(host) and token is None:
            sock.close()
            raise UsageError(f"the socket from systemd listens on {host}:{port}, not loopback; "
                             "configure a web token first (docs/web.md)")
        return Listener(sock, host, port, True)
    host, port = parse_listen(listen)
    if not is_loopback(host) and token is None:
        raise UsageError(f"--listen {listen}: refusing a non-loopback address without a web "
                         "token ($HARNESS_WEB_TOKEN or coordination/config/web-token, 0600)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise HarnessError(f"--listen {listen}: cannot bind: {exc.strerror}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    return Listener(sock, bound_host, bound_port, False)


def allowed_hosts(listener: Listener, extra: tuple[str, ...]) -> list[str]:
    """Host header values accepted: loopback names, the bound address, ``--allow-host``
    names, and this machine's names when bound to every address."""
    from .app import LOOPBACK_HOSTS

    hosts = [*LOOPBACK_HOSTS, listener.host, *extra]
    if listener.host in ("0.0.0.0", "::"):
        hosts += [socket.gethostname(), socket.getfqdn()]
    return hosts


def serve(home: Home, listen: str, *, allow_hosts: tuple[str, ...] = (),
          log_level: str = "warning") -> int:
    """Run the dashboard until SIGTERM/SIGINT; returns the exit status."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("harness web needs the web extra: pip install -e '.[web]' "
                         "(starlette, uvicorn, jinja2)") from None
    from .app import create_app
    from .auth import load_token

    home.require()
    token = load_token(home)
    listener = open_listener(listen, token=token)
    app = create_app(home, token=token, allowed_hosts=allowed_hosts(listener, allow_hosts))
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            loop="asyncio", http="h11", ws="none", server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_S)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            feed: Any = getattr(app.state, "feed", None)
            if feed is not None and feed.loop is not None:
                feed.loop.call_soon_threadsafe(feed.close)  # open streams end now
            super().handle_exit(sig, frame)

    server = Server(config)
    mode = "writes need the web token" if token else "read-only"
    how = " (socket from systemd)" if listener.activated else ""
    print(f"harness web: serving {home.root} at {listener.url}{how}; {mode}", flush=True)
    try:
        server.run(sockets=[listener.sock])
    except KeyboardInterrupt:
        pass
    finally:
        listener.sock.close()
    return 0 if server.started else 1


__all__ = ["DEFAULT_LISTEN", "open_listener", "parse_listen", "serve"]
