"""The request-reading layer of ``graft serve``: the server's limits (:class:`ServeSettings`),
admission of /predict requests (:class:`Admission`), reading their images from a multipart or
JSON body (:func:`read_uploads`) and turning each into the model's input (:func:`prepare_upload`).

What a client can make the server hold is bounded by :class:`ServeSettings`: bodies are
parsed while they stream in and refused (413) as soon as a file or the request is over its
limit; a request that would take the server over its count or its bytes in flight is turned
away with 503 and Retry-After instead of queued; an image's size is read from its header and
refused (413) over the pixel budget before it is decoded, and JPEGs decode downscaled; a body
must arrive within ``read_timeout_s`` (408). Client file names are only echoed back, never
opened. Nothing here knows the app or the model (graft.serve passes the model's ``prepare``):
nothing a client sends becomes a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import PurePosixPath
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image

from .errors import UsageError
from .files import decode_error_kind, describe_decode_error  # torch-free, unlike graft.data

MB = 1024 * 1024

#: largest accepted value of each setting (all must also be finite and above 0)
_MAXIMA: dict[str, float] = {
    "max_mb": 1024,
    "max_files": 1000,
    "top_k": 1000,
    "max_batch": 4096,
    # Pillow refuses images over this as decompression bombs (graft.runtime.load_image)
    "max_megapixels": Image.MAX_IMAGE_PIXELS / 1e6 if Image.MAX_IMAGE_PIXELS else 1e4,
    "max_request_mb": 4096,
    "max_inflight_mb": 65536,
    "max_requests": 10_000,
    "max_connections": 100_000,
    "read_timeout_s": 3600,
    "header_timeout_s": 3600,
    "keep_alive_s": 3600,
    "max_queue": 100_000,
    "timeout_ms": 3_600_000,
}
_CLI_OPTIONS = {
    "max_mb": "--max-mb",
    "max_files": "--max-files",
    "top_k": "--top-k",
    "max_queue": "--max-queue",
    "timeout_ms": "--timeout-ms",
    "max_connections": "--max-connections",
}


@dataclass(frozen=True)
class ServeSettings:
    """The limits of one server. Every value must be finite and above 0 (UsageError)."""

    max_mb: float = 20.0  #: largest accepted image file
    max_files: int = 16  #: most images in one request
    top_k: int = 3  #: classes returned per image unless the request asks otherwise
    max_batch: int = 32  #: most images the model runs at once
    #: largest image decoded, in millions of pixels (after a JPEG's reduced decode)
    max_megapixels: float = 16.0
    #: largest request body (all its files; see request_bytes). JSON: x4/3 (base64)
    max_request_mb: float = 64.0
    #: bodies held at once by all requests (a JSON body counts twice: text and parsed strings)
    max_inflight_mb: float = 128.0
    max_requests: int = 32  #: /predict requests at once; more get 503 with Retry-After
    max_connections: int = 256  #: open connections (uvicorn answers more with 503)
    read_timeout_s: float = 60.0  #: for a request body to arrive (else 408)
    header_timeout_s: float = 10.0  #: for a request line and headers (else the socket closes)
    keep_alive_s: float = 5.0  #: an idle keep-alive connection stays open this long
    #: images waiting for decoding or the model; a request that would go over gets 503 with
    #: Retry-After. 128 is about a second of work for a small CNN on 2 CPU cores (100-250
    #: images/s), a fraction of one on a bigger machine: the queue absorbs bursts, and a
    #: client told to retry soon beats one answered after ten seconds
    max_queue: int = 128
    #: from a request's body arriving to its answer; past it 503 with Retry-After and the
    #: work not yet started is dropped. Well above a full batch on CPU (a few seconds for the
    #: largest backbones) and below the 60 s a reverse proxy waits by default, so a client
    #: gets graft's 503 rather than the proxy's 504
    timeout_ms: float = 10_000.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value, whole = getattr(self, f.name), f.type == "int"
            name = _CLI_OPTIONS.get(f.name, f"ServeSettings.{f.name}")
            kind = int if whole else (int, float)
            if (
                isinstance(value, bool)
                or not isinstance(value, kind)
                or not math.isfinite(value)
                or not 0 < value <= _MAXIMA[f.name]
            ):
                raise UsageError(
                    f"{name} must be a {'whole' if whole else 'finite'} number above 0 and at "
                    f"most {_MAXIMA[f.name]:g}, got {value!r}: pass a value in that range."
                )

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    @property
    def request_bytes(self) -> int:
        """All the files of one request together: max_request_mb, or less when max_files
        files of max_mb are less, and never below one file of max_mb."""
        files = min(self.max_request_mb, self.max_files * self.max_mb)
        return int(max(files, self.max_mb) * MB)

    def body_limit(self, is_json: bool) -> int:
        # the files, base64's 4/3 for JSON, and room for the form's or the JSON's own text
        return (self.request_bytes * 4 // 3 if is_json else self.request_bytes) + 64 * 1024

    @property
    def queue_images(self) -> int:
        # never below one largest request, or that request could never be served
        return max(self.max_queue, self.max_files)

    @property
    def inflight_bytes(self) -> int:
        # never below one largest request, or that request could never be served
        return max(int(self.max_inflight_mb * MB), 2 * self.body_limit(True))


@dataclass
class Upload:
    name: str
    data: bytes


def _client_name(name: object, index: int) -> str:
    """Only the last part of what the client calls its file, for echoing back."""
    text = name if isinstance(name, str) else ""
    base = PurePosixPath(text.replace("\\", "/")).name
    return base[:200] or f"image-{index + 1}"


def _refuse(status: int, detail: str, retry_after: int | None = None) -> HTTPException:
    """An error answered before the body is read to its end. The connection stays open so
    the client can read it (closing at once would reset it mid-upload); uvicorn discards
    the rest of the body, and the server's protocol closes it after ``header_timeout_s``."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return HTTPException(status, detail, headers=headers)


