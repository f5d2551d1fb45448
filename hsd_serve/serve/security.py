"""Who may call the service (docs/security.md).

Client API keys.  ``ApiKeys`` holds the keys the coordinator accepts at both front doors:
``Authorization: Bearer <key>`` on HTTP and ``authorization`` metadata on gRPC.  Keys come from an
environment variable (comma- or whitespace-separated) and/or a file (one per line, ``#``
comments), re-read when the file changes, so keys rotate without a restart.  A presented key is
hashed and compared with every key's hash in constant time (``hmac.compare_digest``, no early
exit), so neither its content nor its length leaks through timing.  Keys are never logged, nor
shown by ``repr``.  Once keys are on they stay on: a keys file that later vanishes or empties
refuses everyone rather than opening the door.

Data plane.  ``DataPlaneSecurity`` is the cluster's shared token (plus optional TLS/mTLS) for the
gRPC servers in drafter and target replicas.  Servers get ``server_interceptors`` (every call but
the standard health check needs ``authorization: Bearer <token>``, else ``UNAUTHENTICATED``) and
``add_port`` (TLS when configured); callers get ``channel`` (the token on every call, TLS when
configured).  The token is made where the application is built (``resolve_dataplane_token``) and
handed to the replicas as a deployment argument, never inside a request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

import grpc

log = logging.getLogger("hsd_serve.security")

AUTH_METADATA = "authorization"  # gRPC metadata keys are lower case
DATAPLANE_ENV = "HSD_DATAPLANE_SECURITY"  # how a vLLM target hands it to its engine's processes
OPEN_DATAPLANE_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what a header carries
_SPLIT = re.compile(r"[\s,]+")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


CLIENT_KEY_ENV = "HSD_API_KEY"  # where our clients (hsd-serve client, bench) find their key


def client_key(key: Optional[str] = None, environ: Mapping[str, str] = os.environ
               ) -> Optional[str]:
    """The key a client sends: ``key`` when given, else ``$HSD_API_KEY`` (None: none)."""
    key = key if key is not None else environ.get(CLIENT_KEY_ENV)
    return key.strip() if key and key.strip() else None


def auth_header(key: Optional[str]) -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}`` (empty without a key); lower-cased, it is the gRPC
    metadata pair too."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def auth_metadata(key: Optional[str]) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA, f"Bearer {key}"),) if key else ()


class Unauthenticated(Exception):
    """A call without a valid key (HTTP 401, gRPC ``UNAUTHENTICATED``)."""


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def bearer_credential(value: Optional[str]) -> Optional[str]:
    """The credential of an ``Authorization`` value ``Bearer <credential>`` (the scheme in any
    case, surrounding spaces ignored); ``None`` for anything else."""
    if not value:
        return None
    scheme, _, cred = value.strip().partition(" ")
    cred = cred.strip()
    if scheme.lower() != "bearer" or not cred:
        return None
    return cred


def parse_keys(text: str, source: str) -> list[str]:
    """Keys in ``text``: separated by commas, spaces or new lines; lines starting with ``#`` are
    comments.  A key with other than printable ASCII is an error naming ``source`` (not the key)."""
    keys: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for i, key in enumerate(k for k in _SPLIT.split(line) if k):
            if not _KEY_CHARS.match(key):
                raise ValueError(f"{source}: a key holds characters other than printable ASCII "
                                 f"(key #{len(keys) + i + 1}; keys go in HTTP headers)")
            keys.append(key)
    return keys


class ApiKeys:
    """The client keys a coordinator accepts (see the module docstring)."""

    def __init__(self, keys: Iterable[str] = (), *, file: Optional[str] = None,
                 reload_s: float = 1.0):
        self._static = [_digest(k) for k in keys]
        self.file = file
        self.reload_s = reload_s
        self._file_digests: list[bytes] = []
        self._file_stamp: Optional[tuple] = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if file is not None:
            self._file_digests = self._read_file(first=True)
        self.enabled = bool(self._static or file is not None)

    @classmethod
    def from_config(cls, security, environ: Mapping[str, str] = os.environ) -> "ApiKeys":
        """Keys from ``security.api_keys_env`` (when set in ``environ``) and
        ``security.api_keys_file``; raises ``ValueError`` for a file that is missing or empty."""
        keys: list[str] = []
        if security.api_keys_env and environ.get(security.api_keys_env, "").strip():
            keys = parse_keys(environ[security.api_keys_env], f"${security.api_keys_env}")
        return cls(keys, file=security.api_keys_file)

    def _read_file(self, first: bool = False) -> list[bytes]:
        path = Path(self.file)
        try:
            st = path.stat()
            keys = parse_keys(path.read_text(encoding="utf-8"), f"api_keys_file {self.file}")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if first:
                raise ValueError(f"security.api_keys_file: cannot read {self.file}: "
                                 f"{type(exc).__name__}") from None
            if self._file_stamp is not None or self._file_digests:  # once, not every second
                log.error("api_keys_file %s cannot be read (%s): refusing every key until it "
                          "can", self.file, type(exc).__name__)
            self._file_stamp = None
            return []
        if first and not keys:
            raise ValueError(f"security.api_keys_file: {self.file} holds no key")
        if not first:
            log.warning("api_keys_file %s changed: %d key(s) now", self.file, len(keys))
        self._file_stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return [_digest(k) for k in keys]

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.file is None or now - self._checked < self.reload_s:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.file)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamp = None
            if stamp != self._file_stamp or stamp is None:
                self._file_digests = self._read_file()

    def __len__(self) -> int:
        return len(self._static) + len(self._file_digests)

    def verify(self, key: Optional[str]) -> bool:
        """Whether ``key`` is one of the keys; ``True`` for anything when keys are off."""
        if not self.enabled:
            return True
        self._refresh()
        if not key:
            return False
        presented = _digest(key)
        ok = False
        for known in self._static + self._file_digests:
            ok |= hmac.compare_digest(presented, known)  # no early exit
        return ok

    def verify_authorization(self, value: Optional[str]) -> bool:
        """Whether an ``Authorization`` value carries a valid key as ``Bearer <key>``."""
        return self.verify(bearer_credential(value)) if self.enabled else True

    def check_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        """Raise ``Unauthenticated`` unless gRPC ``metadata`` carries a valid key."""
        if not self.enabled:
            return
        value = next((v for k, v in metadata or () if k.lower() == AUTH_METADATA), None)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not self.verify_authorization(value):
            raise Unauthenticated(MISSING_KEY)

    def __repr__(self) -> str:
        return f"ApiKeys(enabled={self.enabled}, keys={len(self)}, file={self.file!r})"


MISSING_KEY = ("missing or invalid API key: send 'Authorization: Bearer <key>' (gRPC: "
               "'authorization' metadata)")


# ============================================================================== data plane
@dataclass(frozen=True)
class DataPlaneSecurity:
    """The data plane's shared token and TLS settings (``SecurityConfig.dataplane_tls`` as a
    plain dict, or ``None``).  Picklable: it travels to the replicas as a deployment argument."""

    token: str = field(repr=False)
    tls: Optional[dict] = None

    def __post_init__(self) -> None:
        if not self.token or not _KEY_CHARS.match(self.token):
            raise ValueError("the data-plane token must be non-empty printable ASCII")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_METADATA, f"Bearer {self.token}"),)

    def __repr__(self) -> str:
        return f"DataPlaneSecurity(token=<{len(self.token)} chars>, tls={self.tls is not None})"

    # ---- servers ------------------------------------------------------------------------------
    def server_interceptors(self) -> list:
        return [_TokenInterceptor(self.token)]

    def add_port(self, server, address: str) -> int:
        """Bind ``server`` to ``address``: TLS (and client certificates) when configured."""
        if not self.tls:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(self.tls))

    # ---- callers ------------------------------------------------------------------------------
    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to a replica that sends the token on every call."""
        interceptors = [_TokenUnary(self.metadata), _TokenStream(self.metadata)]
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        t = self.tls
        mtls = bool(t.get("require_client_cert"))
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(t["ca_file"]) if t.get("ca_file") else None,
            private_key=_read(t["key_file"]) if mtls else None,
            certificate_chain=_read(t["cert_file"]) if mtls else None)
        opts = list(options)
        if t.get("server_name"):
            opts.append(("grpc.ssl_target_name_override", t["server_name"]))
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)

    # ---- handing it to another process (vLLM's engine) ------------------------------------------
    def to_env(self) -> str:
        import json

        return json.dumps({"token": self.token, "tls": self.tls})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["DataPlaneSecurity"]:
        import json

        raw = environ.get(DATAPLANE_ENV)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(d["token"], d.get("tls"))

    @classmethod
    def from_config(cls, token: str, security) -> "DataPlaneSecurity":
        tls = security.dataplane_tls
        return cls(token, tls.model_dump() if tls is not None else None)


