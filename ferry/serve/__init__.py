"""Online serving (`ferry serve`): one HTTP app (app.py) over a backend that batches requests, hosted
by one uvicorn process (local.py, the default) or by Ray Serve replicas across a cluster
(ray_host.py). Depends on the runtime; Starlette/uvicorn (`ferry[serve]`) and Ray (`ferry[scale]`)
are imported inside the functions that need them."""
