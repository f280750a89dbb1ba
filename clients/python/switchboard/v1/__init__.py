"""Generated protobuf and gRPC modules of the ``switchboard.v1`` API (``make proto``)."""
