"""Which host names a server answers to: loopback names always, others when allowed. Standard
library only: server.py checks its bind address with it before the server's packages load,
app.py each request's Host header (DNS rebinding: a site whose name has been rebound to
127.0.0.1 must not reach a keyless server as if it were its own page)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine: `localhost` or a loopback address
    (127.0.0.0/8, ::1, bracketed or not). Not `*.localhost` nor any other name: those resolve
    wherever their DNS says."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str | None:
    """The name of a Host header (`127.0.0.1:8000`, `[::1]:8000`, `localhost`) without its
    port, lowercased; None if it is not a host[:port]."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 address
        name, bracket, port = host.partition("]")
        name += bracket
        port = port[1:] if port.startswith(":") else port
    else:
        name, _, port = host.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name


def host_refusal(host: str | None, allow_hosts: tuple[str, ...]) -> str | None:
    """Why a keyless server refuses a request with this Host header (DNS rebinding: a site whose
    name now resolves to 127.0.0.1 would otherwise reach the server as if from its own page);
    None if it answers it."""
    name = None if host is None else host_name(host)
    if name is not None and (is_loopback(name) or name in allow_hosts):
        return None
    allowed = ", ".join((*LOOPBACK_NAMES, *allow_hosts))
    given = "no host" if host is None else f"the host {host!r}"
    return f"this server answers only requests for {allowed}; this one names {given}"
