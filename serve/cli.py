"""`genesis serve` (the watch-and-try page) and `genesis plot` (the curves as a PNG, no browser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genesis.cli_help import examples
from genesis.errors import GenesisError
from genesis.run_dir import RunDir


def _existing_run_dir(path: Path) -> Path:
    if not path.is_dir():
        raise GenesisError(f"--run-dir {path}: not a directory; pass the trainer's run_dir (it holds latest.json)")
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from genesis.config import validate
    from serve.app import create_app
    from serve.guard import HostPolicy
    from serve.models import ServeLimits

    run_dir = _existing_run_dir(args.run_dir)
    limits = validate(ServeLimits, {"max_prompt_chars": args.max_prompt_chars, "max_new_tokens": args.max_new_tokens,
                                    "queue_size": args.queue_size, "max_loaded_models": args.max_loaded_models},
                      "genesis serve options")
    try:
        hosts = HostPolicy(args.host, args.port, tuple(args.allow_host))
    except ValueError:
        raise GenesisError(f"--allow-host {args.allow_host}: each must be a host name or name:port, e.g. "
                           f"genesis.example.org") from None
    tracking = args.tracking_uri
    app = create_app(run_dir, tracking_uri=tracking, limits=limits, device=args.device, hosts=hosts)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach this port can generate with your models",
              file=sys.stderr)
    print(f"genesis serve: http://{args.host}:{args.port}/  (run {run_dir.resolve()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from serve.plots import plot_run

    run_dir = _existing_run_dir(args.run_dir)
    out = plot_run(run_dir, args.output)
    if out is None:
        raise GenesisError(f"{RunDir(run_dir).metrics}: nothing logged yet; plot again once the trainer has logged a step")
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    serve = sub.add_parser(
        "serve", help="a local page to watch a run and try its checkpoints and branches",
        epilog=examples("genesis serve --run-dir runs/demo/trunk --tracking-uri sqlite:///runs/mlflow/mlflow.db",
                        "genesis serve --run-dir runs/genesis-1b --port 8800"))
    serve.add_argument("--run-dir", type=Path, required=True)
    serve.add_argument("--host", default="127.0.0.1", help="default loopback only; 0.0.0.0 exposes it to the network")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                       help="also answer requests addressed to this name (a reverse proxy's); repeatable. Other "
                            "names are refused, so a web page cannot reach the server through DNS rebinding")
    serve.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI: adds registered models to the tree and the try-it list")
    serve.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    serve.add_argument("--max-prompt-chars", type=int, default=4000)
    serve.add_argument("--max-new-tokens", type=int, default=512)
    serve.add_argument("--queue-size", type=int, default=8, help="requests waiting per model; more get HTTP 429")
    serve.add_argument("--max-loaded-models", type=int, default=2)
    serve.add_argument("--log-level", default="warning")
    serve.set_defaults(handler=cmd_serve)

    plot = sub.add_parser("plot", help="training/validation loss, lr, grad norm and tokens/s as a PNG",
                          epilog=examples("genesis plot --run-dir runs/demo/trunk -o loss.png"))
    plot.add_argument("--run-dir", type=Path, required=True)
    plot.add_argument("-o", "--output", type=Path, default=Path("loss.png"))
    plot.set_defaults(handler=cmd_plot)
