"""The API's OpenAPI 3.1 document, served at /openapi.json and checked against the routes."""

from __future__ import annotations

from typing import Any

from tiktokguard import __version__

_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
# What the API accepts: RFC 3339 with an offset, years 1000-9999 (leap seconds are read as :59).
_TIME_IN = {"type": "string", "format": "date-time",
            "pattern": "^[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                       "(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"}

DEVICE = {
    "type": "object",
    "required": ["id", "name", "addresses", "macs", "custodian", "supervisor", "ticket",
                 "location", "expires_at", "active", "expired", "created_at", "updated_at"],
    "properties": {
        "id": _STR,
        "name": _STR,
        "addresses": {"type": "array", "items": _STR},
        "macs": {"type": "array", "items": _STR},
        "custodian": _STR,
        "supervisor": _STR,
        "ticket": _STR,
        "location": _STR,
        "expires_at": _NULL_TIME,
        "active": {"type": "boolean"},
        "expired": {"type": "boolean"},
        "created_at": _TIME,
        "updated_at": _TIME,
    },
    "additionalProperties": False,
}

# Text fields: no control characters; required ones need something besides white space.
_TEXT = {"type": "string", "maxLength": 200, "pattern": "^[^\\u0000-\\u001f]*$"}
_REQUIRED_TEXT = {**_TEXT, "minLength": 1,
                  "pattern": "^[^\\u0000-\\u001f]*[^\\s\\u0000-\\u001f][^\\u0000-\\u001f]*$"}
_ADDRESS = {"type": "string", "description": "IP address, or CIDR at most /16 (IPv4) or /48 "
                                             "(IPv6) wide with no host bits set",
            "anyOf": [{"format": "ipv4"}, {"format": "ipv6"},
                      {"pattern": "^[0-9a-fA-F.:]+/[0-9]{1,3}$"}]}
_MAC = {"type": "string", "description": "MAC address: aa:bb:cc:dd:ee:ff, aa-bb-..., "
                                         "aabb.ccdd.eeff or aabbccddeeff, any case",
        "pattern": ("^[0-9a-fA-F]{2}([:-]?[0-9a-fA-F]{2}){5}$"
                    "|^[0-9a-fA-F]{4}(\\.[0-9a-fA-F]{4}){2}$")}

_EDITABLE = {
    "name": _REQUIRED_TEXT,
    "addresses": {"type": "array", "items": _ADDRESS, "maxItems": 64},
    "macs": {"type": "array", "items": _MAC, "maxItems": 64},
    "custodian": _REQUIRED_TEXT,
    "supervisor": _REQUIRED_TEXT,
    "ticket": _REQUIRED_TEXT,
    "location": _TEXT,
    "expires_at": {"oneOf": [_TIME_IN, {"type": "null"}]},
    "active": {"type": "boolean"},
}

DEVICE_CREATE = {
    "type": "object",
    "required": ["name", "custodian", "supervisor", "ticket"],
    "properties": _EDITABLE,
    "additionalProperties": False,
    "anyOf": [{"required": ["addresses"], "properties": {"addresses": {"minItems": 1}}},
              {"required": ["macs"], "properties": {"macs": {"minItems": 1}}}],
    "description": "At least one address or MAC is needed.",
}

DEVICE_PATCH = {"type": "object", "properties": _EDITABLE, "additionalProperties": False,
                "minProperties": 1}

ERROR = {
    "type": "object",
    "required": ["error", "field"],
    "properties": {"error": _STR, "field": {"type": ["string", "null"]}},
}

AUDIT_ENTRY = {
    "type": "object",
    "required": ["seq", "at", "actor", "action", "device_id", "before", "after"],
    "properties": {
        "seq": {"type": "integer"},
        "at": _TIME,
        "actor": _STR,
        "action": {"enum": ["create", "update", "deactivate", "reactivate", "expire"]},
        "device_id": _STR,
        "before": {"oneOf": [{"$ref": "#/components/schemas/Device"}, {"type": "null"}]},
        "after": {"oneOf": [{"$ref": "#/components/schemas/Device"}, {"type": "null"}]},
        "instance": {"type": ["string", "null"], "description": "the resolver that made it"},
    },
}

INCIDENT = {
    "type": "object",
    "required": ["incident_id", "client_ip", "client_mac", "name", "rule", "qtype", "count",
                 "first_seen", "last_seen"],
    "properties": {
        "incident_id": _STR, "client_ip": _STR, "client_mac": {"type": ["string", "null"]},
        "device_name": {"type": ["string", "null"]}, "name": _STR, "rule": _STR, "qtype": _STR,
        "count": {"type": "integer", "minimum": 1}, "first_seen": _TIME, "last_seen": _TIME,
        "instance": {"type": ["string", "null"], "description": "the resolver that saw it"},
    },
}

DECISION = {
    "type": "object",
    "required": ["client", "name", "decision", "client_class", "rule", "exception", "device",
                 "explanation"],
    "properties": {
        "client": _STR, "name": _STR, "mac": {"type": ["string", "null"]},
        "decision": {"enum": ["allowed", "blocked", "allowlisted", "unmanaged", "refused"]},
        "client_class": {"enum": ["refused", "allowlisted", "managed", "unmanaged"]},
        "rule": {"type": ["string", "null"]},
        "exception": {"type": ["string", "null"],
                      "description": "the exception that allowed the name under a blocked suffix"},
        "device": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["id", "name"],
            "properties": {"id": _STR, "name": _STR}}]},
        "explanation": _STR,
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad input", 401: "No or unknown token", 403: "Wrong role", 404: "Not found",
            409: "Address or MAC on another active device", 413: "Body too large",
            422: "Lists could not be reloaded",
            503: "The device store (a shared database) is unreachable; nothing was changed"}
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": 1000}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                 "maximum": 1000000000}},
    {"name": "since", "in": "query", "schema": _TIME_IN},
]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_VIEW: list[dict[str, list[str]]] = [{"bearer": []}]


