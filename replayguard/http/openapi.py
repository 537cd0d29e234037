"""The OpenAPI 3.1 document, built from the route table so it cannot drift from it."""

from __future__ import annotations

import re
from typing import Any

from .. import __version__
from .common import Route

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}},
    }},
}
_PARAM = re.compile(r"\{([^}]+)\}")


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _operation(route: Route) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "Success"}
    if route.response_schema is not None:
        success["content"] = {"application/json": {"schema": route.response_schema}}
    responses: dict[str, Any] = {str(route.status): success}
    path_params = _PARAM.findall(route.path)
    if route.request_schema is not None or path_params or route.query:
        responses["400"] = _error("Invalid request (body, identifier in the path, or query)")
    if path_params:
        responses["404"] = _error("No such resource")
    if route.request_schema is not None:
        responses.update({"408": _error("Body not received in time"), "413": _error("Body over 64 KiB"),
                          "415": _error("Not application/json")})
    for status, description in route.errors:
        responses[str(status)] = _error(description)
    if route.roles is not None:
        responses.update({"401": _error("Missing or unknown token"),
                          "403": _error("Wrong role, or a token bound to other VMs")})
        responses["503"] = _error("The ledger is unavailable (fail closed)")
    for status, response in route.responses:
        responses[str(status)] = response
    op: dict[str, Any] = {
        "summary": route.summary, "tags": [route.audience],
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower()).strip('_')}",
        "responses": responses,
        "x-roles": list(route.roles) if route.roles is not None else [],
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1,
                                                                      "maxLength": 256}}
              for n in _PARAM.findall(route.path)]
    params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in route.query]
    if params:
        op["parameters"] = params
    if route.request_schema is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": route.request_schema}}}
    if route.roles is not None:
        op["security"] = [{"bearer": []}]
    return op


def build(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "replayguard", "version": __version__,
                 "description": "Host-side replay ledger that defeats snapshot-replay attacks on VMs."},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
