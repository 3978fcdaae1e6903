"""Generated protobuf and gRPC stubs of the ``sensorium.v1`` contract (``make proto``; not committed)."""
