"""Helpers shared by the tests: tiny models, raw gRPC calls, training references, waiting."""
