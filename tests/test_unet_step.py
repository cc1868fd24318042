"""The loss of one UNet step (`unet_stage.step_loss` / `training_loss`), composed from its parts: the target of
epsilon and v-prediction, min-SNR weighting, offset noise, caption dropout, and LoRA adapters as the only weights
that learn."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import compute_snr

from ldm_pipeline.config import LoraConfig, ModelConfig
from ldm_pipeline.data import tokenize
from ldm_pipeline.lora import add_adapters
from ldm_pipeline.models import build_noise_scheduler, build_text_encoder, build_unet, build_vae, load_tokenizer
from ldm_pipeline.unet_stage import UNetParts, draw, step_loss, training_loss

CAPTIONS = ["a red square on the left", "a blue square on the right"]
SHAPE = (4, 4, 4)  # (C, h, w) of 32 px images through the tiny VAE


class Spy(torch.nn.Module):
    """A denoiser that predicts zeros and remembers the text states it was given."""

    def __init__(self):
        super().__init__()
        self.states = []

    def forward(self, noisy, timesteps, states, added_cond_kwargs=None):
        self.states.append(states)
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def make_parts(unet, prediction_type="epsilon", **settings) -> tuple[UNetParts, dict]:
    torch.manual_seed(0)
    model = ModelConfig()
    tokenizer = load_tokenizer(model, lambda: CAPTIONS)
    text_encoder = build_text_encoder(model, tokenizer).eval()
    ids = tokenize(tokenizer, CAPTIONS * 2)  # (4, L)
    values = dict(caption_dropout=0.0, noise_offset=0.0, snr_gamma=None) | settings
    parts = UNetParts(unet=unet, text_encoder=text_encoder, vae=build_vae(model),
                      noise_scheduler=build_noise_scheduler(model, prediction_type), latent_shape=SHAPE,
                      empty_ids=tokenize(tokenizer, [""])[0], empty_embeds=None, weight_dtype=torch.float32,
                      trains_text_encoder=False, device=torch.device("cpu"), **values)
    batch = {"latent_mean": torch.randn(4, *SHAPE), "latent_std": torch.rand(4, *SHAPE) * 0.1, "input_ids": ids}
    return parts, batch


def fixed_draws(parts):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(4, *SHAPE, generator=generator), torch.randn(4, *SHAPE, generator=generator),
            torch.tensor([999, 500, 100, 10]), torch.zeros(4, dtype=torch.bool))


def latents_of(parts, batch, latent_noise):
    return (batch["latent_mean"] + batch["latent_std"] * latent_noise) * parts.vae.config.scaling_factor


def test_epsilon_prediction_is_scored_against_the_noise():
    parts, batch = make_parts(Spy())
    latent_noise, noise, timesteps, dropped = fixed_draws(parts)
    loss = step_loss(parts, batch, latent_noise, noise, timesteps, dropped)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_v_prediction_is_scored_against_the_velocity():
    parts, batch = make_parts(Spy(), "v_prediction")
    latent_noise, noise, timesteps, dropped = fixed_draws(parts)
    velocity = parts.noise_scheduler.get_velocity(latents_of(parts, batch, latent_noise), noise, timesteps)
    loss = step_loss(parts, batch, latent_noise, noise, timesteps, dropped)
    assert loss.item() == pytest.approx(velocity.pow(2).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(noise.pow(2).mean().item(), rel=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_by_its_timestep(prediction_type):
    parts, batch = make_parts(Spy(), prediction_type, snr_gamma=5.0)
    latent_noise, noise, timesteps, dropped = fixed_draws(parts)
    target = noise if prediction_type == "epsilon" else \
        parts.noise_scheduler.get_velocity(latents_of(parts, batch, latent_noise), noise, timesteps)
    snr = compute_snr(parts.noise_scheduler, timesteps)
    weight = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    expected = (target.pow(2).mean(dim=(1, 2, 3)) * weight).mean()
    assert step_loss(parts, batch, latent_noise, noise, timesteps, dropped).item() == \
        pytest.approx(expected.item(), rel=1e-5)
    assert weight.max() / weight.min() > 10  # the weights differ enough across timesteps to matter


def test_offset_noise_adds_a_per_channel_constant_to_the_noise():
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in range(4)]  # noqa: E731
    plain, batch = make_parts(Spy())
    offset, _ = make_parts(Spy(), noise_offset=0.5)
    draws = [draw(plain, generator, SHAPE) for generator in generators()]
    noise = torch.stack([d[1] for d in draws]) + 0.5 * torch.stack([d[2] for d in draws])  # (B, C, h, w)
    assert training_loss(offset, batch, generators()).item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)
    assert training_loss(plain, batch, generators()).item() != pytest.approx(noise.pow(2).mean().item(), rel=1e-3)


def test_a_dropped_caption_becomes_the_empty_prompt():
    spy = Spy()
    parts, batch = make_parts(spy, caption_dropout=1.0)  # every caption drawn as dropped
    training_loss(parts, batch, [torch.Generator().manual_seed(seed) for seed in range(4)])
    empty = parts.text_encoder(parts.empty_ids[None])[0]  # (1, L, D)
    assert torch.allclose(spy.states[-1], empty.expand(4, -1, -1))

    kept, batch = make_parts(spy, caption_dropout=0.0)
    training_loss(kept, batch, [torch.Generator().manual_seed(seed) for seed in range(4)])
    assert torch.allclose(spy.states[-1], kept.text_encoder(batch["input_ids"])[0])
    assert not torch.allclose(spy.states[-1], empty.expand(4, -1, -1))

    cached = {**{k: batch[k] for k in ("latent_mean", "latent_std")}, "prompt_embeds": torch.randn(4, 16, 32)}
    parts.empty_embeds = torch.full((16, 32), 7.0)  # the cache's empty-prompt embedding
    training_loss(parts, cached, [torch.Generator().manual_seed(seed) for seed in range(4)])
    assert torch.equal(spy.states[-1], torch.full((4, 16, 32), 7.0))


def test_with_lora_only_the_adapters_get_gradients():
    model = ModelConfig()
    tokenizer = load_tokenizer(model, lambda: CAPTIONS)
    vae, text_encoder = build_vae(model), build_text_encoder(model, tokenizer)
    unet = build_unet(model, 32, vae, text_encoder)
    add_adapters(unet, LoraConfig(rank=2), LoraConfig().target_modules)
    parts, batch = make_parts(unet)
    loss = training_loss(parts, batch, [torch.Generator().manual_seed(seed) for seed in range(4)])
    loss.backward()
    adapters = {name for name, p in unet.named_parameters() if p.grad is not None}
    assert adapters and all("lora_" in name for name in adapters)
    assert all(p.grad is None for name, p in unet.named_parameters() if "lora_" not in name)