def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """(METHOD, path) → the query parameters the document allows there."""
    out = {}
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            out[method.upper(), path] = frozenset(
                p["name"] for p in operation.get("parameters", []) if p["in"] == "query")
    return out


_LABEL = "[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# A DNS name as the decision API takes it (a URL or other junk is a 400 with a hint).
_NAME_PATTERN = f"^(?:{_LABEL}\\.)*{_LABEL}\\.?$"
TOKEN_CREATE = {
    "type": "object", "required": ["name", "role"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_.@-]{1,64}$"},
                   "role": {"enum": ["admin", "viewer"]}},
}


def openapi_document() -> dict[str, Any]:
    token_list = {"type": "object", "required": ["tokens"], "properties": {"tokens": {
        "type": "array", "items": {"type": "object", "required": ["name", "role", "source"],
                                   "properties": {"name": _STR, "role": _STR,
                                                  "source": {"enum": ["config", "store"]},
                                                  "created_at": {"type": ["string", "null"]}}}}}}
    device_list = {"type": "object", "required": ["devices"],
                   "properties": {"devices": {"type": "array", "items": _ref("Device")}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tiktokguard API", "version": __version__,
                 "description": "Social media devices, audit trail, incidents and decisions of "
                                "the tiktokguard DNS enforcement daemon."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Device": DEVICE, "DeviceCreate": DEVICE_CREATE,
                        "DevicePatch": DEVICE_PATCH, "Error": ERROR, "AuditEntry": AUDIT_ENTRY,
                        "Incident": INCIDENT, "Decision": DECISION},
        },
        "paths": {
            "/healthz": {"get": {"summary": "Process alive", "security": [],
                                 "responses": {"200": _json({"type": "object"}, "Alive")}}},
            "/readyz": {"get": {"summary": "Every component ready (status ready, or degraded: "
                                           "DNS works, a shared store is unreachable)",
                                "security": [],
                                "responses": {"200": _json({"type": "object"}, "Ready"),
                                              "503": _json({"type": "object"}, "Not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [],
                                 "responses": {"200": {"description": "Metrics",
                                                       "content": {"text/plain": {
                                                           "schema": {"type": "string"}}}},
                                               **_errors(401)}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI")}}},
            "/api/v1/devices": {
                "get": {"summary": "List devices (viewer)", "security": _VIEW,
                        "parameters": [{"name": "active", "in": "query",
                                        "schema": {"enum": ["true", "false"]}}],
                        "responses": {"200": _json(device_list, "Devices"), **_errors(400, 401)}},
                "post": {"summary": "Allowlist a social media device (admin)", "security": _VIEW,
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": _ref("DeviceCreate")}}},
                         "responses": {"201": _json(_ref("Device"), "Created"),
                                       **_errors(400, 401, 403, 409, 413, 503)}},
            },
            "/api/v1/devices/{id}": {
                "get": {"summary": "One device (viewer)", "security": _VIEW, "parameters": _ID,
                        "responses": {"200": _json(_ref("Device"), "Device"),
                                      **_errors(401, 404)}},
                "patch": {"summary": "Update a device (admin)", "security": _VIEW,
                          "parameters": _ID,
                          "requestBody": {"required": True, "content": {"application/json": {
                              "schema": _ref("DevicePatch")}}},
                          "responses": {"200": _json(_ref("Device"), "Updated"),
                                        **_errors(400, 401, 403, 404, 409, 413, 503)}},
                "delete": {"summary": "Deactivate a device; record and history stay (admin)",
                           "security": _VIEW, "parameters": _ID,
                           "responses": {"200": _json(_ref("Device"), "Deactivated"),
                                         **_errors(401, 403, 404, 503)}},
            },
            "/api/v1/audit": {"get": {
                "summary": "Audit trail of device changes (viewer)", "security": _VIEW,
                "parameters": [{"name": "device_id", "in": "query", "schema": _STR}, *_PAGING],
                "responses": {"200": _json({"type": "object", "required": ["entries"],
                                            "properties": {"entries": {
                                                "type": "array", "items": _ref("AuditEntry")}}},
                                           "Entries, oldest first"),
                                     **_errors(400, 401, 503)}}},
            "/api/v1/incidents": {"get": {
                "summary": "Policy violation incidents (viewer)", "security": _VIEW,
                "parameters": [{"name": "client", "in": "query", "schema": _STR},
                               {"name": "rule", "in": "query", "schema": _STR}, *_PAGING],
                "responses": {"200": _json({"type": "object", "required": ["incidents"],
                                            "properties": {"incidents": {
                                                "type": "array", "items": _ref("Incident")}}},
                                           "Incidents, newest first"),
                                     **_errors(400, 401, 503)}}},
            "/api/v1/decision": {"get": {
                "summary": "How a query would be decided, and why (viewer)", "security": _VIEW,
                "parameters": [
                    {"name": "client", "in": "query", "required": True,
                     "schema": {"type": "string", "anyOf": [{"format": "ipv4"},
                                                            {"format": "ipv6"}]}},
                    {"name": "name", "in": "query", "required": True,
                     "schema": {"type": "string", "maxLength": 253,
                                "pattern": _NAME_PATTERN}},
                    {"name": "mac", "in": "query", "schema": _MAC}],
                "responses": {"200": _json(_ref("Decision"), "Decision"), **_errors(400, 401)}}},
            "/api/v1/reload": {"post": {
                "summary": "Reload the block lists (admin)", "security": _VIEW,
                "responses": {"200": _json({"type": "object"}, "Reloaded"),
                              **_errors(401, 403, 422)}}},
            "/api/v1/tokens": {
                "get": {"summary": "API tokens, configured and personal (admin)",
                        "security": _VIEW,
                        "responses": {"200": _json(token_list, "Tokens"),
                                      **_errors(401, 403, 503)}},
                "post": {"summary": "Create a personal token; shown once (admin)",
                         "security": _VIEW,
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": TOKEN_CREATE}}},
                         "responses": {"201": _json({"type": "object", "required": ["token"],
                                                     "properties": {"token": _STR}},
                                                    "The new token (shown once)"),
                                       **_errors(400, 401, 403, 409, 413, 503)}}},
            "/api/v1/tokens/{name}": {"delete": {
                "summary": "Revoke a personal token (admin)", "security": _VIEW,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": _STR}],
                "responses": {"200": _json({"type": "object"}, "Revoked"),
                              **_errors(401, 403, 404, 409, 503)}}},
        },
    }
