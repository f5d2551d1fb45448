"""Generated gRPC stubs for ``protos/hsd_serve/pb/hsd.proto`` (git-ignored, never edited by hand).

``make setup`` generates them (``python -m hsd_serve.pb``); importing this package also generates
them when they are missing and ``grpcio-tools`` is installed, so every node that has the package
can import ``hsd_serve.pb.hsd_pb2_grpc`` (Ray Serve's gRPC proxy imports it by name).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTO_ROOT = _HERE.parents[1] / "protos"
_PROTO = _PROTO_ROOT / "hsd_serve" / "pb" / "hsd.proto"


def generate(force: bool = False) -> None:
    """Run protoc on hsd.proto into this package (no-op when stubs are newer than the proto)."""
    out = _HERE / "hsd_pb2.py"
    if not force and out.exists() and (_HERE / "hsd_pb2_grpc.py").exists() and \
            (not _PROTO.exists() or out.stat().st_mtime >= _PROTO.stat().st_mtime):
        return
    if not _PROTO.exists():
        raise ImportError(f"generated stubs missing and {_PROTO} not found")
    from grpc_tools import protoc

    rc = protoc.main(["grpc_tools.protoc", f"-I{_PROTO_ROOT}", f"--python_out={_PROTO_ROOT.parent}",
                      f"--grpc_python_out={_PROTO_ROOT.parent}", f"--pyi_out={_PROTO_ROOT.parent}",
                      str(_PROTO)])
    if rc != 0:
        raise ImportError(f"protoc failed on {_PROTO} (exit {rc})")


generate()
