"""A layer blob fetched whole, once: one streamed GET into an unlinked file, readable while it arrives.

Indexing a tar layer reads all of it in order; this lets the index pass
run while the blob downloads (its reads wait for the bytes they need) and
takes the blob's sha256 on the way, so no byte is fetched twice. The file
lives in the cache directory with no name (O_TMPFILE, or unlinked at once
where the filesystem lacks it): nothing of the blob is left when it is
closed, whatever happens. Its size is bounded by
the manifest's descriptor and by the filesystem's free space.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from typing import Any

from erofs_mount_core import Source, SourceChangedError, SourceError, cache_directory, cache_room

from . import _http
from .routing import distrust_served

log = logging.getLogger("erofs_mount.oci")
DOWNLOAD_DIR = "oci-download"
ATTEMPTS = 4  # a broken transfer resumes from where it stopped (Range), this many times in all


class DownloadStopped(SourceError):
    """The download was given up because another layer failed: that failure is the one to report."""


class Download(Source):
    def __init__(self, client: Any, url: str, digest: str, size: int, what: str, *,
                 slots: threading.Semaphore | None = None, rate: int = 0) -> None:
        """``rate``: at most this many bytes a second (0: as fast as they come), for a pass beside serving."""
        if not digest.startswith("sha256:"):
            raise SourceError(f"{what}: only sha256 blobs can be indexed, not {digest.split(':')[0]}")
        directory = cache_directory(DOWNLOAD_DIR)
        if size > cache_room(directory):
            raise SourceError(f"{what}: its {size >> 20} MiB would leave the cache's filesystem ({directory}) "
                              "with less than its reserve free (1 GiB, or a twentieth of a small filesystem)")
        self.client, self.url, self.digest, self.what = client, url, digest, what
        self._size = size
        try:  # no name (O_TMPFILE where the filesystem has it, else unlinked at once)
            self._file = tempfile.TemporaryFile(dir=directory, prefix=".download-")
        except OSError as exc:
            raise SourceError(f"{what}: cannot keep the download in {directory}: {exc.strerror}") from None
        self._fd = self._file.fileno()
        self._have = 0
        self._done = False
        self._error: BaseException | None = None
        self._stop = False
        self._hex = ""
        self._cond = threading.Condition()
        self._slots = slots  # transfers that may run at once: this one waits for a slot
        self._rate, self._paused = rate, threading.Event()  # set by stop(): a paced transfer wakes at once
        self._thread = threading.Thread(target=self._run, name=f"download {digest[7:19]}", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self._size

    def describe(self) -> str:
        return self.what

    # -- the transfer (its own thread) ---------------------------------------------------------

    def _run(self) -> None:
        whole = hashlib.sha256()
        if self._slots is not None:
            self._slots.acquire()
        try:
            for attempt in range(ATTEMPTS):
                try:
                    self._transfer(whole)
                    break
                except SourceError as exc:
                    if not exc.transient or attempt == ATTEMPTS - 1 or self._stop:
                        raise
                    log.warning("%s; resuming at byte %d", exc, self._have)  # its message names the layer
            got = "sha256:" + whole.hexdigest()
            if got != self.digest:
                message = (f"{self.what}: the registry served bytes whose digest is {got[:19]}…, "
                           f"not the layer's {self.digest[:19]}…")
                distrust_served(message)  # a mirror's, if a mirror served them: the next pass goes elsewhere
                raise SourceChangedError(message)
            self._hex = whole.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - handed to the readers and to sha256()
            self._error = exc
        finally:
            if self._slots is not None:
                self._slots.release()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _transfer(self, whole: Any) -> None:
        started, first = time.monotonic(), self._have
        if self._stop:
            raise DownloadStopped(f"{self.what}: download stopped")
        headers = {"Accept-Encoding": "identity"}
        if self._have:
            headers["Range"] = f"bytes={self._have}-"
        response = _http.attempt(self.client, "GET", self.url, what=self.what, headers=headers, stream=True,
                                 body_limit=self._size)
        try:
            if response.status_code not in ((206,) if self._have else (200,)):
                raise _http.status_error(response, self.what)
            for chunk in response.iter_bytes(1 << 20):
                if self._stop:
                    raise DownloadStopped(f"{self.what}: download stopped")
                if self._have + len(chunk) > self._size:
                    raise SourceError(f"{self.what}: the registry sent more than the layer's {self._size} bytes")
                try:
                    os.pwrite(self._fd, chunk, self._have)
                except OSError as exc:
                    raise SourceError(f"{self.what}: cannot keep the download: {exc.strerror}") from None
                whole.update(chunk)
                with self._cond:
                    self._have += len(chunk)
                    self._cond.notify_all()
                if self._rate:  # no faster than the rate, on average since this transfer began
                    self._paused.wait(max(0.0, (self._have - first) / self._rate - (time.monotonic() - started)))
        except _http.HTTPError as exc:
            message = f"{self.what}: {type(exc).__name__}: {exc}"
            distrust_served(message, lied=False)  # a mirror that breaks off: the rest is asked of the next host
            raise SourceError(message, transient=True) from None
        finally:
            response.close()
        if self._have != self._size:
            raise SourceError(f"{self.what}: the registry sent {self._have} of its {self._size} bytes",
                              transient=True)

    # -- the reader's side ---------------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        end = min(offset + length, self._size)
        with self._cond:
            while self._have < end and not self._done:
                self._cond.wait()
            if self._have < end or self._error is not None:  # bytes known bad are not read on
                raise self._failure()
        return os.pread(self._fd, end - offset, offset)

    def _failure(self) -> BaseException:
        return self._error or SourceError(f"{self.what}: the download ended early")

    def sha256(self) -> str:
        """The blob's sha256 once all of it has arrived and matched its digest; its error otherwise."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hex

    def failed(self) -> BaseException | None:
        """Why the download failed, if it has (the better reason when an index pass fails too)."""
        with self._cond:
            return self._error if self._done else None

    def stop(self) -> None:
        """Give up (another layer failed): readers then get this download's failure."""
        self._stop = True
        self._paused.set()

    def close(self) -> None:
        self.stop()
        self._thread.join()
        self._file.close()
