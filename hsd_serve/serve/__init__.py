"""Serving: protobuf conversions (``convert``), the gRPC data plane between the coordinator and
the model replicas (``dataplane``), and the Ray Serve application.  Protobuf types stay in here."""
