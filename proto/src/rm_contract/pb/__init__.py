"""Protobuf and gRPC stubs generated from proto/reward/v1/reward.proto by `make proto`: do not edit."""
