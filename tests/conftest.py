import os

# Tests run on the CPU with one device unless a test module says otherwise; the
# Federation-of-Experts tests start their own 8-device subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
