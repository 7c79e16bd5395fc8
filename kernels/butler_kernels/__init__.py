"""Budgeted-gather decode for TokenButler: plain-torch reference and Triton kernels.

``butler_kernels.reference`` defines the policy (sinks + window + top-B per KV head) and is what
every fast path is tested against.
"""

from butler_kernels import reference

__all__ = ["reference"]
