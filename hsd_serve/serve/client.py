"""`hsd-serve client`: a gRPC client for ``hsd.v1.Generation`` that streams to the terminal."""

from __future__ import annotations

import json
import sys

import grpc

from hsd_serve.pb import hsd_pb2, hsd_pb2_grpc


def build_request(args, prompt: str) -> hsd_pb2.GenerateRequest:
    """``args.method``: a method name (ar | sd | slem | tli | slrs | auto; "": the server's
    default), sent as the wire's ``Method`` enum; another name raises ValueError.  ``args.seed``
    None (or absent): no seed is sent, so a sampled request gets a fresh random one from the
    server (printed in the stats line)."""
    from hsd_serve.serve.convert import method_to_proto

    sampling = hsd_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p)
    seed = getattr(args, "seed", None)
    if seed is not None:
        sampling.seed = seed
    return hsd_pb2.GenerateRequest(
        prompt=prompt, max_tokens=args.max_tokens, method=method_to_proto(args.method),
        lookahead=args.lookahead, stop=list(args.stop), sampling=sampling,
        trace=bool(getattr(args, "trace", False)))


def stats_line(stats) -> str:
    return (f"[{stats.method}] {stats.completion_tokens} tokens in {stats.wall_s:.2f}s "
            f"({stats.tokens_per_s:.1f} tok/s), acceptance {stats.acceptance_rate:.2f}, "
            f"{stats.tokens_per_round:.2f} tokens/round, ttft {stats.ttft_s * 1000:.0f} ms, "
            f"seed {stats.seed}")


def _as_dict(msg) -> dict:
    """``msg`` as JSON-ready data (proto field names), ``finish_reason`` as "stop" / "length"
    (the wire's enum, converted back; absent while unspecified, as MessageToDict leaves it)."""
    from google.protobuf.json_format import MessageToDict

    from hsd_serve.serve.convert import finish_reason_from_proto

    out = MessageToDict(msg, preserving_proto_field_name=True)
    if "finish_reason" in out:  # in place: the keys keep their order
        out["finish_reason"] = finish_reason_from_proto(msg.finish_reason)
    return out


def run_client(args, prompt: str) -> int:
    from hsd_serve.serve.convert import finish_reason_from_proto

    from hsd_serve.serve.security import auth_metadata, client_key

    metadata = (("application", args.application),) + auth_metadata(
        client_key(getattr(args, "api_key", None)))
    with grpc.insecure_channel(args.address) as channel:
        stub = hsd_pb2_grpc.GenerationStub(channel)
        req = build_request(args, prompt)
        try:
            if args.no_stream:
                resp = stub.Generate(req, metadata=metadata, timeout=args.timeout)
                if args.json:
                    print(json.dumps(_as_dict(resp)))
                else:
                    print(resp.text)
                    print(stats_line(resp.stats), file=sys.stderr)
                return 0
            last = None
            text = []
            for chunk in stub.GenerateStream(req, metadata=metadata, timeout=args.timeout):
                text.append(chunk.text)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                last = chunk
            if args.json:
                out = _as_dict(last) if last else {}
                out["text"] = "".join(text)
                print(json.dumps(out))
            else:
                print()
                if last is not None:
                    print(stats_line(last.stats) +
                          f", finish={finish_reason_from_proto(last.finish_reason)}",
                          file=sys.stderr)
            return 0
        except grpc.RpcError as exc:
            print(f"hsd-serve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
