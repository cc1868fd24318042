"""The VAE loss's foreground weighting: which pixels count as foreground, and by how much they count."""

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
