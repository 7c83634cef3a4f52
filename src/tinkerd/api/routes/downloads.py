"""Downloading checkpoint files: signed per-file URLs (SDK >= 0.28, ``tinker checkpoint download``) and one tar
archive per checkpoint (the ``.../archive`` call of SDKs and CLIs up to 0.33).

Asking for URLs needs the API key of someone who may read the checkpoint (its owner, or anyone once published);
fetching them needs only the URL, whose signature (see ``signing``) names the file and its expiry. A fetch also
re-checks that the checkpoint still exists and has not expired, so a URL dies with its checkpoint.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from tinkerd.api import rest_schemas
from tinkerd.api.context import ApiContext
from tinkerd.api.routes.common import JSON, Context, Owner, json_response
from tinkerd.api.routes.rest import checkpoint_path
from tinkerd.api.signing import UrlSigner
from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.paths import TinkerPath
from tinkerd.domain.records import utc_now
from tinkerd.store.storage import CheckpointStorage, StoredFile

router = APIRouter()

FILE_PURPOSE = "file"
ARCHIVE_PURPOSE = "archive"
MAX_PAGE_SIZE = 1000
# Tinker's archives carry this empty marker, and older CLIs (push-hf) refuse an archive without it. Our saves are
# atomic, so every checkpoint that lists is complete: the marker is true of all of them.
COMPLETE_MARKER = "checkpoint_complete"
_CHUNK = 1 << 20
_TAR_BLOCK = 512


def _resource(path: TinkerPath, relpath: str | None = None) -> str:
    run_id, kind, name = path.parts()
    return f"{run_id}/{kind}/{name}" + ("" if relpath is None else f"/{relpath}")


def _signed(url: str, signer: UrlSigner, purpose: str, resource: str, expires: int) -> str:
    return f"{url}?expires={expires}&sig={signer.sign(purpose, resource, expires)}"


def _expires_at(expires: int) -> datetime:
    return datetime.fromtimestamp(expires, UTC)


def _readable(ctx: ApiContext, path: TinkerPath, owner: str) -> list[StoredFile]:
    """The files of a checkpoint `owner` may read; NotFoundError if there is no such checkpoint or it has no files."""
    files, _ = ctx.downloads()
    ctx.store.checkpoints.get(path, owner)
    return files.list_files(path)


# -- asking for URLs (API key) -----------------------------------------------------------------------------------------


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    run_id: str,
    kind: str,
    name: str,
    request: Request,
    ctx: Context,
    owner: Owner,
    page_size: Annotated[int, Query()] = MAX_PAGE_SIZE,
    page_token: Annotated[int, Query()] = 0,
) -> Response:
    """Signed URLs of an external_weights checkpoint's files, sorted by path, a page at a time (Baseten Loops'
    file lists: `page_size` files from offset `page_token`; `next_page_token` is None on the last page)."""
    path = checkpoint_path(run_id, kind, name)
    if path.kind != "external_weights":
        raise InvalidRequestError(
            f"{path} is not an external_weights checkpoint; export one with save_weights_external "
            "(`tinker checkpoint download` does that for a weights/ checkpoint)"
        )
    if not 1 <= page_size <= MAX_PAGE_SIZE or page_token < 0:
        raise InvalidRequestError(
            f"page_size must be between 1 and {MAX_PAGE_SIZE} and page_token >= 0, got {page_size} and {page_token}"
        )
    stored = _readable(ctx, path, owner)
    _, signer = ctx.downloads()
    expires = signer.expiry(ctx.settings.download_url_ttl_s)
    page = stored[page_token : page_token + page_size]
    entries: list[rest_schemas.CheckpointFile] = []
    for item in page:
        resource = _resource(path, item.relpath)
        url = str(
            request.url_for("download_file", run_id=path.run_id, kind=path.kind, name=path.name, relpath=item.relpath)
        )
        entries.append(
            rest_schemas.CheckpointFile(
                relative_file_name=item.relpath,
                url=_signed(url, signer, FILE_PURPOSE, resource, expires),
                size_bytes=item.size_bytes,
                last_modified=datetime.fromtimestamp(item.modified, UTC),
            )
        )
    end = page_token + len(page)
    # Serialised with its nulls: a paging client reads `next_page_token: null` as "last page".
    return Response(
        rest_schemas.ExternalWeightsUrlsResponse(
            urls={entry.relative_file_name: entry.url for entry in entries},
            expires=_expires_at(expires),
            files=entries,
            total_count=len(stored),
            next_page_token=end if end < len(stored) else None,
        ).model_dump_json(),
        media_type=JSON,
    )


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/archive")
def checkpoint_archive(run_id: str, kind: str, name: str, request: Request, ctx: Context, owner: Owner) -> Response:
    """SDKs up to 0.33: a 302 to a signed URL of the checkpoint as one tar (with redirects off, they read `Location`
    and `Expires`); the body says the same as JSON for clients that read a 200's `{"url", "expires"}`."""
    path = checkpoint_path(run_id, kind, name)
    _readable(ctx, path, owner)
    _, signer = ctx.downloads()
    expires = signer.expiry(ctx.settings.download_url_ttl_s)
    url = str(request.url_for("download_archive", run_id=path.run_id, kind=path.kind, name=path.name))
    signed = _signed(url, signer, ARCHIVE_PURPOSE, _resource(path), expires)
    body = rest_schemas.CheckpointArchiveUrlResponse(url=signed, expires=_expires_at(expires))
    response = json_response(body, status_code=302)
    response.headers["location"] = signed
    response.headers["expires"] = format_datetime(_expires_at(expires), usegmt=True)
    return response


