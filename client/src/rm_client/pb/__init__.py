"""Deprecated alias of `rm_contract.pb` (the stubs live in the rewardserve-contract package); it goes away
in the next release. The modules are the very same objects: a second copy of the generated module would
register reward.proto twice and fail at import.
"""

import sys
import warnings

from rm_contract.pb import reward_pb2, reward_pb2_grpc

warnings.warn(
    "rm_client.pb is deprecated: import rm_contract.pb (package rewardserve-contract) instead",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[f"{__name__}.reward_pb2"] = reward_pb2
sys.modules[f"{__name__}.reward_pb2_grpc"] = reward_pb2_grpc

__all__ = ["reward_pb2", "reward_pb2_grpc"]
