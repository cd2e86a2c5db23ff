"""Where kvjax keeps downloaded checkpoints and extracted corpora, and how it writes there.

The cache directory is `$KVJAX_CACHE_DIR` if set, else `$XDG_CACHE_HOME/kvjax`, else
`~/.cache/kvjax`. Every file under it is written to a temporary name in the same directory and
moved into place with `os.replace`, so a reader never sees a half-written file, whatever
interrupts the writer.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


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
