"""The browser editor (``cycle-encoding ui``): a Gradio page over :class:`~cycle_encoding.editing.editor.Editor`, its
handlers and its server. Design notes: docs/INTERNALS.md, "cycle_encoding.ui.app"."""

from __future__ import annotations

import math
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..editing.editor import DEFAULT_STAGES, Editor, InversionCancelled, InversionProgress, tensor_to_pil
from ..errors import CycleEncodingError
from ..inversion.config import STAGES
from .page import ENTER_JS, MAX_TUNE_STEPS, PAGE_CSS, SHOWN, TUNE_BOUND_WHY, build_page
from .sessions import DEFAULT_MAX_SESSIONS, Session, SessionPool, make_root

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD_MB = 20.0
UPLOAD_MAX_PIXELS = 40_000_000
HEARTBEAT_S = 0.5  # an inversion's handler yields at least this often: the points where Gradio can close it


def import_gradio() -> Any:
    """Gradio, or a one-line error saying how to install it (an optional extra)."""
    try:
        import gradio as gr  # lazy: an optional extra, and seconds to import
    except ImportError:
        raise CycleEncodingError(
            "the browser editor needs Gradio: pip install 'cycle-encoding[ui]' (or the pins of requirements.txt)"
        ) from None
    return gr


def check_upload(path: str | Path, max_bytes: int, max_pixels: int = UPLOAD_MAX_PIXELS) -> None:
    """Refuse, with a one-line message, a file over ``max_bytes``, one that is not an image PIL can read, or an image
    of more than ``max_pixels`` pixels (checked from the header, before the pixels are decoded)."""
    p = Path(path)
    name = p.name
    size = p.stat().st_size
    if size > max_bytes:
        raise CycleEncodingError(f"{name}: {size / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.1f} MB")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise CycleEncodingError(f"{name}: {w} x {h} pixels is over the limit of {max_pixels:,} pixels")
            im.verify()
    except CycleEncodingError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise CycleEncodingError(f"{name}: not an image (PNG, JPEG, WebP, ... expected)") from None


def _error(text: str) -> str:
    return f"**Error:** {text}"


