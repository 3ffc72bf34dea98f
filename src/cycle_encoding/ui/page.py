"""The browser editor's page: its components (:class:`Page`) and which handler of ``EditorApp`` each event calls
(``app``: the ``ui.app.EditorApp`` the page belongs to)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..inversion.config import STAGES

MAX_TUNE_STEPS = 3500  # 10x the authors' 350 (PTI's and Cycle Encoding's default)
TUNE_BOUND_WHY = (f"bounded at {MAX_TUNE_STEPS}, ten times the authors' 350, so that one visitor cannot hold the "
                  "server for hours")  # fmt: skip
SHOWN = ("input", "pivot", "recon")  # the pictures of the image being edited, before the edit
RANGES_HELP = (
    "Each slider runs over +-L, where L is the spread of the generator's codes along its direction (the largest "
    "minus the smallest projection of 2,000 mapping-network codes: standard deviations for GANSpace, distance in W "
    "for the others), and at least 3 (the largest default strength of `cycle-encoding edit`): from any code in the "
    "generator's range, a full slider reaches the far end of it. The edit renders when a slider is released, or when "
    "a typed value is entered (Enter or Tab); a value beyond the range is clamped to it."
)
PAGE_CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#status { min-height: 1.5em; }
"""
# Enter in a slider's number box renders as Tab does (Gradio renders on leaving the box)
ENTER_JS = """() => { document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.key === "Enter" && t instanceof HTMLInputElement && t.type === "number" && t.closest(".edit-slider")) t.blur();
}, true); }"""


@dataclass
class Page:
    """The components the handlers read and write."""

    state: Any
    status: Any
    upload: Any
    stages: Any
    tune_steps: Any
    align: Any
    invert_btn: Any
    cancel_btn: Any
    run_path: Any
    open_btn: Any
    run_image: Any
    gallery: Any
    images: list[Any]  # input, pivot, reconstruction, edit
    render_info: Any
    sliders: list[Any]
    reset: Any
    downloads: list[Any]  # edited PNG, codes, generator

    @property
    def everything(self) -> list[Any]:
        """What showing another image changes."""
        return [self.status, *self.images, self.render_info, *self.downloads, *self.sliders, self.state,
                self.run_image, self.invert_btn]  # fmt: skip

    @property
    def edit_outputs(self) -> list[Any]:
        """What a render of the sliders changes."""
        return [self.images[3], self.render_info, *self.downloads[:2], self.status, *self.sliders]


def build_page(app: Any) -> Any:
    """The page of ``app`` (a ``gr.Blocks``), its events wired to ``app``'s handlers."""
    gr = app.gr
    ed = app.template
    G = ed.base
    title = "cycle-encoding editor"
    # Gradio's copies of the files shown and offered: those older than a day are removed every hour
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        state = gr.State(None, delete_callback=app.sessions.drop)
        gr.Markdown(
            f"## {title}\nGenerator: {G.resolution}x{G.resolution}, {G.img_channels} channel(s), {G.num_ws} codes "
            f"of {G.w_dim}; encoder: {'yes' if ed.has_encoder else 'none'}. Upload an image to invert it, or open a "
            "run folder; then move the sliders."
        )
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                left = _inputs(app, gr)
            with gr.Column(scale=3):
                right = _outputs(app, gr)
        page = Page(state, status, *left, *right)
        app.page = page
        _wire(app, page, demo)
    return demo


