"""The documents ``graft serve`` hands out besides predictions: the OpenAPI description of
/predict's body, the schema's API-key scheme, and the run's report with local paths redacted.

    request_body_docs  /predict's two body forms (multipart, JSON), for /docs
    secure_docs        the schema declares the bearer key on every non-public operation
    redact_report      report.html as served: absolute local paths shown as folder names
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from fastapi import FastAPI

from .serve_ops import PUBLIC


def request_body_docs() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                                "description": "one or more images (repeat the field)",
                            }
                        },
                        "required": ["file"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "byte"},
                                "description": "base64 images (or data URLs)",
                            }
                        },
                        "required": ["images"],
                    }
                },
            },
        }
    }


def secure_docs(app: FastAPI) -> None:
    """The OpenAPI schema declares the key (Swagger UI then offers 'Authorize') on every
    operation but the public ones."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "graft API key"}
            }
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation["security"] = [] if path in PUBLIC else [{"apiKey": []}]
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _recorded_paths(folder: Path) -> set[str]:
    """Every absolute path the run's JSON files record (data root, unseen and evaluation
    folders...), and the run folder's own."""
    found = {str(folder.resolve()), str(folder.absolute()), str(Path.home())}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and len(value) < 4096:
            if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
                found.add(value)

    for path in [*folder.glob("*.json"), *folder.glob("eval-*/*.json")]:
        try:
            walk(json.loads(path.read_text(errors="replace")))
        except (OSError, ValueError, RecursionError):
            continue
    return {p for p in found if len(p) > 1}


#: an absolute path left in text (after a space, '>' or '('), as a safety net: its folders
_ABSOLUTE = re.compile(r"(?<=[\s>(])(?:/[^\s<>\"'/]+)+/(?=[^\s<>\"'/])")


def redact_report(text: str, folder: Path) -> str:
    """The report as served: each absolute local path shown by its last folder name only,
    so a client learns nothing of this machine's layout (the file itself is unchanged)."""
    for path in sorted(_recorded_paths(folder), key=len, reverse=True):
        pure = PureWindowsPath(path) if "\\" in path else PurePosixPath(path)
        short = "~" if path == str(Path.home()) else pure.name or "/"
        for form in {path, html.escape(path), html.escape(path, quote=False)}:
            text = text.replace(form, short)
    return _ABSOLUTE.sub("", text)


__all__ = ["redact_report", "request_body_docs", "secure_docs"]
