"""The Gradio page: widgets wired to the plain functions of ``logic.py``.

Handlers take the widgets' raw values (``preprocess=False``): the app reads uploads itself with
``read_upload``, so a corrupt, huge or odd file gives a message in the page, never a traceback.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check (read by gradio at run time)

import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qualiteacher.app.logic import (LEVELS, MAX_PIXELS, UploadError, level_sweep, read_upload,  # noqa: E402
                                    restore_image, score_images, score_markdown, to_uint8)
from qualiteacher.app.model import AppModel  # noqa: E402
from qualiteacher.classical import CLASSICAL, DEFAULT_CLASSICAL, classical_restorer, list_classical  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NO_CLASSICAL = "none"


class Settings(NamedTuple):
    tile: int | None = None          # None: tiles of 512 px above that size; 0: never
    max_pixels: int = MAX_PIXELS


def upload_path(payload: Any) -> str | None:
    """The file path inside a raw Gradio image payload (dict or FileData), or a plain path."""
    if payload is None or isinstance(payload, (str, Path)):
        return None if payload in (None, "") else str(payload)
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None)


class Handlers:
    """What the page's buttons and sliders call; usable without a browser."""

    def __init__(self, model: AppModel, ensemble: nn.Module, settings: Settings = Settings()) -> None:
        self.model, self.ensemble, self.settings = model, ensemble, settings

    def restore(self, payload: Any, level: float, w: float | None, teacher: bool
                ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str, str]:
        """-> (input/output pair for the slider, score table, status line)."""
        try:
            x = read_upload(upload_path(payload), self.settings.max_pixels)
            out = restore_image(self.model, x, int(level), None if w is None else float(w), bool(teacher),
                                self.settings.tile)
            start = time.perf_counter()
            table = score_images(self.ensemble, torch.cat([x, out.image]), ["input", "output"])
            scoring = time.perf_counter() - start
        except UploadError as err:
            return None, "", f"⚠️ {err}"
        except Exception as err:  # noqa: BLE001  the page must say what failed, not die
            return None, "", f"⚠️ restoration failed: {type(err).__name__}: {err}"
        h, w_px = x.shape[-2:]
        tiling = f"tiles of {out.tile} px" if out.tile else "untiled"
        status = (f"**{out.label}** · {w_px}×{h} px, {tiling} · restored in {out.seconds:.2f} s, "
                  f"scored in {scoring:.2f} s")
        return (to_uint8(x), to_uint8(out.image)), score_markdown(table), status

    def classical(self, payload: Any, name: str | None) -> tuple[np.ndarray | None, str]:
        """-> (the classical restorer ``name``'s output, its scores beside the input's, with a timing
        line); nothing for ``"none"``. Runs on the model's device."""
        if not name or name == NO_CLASSICAL:
            return None, ""
        try:
            x = read_upload(upload_path(payload), self.settings.max_pixels)
            device = next(self.model.student.parameters()).device
            start = time.perf_counter()
            with torch.no_grad():
                out = classical_restorer(name)(x.to(device)).float().cpu()
            seconds = time.perf_counter() - start
            table = score_images(self.ensemble, torch.cat([x, out]), ["input", name])
        except UploadError as err:
            return None, f"⚠️ {err}"
        except Exception as err:  # noqa: BLE001
            return None, f"⚠️ classical restoration failed: {type(err).__name__}: {err}"
        return to_uint8(out), (f"**{name}**: {CLASSICAL[name].summary} · no training · {seconds:.2f} s\n\n"
                               + score_markdown(table))

    def sweep(self, payload: Any, w: float | None) -> tuple[list[tuple[np.ndarray, str]] | None, str]:
        """-> (the image at every level with its fused score, per-level score table with a timing line)."""
        try:
            x = read_upload(upload_path(payload), self.settings.max_pixels)
            sw = level_sweep(self.model, self.ensemble, x, None if w is None else float(w), LEVELS,
                             tile=self.settings.tile)
        except UploadError as err:
            return None, f"⚠️ {err}"
        except Exception as err:  # noqa: BLE001
            return None, f"⚠️ level sweep failed: {type(err).__name__}: {err}"
        return list(zip(sw.images, sw.captions)), f"Level sweep in {sw.seconds:.2f} s\n\n" + score_markdown(sw.table)


