"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, KServe v2 / Triton) and
the standard gRPC health service, on their own port (SERVING_GRPC_PORT), in the same process and
event loop as the HTTP server and on the same data plane, so both protocols serve one model.

`inference.proto` and `health.proto` are the wire contract; the `*_pb2*` modules next to them are
generated from them by `make grpc-stubs` and checked in (tests/serving/test_grpc.py regenerates them
and compares). `tensors` converts protobuf tensors with `serving.codec`; `server` holds the services.
"""
