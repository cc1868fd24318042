"""Every run logs to TensorBoard by default: scalars of both stages and the validation / VAE grids as images,
read back with TensorBoard's own EventAccumulator; `report_to: none` writes no event files."""

import pytest
from conftest import tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm_pipeline.training import train


def events(out) -> EventAccumulator:
    files = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {out / 'logs'}"
    accumulator = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_run_logs_scalars_and_images_to_tensorboard(tmp_path, caption_folder, family):
    out = tmp_path / "out"
    train(tiny_config(out, caption_folder, stages=["vae", "unet"], max_train_steps=3,
                      validation__validation_steps=2, vae_training__max_train_steps=2, model__family=family))
    logged = events(out)
    scalars = set(logged.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "val_loss", "heldout_psnr_db"):
        assert name in scalars, name
    loss_steps = [event.step for event in logged.Scalars("loss")]
    assert loss_steps == [1, 2, 3, 4, 5]  # VAE steps 1-2, then UNet steps 1-3 as 3-5: they only grow
    assert {"validation", "vae_reconstructions"} <= set(logged.Tags()["images"])
    grid = logged.Images("validation")[-1]
    # one prompt x one seed: the 32 px image enlarged to 128 px, with its prompt written under it
    assert grid.step == 2 + 3 and grid.width == 128 and grid.height > 128


@pytest.mark.parametrize("report_to", ["none", None])
def test_report_to_none_writes_no_event_files(tmp_path, caption_folder, report_to):
    out = tmp_path / "out"
    train(tiny_config(out, caption_folder, max_train_steps=1, report_to=report_to))
    assert not list(out.rglob("events.out.tfevents.*"))
    assert (out / "metrics.jsonl").is_file()