def _inputs(app: Any, gr: Any) -> tuple[Any, ...]:
    """The left column: upload, stages, tuning steps, alignment, Invert / Cancel, the run folder."""
    ed, G = app.template, app.template.base
    upload = gr.File(label="Image to invert", file_count="single", type="filepath", elem_id="upload")
    stages = gr.CheckboxGroup(list(STAGES), value=list(app.stages), label="Stages", elem_id="stages")
    tune_steps = gr.Number(app.tune_steps, label=f"Tuning steps (at most; 0-{MAX_TUNE_STEPS})", precision=0,
                           info=TUNE_BOUND_WHY, elem_id="tune-steps")  # fmt: skip
    align = gr.Checkbox(False, label="Faces: align first (dlib, FFHQ crop)", elem_id="align",
                        interactive=G.img_channels == 3)  # fmt: skip
    with gr.Row():
        invert_btn = gr.Button("Invert", elem_id="invert")
        cancel_btn = gr.Button("Cancel", elem_id="cancel", variant="stop")
    with gr.Accordion("Open a run folder", open=ed.run is not None):
        run_path = gr.Textbox(str(ed.run.dir) if ed.run is not None else "", label="Run folder",
                              placeholder="out/demo/run", elem_id="run-path")  # fmt: skip
        open_btn = gr.Button("Open run", elem_id="open-run")
        run_image = gr.Dropdown(ed.run_images(), value=ed.name if ed.run is not None else None,
                                label="Image of the run", elem_id="run-image")  # fmt: skip
        gallery = gr.Gallery(app.gallery(ed), label="The run's images", columns=4, height=220, elem_id="run-gallery",
                             elem_classes="pixelated")  # fmt: skip
    return upload, stages, tune_steps, align, invert_btn, cancel_btn, run_path, open_btn, run_image, gallery


def _outputs(app: Any, gr: Any) -> tuple[Any, ...]:
    """The right column: the four pictures, the render's line, one slider per direction, the downloads."""
    kw = dict(type="filepath", format="png", interactive=False, height=220, elem_classes="pixelated")
    with gr.Row():
        images = [gr.Image(label=label, elem_id=f"im-{key}", **kw) for key, label in (
            ("input", "input (as inverted)"), ("pivot", "pivot (before tuning)"), ("recon", "reconstruction (tuned)"),
            ("edit", "edit"))]  # fmt: skip
    render_info = gr.Markdown("", elem_id="render-info")
    with gr.Row():
        sliders = [gr.Slider(-d.limit, d.limit, value=0.0, step=d.step, label=d.label, elem_id=f"dir-{i}",
                             elem_classes="edit-slider", min_width=240) for i, d in enumerate(app.directions)]  # fmt: skip
    gr.Markdown(RANGES_HELP, elem_id="ranges-help")
    reset = gr.Button("Reset sliders", elem_id="reset")
    with gr.Row():
        downloads = [gr.DownloadButton(label, elem_id=f"dl-{key}", interactive=False) for key, label in (
            ("png", "edited PNG"), ("npz", "codes (.npz)"), ("gen", "generator (.safetensors)"))]  # fmt: skip
    return images, render_info, sliders, reset, downloads


def _wire(app: Any, p: Page, demo: Any) -> None:
    gr = app.gr

    def on_invert(path: str | None, stage_list: list[str], steps: Any, do_align: bool, s: Any,
                  progress: Any = gr.Progress()) -> Any:  # noqa: B008  # fmt: skip
        yield from app.on_invert(path, stage_list, steps, do_align, s, progress)

    def on_gallery(s: Any, evt: Any) -> Any:
        return app.on_gallery(s, evt.index)

    on_gallery.__annotations__["evt"] = gr.SelectData  # what Gradio reads to pass the selection

    inv_inputs = [p.upload, p.stages, p.tune_steps, p.align, p.state]
    kw_inv = dict(outputs=p.everything, concurrency_limit=1, show_progress_on=[p.images[2]])
    inverting = [p.upload.upload(on_invert, inv_inputs, **kw_inv), p.invert_btn.click(on_invert, inv_inputs, **kw_inv)]
    # the button stops the inversion at its next step (a closed page does the same: Gradio closes the handler)
    p.cancel_btn.click(app.on_cancel, [p.state], [p.status, *p.images[:3]], cancels=inverting)
    run_outputs = [*p.everything, p.gallery, p.upload]
    p.open_btn.click(app.on_open_run, [p.run_path, p.state], run_outputs)
    p.run_image.input(app.on_run_image, [p.run_image, p.state], p.everything)
    p.gallery.select(on_gallery, [p.state], p.run_image).then(app.on_run_image, [p.run_image, p.state], p.everything)
    for sl in p.sliders:  # raw values (preprocess off): a typed value beyond the range is clamped by the handler
        sl.release(app.on_release, [p.state, *p.sliders], p.edit_outputs, show_progress="hidden", preprocess=False)
    p.reset.click(app.on_reset, [p.state], p.edit_outputs)
    if app.template.run is not None:  # started on a run: every new session opens it
        demo.load(lambda s: app.on_open_run(str(app.template.run.dir), s), [p.state], run_outputs)
