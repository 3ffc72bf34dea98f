"""The browser editor (``cycle-encoding ui``): a Gradio page over :class:`~cycle_encoding.editing.editor.Editor`.

Upload an image (or open a run folder), see the encoder's pivot at once and the tuned reconstruction after it (with a
progress bar), move one slider per direction (the edit renders when a slider is released; the render time is shown),
and download the edited PNG, the codes (``.npz``, NVIDIA's ``projected_w`` layout) and the generator that renders
them. Each browser session edits its own image; the networks and directions are shared.

Nothing here reaches the network: Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``
is set before Gradio is imported), no share link is made, the page's fonts and scripts come from the local server.
Uploads are checked before anything reads them: a file over the size limit, one that is not an image, or an image
with too many pixels gets a message in the page and changes nothing else (Gradio itself refuses files over four times
the limit plus 10 MB before they are sent).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..editing.editor import DEFAULT_STAGES, Editor, Progress
from ..errors import CycleEncodingError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 40_000_000
STAGE_CHOICES = ("encoder", "refine", "project", "tune")
CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#status { min-height: 1.5em; }
"""


def import_gradio() -> Any:
    """Gradio, or a one-line error saying how to install it (an optional extra)."""
    try:
        import gradio as gr
    except ImportError:
        raise CycleEncodingError(
            "the browser editor needs Gradio: pip install 'cycle-encoding[ui]' (or the pins of requirements.txt)"
        ) from None
    return gr


