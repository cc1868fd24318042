"""The losses: the VAE loss's foreground weighting, and the diffusion loss's masks."""

from types import SimpleNamespace

import pytest
import torch

from ldm_pipeline.losses import foreground_mask, vae_loss

NO_KL = SimpleNamespace(kl=lambda: torch.zeros(1))


def red_square_on_white() -> torch.Tensor:
    image = torch.ones(1, 3, 16, 16)  # white in [-1, 1]
    image[0, :, 4:8, 4:8] = torch.tensor([0.72, -0.69, -0.69])[:, None, None]  # (220, 40, 40)
    return image


def test_foreground_is_what_differs_from_the_background():
    mask = foreground_mask(red_square_on_white())
    expected = torch.zeros(1, 1, 16, 16)
    expected[0, 0, 4:8, 4:8] = 1
    assert torch.equal(mask, expected)
    dark = -red_square_on_white()  # the background is whatever color most pixels have
    assert torch.equal(foreground_mask(dark), expected)


@pytest.mark.parametrize("weight", [0.0, 4.0])
def test_foreground_errors_count_one_plus_weight_times_more(weight):
    target = red_square_on_white()
    on_shape, on_background = target.clone(), target.clone()
    on_shape[0, 1, 5, 5] += 0.5
    on_background[0, 1, 12, 12] -= 0.5
    shape_loss = vae_loss(on_shape, target, NO_KL, 0.0, weight)[0]
    background_loss = vae_loss(on_background, target, NO_KL, 0.0, weight)[0]
    assert shape_loss / background_loss == pytest.approx(1 + weight)
    assert vae_loss(target, target, NO_KL, 0.0, weight)[0] == 0


def test_a_masked_out_region_gets_no_gradient_and_an_all_ones_mask_is_no_mask():
    from ldm_pipeline.config import ModelConfig
    from ldm_pipeline.losses import diffusion_loss
    from ldm_pipeline.models import build_noise_scheduler

    scheduler = build_noise_scheduler(ModelConfig(), "epsilon")
    torch.manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0  # the subject; the rest is background
    diffusion_loss(prediction, target, timesteps, scheduler, 5.0, mask).backward()
    assert prediction.grad[:, :, 2:6, 2:6].abs().sum() > 0
    assert prediction.grad[:, :, :2].abs().sum() == 0 and prediction.grad[:, :, :, 6:].abs().sum() == 0
    plain = diffusion_loss(prediction, target, timesteps, scheduler, 5.0)
    ones = diffusion_loss(prediction, target, timesteps, scheduler, 5.0, torch.ones(2, 1, 8, 8))
    assert torch.allclose(plain, ones, rtol=1e-6)
    # normalised by the mask's area: the masked loss is the mean error over the subject
    inside = (prediction - target)[:, :, 2:6, 2:6].pow(2).mean()
    assert torch.allclose(diffusion_loss(prediction, target, timesteps, scheduler, None, mask), inside, rtol=1e-6)