# -- fetching (signature, no API key) ----------------------------------------------------------------------------------


def _check_link(
    ctx: ApiContext,
    purpose: str,
    parts: tuple[str, str, str],
    relpath: str | None,
    expires: str | None,
    sig: str | None,
) -> tuple[CheckpointStorage, TinkerPath]:
    files, signer = ctx.downloads()
    run_id, kind, name = parts
    # The signature is checked on the raw URL segments first: an altered link is refused (403) whatever it names.
    signer.check(purpose, f"{run_id}/{kind}/{name}" + ("" if relpath is None else f"/{relpath}"), expires, sig)
    path = checkpoint_path(run_id, kind, name)
    checkpoint = ctx.store.checkpoints.find(path)
    if checkpoint is None or (checkpoint.expires_at is not None and checkpoint.expires_at <= utc_now()):
        raise NotFoundError(f"checkpoint {path} no longer exists (deleted, or its TTL ran out)")
    return files, path


Signature = Annotated[str | None, Query()]


@router.get("/files/{run_id}/{kind}/{name}/{relpath:path}", name="download_file")
def download_file(
    run_id: str, kind: str, name: str, relpath: str, ctx: Context, expires: Signature = None, sig: Signature = None
) -> Response:
    files, path = _check_link(ctx, FILE_PURPOSE, (run_id, kind, name), relpath, expires, sig)
    target = files.file_of(path, relpath)
    # FileResponse streams in chunks and sets Content-Length (the CLI's progress bar reads it) and supports Range.
    return FileResponse(target, media_type="application/octet-stream", filename=target.name)


@router.get("/archives/{run_id}/{kind}/{name}.tar", name="download_archive")
def download_archive(
    run_id: str, kind: str, name: str, ctx: Context, expires: Signature = None, sig: Signature = None
) -> Response:
    files, path = _check_link(ctx, ARCHIVE_PURPOSE, (run_id, kind, name), None, expires, sig)
    directory = files.read_dir(path)
    opened: list[tuple[StoredFile, BinaryIO]] = []
    try:
        # Open every file now: a save replacing the checkpoint (a directory swap) or a delete cannot change what
        # this archive holds once its length is announced.
        for item in files.list_files(path):
            opened.append((item, open(directory / item.relpath, "rb")))  # noqa: SIM115 (closed by the stream)
    except (OSError, NotFoundError):
        for _, handle in opened:
            handle.close()
        raise NotFoundError(
            f"checkpoint {path} no longer exists (deleted while the archive was being prepared)"
        ) from None
    members: list[tuple[bytes, BinaryIO | None, int]] = []
    for item, handle in opened:
        size = os.fstat(handle.fileno()).st_size
        members.append((_tar_header(item.relpath, size, item.modified), handle, size))
    members.append((_tar_header(COMPLETE_MARKER, 0, utc_now().timestamp()), None, 0))
    length = sum(len(header) + _padded(size) for header, _, size in members) + 2 * _TAR_BLOCK
    filename = f"{path.run_id}_{path.kind}_{path.name}.tar".replace(":", "_")
    return StreamingResponse(
        _tar_stream(members),
        media_type="application/x-tar",
        headers={"content-length": str(length), "content-disposition": f'attachment; filename="{filename}"'},
    )


def _tar_header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_stream(members: list[tuple[bytes, BinaryIO | None, int]]) -> Iterator[bytes]:
    """A tar built on the fly: header, content, zero padding to 512 bytes, per file; two zero blocks at the end
    (tar readers need no padding to a full 10 KiB record). Exactly the announced length, or the stream breaks."""
    try:
        for header, handle, size in members:
            yield header
            if handle is None:
                continue
            sent = 0
            while sent < size:
                chunk = handle.read(min(_CHUNK, size - sent))
                if not chunk:
                    raise OSError(f"{handle.name} shrank while it was being archived")
                sent += len(chunk)
                yield chunk
            if _padded(size) > size:
                yield b"\0" * (_padded(size) - size)
        yield b"\0" * (2 * _TAR_BLOCK)
    finally:
        for _, handle, _ in members:
            if handle is not None:
                handle.close()