def check_upload(path: str | Path, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, with a one-line message, a file over ``max_bytes``, one that is not an image PIL can read, or an image
    of more than ``max_pixels`` pixels (checked from the header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

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


@dataclass
class Session:
    """One browser session: its editor (a fork of the app's) and the folder its files are written to."""

    editor: Editor
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    shown: dict[str, str | None] = field(default_factory=dict)  # the pictures of the image being edited
    count: int = 0

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _error(text: str) -> str:
    return f"**Error:** {text}"


class EditorApp:
    """The page and its handlers (see the module doc). ``template``: the editor every session forks."""

    def __init__(
        self,
        template: Editor,
        *,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        stages: tuple[str, ...] = DEFAULT_STAGES,
        tune_steps: int = 100,
        work_dir: str | Path | None = None,
    ) -> None:
        self.template = template
        self.max_upload_bytes = int(max_upload_mb * 1e6)
        # Gradio's own cap, a backstop against filling the disk: it refuses in the browser with a short-lived notice,
        # so files between the two limits reach the handler, which says in the page what the limit is
        self.hard_upload_limit = 4 * self.max_upload_bytes + 10_000_000
        self.max_pixels = int(max_pixels)
        self.stages = tuple(stages)
        self.tune_steps = int(tune_steps)
        self.root = Path(tempfile.mkdtemp(prefix="cycle-encoding-ui-", dir=work_dir))
        self.directions = template.directions()
        self.blocks = self._build()

    # -- sessions ------------------------------------------------------------------------------------------------
    def _session(self, s: Session | None) -> Session:
        if s is not None:
            return s
        folder = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
        return Session(self.template.fork(), folder)

    def _export(self, s: Session, strengths: dict[str, float], generator: bool) -> tuple[dict[str, Path], float]:
        """Render and write the session's files; returns them and the render's seconds."""
        t0 = time.perf_counter()
        s.editor.render_tensor(strengths)
        dt = time.perf_counter() - t0
        files = s.editor.export(s.folder / "export", strengths, generator=generator)
        s.files.update(files)
        return s.files, dt

    def _strengths(self, values: tuple[Any, ...]) -> dict[str, float]:
        """Slider values by direction, rounded to 6 decimals (the page's arithmetic leaves float noise such as
        2.6000000000000005; the strength used is the one shown)."""
        return {d.key: round(float(v or 0.0), 6) for d, v in zip(self.directions, values)}

    def _copy(self, s: Session, src: Path, stem: str) -> str:
        s.count += 1
        dst = s.folder / f"{stem}-{s.count}{src.suffix}"
        shutil.copyfile(src, dst)
        return str(dst)

    def _image_file(self, s: Session, image: Any, stem: str) -> str | None:
        if image is None:
            return None
        s.count += 1
        p = s.folder / f"{stem}-{s.count}.png"
        image.save(p, format="PNG")
        return str(p)

    # -- the page ------------------------------------------------------------------------------------------------
    def _build(self) -> Any:
        gr = import_gradio()
        ed = self.template
        G = ed.base
        title = "cycle-encoding editor"
        # Gradio's copies of the files shown and offered: those older than a day are removed every hour
        with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
            state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
            gr.Markdown(
                f"## {title}\nGenerator: {G.resolution}x{G.resolution}, {G.img_channels} channel(s), "
                f"{G.num_ws} codes of {G.w_dim}; encoder: {'yes' if ed.has_encoder else 'none'}. Upload an image "
                "to invert it, or open a run folder; then move the sliders (the edit renders on release)."
            )
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    upload = gr.File(label="Image to invert", file_count="single", type="filepath", elem_id="upload")
                    stages = gr.CheckboxGroup(list(STAGE_CHOICES), value=list(self.stages), label="Stages",
                                              elem_id="stages")  # fmt: skip
                    tune_steps = gr.Number(self.tune_steps, label="Tuning steps (at most)", precision=0,
                                           minimum=0, elem_id="tune-steps")  # fmt: skip
                    align = gr.Checkbox(False, label="Faces: align first (dlib, FFHQ crop)", elem_id="align",
                                        interactive=G.img_channels == 3)  # fmt: skip
                    invert_btn = gr.Button("Invert again", elem_id="invert")
                    with gr.Accordion("Open a run folder", open=ed.run is not None):
                        run_path = gr.Textbox(str(ed.run.dir) if ed.run is not None else "", label="Run folder",
                                              placeholder="out/demo/run", elem_id="run-path")  # fmt: skip
                        open_btn = gr.Button("Open run", elem_id="open-run")
                        run_image = gr.Dropdown(ed.run_images(), value=ed.name if ed.run is not None else None,
                                                label="Image of the run", elem_id="run-image")  # fmt: skip
                        gallery = gr.Gallery(self._gallery(ed), label="The run's images", columns=4, height=220,
                                             elem_id="run-gallery", elem_classes="pixelated")  # fmt: skip
                with gr.Column(scale=3):
                    with gr.Row():
                        kw = dict(type="filepath", format="png", interactive=False, height=220,
                                  elem_classes="pixelated")  # fmt: skip
                        im_input = gr.Image(label="input (as inverted)", elem_id="im-input", **kw)
                        im_pivot = gr.Image(label="pivot (before tuning)", elem_id="im-pivot", **kw)
                        im_recon = gr.Image(label="reconstruction (tuned)", elem_id="im-recon", **kw)
                        im_edit = gr.Image(label="edit", elem_id="im-edit", **kw)
                    render_info = gr.Markdown("", elem_id="render-info")
                    sliders = []
                    with gr.Row():
                        for i, d in enumerate(self.directions):
                            step = slider_step(d.limit)
                            sliders.append(gr.Slider(-d.limit, d.limit, value=0.0, step=step, label=d.label,
                                                     elem_id=f"dir-{i}", min_width=240))  # fmt: skip
                    reset = gr.Button("Reset sliders", elem_id="reset")
                    with gr.Row():
                        dl_png = gr.DownloadButton("edited PNG", elem_id="dl-png", interactive=False)
                        dl_npz = gr.DownloadButton("codes (.npz)", elem_id="dl-npz", interactive=False)
                        dl_gen = gr.DownloadButton("generator (.safetensors)", elem_id="dl-gen", interactive=False)

            images = [im_input, im_pivot, im_recon, im_edit]
            downloads = [dl_png, dl_npz, dl_gen]
            everything = [status, *images, render_info, *downloads, *sliders, state, run_image]

            def updates(s: Session, info: str, gen: bool, **imgs: Any) -> dict[Any, Any]:
                files, dt = self._export(s, {}, gen)
                out: dict[Any, Any] = {state: s, status: info}
                s.shown = {k: imgs.get(k) for k in ("input", "pivot", "recon")}
                for comp, key in zip(images, ("input", "pivot", "recon")):
                    out[comp] = s.shown[key]
                out[im_edit] = str(files["png"])
                out[render_info] = f"rendered in {dt * 1000:.1f} ms ({'tuned' if s.editor.tuned else 'base'} generator)"
                for comp, key in zip(downloads, ("png", "npz", "generator")):
                    out[comp] = gr.update(value=str(files[key]), interactive=True) if key in files else gr.update()
                for sl in sliders:
                    out[sl] = 0.0
                return out

            def on_invert(path: str | None, stage_list: list[str], steps: Any, do_align: bool, s: Session | None,
                          progress: Any = gr.Progress()) -> Any:  # noqa: B008  # fmt: skip
                if not path:
                    yield {status: _error("upload an image first")}
                    return
                try:
                    check_upload(path, self.max_upload_bytes, self.max_pixels)
                    order = [st for st in STAGE_CHOICES if st in (stage_list or [])]
                    if not order:
                        raise CycleEncodingError("choose at least one stage")
                    n = int(steps or 0)
                    if n < 0:
                        raise CycleEncodingError("tuning steps must be >= 0")
                except CycleEncodingError as e:
                    yield {status: _error(str(e))}
                    return
                s = self._session(s)
                work = s.editor.fork()  # the session's image stays editable until the new one is done
                events: queue.Queue[tuple[str, Any]] = queue.Queue()

                def worker() -> None:
                    try:
                        target = work.load_image(path, align=bool(do_align))
                        events.put(("target", target))
                        work.invert(target, order, progress=lambda p: events.put(("progress", p)),
                                    name=Path(path).stem, tune={"steps": n})  # fmt: skip
                        events.put(("done", None))
                    except CycleEncodingError as e:
                        events.put(("error", str(e)))
                    except Exception as e:  # shown in the page; the app goes on
                        events.put(("error", f"{type(e).__name__}: {e}"))

                t0 = time.perf_counter()
                threading.Thread(target=worker, daemon=True).start()
                progress(0, desc="starting")
                shown: dict[str, str | None] = {}
                while True:
                    kind, val = events.get()
                    if kind == "target":
                        from ..editing.editor import tensor_to_pil

                        shown["input"] = self._image_file(s, tensor_to_pil(val), "input")
                        yield {status: f"inverting {Path(path).name}: {', '.join(order)}", im_input: shown["input"],
                               im_pivot: None, im_recon: None}  # fmt: skip
                    elif kind == "progress":
                        p: Progress = val
                        if p.done:
                            f = self._image_file(s, p.image, p.stage)
                            key = "recon" if p.stage == "tune" else "pivot"
                            shown[key] = f
                            m = p.metrics
                            msg = f"{p.stage}: MSE {m.get('mse', float('nan')):.4f} ({p.seconds:.1f} s)"
                            yield {status: msg, images[("input", "pivot", "recon").index(key)]: f}
                        else:
                            progress((p.step, max(p.total, p.step)), desc=f"{p.stage} step", unit="steps")
                    elif kind == "error":  # the image being edited stays, with its pictures
                        back = {comp: s.shown.get(key) for comp, key in zip(images, ("input", "pivot", "recon"))}
                        yield {status: _error(val), **back}
                        return
                    else:
                        break
                s.editor = work
                info = f"{Path(path).name}: inverted with {', '.join(order)} in {time.perf_counter() - t0:.1f} s"
                if "recon" not in shown:
                    shown["recon"] = self._image_file(s, work.reconstruction(), "recon")
                yield updates(s, info, True, **shown)

            def on_open_run(path: str, s: Session | None) -> Any:
                s = self._session(s)
                try:
                    if not path or not path.strip():
                        raise CycleEncodingError("give a run folder (made by cycle-encoding invert)")
                    work = s.editor.fork()
                    names = work.attach_run(Path(path.strip()).expanduser())
                except CycleEncodingError as e:
                    return {status: _error(str(e)), state: s}
                s.editor = work
                out = show_run_image(s, work.name)
                out[run_image] = gr.update(choices=names, value=work.name)
                out[gallery] = self._gallery(work, s)
                return out

            def show_run_image(s: Session, name: str | None) -> dict[Any, Any]:
                ed = s.editor
                imgs: dict[str, Any] = {"input": self._image_file(s, ed.target_image(), "input")}
                im = ed.run.image(name)
                pivot_png = im.recon_path(im.pivot_stage)
                imgs["pivot"] = self._copy(s, pivot_png, "pivot") if pivot_png.is_file() else None
                imgs["recon"] = self._image_file(s, ed.reconstruction(), "recon")
                return updates(s, f"{ed.run.dir.name}/{name}: {', '.join(ed.stages)}", True, **imgs)

            def on_run_image(name: str | None, s: Session | None) -> Any:
                if s is None or s.editor.run is None or not name or name == s.editor.name:
                    return {}
                try:
                    s.editor.open_image(name)
                except CycleEncodingError as e:
                    return {status: _error(str(e))}
                return show_run_image(s, name)

            def on_gallery(s: Session | None, evt: Any) -> Any:
                if s is None or s.editor.run is None:
                    return gr.update()
                names = s.editor.run_images()
                return gr.update(value=names[evt.index]) if 0 <= evt.index < len(names) else gr.update()

            on_gallery.__annotations__["evt"] = gr.SelectData  # what Gradio reads to pass the selection

            def on_release(s: Session | None, *values: float) -> Any:
                if s is None or s.editor.pivot is None:
                    return {status: _error("no image yet: upload one or open a run")}
                strengths = self._strengths(values)
                try:
                    files, dt = self._export(s, strengths, False)
                except CycleEncodingError as e:
                    return {status: _error(str(e))}
                used = ", ".join(f"{k} {v:+g}" for k, v in strengths.items() if v) or "none"
                return {im_edit: str(files["png"]), dl_png: str(files["png"]), dl_npz: str(files["npz"]),
                        render_info: f"rendered in {dt * 1000:.1f} ms (edits: {used})"}  # fmt: skip

            def on_reset(s: Session | None) -> Any:
                out = on_release(s, *([0.0] * len(sliders)))
                return {**out, **{sl: 0.0 for sl in sliders}}

            inv_inputs = [upload, stages, tune_steps, align, state]
            kw_inv = dict(outputs=everything, concurrency_limit=1, show_progress_on=[im_recon])
            upload.upload(on_invert, inv_inputs, **kw_inv)
            invert_btn.click(on_invert, inv_inputs, **kw_inv)
            open_btn.click(on_open_run, [run_path, state], [*everything, gallery])
            run_image.input(on_run_image, [run_image, state], everything)
            gallery.select(on_gallery, [state], run_image).then(on_run_image, [run_image, state], everything)
            for sl in sliders:
                sl.release(on_release, [state, *sliders], [im_edit, render_info, dl_png, dl_npz, status],
                           show_progress="hidden")  # fmt: skip
            reset.click(on_reset, [state], [im_edit, render_info, dl_png, dl_npz, status, *sliders])
            if ed.run is not None:  # started on a run: every new session opens it
                demo.load(lambda s: on_open_run(str(ed.run.dir), s), [state], [*everything, gallery])
        return demo

    def _gallery(self, ed: Editor, s: Session | None = None) -> list[tuple[str, str]]:
        """The run's targets (copied into the session's folder: Gradio serves files from there)."""
        if ed.run is None:
            return []
        out = []
        for n in ed.run_images():
            t = ed.run.dir / "images" / n / "target.png"
            if t.is_file():
                out.append((self._copy(s, t, f"run-{n}") if s is not None else str(t), n))
        return out

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
            ssr_mode=False, enable_monitoring=False, mcp_server=False, pwa=False, css=CSS,
        )  # fmt: skip

    def close(self) -> None:
        self.blocks.close()
        shutil.rmtree(self.root, ignore_errors=True)


def slider_step(limit: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about 40 steps from 0 to ``limit``."""
    import math

    raw = max(limit, 1e-6) / 40
    e = 10.0 ** math.floor(math.log10(raw))
    return float(min((m * e for m in (1, 2, 5, 10)), key=lambda v: abs(math.log(v / raw))))


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
