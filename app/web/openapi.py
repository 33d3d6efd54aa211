"""The OpenAPI document (GET /openapi.json), generated from the same marshmallow schemas
that validate the requests, so the documentation cannot drift from the behaviour."""
from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import fields

from schemas import RequestSchemas
from schemas.fields import Bool, Int, Number, Stop, Str, TextInputs
from schemas.messages import ROLE_ALIASES, Messages
from schemas.responses import Input, JsonList, JsonObject, Metadata

_STRINGS = {"type": "array", "items": {"type": "string"}}
_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "image_url", "refusal"]},
    "text": {"type": "string"}, "refusal": {"type": "string"},
    "image_url": {"type": "object", "properties": {"url": {"type": "string"}}}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": sorted(ROLE_ALIASES)},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _PART}],
                "nullable": True},
    "name": {"type": "string"}, "tool_call_id": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object"}}}}
_INPUT_ITEM = {"type": "object", "properties": {
    "type": {"type": "string", "enum": ["message", "function_call", "function_call_output"]},
    "role": {"type": "string", "enum": ["user", "system", "developer", "assistant"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"], "properties": {
            "type": {"type": "string", "enum": ["input_text", "output_text"]},
            "text": {"type": "string"}}}}]},
    "call_id": {"type": "string"}, "name": {"type": "string"},
    "arguments": {"type": "string"}, "output": {"type": "string"}}}
_ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "object", "required": ["message", "type", "param", "code"],
              "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                             "param": {"type": "string", "nullable": True},
                             "code": {"type": "string", "nullable": True}}},
    "object": {"type": "string"}, "message": {"type": "string"}, "code": {"type": "integer"}}}


def _field_schema(self: Any, field: fields.Field[Any], **kwargs: Any) -> dict[str, Any]:
    """JSON schema for flaskchat's own field types (apispec knows only marshmallow's)."""
    if isinstance(field, Number):
        return {"type": "number"}
    if isinstance(field, Int):
        return {"type": "integer"}
    if isinstance(field, Bool):
        return {"type": "boolean"}
    if isinstance(field, Str):
        return {"type": "string"}
    if isinstance(field, (Stop, TextInputs)):
        return {"oneOf": [{"type": "string"}, _STRINGS]}
    if isinstance(field, Messages):
        return {"oneOf": [{"type": "string"}, {"type": "array", "items": _MESSAGE}]}
    if isinstance(field, Input):
        return {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1,
                                               "items": _INPUT_ITEM}]}
    if isinstance(field, Metadata):
        return {"type": "object", "maxProperties": 16,
                "additionalProperties": {"type": "string", "maxLength": 512}}
    if isinstance(field, JsonObject):
        return {"type": "object"}
    if isinstance(field, JsonList):
        return {"type": "array", "items": {"type": "object"}}
    return {}


ROUTES: list[tuple[str, str, str | None, str]] = [
    # (method, path, request schema, summary)
    ("get", "/v1/models", None, "List the models"),
    ("get", "/v1/models/{model}", None, "Retrieve a model"),
    ("post", "/v1/chat/completions", "ChatCompletionRequest", "Create a chat completion"),
    ("post", "/v1/completions", "CompletionRequest", "Create a text completion"),
    ("post", "/v1/embeddings", "EmbeddingRequest", "Create embeddings"),
    ("post", "/v1/engines/{model}/embeddings", "EmbeddingRequest",
     "Create embeddings (engine in the path)"),
    ("post", "/v1/responses", "ResponseRequest",
     "Create a response (the Responses API, served on the chat path)"),
    ("get", "/v1/responses/{response_id}", None, "Retrieve a stored response"),
    ("delete", "/v1/responses/{response_id}", None, "Delete a stored response"),
    ("get", "/v1/responses/{response_id}/input_items", None,
     "List a stored response's input items"),
    ("post", "/api/v1/chat/completions", "ApiChatCompletionRequest",
     "FastChat: chat completion with repetition_penalty"),
    ("post", "/api/v1/token_check", "TokenCheckRequest",
     "FastChat: do prompts fit the context?"),
]


def build_spec(schemas: RequestSchemas) -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(title="flaskchat", version="1", openapi_version="3.0.3",
                   plugins=[plugin], info={"description": __doc__})
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_field_schema)  # type: ignore[no-untyped-call]
    for name, schema in (("ChatCompletionRequest", schemas.chat),
                         ("ApiChatCompletionRequest", schemas.api_chat),
                         ("CompletionRequest", schemas.completion),
                         ("EmbeddingRequest", schemas.embedding),
                         ("TokenCheckRequest", schemas.token_check),
                         ("ResponseRequest", schemas.responses)):
        spec.components.schema(name, schema=schema)
    spec.components.schema("Error", _ERROR)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for method, path, request, summary in ROUTES:
        operation: dict[str, Any] = {
            "summary": summary, "security": [{"bearer": []}],
            "responses": {"200": {"description": "OK"},
                          "default": {"description": "Error", "content": {
                              "application/json": {"schema": {"$ref":
                                                              "#/components/schemas/Error"}}}}}}
        parameters = [name for name in ("model", "response_id") if f"{{{name}}}" in path]
        if parameters:
            operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                        "schema": {"type": "string"}}
                                       for name in parameters]
        if request:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request}"}}}}
        spec.path(path=path, operations={method: operation})
    document: dict[str, Any] = spec.to_dict()
    return document