def server_credentials(tls: Mapping, what: str = "security.dataplane_tls"):
    """gRPC server credentials from TLS settings (``cert_file``, ``key_file``, ``ca_file``,
    ``require_client_cert``); an unreadable file is a ValueError naming ``what``."""
    return grpc.ssl_server_credentials(
        [(_read(tls["key_file"], what), _read(tls["cert_file"], what))],
        root_certificates=_read(tls["ca_file"], what) if tls.get("ca_file") else None,
        require_client_auth=bool(tls.get("require_client_cert")))


def _read(path: str, what: str = "security.dataplane_tls") -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {type(exc).__name__}") from None


TOKEN_KV_KEY = b"hsd_serve/dataplane_token"


def resolve_dataplane_token(security, environ: Mapping[str, str] = os.environ) -> str:
    """The data plane's token: ``$<dataplane_token_env>`` when set; otherwise one random token
    per Ray cluster, kept in Ray's internal key-value store so that every build of the app (a
    redeploy, a config change) hands the same token to old and new replicas alike; without Ray,
    a fresh random token."""
    given = environ.get(security.dataplane_token_env, "").strip()
    if given:
        return given
    fresh = secrets.token_urlsafe(32)
    try:
        import ray
        from ray.experimental import internal_kv

        if not ray.is_initialized():
            return fresh
        internal_kv._internal_kv_put(TOKEN_KV_KEY, fresh.encode(), overwrite=False,
                                     namespace="hsd_serve")
        stored = internal_kv._internal_kv_get(TOKEN_KV_KEY, namespace="hsd_serve")
        return stored.decode() if stored else fresh
    except Exception:  # noqa: BLE001 - Ray's internal store moved: a token for this build
        log.warning("could not keep the data-plane token in Ray's key-value store; replicas of "
                    "a later build of this app will hold another token")
        return fresh


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse (``UNAUTHENTICATED``) every call but the health check without the token."""

    def __init__(self, token: str):
        self._digest = _digest(token)

    def _allowed(self, details) -> bool:
        if details.method in OPEN_DATAPLANE_METHODS:
            return True
        value = next((v for k, v in details.invocation_metadata or () if k == AUTH_METADATA),
                     None)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        cred = bearer_credential(value)
        return cred is not None and hmac.compare_digest(_digest(cred), self._digest)

    async def intercept_service(self, continuation, details):
        if self._allowed(details):
            return await continuation(details)
        # refused whatever the method, known or not: a stranger learns nothing about the server
        return _deny(await continuation(details))


_DENIED = "the data plane needs the cluster's token (authorization: Bearer <token>)"


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - an async generator for the streaming kinds

    if handler is None:  # a method this server does not have
        return grpc.unary_unary_rpc_method_handler(unary)
    ser, de = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, de, ser)
    return grpc.stream_stream_rpc_method_handler(stream, de, ser)


def _with_token(details, metadata):
    md = grpc.aio.Metadata(*tuple(details.metadata or ()), *metadata)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, md, details.credentials,
                                      details.wait_for_ready)


class _TokenUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata):
        self.md = metadata

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.md), request)


class _TokenStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata):
        self.md = metadata

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.md), request)


def is_loopback(host: Optional[str]) -> bool:
    return (host or "").strip() in LOOPBACK_HOSTS or (host or "").startswith("127.")
