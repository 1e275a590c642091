"""Storage by URI: one way to name where bytes live, whatever the back-end.

Schemes:
- local paths (``/data/pyr``, ``relative/dir``) and ``file:///data/pyr``: plain files;
- ``s3://bucket/prefix``: obstore's ``S3Store`` (through ``zarr.storage.ObjectStore`` for
  zarr). Credentials, region and endpoint come from the standard ``AWS_*`` environment
  variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` or
  ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``); an ``http://`` endpoint enables plain HTTP;
- ``memory://name/prefix``: a process-wide registry of in-memory stores by ``name`` (tests).

Back-ends are imported on demand so that importing this module stays cheap.
Keys inside a store are always ``/``-separated relative paths.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zarr.abc.store import Store

SCHEMES = ("file", "s3", "memory")


@dataclass(frozen=True, slots=True)
class ParsedUri:
    """A storage URI split into its parts.

    Attributes:
        scheme: ``"file"``, ``"s3"`` or ``"memory"``.
        root: the store root: an absolute directory for files, the bucket for s3, the
            registry name for memory.
        path: ``/``-separated key prefix below ``root`` (no leading or trailing ``/``); for
            files it is always ``""`` (the directory itself is the root).
    """

    scheme: str
    root: str
    path: str

    def root_uri(self) -> str:
        """The URI of the store root (``s3://bucket``, ``memory://name``, or the directory)."""
        return self.root if self.scheme == "file" else f"{self.scheme}://{self.root}"


def parse_uri(uri: str) -> ParsedUri:
    """Split ``uri`` into scheme, root and key prefix; raise ``ValueError`` on unknown schemes."""
    if "://" not in uri:
        return ParsedUri("file", str(Path(uri).expanduser().absolute()), "")
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return ParsedUri("file", str(Path(rest).absolute()), "")
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported storage scheme {scheme!r} in {uri!r}; use one of {SCHEMES}")
    root, _, path = rest.partition("/")
    if not root:
        raise ValueError(f"storage URI {uri!r} names no bucket or store name")
    return ParsedUri(scheme, root, path.strip("/"))


def join_uri(root: str, *parts: str) -> str:
    """Join ``parts`` to a URI or path with ``/`` (no doubled separators)."""
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if not parts:
        return root
    return "/".join((root.rstrip("/"), *parts))


def split_uri(uri: str) -> tuple[str, str]:
    """``(store root URI, key)`` such that a store opened at the root holds ``key``.

    For files the root is the parent directory and the key the file name; for s3 and memory
    the root is the bucket / name and the key the rest of the path.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        p = Path(parsed.root)
        return str(p.parent), p.name
    return parsed.root_uri(), parsed.path


# --------------------------------------------------------------------------- memory registry

_MEMORY: dict[str, dict[str, Any]] = {}
_MEMORY_LOCK = threading.Lock()


def _memory_dict(name: str) -> dict[str, Any]:
    with _MEMORY_LOCK:
        return _MEMORY.setdefault(name, {})


def clear_memory(name: str | None = None) -> None:
    """Forget the in-memory store ``name`` (all of them when None)."""
    with _MEMORY_LOCK:
        if name is None:
            _MEMORY.clear()
        else:
            _MEMORY.pop(name, None)


class _PrefixedDict(MutableMapping):
    """A view of the keys of ``base`` under ``prefix/``, so memory URIs can have paths."""

    def __init__(self, base: dict[str, Any], prefix: str):
        self.base, self.prefix = base, f"{prefix}/" if prefix else ""

    def __getitem__(self, key: str) -> Any:
        return self.base[self.prefix + key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.base[self.prefix + key] = value

    def __delitem__(self, key: str) -> None:
        del self.base[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return iter([k[n:] for k in list(self.base) if k.startswith(self.prefix)])

    def __len__(self) -> int:
        return sum(1 for k in list(self.base) if k.startswith(self.prefix))


# --------------------------------------------------------------------------- s3


# Whole-object S3 calls through obstore (metadata, manifests, ingest's puts and gets; the
# reader's range reads have their own bounds in ``pipeline.read.settings.ReaderSettings``).
# obstore's defaults would hold a stalled request for 30 s; objects here are at most a few MB.
OBJECT_TIMEOUT_S = 20.0  # one request, connection to last byte
OBJECT_CONNECT_TIMEOUT_S = 5.0
OBJECT_MAX_RETRIES = 4  # 5xx, resets and timeouts; backoff 0.1 s doubling to 2 s
OBJECT_RETRY = {"max_retries": OBJECT_MAX_RETRIES,
                "backoff": {"init_backoff": timedelta(seconds=0.1),
                            "max_backoff": timedelta(seconds=2), "base": 2},
                "retry_timeout": timedelta(seconds=OBJECT_TIMEOUT_S * (OBJECT_MAX_RETRIES + 1))}


def s3_options_from_env() -> dict[str, Any]:
    """Keyword arguments for obstore's ``S3Store`` from the standard ``AWS_*`` variables,
    with explicit timeouts and retries (``OBJECT_TIMEOUT_S``, ``OBJECT_RETRY``)."""
    env = os.environ
    opts: dict[str, Any] = {
        "client_options": {"timeout": timedelta(seconds=OBJECT_TIMEOUT_S),
                           "connect_timeout": timedelta(seconds=OBJECT_CONNECT_TIMEOUT_S)},
        "retry_config": OBJECT_RETRY,
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if endpoint:
        opts["endpoint"] = endpoint
    if region:
        opts["region"] = region
    if env.get("AWS_ACCESS_KEY_ID"):
        opts["access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret_access_key"] = env.get("AWS_SECRET_ACCESS_KEY", "")
    if env.get("AWS_SESSION_TOKEN"):
        opts["session_token"] = env["AWS_SESSION_TOKEN"]
    if endpoint and endpoint.startswith("http://"):
        opts["client_options"]["allow_http"] = True
    return opts


def _s3_store(bucket: str, prefix: str) -> Any:
    """An obstore ``S3Store`` for ``bucket``/``prefix`` configured from the environment."""
    return _s3_store_cached(bucket, prefix, tuple(sorted(_env_key().items())))


def _env_key() -> dict[str, str]:
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return {k: os.environ[k] for k in keys if k in os.environ}


@lru_cache(maxsize=64)
def _s3_store_cached(bucket: str, prefix: str, env: tuple) -> Any:
    # cached per bucket, prefix and environment so that helpers reuse one HTTP client
    from obstore.store import S3Store

    return S3Store(bucket, prefix=prefix or None, **s3_options_from_env())


# --------------------------------------------------------------------------- zarr stores


def open_store(uri: str, *, read_only: bool) -> Store:
    """A zarr v3 ``Store`` rooted at ``uri`` (local dir, ``file://``, ``s3://``, ``memory://``).

    Args:
        uri: where the store lives; keys of the returned store are relative to it.
        read_only: open without write permission (writes raise).
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        from zarr.storage import LocalStore

        if not read_only:
            Path(parsed.root).mkdir(parents=True, exist_ok=True)
        return LocalStore(parsed.root, read_only=read_only)
    if parsed.scheme == "memory":
        from zarr.storage import MemoryStore

        mapping = _PrefixedDict(_memory_dict(parsed.root), parsed.path)
        return MemoryStore(store_dict=mapping, read_only=read_only)
    from zarr.storage import ObjectStore

    return ObjectStore(_s3_store(parsed.root, parsed.path), read_only=read_only)


# --------------------------------------------------------------------------- whole objects


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``; ``FileNotFoundError`` (naming the URI) if it is missing."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.root).read_bytes()
    if parsed.scheme == "memory":
        try:
            return _memory_dict(parsed.root)[parsed.path].to_bytes()
        except KeyError:
            raise FileNotFoundError(f"no object at {uri}") from None
    import obstore

    try:
        return obstore.get(_s3_store(parsed.root, ""), parsed.path).bytes().to_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no object at {uri}") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` as the whole object at ``uri`` (creating parent directories locally)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        path = Path(parsed.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half a file
        return
    if parsed.scheme == "memory":
        from zarr.buffer import cpu

        _memory_dict(parsed.root)[parsed.path] = cpu.Buffer.from_bytes(bytes(data))
        return
    import obstore

    obstore.put(_s3_store(parsed.root, ""), parsed.path, bytes(data))


def exists(uri: str) -> bool:
    """Whether an object (or, locally, a file or directory) exists at ``uri``."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return Path(parsed.root).exists()
    if parsed.scheme == "memory":
        return parsed.path in _memory_dict(parsed.root)
    import obstore

    try:
        obstore.head(_s3_store(parsed.root, ""), parsed.path)
        return True
    except FileNotFoundError:
        return False


def list_prefix(uri: str) -> list[str]:
    """Sorted URIs of every object below ``uri`` (recursive); ``[]`` when there is none.

    The prefix is a directory: ``s3://b/a`` lists ``s3://b/a/x`` but not ``s3://b/ab``.
    Local URIs come back as plain absolute paths.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        base = Path(parsed.root)
        if not base.is_dir():
            return []
        return sorted(str(p) for p in base.rglob("*") if p.is_file())
    if parsed.scheme == "memory":
        pre = f"{parsed.path}/" if parsed.path else ""
        keys = [k for k in list(_memory_dict(parsed.root)) if k.startswith(pre)]
        return sorted(f"memory://{parsed.root}/{k}" for k in keys)
    import obstore

    pre = f"{parsed.path}/" if parsed.path else None
    out = []
    for batch in obstore.list(_s3_store(parsed.root, ""), pre, chunk_size=1000):
        out.extend(f"s3://{parsed.root}/{meta['path']}" for meta in batch)
    return sorted(out)


def delete_object(uri: str) -> None:
    """Delete the one object at ``uri``; nothing happens when there is none."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        Path(parsed.root).unlink(missing_ok=True)
        return
    if parsed.scheme == "memory":
        _memory_dict(parsed.root).pop(parsed.path, None)
        return
    import obstore

    obstore.delete(_s3_store(parsed.root, ""), parsed.path)


def delete_prefix(uri: str) -> None:
    """Delete every object below ``uri`` (recursive); nothing happens when there is none."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        import shutil

        if Path(parsed.root).is_dir():
            shutil.rmtree(parsed.root)
        return
    if parsed.scheme == "memory":
        d = _memory_dict(parsed.root)
        pre = f"{parsed.path}/" if parsed.path else ""
        for k in [k for k in list(d) if k.startswith(pre)]:
            d.pop(k, None)
        return
    import obstore

    store = _s3_store(parsed.root, "")
    keys = [u.split("/", 3)[3] for u in list_prefix(uri)]
    for i in range(0, len(keys), 1000):
        obstore.delete(store, keys[i : i + 1000])
