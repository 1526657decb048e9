"""The baseline `ferry serve` is measured against: the least a server can do. One uvicorn process,
one Starlette route per model, onnxruntime in the handler (through the runtime's Classifier, so the
same decoding and preprocessing), no batching, no checks beyond what the Classifier does.

  python -m ferry.bench.minimal_server MODEL.onnx [MODEL2.onnx ...] --port 8100
"""

from __future__ import annotations

import argparse
import sys


def create_minimal_app(paths: list[str]):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ferry.runtime import Classifier

    models = {}
    for p in paths:
        clf = Classifier.from_onnx(p, provider="cpu")
        models[clf.name] = clf

    async def predict(request: Request):
        clf = models[request.path_params["name"]]
        body = await request.body()
        try:
            pred = await run_in_threadpool(clf.predict, body, int(request.query_params.get("top_k", "1")))
        except Exception as exc:  # noqa: BLE001 - a baseline still answers bad input
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(pred.to_dict())

    async def ready(_request: Request):
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route("/v1/models/{name}/predict", predict, methods=["POST"]), Route("/readyz", ready)])


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    uvicorn.run(create_minimal_app(args.models), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
