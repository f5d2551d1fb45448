"""Server reflection on the client-facing gRPC port (Ray Serve's proxy, :9000 in serve_config.yaml).

What ``grpcurl -plaintext HOST:9000 list`` / ``describe`` / an RPC without ``-proto`` do: list the
services, fetch ``hsd.v1.Generation``'s file descriptor, then build the request from the reflected
descriptors alone (no generated stubs) and call it.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from hsd_serve.pb import hsd_pb2

META = (("application", "hsd"),)


def test_reflection_lists_the_client_services(service):
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (reply,) = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    names = {s.name for s in reply.list_services_response.service}
    assert {"hsd.v1.Generation", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names, names
    assert not any(n.startswith("ray.serve.") for n in names), names  # Serve's own API stays out


def test_reflected_descriptors_describe_and_call_generation(service):
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        svc = pool.FindServiceByName("hsd.v1.Generation")
        assert svc.file.name == hsd_pb2.DESCRIPTOR.name == "hsd_serve/pb/hsd.proto"
        assert set(svc.methods_by_name) == {"Generate", "GenerateStream"}
        assert svc.methods_by_name["GenerateStream"].server_streaming
        gen = svc.methods_by_name["Generate"]
        # the reflected request type is the stubs' own, field for field
        want = hsd_pb2.GenerateRequest.DESCRIPTOR
        assert [(f.name, f.number, f.type) for f in gen.input_type.fields] == \
            [(f.name, f.number, f.type) for f in want.fields]

        # an RPC built from reflection alone, as grpcurl makes it
        request_cls = message_factory.GetMessageClass(gen.input_type)
        response_cls = message_factory.GetMessageClass(gen.output_type)
        call = ch.unary_unary(f"/{svc.full_name}/{gen.name}",
                              request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
        reply = call(request_cls(prompt="def fib(n):", max_tokens=3), metadata=META, timeout=120)
    assert reply.finish_reason in (hsd_pb2.FINISH_REASON_STOP, hsd_pb2.FINISH_REASON_LENGTH)
    assert 0 < len(reply.token_ids) <= 3


def test_v1_reflection_answers_unimplemented_so_grpcurl_falls_back(service):
    """grpcurl asks ``grpc.reflection.v1`` first and falls back to ``v1alpha`` only on
    UNIMPLEMENTED (grpcio-reflection serves v1alpha)."""
    with grpc.insecure_channel(f"127.0.0.1:{service['grpc']}") as ch:
        call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest
                                .SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse
                                .FromString)
        try:
            replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
        else:  # a server that speaks v1 as well: it must list the same services
            names = {s.name for s in replies[0].list_services_response.service}
            assert "hsd.v1.Generation" in names, names
