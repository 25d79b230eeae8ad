"""The baseline: a bare standard-library XML-RPC server answering constants.

``python -m bench.baseline --replies FILE --url-file F`` serves, from a process of its own, a
``ThreadingMixIn`` ``SimpleXMLRPCServer`` on 127.0.0.1 (any free port) with HTTP/1.1 keep-alive.
``FILE`` is a JSON object mapping a method name to a complete XML-RPC response body that xapid
sent for it; the server decodes each once and answers every call of that method with the
decoded struct, marshalled again per call by the standard library, so the baseline does the
work of a Python XML-RPC server (parse the request, dispatch, marshal a struct of the same
size) and nothing more.  When ready it writes its URL to ``F``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer


class Handler(SimpleXMLRPCRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as xapid
    disable_nagle_algorithm = True  # as xapid: no Nagle/delayed-ACK stalls on the split reply
    rpc_paths = ()  # any path, as xapid


class BaselineServer(ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def constant(value: Any) -> Callable[..., Any]:
    def answer(*_params: Any) -> Any:
        return value

    return answer


def serve(replies: dict[str, str], url_file: Path) -> None:
    server = BaselineServer(("127.0.0.1", 0), Handler, logRequests=False, allow_none=True)
    for method, body in replies.items():
        (value,), _name = xmlrpc.client.loads(body.encode("utf-8"))
        server.register_function(constant(value), method)
    host, port = server.server_address[:2]
    tmp = url_file.with_name(url_file.name + ".tmp")
    tmp.write_text(f"http://{host}:{port}/\n")
    os.replace(tmp, url_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--replies", required=True, type=Path, help="JSON: method name -> XML-RPC response body")
    parser.add_argument("--url-file", required=True, type=Path)
    args = parser.parse_args(argv)
    serve(json.loads(args.replies.read_text()), args.url_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
