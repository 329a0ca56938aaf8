"""The relay's OpenAPI document, served at /openapi.json.

Request schemas come from the same pydantic models that validate requests, so the document
cannot drift from what the relay accepts. Response schemas describe Chamelaion's objects as the
relay passes them on: extra fields are allowed and timestamps are plain strings, because the
relay forwards what Chamelaion sends rather than rewriting it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from relay.api.deliveries import MAX_PAGE, RecoverRequest
from relay.api.feed import MAX_LIMIT as FEED_LIMIT
from relay.api.idempotency import MAX_KEY_LENGTH
from relay.api.job_events import EVENT_STREAM
from relay.api.models import (
    EVENT_TYPES,
    MAX_ID_LENGTH,
    MAX_METADATA_BYTES,
    MAX_REFERENCE_ID_LENGTH,
    GenerateRequest,
)
from relay.api.responses import MAX_DETAILS
from relay.api.test_events import TestEventRequest
from relay.api.watches import WatchRequest
from relay.callers.model import NAME_PATTERN
from relay.delivery.failure import FAILURE_CLASSES
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
        # As the official SDK flattens a JSON body's lists and objects into form fields.
        "callback_events[]": {
            "type": "array",
            "items": {"type": "string", "enum": list(EVENT_TYPES)},
            "minItems": 1,
            "maxItems": len(EVENT_TYPES),
            "uniqueItems": True,
            "description": "one part per event (`callback_events` is taken too)",
        },
        "callback_metadata": {
            "type": "string",
            "description": f"a JSON object of at most {MAX_METADATA_BYTES} bytes, echoed in "
            "every callback with its types; or send callback_metadata[key] fields instead",
        },
    },
    "patternProperties": {
        r"^callback_metadata(\[[^\[\]]+\])+(\[\])?$": {
            "type": "string",
            "description": "one text value of the metadata (`[key][]`: an item of a list)",
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
            "TestEventRequest": TestEventRequest.model_json_schema(ref_template=_REF),
            "WatchRequest": WatchRequest.model_json_schema(ref_template=_REF),
            "TestEventResult": {
                "type": "object",
                "required": ["webhook_id", "delivered", "status", "error", "duration_ms"],
                "properties": {
                    "webhook_id": {"type": "string"},
                    "delivered": {"type": "boolean"},
                    "status": {"type": ["integer", "null"]},
                    "error": {
                        "type": ["string", "null"],
                        "enum": [*FAILURE_CLASSES, None],
                    },
                    "duration_ms": {"type": "number"},
                },
            },
            "RecoverRequest": RecoverRequest.model_json_schema(ref_template=_REF),
            "JobEvent": {
                "type": "object",
                "required": ["sequence", "request_id", "at", "type"],
                "properties": {
                    "sequence": {"type": "integer", "minimum": 1},
                    "request_id": {"type": "string"},
                    "at": {"type": "string"},
                    "type": {"type": "string", "enum": ["status", "delivery"]},
                    "last": {"type": "boolean"},
                    "status": {"type": "string"},
                    "data": {"$ref": "#/components/schemas/LipsyncRequest"},
                    "event": {"type": "string"},
                    "attempt": {"type": "integer"},
                    "outcome": {
                        "type": "string",
                        "enum": ["delivered", "failing", "failed", "gone"],
                    },
                    "result": {"type": "string"},
                },
            },
            "EventFeed": {
                "type": "object",
                "required": ["events", "next_cursor"],
                "properties": {
                    "events": {"type": "array", "items": {"$ref": "#/components/schemas/JobEvent"}},
                    "next_cursor": {"type": "string"},
                },
            },
            "Recovered": {
                "type": "object",
                "required": ["requeued", "already_pending", "more", "since"],
                "properties": {
                    "requeued": {"type": "integer"},
                    "already_pending": {"type": "integer"},
                    "more": {"type": "boolean"},
                    "since": {"type": "string"},
                },
            },
            "Redelivered": {
                "type": "object",
                "required": ["request_id", "webhook_id", "attempt", "requeued"],
                "properties": {
                    "request_id": {"type": "string"},
                    "webhook_id": {"type": ["string", "null"]},
                    "attempt": {"type": "integer"},
                    "requeued": {"const": True},
                },
            },
            "JobDeliveries": {
                "type": "object",
                "required": ["request_id", "deliveries"],
                "properties": {
                    "request_id": {"type": "string"},
                    "callback": {"type": "boolean"},
                    "status": {"type": ["string", "null"]},
                    "deliveries": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "delivery_id": {"type": "string"},
                                "event": {"type": ["string", "null"]},
                                "webhook_id": {"type": ["string", "null"]},
                                "state": {"type": ["string", "null"]},
                                "attempts": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    },
                    "audit": {
                        "type": "array",
                        "description": "Who steered the job, newest first (at most 50)",
                        "items": {
                            "type": "object",
                            "required": ["at", "caller", "action"],
                            "properties": {
                                "at": {"type": "string"},
                                "caller": {"type": "string"},
                                "action": {"enum": ["redeliver", "recover", "watch"]},
                                "detail": {"type": "string"},
                            },
                        },
                    },
                },
            },
            "DeliveryPage": {
                "type": "object",
                "required": ["data", "next_cursor"],
                "properties": {
                    "data": {"type": "array", "items": {"type": "object"}},
                    "next_cursor": {"type": ["string", "null"]},
                },
            },
            "Watch": {
                "type": "object",
                "required": ["request_id", "watching", "created"],
                "properties": {
                    "request_id": {"type": "string"},
                    "watching": {"const": True},
                    "created": {"type": "boolean"},
                },
            },
            "WebhookKeys": {
                "type": "object",
                "required": ["keys"],
                "properties": {
                    "keys": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["key_id", "algorithm", "public_key", "created"],
                            "properties": {
                                "key_id": {"type": "string"},
                                "algorithm": {"const": "ed25519"},
                                "public_key": {"type": "string", "pattern": "^whpk_"},
                                "created": {"type": ["string", "null"]},
                                "caller": {
                                    "type": ["string", "null"],
                                    "description": "The caller whose own key it is; null: "
                                    "the global key, for every caller without its own",
                                },
                            },
                        },
                    }
                },
            },
            "LipsyncGenerate": {
                "type": "object",
                "required": ["status", "request_id"],
                "properties": {
                    "status": {"const": "success"},
                    "request_id": {"type": "string"},
                    "request": {"$ref": "#/components/schemas/LipsyncRequest"},
                },
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
                "properties": {
                    "error": {"type": "string"},
                    "details": {"type": "array", "maxItems": MAX_DETAILS},
                    "details_omitted": {
                        "type": "integer",
                        "description": "How many details were left out of `details`",
                    },
                },
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
            "description": (
                "Accepted by Chamelaion and tracked; with Prefer: wait, also the job as "
                "`request` once the relay has read it"
            ),
            "content": _json("LipsyncGenerate"),
        },
        "400": _error("Malformed body or Prefer: wait, or refused by Chamelaion as sent"),
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
    caller_filter = {
        "name": "caller",
        "in": "query",
        "description": "An admin's caller filter: only that caller's jobs",
        "schema": {"type": "string", "pattern": NAME_PATTERN},
    }
    not_yours = _error("A caller named another caller (only an admin may)")
    secured: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Replays the first answer for the same key and body (24 h, per caller)",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
    }
    idempotency_errors = {
        "409": _error("A request with this Idempotency-Key is still in progress"),
        "422": _error("Invalid field, or Idempotency-Key reused with another body"),
        "429": _error(
            "Chamelaion's rate limit, or this caller holds RELAY_IDEMPOTENCY_MAX_KEYS "
            "Idempotency-Keys already; see Retry-After"
        ),
    }
    prefer = {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": (
            "wait=N (RFC 7240): answer when the job ends, or after N seconds (at most "
            "RELAY_MAX_WAIT) with the job as it stands; Preference-Applied says so"
        ),
        # Any text: preferences the relay does not know are ignored (RFC 7240).
        "schema": {"type": "string"},
    }
    applied = {
        "Preference-Applied": {
            "description": "wait=N when the answer waited (up to N seconds) for the job's end",
            "schema": {"type": "string"},
        }
    }
    relay_body = {
        "413": _error("Body over the configured limit"),
        "422": _error("Invalid field (named in the message and details)"),
        "400": _error("Malformed body"),
    }
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
                    {**submitted, **idempotency_errors},
                    security=secured,
                    parameters=[idempotency_key, prefer],
                    requestBody={"required": True, "content": _json("GenerateRequest")},
                )
            },
            "/api/v1/lipsync/generate-with-media": {
                "post": _operation(
                    "Start a lip-sync job from uploaded files, streamed through to Chamelaion",
                    {
                        **submitted,
                        **idempotency_errors,
                        "400": _error("Missing, extra, malformed or ambiguous parts"),
                        "408": _error("The upload stalled or arrived below the minimum rate"),
                        "415": _error("Not multipart/form-data"),
                        "429": _error(
                            "Too many uploads in progress (for this caller or in all), "
                            "Chamelaion's rate limit, or this caller holds "
                            "RELAY_IDEMPOTENCY_MAX_KEYS Idempotency-Keys already; see Retry-After"
                        ),
                    },
                    security=secured,
                    parameters=[idempotency_key, prefer],
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
                        "200": {
                            "description": "The request",
                            "content": _json("LipsyncRequest"),
                            "headers": applied,
                        },
                        "400": _error("Id too long, a dot segment, or with a slash; bad Prefer"),
                        "404": _error("Not found: unknown, or another caller's job"),
                        "503": _error("The relay's job store is unavailable"),
                        **_UPSTREAM_ERRORS,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[lipsync_id, prefer],
                )
            },
            "/api/v1/lipsync/requests": {
                "get": _operation(
                    "List the caller's requests (an admin: Chamelaion's whole list, proxied)",
                    {
                        "200": {"description": "A page", "content": _json("LipsyncRequestList")},
                        "400": _error("Bad limit, offset, reference_id or caller"),
                        "403": not_yours,
                        "503": _error("The relay's job store is unavailable"),
                        **_UPSTREAM_ERRORS,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[*list_params, caller_filter],
                )
            },
            "/api/relay/v1/webhook-keys": {
                "get": _operation(
                    "The ed25519 public keys that verify v1a signatures (no key needed)",
                    {"200": {"description": "The keys", "content": _json("WebhookKeys")}},
                )
            },
            "/api/relay/v1/test-events": {
                "post": _operation(
                    "Send a signed relay.test event to a URL now, and say what it answered",
                    {
                        "200": {
                            "description": "What happened",
                            "content": _json("TestEventResult"),
                        },
                        **relay_body,
                        "503": _error("This API process has no signing secrets"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    requestBody={"required": True, "content": _json("TestEventRequest")},
                )
            },
            "/api/relay/v1/watches": {
                "post": _operation(
                    "Call back for a job submitted to Chamelaion directly",
                    {
                        "200": {"description": "Already watched", "content": _json("Watch")},
                        "201": {"description": "Now watched", "content": _json("Watch")},
                        "403": _error("A caller named another caller (only an admin may)"),
                        "404": _error(
                            "Not found: unknown, another caller's job, or (for a caller that is "
                            "not an admin) not one of its own"
                        ),
                        "409": _error(
                            "Already tracked with a different callback_url, or a submission "
                            "with its reference_id is being settled"
                        ),
                        "503": _error("The relay's job store is unavailable"),
                        **relay_body,
                        **_UPSTREAM_ERRORS,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    requestBody={"required": True, "content": _json("WatchRequest")},
                )
            },
            "/api/relay/v1/jobs/{id}/deliveries": {
                "get": _operation(
                    "A job's deliveries, each with its attempt log",
                    {
                        "200": {"description": "The deliveries", "content": _json("JobDeliveries")},
                        "400": _error("Bad id"),
                        "404": _error("No tracked job of the caller's has this id or reference_id"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[lipsync_id],
                )
            },
            "/api/relay/v1/jobs/{id}/events": {
                "get": _operation(
                    "The job's events as server-sent events (id: sequence), until its last",
                    {
                        "200": {
                            "description": "An event stream",
                            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
                        },
                        "400": _error("Bad id or Last-Event-ID"),
                        "404": _error("No tracked job has this id or reference_id"),
                        "406": _error("The client does not accept text/event-stream"),
                        "503": _error("The relay's job store is unavailable"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[
                        lipsync_id,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "description": "Resume after this event (its sequence number)",
                            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        },
                    ],
                )
            },
            "/api/relay/v1/events": {
                "get": _operation(
                    "The caller's job events after a cursor, oldest first (long-polled)",
                    {
                        "200": {"description": "A page", "content": _json("EventFeed")},
                        "400": _error("Bad cursor, wait or limit"),
                        "503": _error("The relay's job store is unavailable"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[
                        {
                            "name": "after",
                            "in": "query",
                            "description": "The last page's next_cursor; 0 (default): the start",
                            "schema": {
                                "type": "string",
                                "pattern": "^(0|[0-9]{1,15}-[0-9]{1,19})$",
                            },
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "description": "Seconds to wait for an event (RELAY_MAX_WAIT at most)",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 3600},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": FEED_LIMIT},
                        },
                    ],
                )
            },
            "/api/relay/v1/jobs/{id}/redeliver": {
                "post": _operation(
                    "Send the job's final event again now (same webhook-id, fresh schedule)",
                    {
                        "202": {"description": "Requeued", "content": _json("Redelivered")},
                        "400": _error("Bad id"),
                        "404": _error("No tracked job of the caller's has this id or reference_id"),
                        "409": _error("The job has not ended, or has no callback_url"),
                        "429": _error("RELAY_REDELIVERIES_PER_MINUTE reached; see Retry-After"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[lipsync_id],
                )
            },
            "/api/relay/v1/deliveries": {
                "get": _operation(
                    "Deliveries in a state, newest first",
                    {
                        "200": {"description": "A page", "content": _json("DeliveryPage")},
                        "400": _error("Bad state, time, cursor, limit or caller"),
                        "403": not_yours,
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    parameters=[
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["pending", "failing", "delivered", "gone", "failed"],
                            },
                        },
                        {"name": "since", "in": "query", "schema": {"type": "string"}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        },
                        caller_filter,
                    ],
                )
            },
            "/api/relay/v1/deliveries/recover": {
                "post": _operation(
                    "Redeliver every delivery that failed since a time (capped)",
                    {
                        "200": {"description": "What was requeued", "content": _json("Recovered")},
                        "403": _error(
                            "A caller named another caller, or asked for states gone (admins only)"
                        ),
                        **relay_body,
                        "429": _error("RELAY_RECOVERS_PER_MINUTE reached; see Retry-After"),
                        **_ERRORS_ANY,
                    },
                    security=secured,
                    requestBody={"required": True, "content": _json("RecoverRequest")},
                )
            },
            "/healthz": {
                "get": _operation(
                    "Process alive", {"200": {"description": "ok", "content": _json("Status")}}
                )
            },
            "/readyz": {
                "get": _operation(
                    "Redis reachable, and no unacknowledged loss of its data",
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
