"""`qalign serve`: scores over HTTP (POST /v1/score) and a web page at /, with micro-batching."""

from __future__ import annotations

import sys

DEFAULTS = dict(max_batch=16, max_wait_ms=10.0, max_queue=256, max_request_bytes=32 * 1024 * 1024,
                max_pixels=50_000_000, max_items=64, max_frames=16, timeout_s=60.0)


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve scores over HTTP and in the browser",
        description="Serve a Q-Align model over HTTP: POST /v1/score (multipart field 'file', or JSON "
                    "{\"images\": [base64...]} / {\"paths\": [...]}), GET /v1/models, /healthz, /readyz, "
                    "/openapi.json, and a web page at /. Scores are on [1, 5] (bad = 1, excellent = 5) and "
                    "[0, 1]. Needs the serve extra: pip install 'qalign[serve]'.")
    p.add_argument("--model", default="qalign-tiny", help="model name (see `qalign models`), folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; the server "
                                                       "has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--allowed-root", metavar="DIR", default=None,
                   help="let JSON requests name files under DIR ({\"paths\": [...]}); paths are refused without it")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"],
                   help="most images (video frames) per model call (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULTS["max_wait_ms"],
                   help="how long a batch may wait for more items while requests are arriving (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                   help="items waiting for the model; beyond it requests get 503 + Retry-After (default %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS["max_request_bytes"],
                   help="largest request body; larger ones get 413 (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=DEFAULTS["max_pixels"],
                   help="largest image (and video frame) in pixels; larger items fail (default %(default)s)")
    p.add_argument("--max-items", type=int, default=DEFAULTS["max_items"],
                   help="most inputs per request; more get 413 (default %(default)s)")
    p.add_argument("--max-frames", type=int, default=DEFAULTS["max_frames"],
                   help="most frames sampled from one video (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=DEFAULTS["timeout_s"],
                   help="per-request deadline; later answers are 504 (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at once; beyond it uvicorn answers 503 (default %(default)s)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="threads decoding uploads at the same time (default: min(4, CPUs), at least 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the model (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
        import uvicorn
    except ImportError as exc:
        print(f"qalign: serve needs the serve extra: pip install 'qalign[serve]' ({exc})", file=sys.stderr)
        return 2
    import logging
    import signal

    from ..serve.app import Settings, bind_socket, create_app, is_loopback

    settings = Settings(model=args.model, device=args.device, dtype=args.dtype, allowed_root=args.allowed_root,
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                        max_request_bytes=args.max_request_bytes, max_pixels=args.max_pixels,
                        max_items=args.max_items, max_frames=args.max_frames, timeout_s=args.timeout_s)
    if args.decode_workers is not None:
        settings.decode_workers = args.decode_workers
    try:
        settings.validate()
    except ValueError as exc:
        print(f"qalign: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not is_loopback(args.host):
        print(f"qalign: warning: listening on {args.host}: the server has no authentication; anyone who can reach "
              "this address can use it", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    failed: list[BaseException] = []
    server_box: list = []

    def on_load_failure(exc: BaseException) -> None:
        failed.append(exc)
        if server_box:
            server_box[0].should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"qalign: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_keep_alive=30,
                                           limit_concurrency=args.max_connections))
    server_box.append(server)
    print(f"qalign serve: listening on http://{shown}:{port} (model {args.model} loading in the background; "
          f"GET /readyz says when it is ready)", file=sys.stderr, flush=True)
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; land them here so we exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        print(f"qalign: model {args.model!r} failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0
