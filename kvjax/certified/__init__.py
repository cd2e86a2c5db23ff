"""Runtime-certified attention (docs/certified.md).

A `CertifiedKVCache` keeps a compressed tier on the device and the bfloat16 originals in host
memory; every attention row it returns is either within `CertifiedConfig.tol` of exact
attention, with a rigorous certificate that covers the float32 arithmetic too, or is exact.
The ladder that guarantees this (promote blocks, then exact rows) runs inside the jitted step.
"""

from kvjax.certified.attention import (Certificate, append_and_attend, attend, exact_attention,
                                       stats_summary)
from kvjax.certified.bound import certificate
from kvjax.certified.cache import CertifiedKVCache, device_nbytes, init_cache, stacked, write
from kvjax.certified.config import CertifiedConfig

__all__ = ["Certificate", "CertifiedConfig", "CertifiedKVCache", "append_and_attend", "attend",
           "certificate", "device_nbytes", "exact_attention", "init_cache", "stacked", "stats_summary", "write"]
