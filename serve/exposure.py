"""Who can reach the server: the open-host rule, the Host names it answers to, and where its proxy listens.

A server on loopback without a key is safe from other machines, but not from the browser on the same machine:
any web page can send it requests, and a page whose domain is rebound to 127.0.0.1 can read the answers.
So the router answers only Host names it knows (a rebound page sends its own domain), only JSON bodies
declared as `application/json` (which a page cannot send to another origin without a CORS preflight), and
CORS stays off unless `serve.auth.cors_origins` names origins. And a server reachable from other machines
needs a key: the router refuses to start on such a host without one, however it was started (`shores serve`,
`serve run`, `serve deploy`).
"""

from __future__ import annotations

import ipaddress
import logging

from serve.settings import ServeSection

logger = logging.getLogger("ray.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # listen on every interface
ANY_HOST = "*"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume reachable from outside
        return False


def open_host_refusal(host: str, section: ServeSection) -> str | None:
    """Why serving on `host` is refused (reachable from other machines, no key, not allowed), else None."""
    if section.auth.api_key_env or is_loopback(host) or section.auth.allow_unauthenticated:
        return None
    return (
        f"the HTTP proxy listens on {host or 'every interface'}, reachable from other machines, and "
        "serve.auth.api_key_env is not set: set an API key, or serve.auth.allow_unauthenticated: true"
    )


def allowed_host_names(section: ServeSection, listening: str) -> frozenset[str] | None:
    """The Host names requests may carry: `serve.auth.allowed_hosts`, by default the loopback names and the
    address the proxy listens on (unless it listens everywhere); None when any name goes (`["*"]`)."""
    if section.auth.allowed_hosts is not None:
        names = {host_name(h) or h.lower() for h in section.auth.allowed_hosts}
        return None if ANY_HOST in names else frozenset(names)
    names = set(LOOPBACK_NAMES)
    for host in (section.deployment.host, listening):
        if host not in WILDCARDS:
            names.add(host_name(host) or host.lower())
    return frozenset(names)


def host_name(header: str) -> str | None:
    """The name in a Host header, lower case and without its port ("[::1]:8000" -> "::1"); None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 address, with its port after the bracket
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name or None
    if header.count(":") > 1:  # a bare IPv6 address
        return header
    name, colon, port = header.partition(":")
    if (colon and not port.isdigit()) or not name:
        return None
    return name.rstrip(".")  # "localhost." is "localhost"


async def proxy_host(default: str) -> str:
    """The address Serve's HTTP proxies listen on, as the Serve controller has it (`default` if it cannot say).

    `serve run` and `serve deploy` take it from the Serve config's `http_options`, not from
    serve.deployment.host.
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        options = await controller.get_http_config.remote()
    except Exception as err:  # noqa: BLE001 - outside a Serve cluster: the config's host is all there is
        logger.warning("cannot ask the Serve controller where the proxy listens (%s); using %s", err, default)
        return default
    return default if options.host is None else options.host
