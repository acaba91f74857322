"""The one path layer: every file the project reads or writes goes through `path()`.

`path(p)` gives an `etils.epath.Path` for a local path or an object-store URL (`gs://bucket/dir`,
through gcsfs). Local paths are made absolute (Orbax and tensorstore need absolute paths) with `~`
expanded; URLs are kept as they are.

Object stores have no append and upload a file only when it is closed, so writers here replace
whole objects (`write_bytes`, `write_text`) and never rely on `open('a')` or `flush()`.
"""

from __future__ import annotations

import os

import fsspec
from etils import epath

# gcsfs caches folder listings forever by default, but others write into our folders behind its
# back: tensorstore (checkpoint arrays), the other hosts of a pod, a resumed process. A cached
# listing would hide their new checkpoints and metric parts, so gs:// listings always ask GCS.
# (Read by fsspec when epath first creates its gcsfs filesystem, i.e. after this import.)
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


def is_url(p) -> bool:
  return '://' in os.fspath(p)


def path(p) -> epath.Path:
  """An epath.Path for a local path (absolute, `~` expanded) or a URL such as gs://bucket/dir."""
  p = os.fspath(p)
  return epath.Path(p if is_url(p) else os.path.abspath(os.path.expanduser(p)))


def read_bytes(p) -> bytes:
  """A whole file; from an object store in one request.

  gcsfs's buffered reader (what `epath.Path.read_bytes` uses) fetches ranges from background
  read-ahead tasks and hung under Grain's prefetch threads; `cat_file` is one plain GET.
  """
  p = path(p)
  if is_url(p):
    return fsspec.filesystem(fsspec.utils.get_protocol(os.fspath(p))).cat_file(os.fspath(p))
  return p.read_bytes()


def read_text(p) -> str:
  return read_bytes(p).decode()


def write_bytes(p, data: bytes) -> epath.Path:
  """Writes a whole file, creating its parent folders (object stores have none to create)."""
  p = path(p)
  if not is_url(p):
    p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)
  return p


def write_text(p, text: str) -> epath.Path:
  return write_bytes(p, text.encode())