class Admission:
    """How many /predict requests, and how many body bytes, the server holds at once. A
    request that would go over either is answered 503 at once rather than queued."""

    def __init__(self, settings: ServeSettings, on_busy: Callable[[], None] = lambda: None):
        self.settings, self.on_busy = settings, on_busy  # on_busy: each 503, for the metrics
        self.requests = self.bytes = self.since_trim = 0

    def full(self) -> bool:
        return self.requests >= self.settings.max_requests

    def busy(self) -> HTTPException:
        """The 503 for a request that finds every slot taken (counted by ``on_busy``)."""
        self.on_busy()
        return _refuse(503, f"The server is busy ({self.requests} requests in progress): retry.", 1)

    @contextmanager
    def request(self) -> Iterator[Callable[[int], None]]:
        """Hold one request slot; yields ``take(n)``, which holds n more body bytes."""
        if self.full():
            raise self.busy()
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.bytes + n > self.settings.inflight_bytes:
                self.on_busy()
                raise _refuse(
                    503,
                    f"The server is busy ({self.bytes / MB:.0f} MB of uploads in progress, "
                    f"limit {self.settings.inflight_bytes / MB:.0f} MB): retry.",
                    2,
                )
            self.bytes, held, self.since_trim = self.bytes + n, held + n, self.since_trim + n

        self.requests += 1
        try:
            yield take
        finally:
            self.requests, self.bytes = self.requests - 1, self.bytes - held
            if self.requests == 0 and self.since_trim > 32 * MB:
                # graft tunes malloc never to give memory back (graft._malloc): once idle,
                # hand back what big bodies and images took, or the peak stays resident
                self.since_trim = 0
                threading.Thread(target=_trim_heap, daemon=True).start()


