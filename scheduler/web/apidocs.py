"""``/api/v1/docs``: the API's reference rendered on the server from its OpenAPI schema, with no
script (the console's Content-Security-Policy holds, nothing is loaded from the internet, and
no third-party code runs on the console's origin). Tools read ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

METHODS = ("get", "post", "put", "patch", "delete")


def operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation of ``schema`` in path order: method, path, summary, parameters, the
    request body's fields and the responses, with each type written out (``$ref`` resolved)."""
    found = []
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
            found.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "parameters": [
                        {
                            "name": p["name"],
                            "in": p.get("in", ""),
                            "required": bool(p.get("required")),
                            "type": type_of(p.get("schema", {}), schema),
                            "description": p.get("description") or p.get("schema", {}).get("description", ""),
                            "default": _default(p.get("schema", {})),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "body": _fields(body, schema) if body else None,
                    "body_type": type_of(body, schema) if body else "",
                    "responses": [(code, r.get("description", "")) for code, r in op.get("responses", {}).items()],
                }
            )
    return found


def _resolve(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        resolved: dict[str, Any] = schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
        return resolved
    return node


def _fields(node: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    model = _resolve(node, schema)
    required = set(model.get("required", []))
    return [
        {
            "name": name,
            "type": type_of(prop, schema),
            "required": name in required,
            "description": prop.get("description", ""),
            "default": _default(prop),
        }
        for name, prop in model.get("properties", {}).items()
    ]


def _default(node: dict[str, Any]) -> str:
    return "" if "default" not in node else repr(node["default"]).replace("None", "null")


def type_of(node: dict[str, Any], schema: dict[str, Any]) -> str:
    """A schema node as a short type: ``JobRecord``, ``list[string]``, ``integer | null``."""
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[1]
    if "anyOf" in node:
        return " | ".join(type_of(n, schema) for n in node["anyOf"])
    if "enum" in node:
        return " | ".join(repr(v) for v in node["enum"])
    if "const" in node:
        return repr(node["const"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list[{type_of(node.get('items', {}), schema)}]"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"object of {type_of(node['additionalProperties'], schema)}"
    if "format" in node:
        return f"{kind} ({node['format']})"
    return str(kind)


def models(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The schema's named models (answers and bodies) with their fields."""
    return [
        {"name": name, "description": model.get("description", ""), "fields": _fields(model, schema)}
        for name, model in sorted(schema.get("components", {}).get("schemas", {}).items())
    ]
