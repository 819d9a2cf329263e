"""One run per root: a run holds its root while it writes (a locked file locally, a lease object on S3).

Locally ``<root>/.lock`` is held with ``flock``; the kernel releases it when the process dies, however it dies.
S3 has no locks: ``<root>/_lease.json`` (owner, host, pid, started, heartbeat, ttl) is created with a conditional
PUT (If-None-Match), refreshed by a heartbeat thread with If-Match on its own ETag, and taken over (If-Match on the
stale ETag) once its heartbeat is older than its ttl: its holder died. Reading a finished root needs no lease.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from dwf_ray import store

# Seconds after its last heartbeat that an S3 lease is taken to be dead; its holder beats every ttl / 4.
# DWF_LEASE_TTL_S sets it (tests use a few seconds); it is recorded in the lease, so readers use the holder's.
LEASE_TTL_S = float(os.environ.get("DWF_LEASE_TTL_S", "60"))


class RootHeld(store.StoreError):
    """Another live run holds this run root."""


def _holder_text(root: str, info: dict) -> str:
    beat = f", last heartbeat {time.time() - info['heartbeat']:.0f} s ago" if "heartbeat" in info else ""
    return (f"{root} is held by another run (host {info.get('host', '?')}, pid {info.get('pid', '?')}, since "
            f"{info.get('started', '?')}{beat}); wait for it to finish or use another --root")


class Lease:
    """The right to write one run root; ``acquire`` raises RootHeld naming the holder."""

    def __init__(self, root: str):
        self.root = root
        self.info = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ttl": LEASE_TTL_S}

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise RootHeld if another run took this lease over (an S3 holder that stalled past its ttl)."""
        if getattr(self, "lost", False):
            raise RootHeld(f"{self.root}: another run took over this run's lease (no heartbeat for its ttl); "
                           "this run's last stage is not marked complete")


class LocalLease(Lease):
    def __init__(self, root: str):
        super().__init__(root)
        self.path, self._file = os.path.join(root, ".lock"), None

    def acquire(self) -> None:
        import fcntl
        os.makedirs(self.root, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read()
            f.close()
            raise RootHeld(_holder_text(self.root, json.loads(text) if text.strip() else {})) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self.info))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()        # closing the file releases the lock (the file stays: it is only a name)
            self._file = None


class S3Lease(Lease):
    def __init__(self, root: str):
        super().__init__(root)
        self.uri = store.join(root, "_lease.json")
        self._etag, self._stop = None, threading.Event()
        self.lost = False             # set when another run took the lease over (this one stalled past its ttl)

    def _put(self, **condition) -> str:
        """Write this run's lease under a condition; the new ETag (an OSError when the condition fails)."""
        fs, path = store._fs(self.uri)
        data = json.dumps(self.info | {"heartbeat": time.time()}).encode()
        out = fs.pipe_file(path, data, **condition)
        fs.invalidate_cache(path)
        return out["ETag"]

    def _read(self) -> tuple[dict, str]:
        fs, path = store._fs(self.uri)
        fs.invalidate_cache(path)
        etag = fs.info(path)["ETag"]
        return json.loads(fs.cat_file(path)), etag

    def _try(self) -> None:
        try:
            self._etag = self._put(mode="create")
            return
        except FileExistsError:
            pass
        try:
            held, etag = self._read()
        except FileNotFoundError:      # released between our two calls: try once more
            self._etag = self._put(mode="create")
            return
        if time.time() - held.get("heartbeat", 0) <= held.get("ttl", LEASE_TTL_S):
            raise RootHeld(_holder_text(self.root, held))
        try:
            self._etag = self._put(IfMatch=etag)     # the stale lease, unless another run took it first
        except OSError as exc:
            if exc.errno != errno.EINVAL and not isinstance(exc, FileNotFoundError):
                raise                     # not a failed condition: the endpoint's own error
            raise RootHeld(_holder_text(self.root, self._read()[0])) from None

    def acquire(self) -> None:
        try:
            self._try()
        except Exception as exc:     # a missing bucket, access denied...: the store's one-line errors
            explained = store.explain(self.uri, exc)
            if explained is exc:
                raise
            raise explained from exc
        self._stop, self.lost = threading.Event(), False    # one heartbeat thread per hold
        threading.Thread(target=self._beat, name="dwf-lease-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        stop = self._stop
        while not stop.wait(self.info["ttl"] / 4):
            try:
                self._etag = self._put(IfMatch=self._etag)
            except (FileNotFoundError, FileExistsError):
                self.lost = True          # removed or taken over: the If-Match failed
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:   # s3fs's PreconditionFailed: another run took it over
                    self.lost = True
                    return                # otherwise the endpoint did not answer this time: beat again later

    def release(self) -> None:
        self._stop.set()
        if self._etag is None or self.lost:
            return
        try:
            held, _ = self._read()
            if held.get("owner") == self.info["owner"]:
                store.remove(self.uri)
        except FileNotFoundError:
            pass
        self._etag = None


def lease_for(root: str) -> Lease:
    """The lease of a (normalised) run root: a lock file on local disk, a lease object on S3."""
    return LocalLease(root) if store.is_local(root) else S3Lease(root)