def _trim_heap() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _FormReader:
    """A multipart body parsed as it streams in: the files of fields ``file``/``files``, each
    held to ``max_bytes`` and their number to ``max_files`` (413 as soon as one is over)."""

    def __init__(self, boundary: bytes, settings: ServeSettings):
        from python_multipart.multipart import MultipartParser

        self.settings = settings
        self.uploads: list[Upload] = []
        self.others: set[str] = set()
        self._header, self._value = b"", b""
        self._disposition, self._part = b"", bytearray()
        self._kind = ""  # "file" (an image), "text" (a text field named file), "" (ignored)
        self._name: str | None = None
        callbacks: Any = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_header", self._header + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_value", self._value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        self._disposition, self._part, self._kind, self._name = b"", bytearray(), "", None

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field not in ("file", "files"):
            self.others.add(field)
            return
        if b"filename" not in options:
            self._kind = "text"
            return
        self._kind = "file"
        self._name = options[b"filename"].decode("utf-8", "replace")
        if len(self.uploads) + 1 > self.settings.max_files:
            raise _refuse(
                413, f"Too many images in one request; the limit is {self.settings.max_files}."
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._kind != "file":
            return  # other fields are counted in the body's size, never kept
        self._part += data[start:end]
        if len(self._part) > self.settings.max_bytes:
            name = _client_name(self._name, len(self.uploads))
            raise _refuse(
                413, f"{name} is over the limit of {self.settings.max_mb:g} MB per image."
            )

    def _end(self) -> None:
        if self._kind == "text":
            raise HTTPException(400, "Form field 'file' must be a file upload, not text.")
        if self._kind == "file":
            name = _client_name(self._name, len(self.uploads))
            self.uploads.append(Upload(name, bytes(self._part)))
        self._part = bytearray()


def _from_json(body: bytes | bytearray, settings: ServeSettings) -> list[Upload]:
    """``{"images": [<base64 or data URL> | {"data": ..., "name": ...}, ...]}``, every type
    checked (400 with the path of the first wrong field)."""
    try:
        payload = json.loads(body or b"null")
    except RecursionError as exc:
        raise HTTPException(400, "The JSON is nested too deeply: send a flat object.") from exc
    except ValueError as exc:
        raise HTTPException(400, f"The body is not valid JSON: {exc}.") from exc
    shape = 'JSON must be {"images": ["<base64>", ...]} (or objects {"name", "data"}).'
    if not isinstance(payload, dict) or not payload.keys() & {"images", "image"}:
        raise HTTPException(400, shape)
    items = payload["images"] if "images" in payload else [payload["image"]]
    if not isinstance(items, list):
        raise HTTPException(400, f'"images" must be a list. {shape}')
    if len(items) > settings.max_files:
        raise HTTPException(
            413, f"{len(items)} images in one request; the limit is {settings.max_files}."
        )
    uploads = []
    for i, item in enumerate(items):
        name, data = (
            (item.get("name"), item.get("data")) if isinstance(item, dict) else (None, item)
        )
        if not isinstance(data, str):
            raise HTTPException(
                400,
                f'images[{i}] must be a base64 string or an object with a base64 string "data".',
            )
        if name is not None and not isinstance(name, str):
            raise HTTPException(
                400, f"images[{i}].name must be a string, got {type(name).__name__}."
            )
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]  # a data URL, as a browser's FileReader makes
        if len(data) * 3 // 4 > settings.max_bytes + 2:
            raise HTTPException(
                413, f"images[{i}] is over the limit of {settings.max_mb:g} MB per image."
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(400, f"images[{i}] is not valid base64 ({exc}).") from exc
        uploads.append(Upload(_client_name(name, i), raw))
        items[i] = None  # the text can go now
    return uploads


async def _read_uploads(
    request: Request, settings: ServeSettings, take: Callable[[int], None]
) -> list[Upload]:
    """The images of one /predict request, parsed while the body streams in and refused as
    soon as it is over a limit (413), too slow (408) or the server too full (503)."""
    ctype = request.headers.get("content-type", "").lower()
    is_json = ctype.startswith("application/json")
    if ctype.startswith("multipart/form-data"):
        from python_multipart.multipart import parse_options_header

        boundary = parse_options_header(request.headers["content-type"])[1].get(b"boundary")
        if not boundary:
            raise HTTPException(400, "Malformed multipart body: no boundary in Content-Type.")
        form = _FormReader(boundary, settings)
        sink: Callable[[bytes], Any] = form.parser.write
    elif is_json:
        text = bytearray()
        sink = text.extend
    else:
        raise HTTPException(
            415,
            "Send images as multipart/form-data (field 'file', repeated for several) or "
            'as JSON {"images": ["<base64>", ...]}; got Content-Type '
            f"{ctype or 'none'!r}.",
        )
    limit, weight = settings.body_limit(is_json), 2 if is_json else 1
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _refuse(
            413,
            f"Request body is {int(declared) / MB:.1f} MB; the limit is "
            f"{limit / MB:.1f} MB (see GET /model, 'limits').",
        )
    size = 0
    try:
        async with asyncio.timeout(settings.read_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _refuse(413, f"Request body exceeds the {limit / MB:.1f} MB limit.")
                take(weight * len(chunk))
                sink(chunk)
    except TimeoutError as exc:
        raise _refuse(
            408,
            f"The request body did not arrive within "
            f"{settings.read_timeout_s:g} s: send it faster or in smaller requests.",
        ) from exc
    if not is_json:
        form.parser.finalize()
        if not form.uploads:
            raise HTTPException(
                400,
                "No image in the request: add a multipart field named "
                f"'file' (got {sorted(form.others) or 'no fields'}).",
            )
        uploads = form.uploads
    else:
        uploads = _from_json(text, settings)
    if not uploads:
        raise HTTPException(400, 'No image in the request: "images" is empty.')
    for up in uploads:
        if not up.data:
            raise HTTPException(400, f"{up.name} is empty (0 bytes).")
    return uploads


class _OverBudget(ValueError):
    """An image whose pixel count is over ``max_megapixels``."""


def _check_pixels(data: bytes, img_size: int, max_pixels: float) -> int:
    """The pixels the image will decode to, read from its header; refused (_OverBudget)
    over the budget before a pixel is decoded."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (img_size, img_size))  # what load_image decodes: maybe 1/8 scale
        width, height = im.size
    if width * height > max_pixels:
        raise _OverBudget(
            f"image too large: {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels) is over the limit of {max_pixels / 1e6:g}: send it downscaled"
        )
    return width * height


def prepare_upload(
    prepare: Callable[[bytes], Any], img_size: int, upload: Upload, max_pixels: float
) -> tuple[Any, int, str, int]:
    """``prepare(upload.data)`` (the model's input for an image of ``img_size``) once the
    pixel budget allows: (input, 0, "", pixels decoded) or (None, HTTP status, reason, 0)."""
    try:
        pixels = _check_pixels(upload.data, img_size, max_pixels)
        return prepare(upload.data), 0, "", pixels
    except _OverBudget as exc:
        return None, 413, f"{upload.name}: {exc}.", 0
    except Exception as exc:  # whatever Pillow raises on a bad file is the file's fault
        kind, reason = decode_error_kind(exc), describe_decode_error(exc)
        if kind == "too_large":
            return None, 413, f"{upload.name}: {reason}", 0
        if kind == "not_image":
            return None, 415, f"{upload.name} is not an image (or an unsupported format).", 0
        return None, 422, f"{upload.name} could not be decoded: {reason}", 0


async def read_uploads(
    request: Request, settings: ServeSettings, take: Callable[[int], None]
) -> list[Upload]:
    """The uploads, or an HTTP error: nothing a client sends may become a 500."""
    from python_multipart.exceptions import FormParserError
    from starlette.requests import ClientDisconnect

    try:
        return await _read_uploads(request, settings, take)
    except HTTPException:
        raise
    except FormParserError as exc:
        raise HTTPException(400, f"Malformed multipart body: {exc}.") from exc
    except ClientDisconnect as exc:
        raise HTTPException(400, "The client closed the connection mid-request.") from exc
    except (ValueError, TypeError, KeyError, RecursionError, UnicodeError) as exc:
        raise HTTPException(
            400, f"Could not read the request ({type(exc).__name__}: {exc}): check its format."
        ) from exc


__all__ = ["MB", "Admission", "ServeSettings", "Upload", "prepare_upload", "read_uploads"]
