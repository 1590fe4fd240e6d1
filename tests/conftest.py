"""Suite-wide test setup.

tests/sharding needs 8 devices; on CPU that means XLA's simulated host devices, which must be requested
before JAX creates its CPU backend, i.e. before any test module runs JAX code. Setting it here, for the
whole suite, keeps `python3 -m pytest tests` working in one process; single-device tests are unaffected
(they use device 0). Real accelerators ignore the flag.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
