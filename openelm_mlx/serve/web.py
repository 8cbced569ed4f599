"""The chat page: the static files under serve/web/ served at `/`, each with a Content-Security-Policy that
allows only the page's own scripts and styles and connections back to this server."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# No inline script or style, nothing from elsewhere: model text that slipped into the DOM as HTML still could
# not run, load or send anything.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# URL path -> (file under serve/web/, media type). A fixed table: no path from the request reaches the disk.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def web_routes() -> list[Route]:
    """GET routes for the page and its assets (read once, here, from the installed package)."""
    folder = resources.files(__package__) / "web"
    routes = []
    for path, (name, media_type) in FILES.items():
        body = (folder / name).read_bytes()

        async def endpoint(request: Request, body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        routes.append(Route(path, endpoint, methods=["GET", "HEAD"]))
    return routes


__all__ = ["CSP", "web_routes"]
