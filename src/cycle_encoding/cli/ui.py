"""``cycle-encoding ui``: the browser editor (parsing and start-up only; the page is ``ui/app.py``, the work
``editing/editor.py``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..editing.editor import Editor
from ..errors import CycleEncodingError
from ..ui.page import TUNE_BOUND_WHY
from .common import add_command, add_device_arg, comma_list


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "ui", cmd_ui,
        help="the browser editor: upload or open a run, invert, move sliders, download (needs the 'ui' extra)",
        description="Serves an editor page on http://127.0.0.1:7860 (no network use, no share link; docs/USAGE.md, "
        "The browser editor). With RUN_DIR (a `cycle-encoding invert` run) it opens that run, with its own generator "
        "and encoder. Defaults: the shipped Fashion-MNIST models.",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR", help="an inversion run folder to open")
    p.add_argument("--image", default=None, help="the run's image to open first (default: its first)")
    p.add_argument("--generator", default=None,
                   help="generator file or shipped name (default: the run's, else fmnist-generator)")  # fmt: skip
    p.add_argument("--encoder", default=None,
                   help="encoder file or shipped name (default: the run's, else fmnist-encoder); 'none' for none")  # fmt: skip
    p.add_argument("--directions", nargs="+", default=[], metavar="FILE", help="direction files (any layout)")
    p.add_argument("--components", type=int, default=5, help="top SeFa and GANSpace directions offered (default 5)")
    p.add_argument("--methods", default="sefa,ganspace", help="generator directions: sefa,ganspace (default both)")
    p.add_argument("--stages", default="encoder,tune", help="stages ticked at start (default encoder,tune)")
    p.add_argument("--tune-steps", type=int, default=100,
                   help=f"tuning steps at most, at start (default 100); the page's are {TUNE_BOUND_WHY}")  # fmt: skip
    p.add_argument("--perceptual", default=None,
                   help="inversion's perceptual distance (default: fmnist-features for fmnist-generator, else "
                        "lpips-alex, which needs --lpips-backbone)")  # fmt: skip
    p.add_argument("--identity", default=None, help="identity network of the refinement (default as --perceptual)")
    p.add_argument("--train-data", default=None, help="the encoder's training images, for refine")
    p.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet/VGG16 state dict for LPIPS")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted, in MB (default 20)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="browser sessions holding an image at a time (default 8; beyond, the least recently used is "
                        "released)")  # fmt: skip
    add_device_arg(p)


def cmd_ui(args: argparse.Namespace) -> int:
    # lazy: importing ui.app sets Gradio's and the Hugging Face hub's offline variables in os.environ (ui only)
    from ..ui.app import EditorApp, check_tune_steps, import_gradio, is_loopback

    import_gradio()  # the missing extra is reported before any model loads
    check_tune_steps(args.tune_steps)
    if args.max_sessions < 1:
        raise CycleEncodingError("--max-sessions must be at least 1")
    methods = comma_list(args.methods)
    if not 0 < args.port < 65536:
        raise CycleEncodingError(f"--port must be 1-65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise CycleEncodingError("--max-upload-mb must be positive")
    loss = {k: getattr(args, k) for k in ("perceptual", "identity", "train_data", "lpips_backbone")}
    loss = {k: v for k, v in loss.items() if v is not None}
    encoder = None if args.encoder == "none" else args.encoder
    common = dict(directions=args.directions, components=args.components, methods=methods, device=args.device)
    print("loading the models and directions...", file=sys.stderr, flush=True)
    if args.run_dir is not None:
        kw = {} if args.encoder is None else {"encoder": encoder}
        editor = Editor.open_run(args.run_dir, args.image, generator=args.generator, **kw, **common, **loss)
    else:
        editor = Editor(args.generator or "fmnist-generator", "fmnist-encoder" if args.encoder is None else encoder,
                        **common, **loss)  # fmt: skip
    if not is_loopback(args.host):
        print(f"warning: binding {args.host}: anyone who can reach this machine on port {args.port} can use the "
              "editor, upload files and open run folders it can read; the page has no login", file=sys.stderr)  # fmt: skip
    main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    # SIGTERM stops the server as Ctrl-C does (KeyboardInterrupt): its folders are removed
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        app = EditorApp(editor, max_upload_mb=args.max_upload_mb, stages=tuple(comma_list(args.stages)), tune_steps=args.tune_steps,
                        max_sessions=args.max_sessions)  # fmt: skip
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"editor: http://{host}:{args.port}/ ({len(editor.directions())} directions; Ctrl-C to stop)",
              flush=True)  # fmt: skip
        try:
            app.launch(args.host, args.port, block=True, quiet=True)
        finally:
            app.close()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0
