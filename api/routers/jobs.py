"""``GET /v1/jobs/{job_id}``: the status of an ingest job (persisted across restarts)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from api.deps import ReadyDep, errors, require_key
from api.jobs import JobNotFound
from api.schemas import Job

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_key)])


@router.get("/jobs/{job_id}", response_model=Job, responses=errors(401, 404, 503))
async def get_job(job_id: str, svc: ReadyDep) -> Job:
    """Status of an ingest job: queued, running, done (its documents are stored) or failed."""
    assert svc.jobs is not None
    try:
        return Job.model_validate(svc.jobs.get(job_id))
    except JobNotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job with id {job_id!r}") from e