def example_images(folder: str | Path | None, limit: int = 8) -> list[str]:
    """Up to ``limit`` images of ``folder`` (sorted), as the page's examples."""
    if folder is None or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [str(p) for p in files[:limit]]


# over 60 lines: the page's layout, top to bottom, in Gradio's nested blocks (one place to read the page);
# what the widgets do lives in `Handlers`
def build_app(model: AppModel, ensemble: nn.Module, examples: list[str] = (), settings: Settings = Settings()) -> Any:
    """The ``gr.Blocks`` page (not launched)."""
    import gradio as gr  # lazy: gradio takes 4 s to import and only the served page needs it

    h = Handlers(model, ensemble, settings)
    task = model.task or "restoration"
    with gr.Blocks(analytics_enabled=False, title=f"QualiTeacher · {task}") as page:
        gr.Markdown(f"## QualiTeacher · {task}\nModel: `{model.source}` · IQA ensemble `{model.iqa_preset}`. "
                    f"Ask the student for a quality level (0 = low, {max(LEVELS)} = top); the table grades "
                    f"input and output with the ensemble the model was trained with.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, sources=["upload"], label="input image",
                                 height=260, elem_id="qt-input")
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[image], label="examples (demo test images)")
                level = gr.Slider(0, max(LEVELS), value=model.top_level, step=1, label="quality level",
                                  elem_id="qt-level")
                if model.has_fidelity:
                    w = gr.Slider(0.0, 1.0, value=model.default_w, step=0.05, elem_id="qt-w",
                                  label="fidelity w (0: codebook prior only, 1: input features fused fully)")
                else:
                    w = gr.State(None)
                teacher = gr.Checkbox(value=False, label="teacher output (unconditioned EMA teacher)",
                                      interactive=model.teacher is not None, elem_id="qt-teacher",
                                      info=None if model.teacher is not None else "this model source holds no teacher")
                with gr.Row():
                    run = gr.Button("Restore", variant="primary", elem_id="qt-run")
                    sweep = gr.Button("Level sweep", elem_id="qt-sweep-button")
            with gr.Column(scale=2):
                pair = gr.ImageSlider(label="input | output (drag the divider)", type="numpy", elem_id="qt-output")
                status = gr.Markdown(elem_id="qt-status")
                scores = gr.Markdown(elem_id="qt-scores")
        strip = gr.Gallery(label="level sweep: the student at every level (fused score)", columns=len(LEVELS),
                           object_fit="contain", height=240, interactive=False, elem_id="qt-sweep")
        sweep_scores = gr.Markdown(elem_id="qt-sweep-scores")
        with gr.Row():  # what a user tries first: a classical method, no training
            with gr.Column(scale=1):
                method = gr.Dropdown([NO_CLASSICAL, *list_classical(model.task)], elem_id="qt-classical-method",
                                     value=DEFAULT_CLASSICAL.get(model.task or "", NO_CLASSICAL),
                                     label="compare with a classical restorer (no training)")
                classical_view = gr.Image(label="classical restoration", type="numpy", format="png",
                                          interactive=False, height=260, elem_id="qt-classical")
            classical_scores = gr.Markdown(elem_id="qt-classical-scores")

        ins, outs = [image, level, w, teacher], [pair, scores, status]
        common = {"fn": h.restore, "inputs": ins, "outputs": outs, "preprocess": False,
                  "show_progress": "minimal", "trigger_mode": "always_last"}
        image.change(lambda: (None, ""), None, [strip, sweep_scores])  # no stale sweep of another image
        image.change(**common)  # an upload, an example picked, or a cleared input
        compare = {"fn": h.classical, "inputs": [image, method], "outputs": [classical_view, classical_scores],
                   "preprocess": False, "show_progress": "minimal", "trigger_mode": "always_last"}
        image.change(**compare)
        method.change(**compare)
        run.click(**common)
        level.release(**common)
        teacher.input(**common)
        if model.has_fidelity:
            w.release(**common)
        sweep.click(h.sweep, [image, w], [strip, sweep_scores], preprocess=False)
    return page


def launch(page: Any, host: str = "127.0.0.1", port: int | None = None, allowed: list[str] = (),
           block: bool = True) -> Any:
    """Serve ``page`` on ``host:port`` (no share link, no telemetry)."""
    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, share=False, show_error=True, inbrowser=False,
                       max_file_size="200mb", allowed_paths=list(allowed), prevent_thread_lock=not block,
                       ssr_mode=False, mcp_server=False)
