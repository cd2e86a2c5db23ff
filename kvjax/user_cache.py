"""Where kvjax keeps downloaded checkpoints and extracted corpora, and how it writes there.

The cache directory is `$KVJAX_CACHE_DIR` if set, else `$XDG_CACHE_HOME/kvjax`, else
`~/.cache/kvjax`. Every file under it is written to a temporary name in the same directory and
moved into place with `os.replace`, so a reader never sees a half-written file, whatever
interrupts the writer.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import time


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
  """The kvjax cache directory (created if missing).

  Args:
    override: a directory to use instead of the environment's choice (tests, custom layouts).
  """
  if override is not None:
    path = pathlib.Path(override)
  elif os.environ.get("KVJAX_CACHE_DIR"):
    path = pathlib.Path(os.environ["KVJAX_CACHE_DIR"])
  elif os.environ.get("XDG_CACHE_HOME"):
    path = pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "kvjax"
  else:
    path = pathlib.Path.home() / ".cache" / "kvjax"
  path = path.expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` through a temporary file in the same directory and `os.replace`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes files private; cached data is meant to be shared
    os.replace(tmp, path)
  except BaseException:
    # KeyboardInterrupt included: nothing half-written stays behind.
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """`atomic_write_bytes` for UTF-8 text."""
  return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike):
  """Holds an exclusive advisory lock on `lock_path` (created if missing) for the block, so two
  processes do not download or extract the same thing at once. Where `fcntl` does not exist
  (Windows) nothing is locked; atomic renames still leave one complete result."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  lock_path = pathlib.Path(lock_path)
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def sigterm_as_interrupt():
  """Within the block, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the writer's
  cleanup runs and leaves no temporary behind. Only where the process has SIGTERM's default
  action (which would kill it mid-write) and on the main thread; a program's own handler is
  left alone. The previous action is restored after the block."""
  import signal
  import threading
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  try:
    previous = signal.getsignal(signal.SIGTERM)
  except (AttributeError, ValueError):  # no SIGTERM on this platform
    yield
    return
  if previous is not signal.SIG_DFL:
    yield
    return

  def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def sweep_stale(directory: str | os.PathLike, prefix: str, *,
                older_than_s: float = 0.0) -> list[pathlib.Path]:
  """Removes the temporaries `directory/<prefix>*` that a killed writer left behind (a SIGKILL,
  or SIGTERM in a program that does not turn it into an exception); returns what it removed.

  Call it holding the lock that writers of those temporaries hold (then every match is stale),
  or with `older_than_s` to spare temporaries a live writer may still be filling.
  """
  directory = pathlib.Path(directory)
  removed = []
  if not directory.is_dir():
    return removed
  now = time.time()
  for p in directory.glob(prefix + "*"):
    try:
      if now - p.stat().st_mtime < older_than_s:
        continue
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
      else:
        p.unlink()
      removed.append(p)
    except FileNotFoundError:
      pass
  return removed
