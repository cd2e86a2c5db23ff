import os
import pathlib

# Tests run on the CPU with one device unless a test module says otherwise; the
# Federation-of-Experts tests start their own 8-device subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test run, shared by the pytest-xdist workers
# and every subprocess and notebook kernel they start (they inherit the environment): many tests
# build their own jitted steps over the same small models, and a program compiled once is then
# loaded, not compiled again. Entries are keyed by the program, jax/XLA versions and devices, so
# the cache never changes a result; `KVJAX_TEST_COMPILE_CACHE=0` turns it off.
if os.environ.get("KVJAX_TEST_COMPILE_CACHE", "1") != "0":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                        str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
