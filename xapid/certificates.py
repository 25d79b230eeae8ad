"""Each emulated host's TLS server certificate, as ``host.get_server_certificate`` returns it.

A real host answers with the certificate part of its ``xapi-ssl.pem`` (xapi's
``certificates.ml``, ``get_server_certificate``).  Here it is the certificate the
daemon serves HTTPS with when ``--tls-cert`` is given (every host of the pool is
this one process), otherwise a self-signed certificate made once per host by
``openssl`` and kept in the host's folder with its key (the host's NBD service serves TLS
with them), so the answer is a real, parseable certificate that stays the same across restarts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from xapid.errors import ApiError
from xapid.statefiles import make_dirs, read_bytes, write_atomic

CERT_FILE = "server-cert.pem"
KEY_FILE = "server-key.pem"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----\r?\n?", re.S)
OPENSSL_TIMEOUT = 30.0


def certificate_blocks(pem: bytes) -> str:
    """The ``CERTIFICATE`` blocks of a PEM file (keys and other blocks dropped), newline-terminated."""
    blocks = [m.group(0).rstrip(b"\r\n") + b"\n" for m in _PEM_CERT.finditer(pem)]
    return b"".join(blocks).decode("ascii")


def server_certificate(host_dir: Path, hostname: str, served: Path | None) -> str:
    """The PEM certificate host ``hostname`` (folder ``host_dir``) presents.

    ``served`` is the certificate file the daemon serves TLS with, if any.  Raises
    :class:`ApiError` ``INTERNAL_ERROR`` when no certificate can be read or made.
    """
    if served is not None:
        data = read_bytes(served)
        pem = certificate_blocks(data or b"")
        if not pem:
            raise ApiError("INTERNAL_ERROR", f"cannot read the server certificate {served}")
        return pem
    data = read_bytes(host_dir / CERT_FILE)
    if data and certificate_blocks(data):
        return certificate_blocks(data)
    cert, _key = server_key_pair(host_dir, hostname)
    return certificate_blocks(read_bytes(cert) or b"")


def server_key_pair(host_dir: Path, hostname: str) -> tuple[Path, Path]:
    """The files of the host's self-signed certificate and its private key (what its NBD service
    serves TLS with), made once.  A certificate an older xapid kept without its key is replaced."""
    cert, key = host_dir / CERT_FILE, host_dir / KEY_FILE
    data, key_data = read_bytes(cert), read_bytes(key)
    if data and certificate_blocks(data) and key_data and b"PRIVATE KEY" in key_data:
        return cert, key
    cert_pem, key_pem = _self_signed(hostname)
    make_dirs(host_dir)
    write_atomic(key, key_pem.encode("ascii"), mode=0o600)
    write_atomic(cert, cert_pem.encode("ascii"), mode=0o644)
    return cert, key


def _self_signed(hostname: str) -> tuple[str, str]:
    """A new self-signed certificate for ``hostname`` and its private key (PEM)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ApiError("INTERNAL_ERROR", "openssl is not installed: cannot make the host's server certificate")
    cn = re.sub(r"[^A-Za-z0-9.-]", "-", hostname) or "localhost"
    with tempfile.TemporaryDirectory(prefix="xapid-cert-") as tmp:
        cert = Path(tmp) / "cert.pem"
        try:
            subprocess.run(
                [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", str(Path(tmp) / "key.pem"), "-out", str(cert), "-days", "3650",
                 "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn}"],
                check=True, capture_output=True, timeout=OPENSSL_TIMEOUT,
            )
            pem = certificate_blocks(cert.read_bytes())
            key = (Path(tmp) / "key.pem").read_text("ascii")
        except (OSError, subprocess.SubprocessError) as e:
            raise ApiError("INTERNAL_ERROR", f"cannot make the host's server certificate: {e}") from e
    if not pem or "PRIVATE KEY" not in key:
        raise ApiError("INTERNAL_ERROR", "openssl made no certificate")
    return pem, key
