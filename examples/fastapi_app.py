"""A FastAPI app that sends Celery tasks and awaits their results without parking a thread.

Run it (PostgreSQL results, Redis broker; any ``sql+`` URL works)::

    export EXAMPLE_BACKEND=postgresql+psycopg://postgres@127.0.0.1/test
    export EXAMPLE_BROKER=redis://127.0.0.1:6379/0
    celery -A examples.fastapi_app worker --loglevel=INFO &
    uvicorn examples.fastapi_app:api

    curl 'http://127.0.0.1:8000/add?x=2&y=3'         # {"task_id": "...", "result": 5}
    curl -N 'http://127.0.0.1:8000/doubles?n=5'      # one JSON line per result, as each ends
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

from celery import Celery, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import StreamingResponse

from celery_sqlresults import aget, as_completed

celery_app = Celery(
    "fastapi_example",
    broker=os.environ.get("EXAMPLE_BROKER", "redis://127.0.0.1:6379/0"),
    backend="sql+" + os.environ.get("EXAMPLE_BACKEND", "sqlite:///example-results.db"),
)


@celery_app.task(name="example.add")
def add(x: int, y: int) -> int:
    return x + y


def create_api(app: Celery = celery_app, add_task: str = "example.add") -> FastAPI:
    """The routes, for ``app`` and the name of its ``add`` task (the tests bring their own)."""
    api = FastAPI(title="celery-sqlresults asyncio example")

    @api.get("/add")
    async def add_route(x: int, y: int, timeout: float = 10.0) -> dict[str, object]:
        """Send ``add(x, y)`` and answer with its result; 504 if it takes over ``timeout``."""
        result = app.send_task(add_task, (x, y))
        try:
            value = await aget(result, timeout=timeout)
        except CeleryTimeoutError:
            raise HTTPException(504, f"task {result.id} not done in {timeout}s") from None
        return {"task_id": result.id, "result": value}

    @api.get("/doubles")
    async def doubles(n: int = Query(5, ge=1, le=1000), timeout: float = 30.0) -> StreamingResponse:
        """Send ``add(i, i)`` for ``i`` in ``0…n-1`` as a group and stream each result as
        a line of JSON (NDJSON) the moment it is ready, in the order they finish."""
        result = group(app.signature(add_task, (i, i)) for i in range(n)).apply_async()

        async def lines() -> AsyncIterator[str]:
            try:
                async for member, value in as_completed(result, timeout, propagate=False):
                    line: dict[str, object] = {"task_id": member.id, "state": member.state}
                    if isinstance(value, BaseException):
                        line["error"] = f"{type(value).__name__}: {value}"
                    else:
                        line["result"] = value
                    yield json.dumps(line) + "\n"
            except CeleryTimeoutError:
                yield json.dumps({"error": f"timed out after {timeout}s"}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return api


api = create_api()
