"""Shared fixtures. Servers that tests need are started here on 127.0.0.1 and stopped by PID."""

import os

# Ray must bind loopback only (see REFERENCE.md); set before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
