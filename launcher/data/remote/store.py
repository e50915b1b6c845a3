"""Remote shards: how big they are, and fetching them (whole or a byte range) into a local
file, verified, with retries. One small class per kind of URL (S3Store, HttpStore, PipeStore:
listing, small reads, a byte stream); Remote retries, verifies and cancels for all of them:

  s3://bucket/key     boto3; the endpoint is data.s3_endpoint, else boto3's own settings
                      (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_* credentials, ~/.aws files)
  http(s)://host/path urllib with Range requests
  pipe:COMMAND        `sh -c COMMAND`, its standard output is the shard (as WebDataset); no
                      sizes, no ranges: always fetched whole

The retry loop and the verification are written here: boto3's and urllib's retries do not cover
a body cut short mid-stream, and a shard is only ever stored under its real name once it has
every byte it should (size, and SHA-256 where its index records one).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from launcher.errors import LauncherError

CHUNK = 1 << 20
UNKNOWN_SIZE = -1  # pipe: shards, whose size is known only once fetched


@dataclass(frozen=True)
class FetchOptions:
    s3_endpoint: Optional[str] = None
    retries: int = 5  # attempts after the first
    retry_wait: float = 1.0  # seconds before the first retry, doubled each time (at most 30 s)
    timeout: float = 60.0  # seconds a connection or a read may stall before the attempt fails
    cache_limit: Optional[int] = None  # bytes of remote shards one rank may hold locally (None: no limit)
    prefetch_shards: int = 4  # shards fetched ahead of those the loader is reading


class PermanentError(Exception):
    """Retrying cannot help: the object does not exist, or access is denied."""


class ObjectMissing(PermanentError):
    """The store says there is no such object (404). Permanent when a run starts; while a run
    streams a shard that was there, retried (the object may be being replaced)."""


class ChecksumMismatch(IOError):
    """The bytes fetched are not those the shard's index describes (retried: the transfer may have
    damaged them; if it persists, the shard was rewritten after it was indexed)."""


def kind(url: str) -> str:
    if url.startswith("s3://"):
        return "s3"
    if url.startswith(("http://", "https://")):
        return "http"
    if url.startswith("pipe:"):
        return "pipe"
    return "local"


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise LauncherError(f"'{url}' is not an S3 object URL: write s3://BUCKET/KEY.")
    return bucket, key


class S3Store:
    """s3:// objects through boto3, against any S3-compatible endpoint."""

    def __init__(self, options: FetchOptions):
        self.options = options
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise LauncherError("s3:// shards need boto3: pip install 'launcher[s3]' (or boto3).") from None
                config = Config(connect_timeout=min(10.0, self.options.timeout), read_timeout=self.options.timeout,
                                retries={"max_attempts": 1}, max_pool_connections=32)  # Remote retries, with backoff
                self._client = boto3.session.Session().client("s3", endpoint_url=self.options.s3_endpoint,
                                                              config=config)
            return self._client

    def endpoint(self) -> str:
        return self.options.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or \
            os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    def listing(self, urls: list[str], retrying: Callable) -> dict[str, tuple[Optional[int], Optional[str]]]:
        """One listing per folder (1,000 objects a request), not one request per shard."""
        return retrying("list", urls[0], lambda: self._listing(urls))

    def _listing(self, urls: list[str]) -> dict[str, tuple[Optional[int], Optional[str]]]:
        from botocore.exceptions import ClientError

        folders: dict[tuple[str, str], list[str]] = {}
        for url in urls:
            bucket, key = _bucket_key(url)
            folders.setdefault((bucket, key.rsplit("/", 1)[0] + "/" if "/" in key else ""), []).append(url)
        out: dict[str, tuple[Optional[int], Optional[str]]] = {}
        for (bucket, folder), members in folders.items():
            prefix = os.path.commonprefix([_bucket_key(u)[1] for u in members])
            try:
                listed = {}
                for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                    listed.update({o["Key"]: (o["Size"], o.get("ETag")) for o in page.get("Contents", [])})
                out.update({u: listed.get(_bucket_key(u)[1], (None, None)) for u in members})
            except ClientError as err:
                if _s3_code(err) not in ("AccessDenied", "403"):
                    _raise_permanent_s3(err)
                for url in members:  # no permission to list: ask for each object
                    out[url] = self._head(url)
        return out

    def _head(self, url: str) -> tuple[Optional[int], Optional[str]]:
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(url)
        try:
            head = self.client().head_object(Bucket=bucket, Key=key)
            return int(head["ContentLength"]), head.get("ETag")
        except ClientError as err:
            if _s3_code(err) in ("404", "NoSuchKey", "NotFound"):
                return None, None
            _raise_permanent_s3(err)

    def read_small(self, url: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(url)
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            if _s3_code(err) in ("404", "NoSuchKey", "NotFound"):
                return None
            _raise_permanent_s3(err)

    def chunks(self, url: str, start: int, end: Optional[int]):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(url)
        extra = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        try:
            body = self.client().get_object(Bucket=bucket, Key=key, **extra)["Body"]
        except ClientError as err:
            _raise_permanent_s3(err)
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    def upload(self, path: Path, url: str) -> None:
        bucket, key = _bucket_key(url)
        self.client().upload_file(str(path), bucket, key)


class HttpStore:
    """http(s):// objects through urllib, with Range requests (a server that ignores them is read
    from the start and the bytes before the range skipped)."""

    def __init__(self, options: FetchOptions):
        self.options = options

    def listing(self, urls: list[str], retrying: Callable) -> dict[str, tuple[Optional[int], Optional[str]]]:
        """A HEAD request per URL, 16 at a time, each retried on its own."""
        with ThreadPoolExecutor(16) as pool:
            return dict(zip(urls, pool.map(lambda u: retrying("size", u, lambda: self._head(u)), urls)))

    def _head(self, url: str) -> tuple[Optional[int], Optional[str]]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                        timeout=self.options.timeout) as resp:
                length = resp.headers.get("Content-Length")
                return int(length) if length is not None else UNKNOWN_SIZE, resp.headers.get("ETag")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None, None
            if err.code in (401, 403):
                raise PermanentError(f"HTTP {err.code} {err.reason}") from None
            raise

    def read_small(self, url: str) -> Optional[bytes]:
        try:
            with urllib.request.urlopen(url, timeout=self.options.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def chunks(self, url: str, start: int, end: Optional[int]):
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.options.timeout)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise ObjectMissing(f"HTTP 404 {err.reason}") from None
            if err.code in (401, 403):
                raise PermanentError(f"HTTP {err.code} {err.reason}") from None
            raise
        with resp:
            skip = start if headers and resp.status == 200 else 0  # the server ignored Range
            left = None if end is None else end - start
            while chunk := resp.read(CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                if chunk:
                    yield chunk
                if left == 0:
                    break


class PipeStore:
    """pipe:COMMAND: the shard is the command's standard output (as WebDataset): no size before it
    is read, no ranges, nothing next to it (no index file)."""

    def listing(self, urls: list[str], retrying: Callable) -> dict[str, tuple[Optional[int], Optional[str]]]:
        return {url: (UNKNOWN_SIZE, None) for url in urls}

    def read_small(self, url: str) -> Optional[bytes]:
        raise PermanentError("pipe: shards have nothing next to them to read")

    def chunks(self, url: str, start: int, end: Optional[int]):
        if start or end is not None:
            raise PermanentError("pipe: shards cannot be read in part")
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise IOError(f"the command exited with status {proc.returncode}: {err[-300:]}")


class Remote:
    """Access to remote shards for one data set, whatever their store (one class per scheme
    above): retries with backoff, verified fetches, cancellation. Safe to use from several threads."""

    def __init__(self, options: FetchOptions = FetchOptions()):
        self.options = options
        self.stores = {"s3": S3Store(options), "http": HttpStore(options), "pipe": PipeStore()}
        self.cancelled = threading.Event()  # set to abandon downloads in progress (the run is stopping)

    def store(self, url: str):
        found = self.stores.get(kind(url))
        if found is None:
            raise PermanentError(f"'{url}' is not a remote URL")
        return found

    def endpoint(self) -> str:
        return self.stores["s3"].endpoint()

    def sizes(self, urls: list[str]) -> dict[str, Optional[int]]:
        """Each URL's byte size, None where there is no such object, UNKNOWN_SIZE for pipe:."""
        return {url: size for url, (size, _) in self.listing(urls).items()}

    def listing(self, urls: list[str]) -> dict[str, tuple[Optional[int], Optional[str]]]:
        """Each URL's (size, ETag); the ETag is None where the store gives none (pipe:, an HTTP
        server without ETags). An unchanged ETag and size mean unchanged bytes."""
        by_kind: dict[str, list[str]] = {}
        for url in urls:
            by_kind.setdefault(kind(url), []).append(url)
        out: dict[str, tuple[Optional[int], Optional[str]]] = {}
        for group in by_kind.values():
            out.update(self.store(group[0]).listing(group, self._retrying))
        return out

    def read_small(self, url: str) -> Optional[bytes]:
        """A small object (an index file) whole, or None if there is none."""
        return self._retrying("read", url, lambda: self.store(url).read_small(url))

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (a few tar headers), with retries."""
        return self._retrying("read", url, lambda: b"".join(self.store(url).chunks(url, start, end)))

    def upload(self, path: Path, url: str) -> None:
        self._retrying("upload", url, lambda: self.stores["s3"].upload(path, url))

    # ------------------------------------------------------------ shards

    def fetch(self, url: str, target: Path, what: str, start: int = 0, end: Optional[int] = None,
              shard_bytes: Optional[int] = None, sha256: str = "",
              on_bytes: Optional[Callable[[int], None]] = None) -> int:
        """Fetch bytes [start, end) of `url` into `target` at the same offsets (a ranged fetch
        leaves the rest of the file a hole), retrying with backoff. Stored under `target` only
        when complete: `shard_bytes` long (whole fetches: and with the right SHA-256). Returns
        the bytes fetched; a LauncherError naming `what` and the URL after the last attempt."""
        whole = start == 0 and (end is None or end == shard_bytes)
        tmp = target.with_name(f".{target.name}.part{os.getpid()}-{threading.get_ident()}")

        def once() -> int:
            digest = hashlib.sha256() if whole and sha256 else None
            with open(tmp, "wb") as out:
                if not whole and shard_bytes:
                    out.truncate(shard_bytes)  # sparse: the samples keep their offsets
                out.seek(start)
                got = 0
                for chunk in self.store(url).chunks(url, start, None if whole else end):
                    if self.cancelled.is_set():
                        raise _Cancelled()
                    out.write(chunk)
                    got += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            stop = end if end is not None else (shard_bytes if shard_bytes not in (None, UNKNOWN_SIZE) else None)
            if stop is not None and got != stop - start:
                raise IOError(f"got {got} of {stop - start} bytes (the transfer was cut short)")
            if whole and shard_bytes not in (None, UNKNOWN_SIZE) and tmp.stat().st_size != shard_bytes:
                raise IOError(f"the shard has {tmp.stat().st_size} bytes, its index says {shard_bytes}")
            if digest is not None and digest.hexdigest() != sha256:
                raise ChecksumMismatch(f"its SHA-256 {digest.hexdigest()[:16]}... differs from its index's "
                                       f"{sha256[:16]}...")
            os.replace(tmp, target)
            return got

        try:  # the shard was in the store when the run started: a 404 now may be a replacement under way
            return self._retrying("fetch", url, once, what=what, retry_missing=True)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------ retrying

    def _retrying(self, action: str, url: str, attempt: Callable, what: str = "", retry_missing: bool = False):
        wait, last, permanent = self.options.retry_wait, None, False
        for n in range(self.options.retries + 1):
            if n:
                if self.cancelled.wait(wait):
                    raise _Cancelled()
                wait = min(2 * wait, 30.0)
            try:
                return attempt()
            except (_Cancelled, LauncherError):
                raise
            except PermanentError as err:
                if not (retry_missing and isinstance(err, ObjectMissing)):
                    last, permanent = err, True
                    break
                last = err
                if n < self.options.retries and not self.cancelled.is_set():
                    print(f"warning: {what + ': ' if what else ''}'{url}' is missing from the store ({err}); "
                          f"retrying in {wait:g} s ({n + 1} of {self.options.retries} retries)", file=sys.stderr,
                          flush=True)
            except Exception as err:  # noqa: BLE001  (network errors come in many types; all retried)
                last = err
                if n < self.options.retries and not self.cancelled.is_set():
                    print(f"warning: {what + ': ' if what else ''}could not {action} '{url}' ({type(err).__name__}: "
                          f"{str(err)[:200]}); retrying in {wait:g} s ({n + 1} of {self.options.retries} retries)",
                          file=sys.stderr, flush=True)
        where = f" (endpoint {self.endpoint()})" if kind(url) == "s3" else ""
        tries = "" if permanent else f" after {self.options.retries + 1} attempts"
        if isinstance(last, ChecksumMismatch):
            advice = ("The shard no longer matches its index: it was rewritten after it was indexed. Write the "
                      f"index again (python -m launcher.shards index '{url}'), then relaunch.")
        elif isinstance(last, ObjectMissing) and not permanent:
            advice = ("The shard was in the store when the run started and is gone now (deleted or being "
                      "replaced): put it back, then relaunch; the run resumes from its last checkpoint.")
        else:
            advice = ("Check that the store is reachable and the object exists (data.fetch_retries and "
                      "data.fetch_retry_wait set how long to keep trying); nothing partial was kept, and a "
                      "relaunch resumes from the last checkpoint.")
        raise LauncherError(f"{what + ': ' if what else ''}could not {action} '{url}'{where}{tries}: "
                            f"{type(last).__name__}: {str(last)[:300].rstrip('.')}. {advice}")


class _Cancelled(Exception):
    """The run is stopping: abandon the download (not an error of the store)."""


def _s3_code(err) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _raise_permanent_s3(err) -> None:
    code = _s3_code(err)
    message = f"S3 {code}: {err.response.get('Error', {}).get('Message', '')}"
    if code in ("404", "NoSuchKey", "NotFound"):
        raise ObjectMissing(message) from None
    if code in ("NoSuchBucket", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        raise PermanentError(message) from None
    raise err


def remote_url_of_index(url: str) -> Optional[str]:
    """Where a remote shard's index file lives (next to it), or None (pipe: has no 'next to')."""
    return None if kind(url) == "pipe" else url + ".index.npz"


def parse_size(value) -> Optional[int]:
    """'20GB', '500 MiB', 1e9 -> bytes (decimal and binary units, as litdata/streaming accept)."""
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{value} is not a size: write a number of bytes of 0 or more, or e.g. 500MB, 20GB")
    if value is None or isinstance(value, int):
        return value
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)b?\s*", str(value).lower())
    if not match:
        raise ValueError(f"'{value}' is not a size: write bytes or e.g. 500MB, 20GB, 1.5TiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * (base ** ("kmgtp".index(unit) + 1) if unit else 1))
