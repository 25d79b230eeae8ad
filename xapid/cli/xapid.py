"""``xapid serve`` and ``xapid passwd``: the daemon's command line (contract in the README)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from xapid import config as config_mod
from xapid import statefiles
from xapid.logging import configure
from xapid.storage import DescriptorError
from xapid.store import StoreCorrupt

if TYPE_CHECKING:
    from xapid.daemon import Daemon

log = structlog.get_logger("xapid.cli")


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


SIGNAL_POLL = 0.2  # seconds between the main thread's checks for SIGTERM/SIGINT


def serve(args: argparse.Namespace) -> int:
    from xapid.daemon import Daemon
    from xapid.endpoints import HostEndpoints, bind_all
    from xapid.server import ApiServer, Limits, UnixXapiServer, XapiServer, bind_tcp

    # Stack scripts inherit this PATH: `#!/usr/bin/env python3` then finds the daemon's own interpreter
    # (fast, and the same Python) before any version-manager shim.
    interpreter_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[:1] != [interpreter_dir]:
        os.environ["PATH"] = os.pathsep.join([interpreter_dir, os.environ.get("PATH", os.defpath)])
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Everything that can refuse start-up without touching the state dir comes first: the
    # configuration, the TLS material, and binding the port.
    host, port = args.listen
    try:
        cfg = config_mod.load(Path(args.config) if args.config else None)
        limits = Limits.from_config(cfg)
        tls = None
        if args.tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
    except config_mod.ConfigError as e:
        print(f"xapid: {e}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError) as e:
        print(f"xapid: cannot load the TLS certificate or key: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_tcp(host, port)
    except OSError as e:
        print(f"xapid: cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}", file=sys.stderr)
        return 2
    _raise_fd_limit(limits.max_connections)
    try:
        daemon = Daemon(cfg, Path(args.state_dir), hosts=args.hosts)
    except (config_mod.ConfigError, DescriptorError) as e:
        sock.close()
        print(f"xapid: {e}", file=sys.stderr)
        return 2
    except StoreCorrupt as e:
        sock.close()
        print(f"xapid: refusing to start: the store failed verification: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - start-up errors are reported, not dumped
        sock.close()
        log.exception("start-up failed")
        print(f"xapid: start-up failed: {e}", file=sys.stderr)
        return 2
    try:
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("listening on a non-loopback address", address=host)
    except ValueError:
        log.warning("listening on a host name, not a loopback address", address=host)
    addresses = _host_addresses(daemon, host)
    try:
        sock, host_sockets = bind_all(host, port, addresses, first=sock)
    except OSError as e:
        daemon.store.close()
        print(f"xapid: cannot listen on every host's address: {e.strerror or e}", file=sys.stderr)
        return 2
    daemon.tls_cert = Path(args.tls_cert) if args.tls_cert else None
    daemon.tls_key = Path(args.tls_key) if args.tls_cert and args.tls_key else None
    tcp = XapiServer(sock, tls)
    server = ApiServer(daemon, limits)
    server.serve(tcp)
    daemon.api_scheme, daemon.api_port = ("https" if tls else "http"), tcp.server_address[1]
    endpoints = HostEndpoints(daemon, server, tcp.server_address[1], tls)
    endpoints.adopt(host_sockets)
    scheme = "https" if tls else "http"
    bound_host, bound_port = tcp.server_address
    url = f"{scheme}://{bound_host}:{bound_port}/"
    unix_path = Path(args.unix) if args.unix is not None else daemon.state_dir / "xapi.sock"
    if args.unix != "":
        try:
            server.serve(UnixXapiServer(unix_path))
            log.info("serving the local socket (pre-authenticated root)", path=str(unix_path))
        except OSError as e:
            log.warning("cannot serve the local socket", path=str(unix_path), error=str(e))
    daemon.start()
    server.start()
    daemon.nbd.start(addresses)
    url_file = daemon.state_dir / "url"
    statefiles.write_atomic(url_file, (url + "\n").encode(), mode=0o644)
    log.info("xapid ready", url=url, console=url + "console", state_dir=str(daemon.state_dir),
             root_password_file=str(daemon.state_dir / "root-password"),
             hosts=sorted(endpoints.urls(scheme).values()))
    # Poll: a signal the kernel hands to another thread only runs its Python handler when the main
    # thread next executes bytecode, and a bare wait() would sleep through it.
    while not stop.wait(SIGNAL_POLL):
        pass
    log.info("stopping")
    server.stop()
    daemon.stop()
    try:
        url_file.unlink()
    except FileNotFoundError:
        pass
    log.info("stopped")
    return 0


def _host_addresses(daemon: Daemon, listen: str) -> list[str]:
    """The hosts' own addresses to serve: loopback ones only, none if ``--listen`` covers them."""
    from xapid.endpoints import wildcard

    addresses = [str(rec["address"]) for _ref, rec in daemon.store.items("host")]
    if wildcard(listen) or listen in addresses:
        log.warning("--listen covers the hosts' own addresses: they are not served separately", address=listen)
        return []
    served = []
    for a in addresses:
        try:
            loopback = ipaddress.ip_address(a).is_loopback
        except ValueError:
            loopback = False
        if loopback and a not in served:
            served.append(a)
        elif not loopback:
            log.warning("a host's address is not a loopback address: not served", address=a)
    return served


def _raise_fd_limit(connections: int) -> None:
    """Lift the soft open-file limit towards what ``max-connections`` needs (never past the hard one)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 2 * connections + 256  # the TCP and Unix listeners, plus files and pipes
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
    except (ImportError, ValueError, OSError):
        pass


def passwd(args: argparse.Namespace) -> int:
    from xapid.auth import Users

    try:
        state = statefiles.ensure_private_dir(Path(args.state_dir))
    except config_mod.ConfigError as e:
        print(f"xapid passwd: {e}", file=sys.stderr)
        return 2
    line = sys.stdin.readline()
    password = line.rstrip("\n")
    if not password:
        print("xapid passwd: empty password on standard input", file=sys.stderr)
        return 1
    try:
        Users(state / "users.json").set_password(args.user, password, args.role)
    except (ValueError, OSError, config_mod.ConfigError) as e:
        print(f"xapid passwd: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fault"]:
        from xapid.hw.faults import main as fault_main

        return fault_main(argv[1:])
    parser = argparse.ArgumentParser(prog="xapid", description="XenAPI emulator daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help="xapi.conf (default: the shipped etc/xapi.conf)")
    s.add_argument("--state-dir", default="./var", help="state folder (default ./var)")
    s.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8080), help="HOST:PORT (port 0 = any)")
    s.add_argument("--hosts", type=int, default=3, help="hosts in the seeded pool (first start only)")
    s.add_argument("--unix", default=None,
                   help="local socket path, pre-authenticated as root (default <state-dir>/xapi.sock; '' = none)")
    s.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    s.add_argument("--tls-key", help="private key for --tls-cert")
    s.add_argument("--log-level", default="info")
    sub.add_parser("fault", help="break the running emulated pool on purpose (xapid fault --help)")
    p = sub.add_parser("passwd", help="set a user's password (read from standard input)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--role", default=None, help="pool-admin or read-only (default: keep, root: pool-admin)")
    p.add_argument("user")
    args = parser.parse_args(argv)
    configure(getattr(args, "log_level", "warning") if args.command == "serve" else "warning")
    if args.command == "serve":
        if args.hosts < 1 or args.hosts > 64:
            parser.error("--hosts must be between 1 and 64")
        return serve(args)
    return passwd(args)


if __name__ == "__main__":
    sys.exit(main())
