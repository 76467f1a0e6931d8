"""The live quality page: one self-contained HTML file (inline CSS and JS, hand-drawn SVG charts)
that polls ``GET /kvproxy/v1/status``. ``GET /`` redirects to it. Kept out of the OpenAPI schema.

The page fetches nothing from other hosts; its Content-Security-Policy says so to the browser too
(scripts and styles inline only, requests to this origin only), so it works offline.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(include_in_schema=False)

PAGE_PATH = "/ui"
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


@cache
def page_html() -> bytes:
    """The page, read once from the package data (kvproxy/static/ui.html)."""
    return resources.files("kvproxy").joinpath("static/ui.html").read_bytes()


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(PAGE_PATH, status_code=307)


@router.get(PAGE_PATH)
async def page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
