"""`ldm-pipeline demo --model DIR`: a local web page over `load_pipeline` / `generate` (gradio).

Each request writes its images as PNGs with their generation settings (`GeneratedImage.save`), so
what the page shows and offers for download is exactly what `ldm-pipeline generate` writes.
gradio is an optional extra: `pip install -e ".[demo]"`.
"""

from __future__ import annotations

import errno
import os
import socket
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
                if pipe.example_prompts:  # what the model was trained on: a newcomer sees what it understands
                    gr.Examples(examples=[[text] for text in pipe.example_prompts], inputs=[prompt],
                                label="Prompts the model was trained on")
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


def check_address(host: str, port: int) -> None:
    """Refuse a port or host the server could not listen on, before the model loads: gradio would only fail
    after it, with a message about an environment variable."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port {port!r} is not a TCP port; give one from 1 to 65535 (default 7860)")
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1] as in a URL
    try:
        family, kind, _, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host}: not an address or a host name this machine can resolve ({error.strerror});"
                          " give e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from error
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no clash
        try:
            probe.bind(where)
        except OSError as error:
            reasons = {errno.EADDRINUSE: f"port {port} is in use on {host} (another demo or server?); stop it, or "
                                         "choose another --port",
                       errno.EACCES: f"port {port} needs administrator rights; choose a --port above 1023",
                       errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; give one of its addresses, "
                                            "127.0.0.1 or 0.0.0.0"}
            reason = reasons.get(error.errno, f"cannot listen there ({error.strerror}); choose another --port or "
                                              "--host")
            raise ConfigError(f"--host {host} --port {port}: {reason}") from error


def serve(model, host: str = "127.0.0.1", port: int = 7860, device=None, out_dir=None) -> None:
    check_address(host, port)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a directory for the images")
    temporary = out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="ldm-pipeline-demo-") if temporary else out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        demo = build_demo(model, out_dir, device=device)
        try:
            demo.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                                allowed_paths=[str(out_dir)], prevent_thread_lock=True)
        except OSError as error:  # taken between the check and now
            raise ConfigError(f"--host {host} --port {port}: the server could not start there (the port was taken "
                              "after the check?); choose another --port") from error
        # Said only once the server listens, so a failed start never looks like a running one.
        print(f"serving {model} on http://{host}:{port}, images to {out_dir} (Ctrl+C stops)", flush=True)
        demo.block_thread()
    finally:
        if temporary and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing generated: a folder nobody will look at
