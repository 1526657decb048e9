"""Where `ferry batch` reads and writes: local paths and URIs, through pyarrow's filesystems.

One code path for every place: a local path (pyarrow's `LocalFileSystem`), `s3://` (pyarrow's
`S3FileSystem`; an S3-compatible store through `endpoint`, from `--storage-endpoint`,
`$AWS_ENDPOINT_URL_S3` or `$AWS_ENDPOINT_URL`), and the other schemes pyarrow knows (`gs://`,
`abfs://`, `hdfs://`, `file://`) or, when it does not, fsspec's filesystem for the scheme.

Every process builds its own filesystem from its own environment (credentials: the provider's usual
variables or files), so no secret travels through Ray. Errors are turned into short reasons
(`reason`): "no such file", "permission denied", "credentials refused", ...
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from ferry.core.errors import FerryError

# stores where an object appears whole when its upload completes, or not at all: written in place;
# anywhere else a file is written under a temporary name and renamed
OBJECT_STORES = ("s3", "gs", "gcs", "abfs", "abfss", "az")


def is_uri(p: str) -> bool:
    return "://" in p


def scheme(p: str) -> str:
    return p.split("://", 1)[0].lower() if is_uri(p) else ""


def storage_endpoint(flag: str | None = None) -> str | None:
    """The S3-compatible endpoint to use: the flag, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL
    (None: Amazon S3 itself)."""
    return flag or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(location: str, endpoint: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI. Raises FerryError for a
    scheme that neither pyarrow nor fsspec knows."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    kind = scheme(location)
    rest = location.split("://", 1)[1]
    if kind == "s3":
        if endpoint:
            return pafs.S3FileSystem(endpoint_override=endpoint), rest.rstrip("/")
        try:
            return pafs.FileSystem.from_uri(location)
        except (OSError, ValueError) as exc:
            raise FerryError(f"cannot open {location}: {first_line(exc)}") from exc
    try:
        return pafs.FileSystem.from_uri(location)
    except pa.ArrowInvalid as exc:
        if "nrecognized filesystem" not in str(exc):
            raise FerryError(f"cannot open {location}: {first_line(exc)}") from exc
    except OSError as exc:
        raise FerryError(f"cannot open {location}: {first_line(exc)}") from exc
    try:  # a scheme pyarrow lacks: fsspec's implementation, when installed
        import fsspec

        fs = fsspec.filesystem(kind)
    except (ImportError, ValueError) as exc:
        raise FerryError(f"{location}: no filesystem for {kind}:// (pyarrow's: s3, gs, abfs, hdfs, file; others "
                         f"need fsspec and its package for {kind})") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(location)


def bucket_region(bucket: str, endpoint: str | None) -> str | None:
    """The region to sign an S3 bucket's requests for: $AWS_REGION or $AWS_DEFAULT_REGION; else, on
    Amazon S3, the bucket's own (asked of S3, as pyarrow does: a bucket outside us-east-1 answers
    requests signed for another region with a redirect); else, on an S3-compatible store, us-east-1.
    None when S3 cannot say (pyarrow's filesystem then reads, finding the region itself)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        return region or "us-east-1"
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return None


class FileSystems:
    """Filesystems by scheme://authority, each built once and reused for every object there
    (creating one may cost a round trip to the store: an S3 bucket's region).

    Reading an `s3://` object (`read`): pyarrow's S3 filesystem asks for an object's size (a HEAD)
    before it reads it (a GET), two requests where one does; with `obstore` installed (the `scale`
    extra) and the credentials in the environment (`AWS_ACCESS_KEY_ID`, as a cluster passes them),
    an object is read with one GET by obstore's S3 client. Everything else (listing, writing, other
    schemes, credentials from files or instance roles) goes through pyarrow."""

    def __init__(self, endpoint: str | None = None):
        self.endpoint = endpoint
        self._cache: dict[str, tuple[Any, int | None]] = {}
        self._stores: dict[str, Any] = {}

    def read(self, location: str, max_bytes: int | None = None) -> bytes:
        """The bytes of a local file or an object (one GET for s3:// where obstore can do it); a
        `TooLarge` error, before its bytes are read, for one of more than `max_bytes`."""
        if scheme(location) == "s3":
            bucket, _, key = location.split("://", 1)[1].partition("/")
            store = self._object_store(bucket)
            if store is not None:
                import obstore

                got = obstore.get(store, key)  # the object's size is known before its body is read
                check_size(got.meta["size"], max_bytes)
                return bytes(got.bytes())
        fs, inner = self.get(location)
        return read_bytes(fs, inner, max_bytes)

    def _object_store(self, bucket: str) -> Any:
        if bucket in self._stores:
            return self._stores[bucket]
        store = None
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            try:
                from obstore.store import S3Store
            except ImportError:
                pass
            else:
                endpoint = storage_endpoint(self.endpoint)  # the flag, or the environment's, as pyarrow's
                options = {"allow_http": True} if (endpoint or "").startswith("http://") else None
                region = bucket_region(bucket, endpoint)
                if region is not None:  # (endpoint=None is refused: Amazon S3 is the default without one)
                    store = S3Store(bucket, region=region, client_options=options, **({"endpoint": endpoint} if endpoint else {}))
        self._stores[bucket] = store
        return store

    def get(self, location: str) -> tuple[Any, str]:
        if not is_uri(location):
            import pyarrow.fs as pafs

            return pafs.LocalFileSystem(), os.path.abspath(location)
        key = "/".join(location.split("/", 3)[:3])
        rest = location.split("://", 1)[1]
        cached = self._cache.get(key)
        if cached is not None and cached[1] is not None:
            return cached[0], rest[cached[1]:]
        fs, inner = filesystem(location, self.endpoint)
        # s3://bucket/key -> "bucket/key" (strip 0); hdfs://host:port/p -> "/p" (strip the authority)
        self._cache[key] = (fs, len(rest) - len(inner) if rest.endswith(inner) else None)
        return fs, inner


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def reason(exc: BaseException) -> str:
    """A store's or the OS's error in a few words, the same for every scheme."""
    text = str(exc)
    kind = type(exc).__name__  # obstore's errors by name: obstore is optional
    if isinstance(exc, FileNotFoundError) or kind == "NotFoundError" or "NO_SUCH_KEY" in text or "NoSuchKey" in text:
        return "no such file"
    if isinstance(exc, PermissionError) or kind == "PermissionDeniedError" or "ACCESS_DENIED" in text or "AccessDenied" in text:
        return "permission denied"
    if kind == "UnauthenticatedError":
        return "credentials refused"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "no such bucket"
    if any(s in text for s in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId",
                               "SignatureDoesNotMatch", "EXPIRED_TOKEN", "ExpiredToken")):
        return "credentials refused"
    if "NETWORK_CONNECTION" in text or isinstance(exc, ConnectionError):
        return f"cannot connect ({first_line(exc, 120)})"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, (TooLarge, NotAFile)):
        return str(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


def bucket_of(location: str, inner: str) -> str | None:
    """The bucket (container) of an object-store location, or None elsewhere."""
    return inner.split("/", 1)[0] if scheme(location) in OBJECT_STORES else None


def check_bucket(fs: Any, location: str, inner: str, what: str, endpoint: str | None) -> None:
    """An object store's bucket must exist and let these credentials in; a FerryError now otherwise.
    Some stores deny the bucket's HEAD to credentials scoped to a few buckets or prefixes (and then say
    "denied" for a missing bucket too): a listing of an unused prefix tells those cases apart."""
    import pyarrow.fs as pafs

    bucket = bucket_of(location, inner)
    if not bucket:
        return
    where = f" at {endpoint}" if endpoint and scheme(location) == "s3" else ""
    try:
        if fs.get_file_info(bucket).type != pafs.FileType.NotFound:
            return
        why = "no such bucket"
    except OSError:
        try:
            fs.get_file_info(pafs.FileSelector(f"{bucket}/.ferry-probe-{uuid.uuid4().hex[:8]}"))
            return
        except FileNotFoundError:
            return  # the bucket is there and can be listed (the prefix is not)
        except OSError as exc:
            why = reason(exc)
            cause: BaseException | None = exc
    else:
        cause = None
    if why == "no such bucket":
        raise FerryError(f"{what} {location}: bucket {bucket!r} does not exist{where} (ferry never creates buckets)") from cause
    if why.startswith("cannot connect"):
        raise FerryError(f"{what} {location}: cannot reach the store{where}: {why}") from cause
    hint = ("check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the provider's own) "
            "and the endpoint (--storage-endpoint)") if why in ("permission denied", "credentials refused") else ""
    raise FerryError(f"{what} {location}: the store refused bucket {bucket!r}{where}: {why}"
                     + (f"; {hint}" if hint else "")) from cause


class TooLarge(OSError):
    """A file larger than any image the runtime would decode: not read."""


class NotAFile(OSError):
    """A FIFO, a device or a socket among the inputs: not read (a FIFO would wait for a writer)."""


def check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"too large for an image ({size / 2**20:.0f} MiB; at most {max_bytes / 2**20:.0f} MiB)")


def read_bytes(fs: Any, path: str, max_bytes: int | None = None) -> bytes:
    if max_bytes is None:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    with fs.open_input_file(path) as f:
        check_size(f.size(), max_bytes)
        return f.read()


def write_bytes(fs: Any, path: str, data: bytes, *, in_place: bool) -> None:
    """Write a whole file so that readers see all of it or nothing: in place on an object store
    (`in_place`), else under a hidden temporary name in the same folder, then renamed."""
    if in_place:
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
