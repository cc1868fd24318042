"""`ldm-pipeline demo --model DIR`: a local web page over `load_pipeline` / `generate` (gradio).

Each request writes its images as PNGs with their generation settings (`GeneratedImage.save`), so
what the page shows and offers for download is exactly what `ldm-pipeline generate` writes.
gradio is an optional extra: `pip install -e ".[demo]"`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError
from .generation import generate, save_images
from .models import SAMPLERS, make_sampler
from .pipeline import load_pipeline

MAX_IMAGES = 8


def import_gradio():
    # A local demo has no reason to report usage to gradio's servers (and no network may be there).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ConfigError('the demo needs gradio, an optional extra: pip install -e ".[demo]"') from error
    return gradio


def build_demo(model, out_dir, device=None):
    """The gradio Blocks page for the pipeline at `model`; each request's PNGs are added to `out_dir`."""
    gr = import_gradio()
    pipe = load_pipeline(model, device=device)
    sampler_config = pipe.scheduler.config
    defaults = {**pipe.generation_defaults, "scheduler": pipe.scheduler_name}

    def run(prompt, negative_prompt, seed, steps, guidance, scheduler, num_images):
        # One request at a time (gradio's default queue), so switching the shared sampler is safe.
        pipe.scheduler, pipe.scheduler_name = make_sampler(scheduler, sampler_config), scheduler
        images = generate(pipe, [prompt] * int(num_images), seeds=int(seed), num_inference_steps=int(steps),
                          guidance_scale=float(guidance), negative_prompt=negative_prompt or None, show_progress=False)
        paths = [str(path) for path in save_images(images, out_dir)]
        return [(path, f"seed {int(seed) + k}") for k, path in enumerate(paths)], paths

    with gr.Blocks(title="ldm_pipeline demo") as demo:
        gr.Markdown(f"### ldm_pipeline · `{model}`\nImage k uses seed + k. The PNGs carry prompt, seed and "
                    "settings as text metadata.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2)
                negative_prompt = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=defaults["num_inference_steps"], step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=defaults["guidance_scale"], step=0.5, label="Guidance")
                scheduler = gr.Dropdown(sorted(SAMPLERS), value=defaults["scheduler"], label="Scheduler")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2)
                files = gr.File(label="PNG files (with metadata)", file_count="multiple")
        inputs = [prompt, negative_prompt, seed, steps, guidance, scheduler, num_images]
        button.click(run, inputs, [gallery, files])
        prompt.submit(run, inputs, [gallery, files])
    return demo


def serve(model, host: str = "127.0.0.1", port: int = 7860, device=None, out_dir=None) -> None:
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ldm-pipeline-demo-"))
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for the images")
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = build_demo(model, out_dir, device=device)
    print(f"serving {model} on http://{host}:{port}, images to {out_dir} (Ctrl+C stops)", flush=True)
    demo.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                        allowed_paths=[str(out_dir)])
