"""`rm_client.pb`, kept for one release, is an alias of `rm_contract.pb` (the very same modules)."""

from __future__ import annotations

import subprocess
import sys

OLD_IMPORTS = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import rm_client.pb.reward_pb2 as old
    from rm_client.pb import reward_pb2_grpc as old_grpc
import rm_contract.pb.reward_pb2 as new
import rm_contract.pb.reward_pb2_grpc as new_grpc
print(old is new, old_grpc is new_grpc, old.Sample is new.Sample)
print([str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)])
"""


def test_old_stub_imports_are_the_contract_modules_with_a_deprecation_warning():
    """A second copy of the generated module would register reward.proto twice and fail at import."""
    result = subprocess.run([sys.executable, "-c", OLD_IMPORTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    same, warnings = result.stdout.splitlines()
    assert same == "True True True"
    assert "rm_client.pb is deprecated: import rm_contract.pb" in warnings
