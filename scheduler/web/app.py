"""The console's ASGI app: :func:`create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.bounds import MAX_REQUEST_BYTES
from scheduler.web.api_v1 import router as api_router
from scheduler.web.console import Console, error_status
from scheduler.web.pages import error_page
from scheduler.web.pages import router as pages_router
from scheduler.web.security import Guard, SecurityHeaders
from shared.settings import AppSettings

STATIC = Path(__file__).parent / "static"


def create_app(settings: AppSettings) -> FastAPI:
    """The console and ``/api/v1`` for the fleet ``settings`` names (``settings.redis`` must
    name a server: ``chronoq web`` resolves the embedded one first). Connects to nothing until
    the first request; a mounted app needs no lifespan of its own."""
    console = Console(settings)
    guard = Guard(settings.web)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Served on its own. Mounted, the host's lifespan should await app.state.console.aclose().
        yield
        await console.aclose()

    app = FastAPI(
        lifespan=lifespan,
        title="chronoq",
        summary="Jobs, fires, workers and replicas of a chronoq fleet",
        version="1",
        # Served by the API's router and the pages (behind authentication, no script): FastAPI's
        # own are open to anyone and its docs load swagger-ui from a CDN.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.console = console
    app.add_middleware(BodyLimit, max_bytes=MAX_REQUEST_BYTES)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        # Liveness for probes and healthchecks: no authentication, no Redis, nothing revealed
        # (Redis down is a 503 on the pages, which should stay reachable to say so).
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        # Pages name /static/favicon.svg; a browser asks here for an answer that is no page.
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.include_router(api_router(console, guard))
    app.include_router(pages_router(console, guard))

    def is_api(request: Request) -> bool:
        return request.url.path.removeprefix(request.scope.get("root_path", "")).startswith("/api/")

    def error(
        request: Request, status_code: int, lines: list[str], headers: Mapping[str, str] | None = None
    ) -> Response:
        """Every error of every path in one shape: ``{"error", "problems"}`` under /api/, the
        console's error page elsewhere (the framework's own 404, 405, 413 and 422 included)."""
        if is_api(request):
            return JSONResponse({"error": lines[0], "problems": lines}, status_code, headers=headers)
        return error_page(request, status_code, lines, headers)

    @app.exception_handler(HTTPException)  # Starlette's: the router's 404 and 405 are raised as it
    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code == 413:
            detail = f"the request body is over {MAX_REQUEST_BYTES} bytes; nothing changed"
        elif exc.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            path = request.url.path
            detail = f"{detail.lower()}: {request.method} {path if len(path) <= 300 else path[:300] + '...'}"
        return error(request, exc.status_code, [detail], exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error(request, 422, lines or ["invalid request"])

    @app.middleware("http")
    async def chronoq_errors(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Redis down, an unknown job, a refused change: a status and one line, not a traceback.
        try:
            response = await call_next(request)
            if request.method not in ("GET", "HEAD", "OPTIONS"):  # a change: live regions read afresh
                console.changed()
            return response
        except Exception as exc:
            found = error_status(exc)
            if found is None:  # a bug: logged with its traceback, one line to the client
                logger.opt(exception=exc).error("console: {} {} failed", request.method, request.url.path)
                found = (500, [f"internal error ({type(exc).__name__}); see the console's log"])
            status_code, lines = found
            return error(request, status_code, lines)

    app.add_middleware(SecurityHeaders)  # the outermost: on every answer, errors included
    return app


class BodyLimit:
    """Refuse a request body over ``max_bytes`` as it is read (or at once when its
    Content-Length says so): an HTTPException 413 raised where the route reads it, so the
    app's handler answers it in the one error shape. (Starlette's own limit answers plain
    text.) A route that reads no body is not refused."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        total = 0

        async def limited() -> Message:
            nonlocal total
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise HTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise HTTPException(413)
            return message

        await self.app(scope, limited, send)
