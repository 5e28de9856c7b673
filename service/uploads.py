"""Reading image uploads from a request body, streamed, with a byte cap and an image cap.

Accepted (issue 3): ``multipart/form-data`` with one or more parts named ``file`` (other
fields are ignored), or a raw body whose Content-Type is ``image/*`` or
``application/octet-stream`` (one image). The result is the images' bytes in request order;
whether they are images at all is ``service.imaging``'s business (content decides there).

Statuses (``UploadRejected.status_code``):

- 413 a Content-Length over ``max_bytes`` (answered before reading any of the body), a body
  that passes ``max_bytes`` while streaming (reading stops at once: at most one network chunk
  past the cap is ever held), or more than ``max_images`` ``file`` parts (parsing stops at the
  first extra part);
- 415 any other Content-Type, or none (the detail says what is accepted);
- 422 an empty body, a zero-length ``file`` part (the detail names its index), or a multipart
  body with no part named ``file``;
- 400 malformed multipart: no or bad boundary, bytes that do not follow the boundary syntax,
  a body that ends before the closing boundary. The request's syntax is broken, so 400 (422
  is kept for well-formed requests with unusable content);
- 400 also when the client disconnects mid-body (nobody is left to read the answer; it keeps
  such requests out of the 5xx counts).

Slow clients: reading happens on the event loop (no worker thread is held); the caller bounds
it with a deadline (``service.deadline.before``; the service uses ``REQUEST_TIMEOUT_S`` -> 504).

Image indexes in details are 0-based and count ``file`` parts only: "image 2" is the third.

After an early 413 the unread rest of the body is the server's business: uvicorn (h11 and
httptools alike) keeps reading and discarding it once the response is complete, so the client
can read its 413 whether it reads while sending (curl) or only after (httpx), and memory stays
flat. Do not add ``Connection: close`` to such answers: uvicorn then closes the socket with
unread data, the kernel answers with a TCP reset, and a client still sending may never see the
413. ``tests/service/test_uploads.py`` checks this against a real uvicorn process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

ACCEPTED = (
    "send multipart/form-data with one or more parts named 'file', or a raw image body "
    "with Content-Type image/* or application/octet-stream"
)


class UploadRejected(Exception):
    """The request body cannot be turned into images; ``status_code`` is the HTTP answer."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


async def read_image_parts(
    request: Request,
    *,
    max_bytes: int,
    max_images: int,
) -> list[bytes]:
    """The uploaded images' bytes in request order; raises ``UploadRejected``."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    if media_type == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadRejected(400, "multipart/form-data without a boundary parameter")
        reader = _MultipartReader(boundary, max_images)
    elif media_type.startswith(b"image/") or media_type == b"application/octet-stream":
        reader = _RawReader()
    else:
        shown = media_type.decode("latin-1") or "none"
        raise UploadRejected(415, f"unsupported Content-Type ({shown}): {ACCEPTED}")
    _check_declared_length(request, max_bytes)
    async with aclosing(_capped(request.stream(), max_bytes)) as chunks:
        return await reader.read(chunks)


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UploadRejected(413, f"upload of {declared} bytes is over the {max_bytes}-byte limit")


async def _capped(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The body's chunks, raising 413 as soon as their total passes ``max_bytes``."""
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes:
                raise UploadRejected(413, f"upload is over the {max_bytes}-byte limit")
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise UploadRejected(
            400, "client disconnected before the request body was complete"
        ) from None


class _RawReader:
    """A raw body: one image."""

    async def read(self, chunks: AsyncIterator[bytes]) -> list[bytes]:
        body = b"".join([chunk async for chunk in chunks])
        if not body:
            raise UploadRejected(422, "empty request body: no image")
        return [body]


class _MultipartReader:
    """multipart/form-data fed chunk by chunk to python-multipart's push parser."""

    def __init__(self, boundary: bytes, max_images: int) -> None:
        try:
            self.parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                },
            )
        except FormParserError as exc:
            raise UploadRejected(400, f"invalid multipart boundary: {exc}") from None
        self.max_images = max_images
        self.images: list[bytes] = []
        self.field = bytearray()
        self.value = bytearray()
        self.disposition = b""
        self.chunks: list[bytes] | None = None  # the current part's data, if it is a file part

    async def read(self, chunks: AsyncIterator[bytes]) -> list[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            try:
                self.parser.write(chunk)
            except FormParserError as exc:
                raise UploadRejected(400, f"malformed multipart body: {exc}") from None
        if not received:
            raise UploadRejected(422, "empty request body: no image")
        if self.parser.state != MultipartState.END:
            raise UploadRejected(400, "malformed multipart body: no closing boundary")
        if not self.images:
            raise UploadRejected(422, "no image part named 'file' in the multipart body")
        return self.images

    # python-multipart callbacks (run inside parser.write) ------------------------------------

    def _part_begin(self) -> None:
        self.disposition = b""
        self.chunks = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self.field).strip().lower() == b"content-disposition":
            self.disposition = bytes(self.value)
        self.field.clear()
        self.value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self.disposition)
        if params.get(b"name") != b"file":
            return
        if len(self.images) >= self.max_images:
            raise UploadRejected(413, f"more than {self.max_images} images in one request")
        self.chunks = []

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.chunks is not None:
            self.chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self.chunks is None:
            return
        image = b"".join(self.chunks)
        if not image:
            raise UploadRejected(422, f"image {len(self.images)} is empty (a zero-length part)")
        self.images.append(image)
        self.chunks = None