class EditorApp:
    """The page's handlers and server. ``template``: the editor every session forks."""

    def __init__(
        self,
        template: Editor,
        *,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        max_pixels: int = UPLOAD_MAX_PIXELS,
        stages: tuple[str, ...] = DEFAULT_STAGES,
        tune_steps: int = 100,
        work_dir: str | Path | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.gr = import_gradio()
        self.template = template
        self.max_upload_bytes = int(max_upload_mb * 1e6)
        # Gradio's own cap, a backstop against filling the disk (docs/INTERNALS.md, "cycle_encoding.ui.app")
        self.hard_upload_limit = 4 * self.max_upload_bytes + 10_000_000
        self.max_pixels = int(max_pixels)
        self.stages = tuple(stages)
        self.tune_steps = check_tune_steps(tune_steps)
        self.directions = template.directions()
        self.root = make_root(work_dir)
        self.sessions = SessionPool(template, self.root, max_sessions)
        self.page: Any = None  # set by build_page
        self.blocks = build_page(self)

    # -- files ---------------------------------------------------------------------------------------------------
    def _export(self, s: Session, strengths: dict[str, float], generator: bool) -> tuple[dict[str, Path], float]:
        """Render and write the session's files (the previous edit's go); returns them and the render's seconds."""
        assert s.editor is not None
        t0 = time.perf_counter()
        s.editor.render_tensor(strengths)
        dt = time.perf_counter() - t0
        files = s.editor.export(s.folder / "export", strengths, generator=generator, named=True)
        for key, old in s.files.items():
            if key in files and files[key] != old:
                old.unlink(missing_ok=True)
        s.files.update(files)
        s.strengths = dict(strengths)
        return s.files, dt

    def _picture(self, s: Session, image: Any, stem: str) -> str | None:
        """``image`` (PIL, or a file to copy) as a new file of the session's folder (Gradio serves files from there)."""
        if image is None:
            return None
        s.count += 1
        suffix = image.suffix if isinstance(image, Path) else ".png"
        dst = s.folder / f"{stem}-{s.count}{suffix}"
        shutil.copyfile(image, dst) if isinstance(image, Path) else image.save(dst, format="PNG")
        return str(dst)

    def gallery(self, ed: Editor, s: Session | None = None) -> list[tuple[str, str]]:
        """The run's targets (copied into the session's folder: Gradio serves files from there)."""
        if ed.run is None:
            return []
        out = []
        for n in ed.run_images():
            t = ed.run.dir / "images" / n / "target.png"
            if t.is_file():
                out.append((self._picture(s, t, f"run-{n}") if s is not None else str(t), n))
        return out

    # -- showing an image ----------------------------------------------------------------------------------------
    def _new_image(self, s: Session, info: str, imgs: dict[str, str | None]) -> dict[Any, Any]:
        """The page after a new image: its pictures, the edit at strength 0, the downloads, sliders at 0."""
        p, gr = self.page, self.gr
        files, dt = self._export(s, {}, True)
        s.shown = {k: imgs.get(k) for k in SHOWN}
        s.info = info
        out: dict[Any, Any] = {p.state: s, p.status: info, **dict(zip(p.images, [s.shown[k] for k in SHOWN]))}
        out[p.images[3]] = str(files["png"])
        assert s.editor is not None
        out[p.render_info] = f"rendered in {dt * 1000:.1f} ms ({'tuned' if s.editor.tuned else 'base'} generator)"
        for comp, key in zip(p.downloads, ("png", "npz", "generator")):
            out[comp] = gr.update(value=str(files[key]), interactive=True)
        out.update({sl: 0.0 for sl in p.sliders})
        return out

    def _shown_back(self, s: Session) -> dict[Any, Any]:
        """The pictures of the image being edited (after a failed or cancelled inversion)."""
        return dict(zip(self.page.images, [s.shown.get(k) for k in SHOWN]))

    def _released(self, s: Session) -> str:
        why, s.released = s.released, None
        return f" (this page's image was released: {why})" if why else ""

    # -- handlers ------------------------------------------------------------------------------------------------
    def on_invert(self, path: str | None, stage_list: list[str], steps: Any, do_align: bool, s: Session | None,
                  progress: Any) -> Any:  # fmt: skip
        """Invert the upload in a thread, showing each stage's picture as it comes (a generator: Gradio closes it
        when the page goes away, which stops the inversion)."""
        p = self.page
        try:
            if not path:
                raise CycleEncodingError("upload an image first")
            check_upload(path, self.max_upload_bytes, self.max_pixels)
            order = [st for st in STAGES if st in (stage_list or [])]
            if not order:
                raise CycleEncodingError("choose at least one stage")
            n = check_tune_steps(steps)
        except CycleEncodingError as e:
            yield {p.status: _error(str(e))}
            return
        s = self.sessions.get(s)
        name = Path(path).name
        assert s.editor is not None
        job: dict[str, Any] = {"name": name, "stop": threading.Event(), "state": "running"}
        s.job = job
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        work = s.editor.fork()  # the session's image stays editable until the new one is done
        notes: list[str] = []

        def worker() -> None:
            try:
                target = work.load_image(path, align=bool(do_align), notes=notes)
                events.put(("target", target))
                work.invert(target, order, progress=lambda q: events.put(("progress", q)), name=Path(path).stem,
                            tune={"steps": n}, cancel=job["stop"])  # fmt: skip
                job["state"] = "done"
                events.put(("done", None))
            except InversionCancelled as e:
                job["state"] = "cancelled"
                print(f"editor: {e}", file=sys.stderr, flush=True)
                events.put(("stopped", f"{e}; the image being edited stays"))
            except Exception as e:  # shown in the page; the app goes on
                job["state"] = "failed"
                events.put(("error", str(e) if isinstance(e, CycleEncodingError) else f"{type(e).__name__}: {e}"))

        t0 = time.perf_counter()
        thread = threading.Thread(target=worker, daemon=True)
        try:
            yield {p.state: s, p.status: f"inverting {name}: {', '.join(order)}{self._released(s)}",
                   p.images[1]: None, p.images[2]: None}  # fmt: skip
            thread.start()
            shown = yield from self._follow(s, events, progress)
        finally:  # also when Gradio closes this generator (page closed, Cancel): the inversion stops at its next step
            job["stop"].set()
            if thread.ident is None:
                job["state"] = "cancelled"
        if shown is None:
            return
        s.editor = work
        info = f"{name}: inverted with {', '.join(order)} in {time.perf_counter() - t0:.1f} s"
        if "recon" not in shown:
            shown["recon"] = self._picture(s, work.reconstruction(), "recon")
        out = self._new_image(s, info + "".join(f". Note: {t}" for t in notes), shown)
        yield {**out, p.invert_btn: self.gr.update(value="Invert again")}

    def _follow(self, s: Session, events: queue.Queue[tuple[str, Any]], progress: Any) -> Any:
        """Yield the page's updates for the worker's events; returns the pictures made (None after an error)."""
        p, skip = self.page, self.gr.skip
        shown: dict[str, str | None] = {}
        progress(0, desc="starting")
        last = time.monotonic()
        while True:
            try:
                kind, val = events.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                kind, val = "wait", None
            if kind == "target":
                shown["input"] = self._picture(s, tensor_to_pil(val), "input")
                yield {p.images[0]: shown["input"]}
            elif kind == "progress" and val.done:
                q: InversionProgress = val
                key = "recon" if q.stage == "tune" else "pivot"
                shown[key] = self._picture(s, q.image, q.stage)
                msg = f"{q.stage}: MSE {q.metrics.get('mse', float('nan')):.4f} ({q.seconds:.1f} s)"
                yield {p.status: msg, p.images[SHOWN.index(key)]: shown[key]}
            elif kind == "progress":
                progress((val.step, max(val.total, val.step)), desc=f"{val.stage} step", unit="steps")
            elif kind in ("error", "stopped"):  # the image being edited stays, with its pictures
                yield {p.status: _error(val) if kind == "error" else val, **self._shown_back(s)}
                return None
            elif kind == "done":
                return shown
            if time.monotonic() - last > HEARTBEAT_S:
                last = time.monotonic()
                yield skip()

    def on_cancel(self, s: Session | None) -> dict[Any, Any]:
        p = self.page
        job = s.job if s is not None else None
        if s is None or job is None or job["state"] not in ("running", "cancelled"):
            return {p.status: "no inversion is running"}
        job["stop"].set()
        return {p.status: f"{job['name']}: inversion cancelled; the image being edited stays", **self._shown_back(s)}

    def on_open_run(self, path: str, s: Session | None) -> dict[Any, Any]:
        p = self.page
        s = self.sessions.get(s)
        assert s.editor is not None
        try:
            if not path or not path.strip():
                raise CycleEncodingError("give a run folder (made by cycle-encoding invert)")
            work = s.editor.fork()
            names = work.attach_run(Path(path.strip()).expanduser())
        except CycleEncodingError as e:
            return {p.status: _error(str(e)), p.state: s}
        s.editor = work
        out = self._show_run_image(s, work.name)
        out[p.run_image] = self.gr.update(choices=names, value=work.name)
        out[p.gallery] = self.gallery(work, s)
        out[p.upload] = None  # the upload box no longer shows what is being edited
        out[p.invert_btn] = self.gr.update(value="Invert")
        return out

    def _show_run_image(self, s: Session, name: str | None) -> dict[Any, Any]:
        ed = s.editor
        assert ed is not None and ed.run is not None
        imgs: dict[str, Any] = {"input": self._picture(s, ed.target_image(), "input")}
        im = ed.run.image(name)
        pivot_png = im.recon_path(im.pivot_stage)
        imgs["pivot"] = self._picture(s, pivot_png, "pivot") if pivot_png.is_file() else None
        imgs["recon"] = self._picture(s, ed.reconstruction(), "recon")
        return self._new_image(s, f"{ed.run.dir.name}/{name}: {', '.join(ed.stages)}", imgs)

    def on_run_image(self, name: str | None, s: Session | None) -> dict[Any, Any]:
        if s is None or s.editor is None or s.editor.run is None or not name or name == s.editor.name:
            return self.gr.skip()
        s = self.sessions.get(s)
        try:
            s.editor.open_image(name)  # type: ignore[union-attr]
        except CycleEncodingError as e:
            return {self.page.status: _error(str(e))}
        return self._show_run_image(s, name)

    def on_gallery(self, s: Session | None, index: int) -> Any:
        gr = self.gr
        if s is None or s.editor is None or s.editor.run is None:
            return gr.update()
        names = s.editor.run_images()
        return gr.update(value=names[index]) if 0 <= index < len(names) else gr.update()

    def on_release(self, s: Session | None, *values: Any) -> dict[Any, Any]:
        """Render the sliders' values (raw: a typed value beyond a range is clamped here, and the slider shows the
        value rendered)."""
        p = self.page
        if s is None or s.editor is None or s.editor.pivot is None:
            why = self._released(s) if s is not None else ""
            return {p.status: _error(f"no image yet: upload one or open a run{why}"),
                    **{sl: 0.0 for sl in p.sliders}}  # fmt: skip
        s = self.sessions.get(s)
        try:
            strengths, clamped = self.strengths(values)
            files, dt = self._export(s, strengths, False)
        except CycleEncodingError as e:  # the sliders go back to the edit shown
            return {p.status: _error(str(e)), **{sl: s.strengths.get(d.key, 0.0) for sl, d in
                                                  zip(p.sliders, self.directions)}}  # fmt: skip
        used = ", ".join(f"{k} {v:+g}" for k, v in strengths.items() if v) or "none"
        note = f"; clamped to the slider's range: {', '.join(clamped)}" if clamped else ""
        return {p.images[3]: str(files["png"]), p.downloads[0]: str(files["png"]), p.downloads[1]: str(files["npz"]),
                p.render_info: f"rendered in {dt * 1000:.1f} ms (edits: {used}{note})", p.status: s.info,
                **dict(zip(p.sliders, strengths.values()))}  # fmt: skip

    def on_reset(self, s: Session | None) -> dict[Any, Any]:
        return self.on_release(s, *([0.0] * len(self.directions)))

    def strengths(self, values: tuple[Any, ...]) -> tuple[dict[str, float], list[str]]:
        """Slider values by direction, each clamped to its range and rounded to 6 decimals (the page's arithmetic
        leaves float noise such as 2.6000000000000005; the strength used is the one shown), and the clamped ones."""
        out, clamped = {}, []
        for d, v in zip(self.directions, values):
            try:
                a = 0.0 if v is None or v == "" else float(v)
            except (TypeError, ValueError):
                raise CycleEncodingError(f"{d.label}: {v!r} is not a number") from None
            if not math.isfinite(a):
                raise CycleEncodingError(f"{d.label}: {v!r} is not a finite number")
            out[d.key] = round(min(max(a, -d.limit), d.limit), 6)
            if out[d.key] != round(a, 6):
                clamped.append(f"{d.label} {a:g} -> {out[d.key]:+g}")
        return out, clamped

    # -- serving -------------------------------------------------------------------------------------------------
    def launch(self, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False) -> Any:
        """Serve on ``host:port`` (no share link, no analytics); ``block`` waits until interrupted."""
        allowed = [str(self.root)]
        if self.template.run is not None:
            allowed.append(str(self.template.run.dir.resolve()))
        self.blocks.queue(default_concurrency_limit=4)
        return self.blocks.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
            max_file_size=self.hard_upload_limit, allowed_paths=allowed, quiet=quiet, show_error=True,
            ssr_mode=False, enable_monitoring=False, mcp_server=False, pwa=False, css=PAGE_CSS, js=ENTER_JS,
        )  # fmt: skip

    def close(self) -> None:
        try:  # a server stopped while still starting can fail to close: its folder goes all the same
            self.blocks.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def check_tune_steps(steps: Any) -> int:
    """The tuning steps asked for, as an int in 0..MAX_TUNE_STEPS, or a one-line error."""
    try:
        n = int(steps or 0)
    except (TypeError, ValueError, OverflowError):
        raise CycleEncodingError(f"tuning steps must be a whole number, got {steps!r}") from None
    if not 0 <= n <= MAX_TUNE_STEPS:
        raise CycleEncodingError(f"tuning steps must be 0-{MAX_TUNE_STEPS} ({TUNE_BOUND_WHY}), got {n}")
    return n


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
