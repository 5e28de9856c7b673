"""``DirectRoute``: the route class of ``POST /predict`` and ``/topk``, the request hot path.

FastAPI documents such a route from its declared signature as usual (query parameters,
``ApiKeyDep``, ``response_model``), but calls it without its per-request machinery: no
dependency solving, no response validation. The handler checks the inference key, validates
the query parameters with FastAPI's own function (the same values, the same 422 errors), and
calls the endpoint with the request and those values. The endpoint returns a ``Response``.

Why: in a FastAPI app that hands a 4.2 ms job to a thread, an ``APIRoute`` with one query
parameter answered a one-connection client in 5.06-5.28 ms, a Starlette route in the same app
in 4.71-4.93 ms (3 alternating rounds of 500 requests); in the service (ResNet-20, C=1) the
p50 went 4.8 -> 4.5 ms and the CPU per request 4.9 -> 4.5 ms (``bench compare``, 8 rounds).

Only what the handler runs may be declared: a dependency, header, cookie, path or body
parameter it does not know is refused when the route is built, not skipped at run time. Add
it here, or use a plain ``APIRoute``. Include the router without include-level dependencies
(``create_app`` does): those are not seen here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from .deps import authorize_inference, require_api_key

RUNS_ITSELF = {require_api_key: authorize_inference}  # declared dependency -> what runs it


class DirectRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # called by APIRoute.__init__, once the dependant is built
        checks, query_fields, endpoint = self._checks(), self.dependant.query_params, self.endpoint

        async def handler(request: Request) -> Response:
            for check in checks:  # first, as FastAPI solves dependencies before parameters
                await check(request)
            values, errors = request_params_to_args(query_fields, request.query_params)
            if errors:
                raise RequestValidationError(errors)
            return await endpoint(request, **values)

        return handler

    def _checks(self) -> list[Callable[[Request], Coroutine[Any, Any, None]]]:
        dependant = self.dependant
        unknown = [d.call for d in dependant.dependencies if d.call not in RUNS_ITSELF]
        params = (dependant.path_params, dependant.header_params, dependant.cookie_params,
                  dependant.body_params)  # fmt: skip
        if unknown or any(params):
            declared = unknown or [p.name for group in params for p in group]
            raise TypeError(
                f"DirectRoute {self.path}: only query parameters and {list(RUNS_ITSELF)} run "
                f"here; also declared: {declared}"
            )
        return [RUNS_ITSELF[d.call] for d in dependant.dependencies]
