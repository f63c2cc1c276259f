"""CurveZMQ for serving beyond loopback: the server authenticates clients by their public keys and every
frame is encrypted (docs/protocol.md, "Authentication and encryption").

Keys are pyzmq's certificate files (`zmq.auth.create_certificates`, or `moerun client keygen`): NAME.key
holds a public key, NAME.key_secret the public and the secret key. The server reads its own
`serve.curve_secret_key_file` and accepts the clients whose NAME.key files are in
`serve.curve_authorized_dir` (read at start), through a ZAP handler (`zmq.auth`) on its own ZeroMQ context;
a client not listed never completes the handshake and gets no reply at all. A client needs the server's
public key and, to be recognised, its own key pair.
"""

from __future__ import annotations

import glob
import os

import zmq

__all__ = ["CurveError", "ALLOW_ANY", "keygen", "load_keypair", "load_public_key", "secure_client", "secure_server"]

ALLOW_ANY = "*"  # serve.curve_authorized_dir = "*": any client key (encryption without client authentication)


class CurveError(ValueError):
    pass


def _check_available() -> None:
    if not zmq.has("curve"):
        raise CurveError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE support")


def load_keypair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    import zmq.auth

    _check_available()
    if not os.path.isfile(path):
        raise CurveError(f"CurveZMQ key file {path!r} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise CurveError(f"{path}: not a ZeroMQ certificate file: {e}") from None
    if not secret:
        raise CurveError(f"{path} holds only a public key; give the NAME.key_secret file")
    return public, secret


def load_public_key(path: str) -> bytes:
    """The public key of a NAME.key (or NAME.key_secret) file."""
    import zmq.auth

    _check_available()
    if not os.path.isfile(path):
        raise CurveError(f"CurveZMQ key file {path!r} does not exist")
    try:
        return zmq.auth.load_certificate(path)[0]
    except (ValueError, OSError) as e:
        raise CurveError(f"{path}: not a ZeroMQ certificate file: {e}") from None


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write DIRECTORY/NAME.key (public: give it to the other side) and NAME.key_secret (keep it private);
    returns both paths."""
    import zmq.auth

    _check_available()
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def secure_server(sock: zmq.Socket, ctx: zmq.Context, secret_key_file: str, authorized_dir: str):
    """Make `sock` (not yet bound) a CURVE server that admits the keys in `authorized_dir` (or any key with
    ALLOW_ANY); returns the started authenticator (stop it after closing the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = load_keypair(secret_key_file)
    if not authorized_dir:
        raise CurveError("serve.curve_authorized_dir must name a directory of the clients' public keys "
                         f"(NAME.key files), or be {ALLOW_ANY!r} to accept any client key")
    if authorized_dir != ALLOW_ANY:
        if not os.path.isdir(authorized_dir):
            raise CurveError(f"serve.curve_authorized_dir {authorized_dir!r} is not a directory")
        if not glob.glob(os.path.join(authorized_dir, "*.key")):
            raise CurveError(f"serve.curve_authorized_dir {authorized_dir!r} holds no client public key "
                             "(NAME.key); no client could connect")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY if authorized_dir == ALLOW_ANY
                         else authorized_dir)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, server_key_file: str, secret_key_file: str | None = None) -> None:
    """Make `sock` (not yet connected) a CURVE client of the server whose public key is in `server_key_file`,
    with this client's key pair from `secret_key_file` (a fresh one without: enough for a server that
    accepts any key)."""
    server_public = load_public_key(server_key_file)
    public, secret = load_keypair(secret_key_file) if secret_key_file else zmq.curve_keypair()
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
