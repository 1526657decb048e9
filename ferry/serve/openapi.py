"""The API's OpenAPI 3 description (`GET /openapi.json`) and the page that shows it (`GET /docs`).

Written by hand, next to the handlers it describes (app.py), and built per server: the `{name}`
of a prediction is an enum of the models this server serves, and the security requirements
appear only when an API key is set. The tests run Schemathesis against a live server with this
description: every status code, header and body the server sends must be described here.
"""

from __future__ import annotations

import html
from collections.abc import Collection
from typing import Any

ERROR_CODES = {
    400: "Bad request: the one-line `error` says what was wrong and what is accepted",
    401: "Missing or wrong API key (send `Authorization: Bearer KEY` or `X-API-Key: KEY`)",
    404: "No such model (or endpoint)",
    409: "The new model files could not be loaded; the previous models keep serving",
    413: "Body over the server's limit (refused from its Content-Length before it is read), or an image "
         "with more pixels than can be decoded safely",
    500: "Internal error: logged by the server under the request id (with its traceback, unless the one-line `error` "
         "says what failed: e.g. a model output of NaN or infinity)",
    503: "Not now: the model's queue is full (`--max-queue`; Retry-After: 1), or the server is stopping (Retry-After: "
         "the drain timeout, by which it has exited). Retry after `Retry-After` seconds",
    504: "No answer within the server's deadline (`--timeout-s`); the request's work was dropped",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(code: int, description: str | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if code == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    if code == 401:
        headers["WWW-Authenticate"] = {"description": "Bearer", "schema": {"type": "string"}}
    return {"description": description or ERROR_CODES[code], "headers": headers, "content": _json(_ref("Error"))}


def _ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
            "content": content}


def openapi_spec(models: list[str], *, auth: bool, max_body_bytes: int, max_top_k: int, max_queue: int,
                 timeout_s: float, version: str = "", detectors: Collection[str] = ()) -> dict[str, Any]:
    """The OpenAPI 3.0 document of a server that serves `models`, of which `detectors` are detectors
    (the rest classifiers): a query parameter is described only where a model takes it."""
    secured = [{"bearer": []}, {"apiKey": []}] if auth else []
    guarded = {401: _error(401)} if auth else {}

    def op(summary: str, description: str, responses: dict[int, Any], *, open_: bool = False, **extra) -> dict[str, Any]:
        rs = {str(k): v for k, v in sorted({**responses, **({} if open_ else guarded), 500: _error(500)}.items())}
        out = {"summary": summary, "description": description, "operationId": extra.pop("operation_id"),
               "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}, *extra.pop("parameters", [])],
               "responses": rs, **extra}
        if auth:
            out["security"] = [] if open_ else secured
        return out

    detectors = set(detectors) & set(models)
    predict_params: list[dict[str, Any]] = [
        {"name": "name", "in": "path", "required": True, "description": "A model this server serves (GET /v1/models)",
         "schema": {"type": "string", "enum": models}}]
    if set(models) - detectors:
        predict_params.append(
            {"name": "top_k", "in": "query", "required": False,
             "description": f"Classifiers: how many of the most probable classes to return, 1 to {max_top_k} (default 1); "
                            "a detector refuses it (400)",
             "schema": {"type": "integer", "minimum": 1, "maximum": max_top_k, "default": 1}})
    if detectors:
        predict_params.append(
            {"name": "min_score", "in": "query", "required": False,
             "description": "Detectors: the lowest score of a detection returned, a plain decimal from 0 to 1 (default "
                            "0.5); a classifier refuses it (400)",
             "schema": {"type": "number", "minimum": 0, "maximum": 1}})
    binary = {"schema": {"type": "string", "format": "binary"}}
    paths = {
        "/healthz": {"get": op(
            "Liveness", "200 while the process runs, draining included. Needs no API key.",
            {200: _ok("Alive", _json(_ref("Health")))}, open_=True, operation_id="healthz")},
        "/readyz": {"get": op(
            "Readiness", "200 once every model is loaded and warmed; 503 while starting or after SIGTERM "
            "(draining: the requests in flight finish, new ones are refused). Needs no API key.",
            {200: _ok("Ready to answer predictions", _json(_ref("Ready"))),
             503: {**_ok("Not ready: starting or draining", _json(_ref("Ready"))),
                   "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
                               "Retry-After": {"$ref": "#/components/headers/Retry-After"}}}},
            open_=True, operation_id="readyz")},
        "/metrics": {"get": op(
            "Prometheus metrics", "The prometheus-client text format, across every worker process or Ray Serve replica: "
            "ferry_requests_total{model,code}, ferry_http_requests_total{path,code}, ferry_request_duration_seconds "
            "(histogram), ferry_batch_size (histogram), ferry_queue_depth, ferry_requests_in_flight, "
            "ferry_model_load_seconds, ferry_model_reloads_total.",
            {200: _ok("The metrics", {"text/plain": {"schema": {"type": "string"}}})}, operation_id="metrics")},
        "/openapi.json": {"get": op(
            "This description", "The OpenAPI 3 description of this server's API.",
            {200: _ok("OpenAPI 3 document", _json({"type": "object"}))}, operation_id="openapi")},
        "/docs": {"get": op(
            "API documentation page", "This description as a page (self-contained HTML).",
            {200: _ok("HTML page", {"text/html": {"schema": {"type": "string"}}})}, operation_id="docs")},
        "/v1/models": {"get": op(
            "The models", "Each model this server serves, with its metadata: labels, preprocessing, input and output, "
            "precision, provider.", {200: _ok("The models", _json(_ref("ModelList")))}, operation_id="listModels")},
        "/v1/stats": {"get": op(
            "Batching statistics", "Requests computed, batches and mean batch size per model, across every worker "
            "process or replica.", {200: _ok("Statistics", _json(_ref("Stats")))}, operation_id="stats")},
        "/v1/models/{name}/predict": {"post": op(
            "Classify an image, or find the objects in it",
            f"The image is the raw body (any content type) or the one file field of a multipart/form-data body "
            f"(preferably named `image`; more than one file is refused: one image per request). Any query parameter "
            f"not described here is refused (400). At most {max_body_bytes:,} bytes; at most {max_queue} requests per "
            f"model are admitted at once (more get 503 with Retry-After, at once); a request not answered within "
            f"{timeout_s:g} s gets 504 and its work is dropped.",
            {200: _ok("The prediction (a classifier) or the detections (a detector)",
                      _json({"oneOf": [_ref("Prediction"), _ref("Detections")]})), 400: _error(400), 404: _error(404, "No such model"),
             413: _error(413), 503: _error(503), 504: _error(504)},
            parameters=predict_params, operation_id="predict",
            requestBody={"required": True, "description": "An encoded image (PNG, JPEG, GIF, BMP, WebP, TIFF ...)",
                         "content": {"application/octet-stream": binary, "image/png": binary, "image/jpeg": binary,
                                     "multipart/form-data": {"schema": {
                                         "type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                                         "required": ["image"]}}}})},
        "/v1/admin/reload": {"post": op(
            "Reload the model files",
            "Loads the model files again from their paths (as SIGHUP does), in every worker process or replica. The "
            "requests in flight finish on the previous models; if a new file cannot be loaded, the previous models "
            "keep serving and the answer (409) says why.",
            {200: _ok("Reloaded", _json(_ref("Reloaded"))), 409: _error(409),
             503: _error(503, "The server is stopping")}, operation_id="reload")},
    }
    candidate = {"type": "object", "required": ["index", "label", "probability"], "properties": {
        "index": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"}}}
    schemas = {
        "Error": {"type": "object", "required": ["error", "request_id"], "properties": {
            "error": {"type": "string", "description": "What was wrong, in one line"},
            "request_id": {"type": "string", "description": "The request's id (also the X-Request-ID header)"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        "Ready": {"type": "object", "required": ["status", "models"], "properties": {
            "status": {"type": "string", "enum": ["ready", "starting", "draining"]},
            "models": {"type": "array", "items": {"type": "string"}}}},
        "Candidate": candidate,
        "Prediction": {"type": "object", "required": ["model", "index", "label", "probability", "top_k", "provider",
                                                      "latency_ms", "request_id"], "properties": {
            "model": {"type": "string"}, "index": {"type": "integer"}, "label": {"type": "string"},
            "probability": {"type": "number", "minimum": 0, "maximum": 1},
            "top_k": {"type": "array", "items": _ref("Candidate")},
            "provider": {"type": "string", "description": "The onnxruntime execution provider that ran the model"},
            "latency_ms": {"type": "number", "description": "Server time from arrival to answer"},
            "request_id": {"type": "string"}}},
        "Detection": {"type": "object", "required": ["label", "category_id", "index", "score", "box"], "properties": {
            "label": {"type": "string"}, "category_id": {"type": "integer"}, "index": {"type": "integer"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "box": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number"},
                    "description": "x1, y1, x2, y2 in the image's own pixels"}}},
        "Detections": {"type": "object", "required": ["model", "detections", "width", "height", "min_score", "provider",
                                                      "latency_ms", "request_id"], "properties": {
            "model": {"type": "string"}, "detections": {"type": "array", "items": _ref("Detection")},
            "width": {"type": "integer"}, "height": {"type": "integer"}, "min_score": {"type": "number"},
            "provider": {"type": "string"}, "latency_ms": {"type": "number"}, "request_id": {"type": "string"}}},
        "Model": {"type": "object", "required": ["name", "model", "precision", "labels", "provider"], "properties": {
            "name": {"type": "string", "description": "The name to use in /v1/models/{name}/predict"},
            "model": {"type": "string"}, "task": {"type": "string"}, "precision": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
            "preprocess": {"type": "object"}, "input": {"type": "object"}, "output": {"type": "object"},
            "weights": {"type": "string"}, "untrained": {"type": "boolean"}, "format_version": {"type": "integer"},
            "provider": {"type": "string"}, "threads": {"type": "integer", "description": "onnxruntime intra-op threads"},
            "load_seconds": {"type": "number"}}},
        "ModelList": {"type": "object", "required": ["models"], "properties": {
            "models": {"type": "array", "items": _ref("Model")}}},
        "Stats": {"type": "object", "required": ["models"], "properties": {"models": {
            "type": "object", "additionalProperties": {"type": "object", "properties": {
                "requests": {"type": "integer"}, "batches": {"type": "integer"}, "mean_batch_size": {"type": "number"}}}}}},
        "Reloaded": {"type": "object", "required": ["status", "models"], "properties": {
            "status": {"type": "string", "enum": ["reloaded"]}, "generation": {"type": "integer"},
            "models": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "path": {"type": "string"}, "load_seconds": {"type": "number"}}}}}},
    }
    components: dict[str, Any] = {
        "schemas": schemas,
        "parameters": {"X-Request-ID": {
            "name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
            "description": "Your id for this request, echoed in the answer when it is 1-128 characters of letters, "
                           "digits and . _ : - (otherwise the server makes one)"}},
        "headers": {
            "X-Request-ID": {"required": True, "schema": {"type": "string"},
                             "description": "The request's id, as in the server's log lines"},
            "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1},
                            "description": "Seconds to wait before retrying"}},
    }
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                         "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    return {"openapi": "3.0.3",
            "info": {"title": "ferry serve", "version": version or "1",
                     "description": "Image classification with models exported by `ferry export`."},
            "paths": paths, "components": components}


def docs_html(spec: dict[str, Any]) -> str:
    """A self-contained page (no scripts, nothing fetched) listing every endpoint of `spec`, its
    parameters, body and responses."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(spec['info']['title'])} API</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
           "code{background:#f3f3f3;padding:0 .2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
           "h2{margin-top:2em;font-family:monospace}</style></head><body>",
           f"<h1>{e(spec['info']['title'])} API</h1><p>{e(spec['info']['description'])} "
           "The machine-readable description: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3).</p>"]
    if "securitySchemes" in spec["components"]:
        out.append("<p>Every endpoint but <code>/healthz</code> and <code>/readyz</code> needs the API key: "
                   "<code>Authorization: Bearer KEY</code> or <code>X-API-Key: KEY</code>.</p>")
    out.append("<p>Every answer carries an <code>X-Request-ID</code> header (yours, when you send a valid one); "
               "errors are JSON <code>{\"error\": \"one line\", \"request_id\": \"...\"}</code>.</p>")
    params = spec["components"]["parameters"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            out.append(f"<h2>{e(method.upper())} {e(path)}</h2><p><b>{e(op['summary'])}</b>. {e(op['description'])}</p>")
            plist = [params[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p for p in op.get("parameters", [])]
            if plist:
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>meaning</th></tr>")
                for p in plist:
                    s = p["schema"]
                    typ = s.get("type", "")
                    if "enum" in s:
                        typ += ": " + ", ".join(map(str, s["enum"]))
                    if "minimum" in s:
                        typ += f" {s['minimum']}..{s.get('maximum', '')}"
                    out.append(f"<tr><td><code>{e(p['name'])}</code>{' (required)' if p.get('required') else ''}</td>"
                               f"<td>{e(p['in'])}</td><td>{e(typ)}</td><td>{e(p.get('description', ''))}</td></tr>")
                out.append("</table>")
            if "requestBody" in op:
                types = ", ".join(f"<code>{e(t)}</code>" for t in op["requestBody"]["content"])
                out.append(f"<p>Body: {e(op['requestBody'].get('description', ''))}; as {types}.</p>")
            out.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
            for code, r in op["responses"].items():
                body = ", ".join(f"{t}" + (f" ({c['schema']['$ref'].rsplit('/', 1)[1]})" if "$ref" in c.get("schema", {}) else "")
                                 for t, c in r.get("content", {}).items())
                out.append(f"<tr><td>{e(code)}</td><td>{e(r['description'])}</td><td>{e(body)}</td></tr>")
            out.append("</table>")
    out.append("<h2>Schemas</h2>")
    for name, s in spec["components"]["schemas"].items():
        props = ", ".join(f"<code>{e(k)}</code>" for k in s.get("properties", {}))
        out.append(f"<p><b>{e(name)}</b>: {props}</p>")
    out.append("</body></html>")
    return "\n".join(out)
