"""Documents: ``POST /v1/documents`` (JSON or multipart files) -> 202 + ingest job; list; delete."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.convert import http_error
from api.deps import ReadyDep, Service, errors, require_key, unavailable
from api.schemas import DOC_ID_PATTERN, Deleted, DocumentList, DocumentsRequest, JobAccepted
from api.workers import Saturated, ShuttingDown

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["documents"], dependencies=[Depends(require_key)])
_ID_RE = re.compile(DOC_ID_PATTERN)


def _inline_schema() -> dict[str, Any]:
    schema = DocumentsRequest.model_json_schema()
    defs = schema.pop("$defs")
    schema["properties"]["documents"]["items"] = defs["DocumentIn"]
    return schema


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            },
        },
    }
}


def _unprocessable(msg: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=msg)


async def _json_documents(request: Request) -> list[dict[str, Any]]:
    try:
        body = DocumentsRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from e
    return [{"id": d.id, "text": d.text, "metadata": d.metadata} for d in body.documents]


async def _file_documents(request: Request) -> list[dict[str, Any]]:
    form = await request.form()
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise _unprocessable("multipart body needs one or more `files` parts")
    docs = []
    for f in files:
        raw = await f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _unprocessable(
                f"file {f.filename!r} is not valid UTF-8 text ({e.reason} at byte {e.start})"
            ) from e
        name = PurePath(f.filename or "").name
        docs.append(
            {"id": name if _ID_RE.match(name) else None, "text": text, "metadata": {"filename": name}}
        )
    return docs


def _check(docs: list[dict[str, Any]], svc: Service) -> list[dict[str, Any]]:
    """Fill default ids (content hashes), reject empty texts, duplicates and oversized batches."""
    if len(docs) > svc.settings.max_documents_per_request:
        raise _unprocessable(
            f"{len(docs)} documents in one request; the limit is {svc.settings.max_documents_per_request} "
            "(TTT_RAG_MAX_DOCUMENTS_PER_REQUEST)"
        )
    seen: set[str] = set()
    for i, d in enumerate(docs):
        if not d["text"].strip():
            raise _unprocessable(f"document {i} has no text")
        if "\x00" in d["text"]:
            raise _unprocessable(f"document {i} contains NUL characters")
        if d["id"] is None:
            d["id"] = "doc-" + hashlib.sha256(d["text"].encode()).hexdigest()[:16]
        if d["id"] in seen:
            raise _unprocessable(f"duplicate document id {d['id']!r} in one request")
        seen.add(d["id"])
    return docs


@router.post(
    "/documents",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    openapi_extra=_BODY,
    responses=errors(401, 413, 415, 422, 503),
)
async def add_documents(request: Request, svc: ReadyDep) -> JobAccepted:
    """Queue documents for ingestion (same id again = update); poll ``/v1/jobs/{job_id}``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        docs = await _json_documents(request)
    elif ctype == "multipart/form-data":
        docs = await _file_documents(request)
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"content type {ctype or 'missing'!r}; send application/json or multipart/form-data",
        )
    docs = _check(docs, svc)
    assert svc.ingest is not None
    rec = svc.ingest.submit(docs)
    if rec is None:
        svc.metrics.rejected.labels("documents").inc()
        raise unavailable(svc.settings, f"{svc.ingest.max_pending} ingest jobs already pending")
    log.info("ingest job queued", extra={"job_id": rec["job_id"], "documents": len(docs)})
    return JobAccepted(job_id=rec["job_id"], document_ids=rec["document_ids"], status=rec["status"])


def document_ids(rag: Any) -> list[str]:
    """Ids of the stored documents, whatever shape ``rag.documents()`` returns them in."""
    out = []
    for d in rag.documents():
        if isinstance(d, str):
            out.append(d)
        elif isinstance(d, dict):
            out.append(str(d.get("doc_id", d.get("id"))))
        else:
            out.append(str(getattr(d, "doc_id", None) or d.id))
    return out


@router.get("/documents", response_model=DocumentList, responses=errors(401, 503))
async def list_documents(svc: ReadyDep) -> DocumentList:
    """Ids of every stored document."""
    ids = document_ids(svc.rag)
    return DocumentList(documents=ids, count=len(ids))


@router.delete("/documents/{doc_id}", response_model=Deleted, responses=errors(401, 404, 503, 504))
async def delete_document(doc_id: str, svc: ReadyDep) -> Deleted:
    """Remove a document from the index (the TTT memory is rebuilt on the next answer that needs it)."""
    if doc_id not in set(document_ids(svc.rag)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no document with id {doc_id!r}")
    assert svc.pool is not None
    try:
        await svc.pool.run(svc.rag.delete, [doc_id], timeout=svc.settings.request_timeout_s)
    except (Saturated, ShuttingDown) as e:
        raise unavailable(svc.settings, str(e)) from e
    except TimeoutError as e:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, detail="delete timed out") from e
    except Exception as e:
        raise http_error(e) from e
    log.info("document deleted", extra={"doc_id": doc_id})
    return Deleted(id=doc_id)
