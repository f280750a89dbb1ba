"""The gRPC front door: servicers, interceptors, and protobuf <-> domain conversion."""
