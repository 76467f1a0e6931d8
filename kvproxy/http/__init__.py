"""The HTTP edge in front of the routes: access control, CORS, body limits, request ids, connection
hygiene and the drain cutoff (ASGI middleware and uvicorn's protocol, no serving logic)."""
