"""The relay's OpenAPI document, served at /openapi.json.

Request schemas come from the same pydantic models that validate requests, so the document
cannot drift from what the relay accepts. Response schemas describe Chamelaion's objects as the
relay passes them on: extra fields are allowed and timestamps are plain strings, because the
relay forwards what Chamelaion sends rather than rewriting it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from relay.api.models import MAX_ID_LENGTH, MAX_REFERENCE_ID_LENGTH, GenerateRequest
from relay.delivery.netpolicy import MAX_URL_LENGTH

_REF = "#/components/schemas/{model}"


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


_ERRORS_ANY = {"401": _error("Missing or wrong API key"), "500": _error("Unexpected relay error")}
_UPSTREAM_ERRORS = {
    "429": _error("Chamelaion's rate limit; see Retry-After"),
    "502": _error("Chamelaion failed, was unreachable, or refused the relay's own key"),
    "504": _error("Chamelaion did not answer in time"),
}

_LIPSYNC_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["id", "created_at", "status"],
    "properties": {
        "id": {"type": "string"},
        "created_at": {"type": "string"},
        "status": {"type": "string", "description": "queued, processing, completed, failed, ..."},
        "error_message": {"type": "string"},
        "finished_at": {"type": "string"},
        "output_url": {"type": "string"},
        "reference_id": {"type": "string"},
        "started_at": {"type": "string"},
    },
}

_MEDIA_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["video", "audio"],
    "properties": {
        "video": {"type": "string", "format": "binary"},
        "audio": {"type": "string", "format": "binary"},
        "disable_active_speaker_detection": {"type": "string", "enum": ["true", "false"]},
        "reference_id": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE_ID_LENGTH},
        "callback_url": {
            "type": "string",
            "maxLength": MAX_URL_LENGTH,
            "description": "http(s) URL",
        },
    },
    "additionalProperties": False,
}


def _operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


@cache
def openapi_document() -> dict[str, Any]:
    generate_schema = GenerateRequest.model_json_schema(ref_template=_REF)
    components = generate_schema.pop("$defs", {})
    components.update(
        {
            "GenerateRequest": generate_schema,
            "LipsyncGenerate": {
                "type": "object",
                "required": ["status", "request_id"],
                "properties": {"status": {"const": "success"}, "request_id": {"type": "string"}},
            },
            "LipsyncRequest": _LIPSYNC_REQUEST,
            "LipsyncRequestList": {
                "type": "object",
                "required": ["data", "pagination"],
                "properties": {
                    "data": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/LipsyncRequest"},
                    },
                    "pagination": {
                        "type": "object",
                        "properties": {
                            "limit": {"type": "integer"},
                            "offset": {"type": "integer"},
                            "total": {"type": "integer"},
                        },
                    },
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "details": {"type": "array"}},
            },
            "Status": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string"}},
            },
        }
    )
    submitted = {
        "200": {
            "description": "Accepted by Chamelaion and tracked",
            "content": _json("LipsyncGenerate"),
        },
        "400": _error("Malformed body, or refused by Chamelaion as sent"),
        "408": _error("The body did not arrive in time"),
        "413": _error("Body over the configured limit"),
        "422": _error("Invalid field (named in the message and details)"),
        "503": _error("The relay's job store is unavailable; nothing was created"),
        **_UPSTREAM_ERRORS,
        **_ERRORS_ANY,
    }
    lipsync_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "Request id or reference_id",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
    }
    list_params = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        {
            "name": "offset",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "maximum": 10**9},
        },
        {
            "name": "reference_id",
            "in": "query",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE_ID_LENGTH},
        },
    ]
    secured: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "chamelaion-relay", "version": "0.1.0"},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/api/v1/lipsync/generate": {
                "post": _operation(
                    "Start a lip-sync job from URLs, with an optional callback",
                    submitted,
                    security=secured,
                    requestBody={"required": True, "content": _json("GenerateRequest")},
                )
            },
            "/api/v1/lipsync/generate-with-media": {
                "post": _operation(
                    "Start a lip-sync job from uploaded files, streamed through to Chamelaion",
                    {
                        **submitted,
                        "400": _error("Missing, extra, malformed or ambiguous parts"),
                        "408": _error("The upload stalled or arrived below the minimum rate"),
                        "415": _error("Not multipart/form-data"),
                        "429": _error(
                            "Too many uploads in progress (for this key or in all), or "
                            "Chamelaion's rate limit; see Retry-After"
                        ),
                    },
                    security=secured,
                    requestBody={
                        "required": True,
                        "content": {"multipart/form-data": {"schema": _MEDIA_FORM}},
                    },
                )
            },
            "/api/v1/lipsync/requests/{id}": {
                "get": _operation(
                    "A request's status: the relay's own state when tracked, else Chamelaion's",
                    {
                        "200": {"description": "The request", "content": _json("LipsyncRequest")},
                        "400": _error("Id too long, a dot segment, or with a slash"),
                        "404": _error("lipsync request not found"),
                        **_UPSTREAM_ERRORS,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[lipsync_id],
                )
            },
            "/api/v1/lipsync/requests": {
                "get": _operation(
                    "List requests (proxied to Chamelaion)",
                    {
                        "200": {"description": "A page", "content": _json("LipsyncRequestList")},
                        "400": _error("Bad limit, offset or reference_id"),
                        **_UPSTREAM_ERRORS,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=list_params,
                )
            },
            "/healthz": {
                "get": _operation(
                    "Process alive", {"200": {"description": "ok", "content": _json("Status")}}
                )
            },
            "/readyz": {
                "get": _operation(
                    "Redis reachable",
                    {
                        "200": {"description": "ready", "content": _json("Status")},
                        "503": {"description": "not ready", "content": _json("Status")},
                    },
                )
            },
            "/metrics": {
                "get": _operation(
                    "Prometheus metrics",
                    {
                        "200": {
                            "description": "exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _error("No or a wrong API key, when RELAY_METRICS_AUTH is on"),
                    },
                )
            },
            "/openapi.json": {
                "get": _operation(
                    "This document",
                    {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                )
            },
        },
    }
