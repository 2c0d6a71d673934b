"""The HTTP API: JSON endpoints and NDJSON progress streams, served inside the service.

`ApiServer` (server.py) is the component the service starts; `routes.py` holds
the endpoints; they only call the core's public API on `App`.
"""

from matrixjobs.api.server import ApiServer, build_asgi_app

__all__ = ["ApiServer", "build_asgi_app"]
