"""The audit log (admin): who did what, when, with which outcome; newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from edgefed.cloud.api.deps import AUTH_ERRORS, AdminDep, SessionDep
from edgefed.cloud.api.schemas import AuditPublic, Page
from edgefed.cloud.registry.models import AuditRecord

router = APIRouter(prefix="/api/v1", tags=["audit"])


@router.get("/audit", responses=AUTH_ERRORS)
def list_audit(
    session: SessionDep,
    _who: AdminDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    actor: Annotated[str | None, Query(max_length=128)] = None,
) -> Page[AuditPublic]:
    """Audit records, newest first, ``limit`` at a time from ``offset``."""
    query = select(AuditRecord)
    counter = select(func.count()).select_from(AuditRecord)
    if actor is not None:
        query = query.where(AuditRecord.actor == actor)
        counter = counter.where(AuditRecord.actor == actor)
    rows = session.scalars(query.order_by(AuditRecord.id.desc()).limit(limit).offset(offset))
    return Page[AuditPublic](
        items=[AuditPublic.model_validate(r) for r in rows],
        total=session.scalar(counter) or 0,
        limit=limit,
        offset=offset,
    )
