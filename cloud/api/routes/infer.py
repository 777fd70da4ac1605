"""The HTTP gateway: ``POST /api/v1/infer`` for clients that do not speak MQTT, routed by the
same policy as everything else (see :mod:`edgefed.cloud.gateway`).

Answers: 200 with the reply and the route it took; 404 when no target serves the model; 422
for input the model refuses (too long, bad parameters); 429 (``Retry-After``) when targets are
overloaded; 503 (``Retry-After``) when no target is live; 504 when the deadline cannot be met
(refused at once) or passed while waiting.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, status

from edgefed.cloud.api.deps import AUTH_ERRORS, ReaderDep, ServicesDep
from edgefed.cloud.api.schemas import ErrorBody, InferIn, InferOut
from edgefed.common.errors import EdgefedError, ErrorCode, RemoteError, RequestTimeout
from edgefed.common.routing import DeadlineUnreachable, NoRouteError, TargetSnapshot
from edgefed.common.schemas import InferenceRequest, Priority

router = APIRouter(prefix="/api/v1", tags=["inference"])

_REMOTE_STATUS = {
    ErrorCode.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    ErrorCode.MALFORMED: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.UNSUPPORTED_VERSION: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.UNKNOWN_KIND: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.OVERLOADED: status.HTTP_429_TOO_MANY_REQUESTS,
    ErrorCode.EXPIRED: status.HTTP_504_GATEWAY_TIMEOUT,
    ErrorCode.TIMEOUT: status.HTTP_504_GATEWAY_TIMEOUT,
}


def _retry_after(exc: EdgefedError) -> dict[str, str]:
    wait = getattr(exc, "retry_after", None)
    return {"Retry-After": str(max(1, math.ceil(wait or 1)))}


@router.post(
    "/infer",
    responses={
        **AUTH_ERRORS,
        404: {"model": ErrorBody, "description": "no target serves the model"},
        503: {"model": ErrorBody, "description": "no live target (see Retry-After)"},
        504: {"model": ErrorBody, "description": "the deadline cannot be or was not met"},
    },
)
async def infer(body: InferIn, services: ServicesDep, _who: ReaderDep) -> InferOut:
    """Run a model on texts wherever it is fastest now (agents, cloud worker pools)."""
    gateway = services.gateway
    if gateway is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the gateway is not running (it starts with `edgefed cloud serve`)",
            headers={"Retry-After": "5"},
        )
    request = InferenceRequest(
        model=body.model,
        texts=body.texts,
        parameters=body.parameters,
        priority=Priority(body.priority),
        **({"request_id": body.request_id} if body.request_id else {}),
    )
    try:
        routed = await gateway.infer(request, timeout=body.timeout_s)
    except NoRouteError as exc:
        code = (
            status.HTTP_404_NOT_FOUND
            if "serves model" in exc.message
            else status.HTTP_503_SERVICE_UNAVAILABLE
        )
        raise HTTPException(code, exc.message, headers=_retry_after(exc)) from exc
    except (DeadlineUnreachable, RequestTimeout) as exc:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, exc.message) from exc
    except RemoteError as exc:
        code = _REMOTE_STATUS.get(exc.code, status.HTTP_502_BAD_GATEWAY)
        headers = _retry_after(exc) if code == status.HTTP_429_TOO_MANY_REQUESTS else None
        raise HTTPException(code, exc.remote_message, headers=headers) from exc
    except EdgefedError as exc:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY, exc.message, headers=_retry_after(exc)
        ) from exc
    reply = routed.reply.message
    return InferOut(
        request_id=reply.request_id,
        model=reply.model,
        version=reply.version,
        served_by=reply.served_by,
        target=routed.target.id,
        attempts=list(routed.attempts),
        hedged=routed.hedged,
        elapsed_ms=round(routed.elapsed_s * 1000, 3),
        outputs=reply.outputs,
        timings_ms=dict(reply.timings_ms),
    )


@router.get("/infer/targets", responses=AUTH_ERRORS)
def infer_targets(services: ServicesDep, _who: ReaderDep) -> list[dict[str, object]]:
    """The gateway's routing targets now: health, in-flight, queue depth, latency estimate."""
    if services.gateway is None:
        return []
    return [_snapshot(t) for t in services.gateway.targets()]


def _snapshot(t: TargetSnapshot) -> dict[str, object]:
    return {
        "id": t.id,
        "kind": t.kind,
        "health": t.health,
        "outstanding": t.outstanding,
        "queue_depth": t.queue_depth,
        "estimate_ms": t.estimate_ms,
        "sent": t.sent,
        "succeeded": t.succeeded,
        "failed": t.failed,
    }
