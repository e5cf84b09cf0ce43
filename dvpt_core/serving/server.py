"""The multi-adapter HTTP server (``dvpt serve``): one frozen backbone, many adapters, the
adapter chosen per request, a newly promoted champion swapped in without a restart.

Endpoints::

    GET  /health                 the process answers (liveness)
    GET  /ready                  200 once every configured adapter is live, else 503 (readiness)
    GET  /adapters               the live adapters: source, version, runtime, fingerprint, swap time
    PUT  /adapters/{name}        {"uri": "models:/NAME@champion", "runtime": "torch"}: load or swap
    POST /predict/{name}         {"images": ["<base64 image file>", ...]} (or uint8 H x W x 3 lists)
                                 -> {"adapter", "version", "predictions": [the task's answer per image: {"label", "index",
                                 "probabilities"}, or {"mask" (base64 PNG), "height", "width", "classes", "fractions"}]}

With ``watch_s`` set, a background thread polls the registry and swaps in the version an
adapter's alias points at when it moves (``AdapterPool.refresh``). Prediction endpoints are
plain functions, which FastAPI runs in its thread pool: inference never blocks the event loop,
and a swap (an assignment) never waits for requests in flight.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from dvpt_core.peft.adapter import AdapterError
from dvpt_core.registry.versions import RegistryError
from dvpt_core.serving.inputs import InputError
from dvpt_core.serving.pool import RUNTIMES, AdapterPool

log = logging.getLogger(__name__)
MAX_IMAGES = 64


class AdapterSpec(BaseModel):
    uri: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder")
    runtime: str = Field(default="torch", description=f"one of {RUNTIMES}")


class PredictRequest(BaseModel):
    images: list[Any] = Field(min_length=1, max_length=MAX_IMAGES,
                              description="base64 image files, or uint8 H x W [x 3] arrays as nested lists")


def create_app(pool: AdapterPool, adapters: dict[str, AdapterSpec], watch_s: float | None = None) -> FastAPI:
    """The app serving ``pool``; ``adapters`` (name -> source) are loaded at start-up, in the
    background so that /health answers at once and /ready says when they are live."""
    state: dict[str, Any] = {"errors": {}}
    stop = threading.Event()

    def load_all() -> None:
        for name, spec in adapters.items():
            try:
                pool.load(name, spec.uri, spec.runtime)
            except Exception as err:  # noqa: BLE001  (reported by /ready, the server keeps running)
                state["errors"][name] = f"{type(err).__name__}: {err}"
                log.error("adapter %s from %s did not load: %s", name, spec.uri, err)

    def watch() -> None:
        while not stop.wait(watch_s):
            pool.refresh()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threads = [threading.Thread(target=load_all, name="dvpt-load", daemon=True)]
        if watch_s:
            threads.append(threading.Thread(target=watch, name="dvpt-watch", daemon=True))
        for thread in threads:
            thread.start()
        yield
        stop.set()

    app = FastAPI(title="DVPT adapters", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        live = {a.name for a in pool.live()}
        missing = sorted(set(adapters) - live)
        body = {"ready": not missing, "live": sorted(live), "missing": missing, "errors": state["errors"]}
        return JSONResponse(body, status_code=200 if not missing else 503)

    @app.get("/adapters")
    def list_adapters() -> dict:
        info = pool.info
        return {"backbone": None if info is None else {"name": info.name, "fingerprint": info.fingerprint},
                "adapters": [a.describe() for a in pool.live()]}

    @app.put("/adapters/{name}")
    def put_adapter(name: str, spec: AdapterSpec) -> dict:
        try:
            return pool.load(name, spec.uri, spec.runtime).describe()
        except (AdapterError, RegistryError, ValueError, FileNotFoundError) as err:
            raise HTTPException(status_code=409, detail=f"adapter {name} not swapped: {err}") from None

    @app.post("/predict/{name}")
    def predict(name: str, request: PredictRequest) -> dict:
        try:
            adapter = pool.get(name)
        except KeyError as err:
            raise HTTPException(status_code=404, detail=str(err.args[0])) from None
        try:
            predictions = adapter.predictor.predict(request.images)
        except InputError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        return {"adapter": name, "version": adapter.source.version, "predictions": predictions}

    return app
