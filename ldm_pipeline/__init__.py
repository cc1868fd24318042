"""ldm_pipeline: latent diffusion text-to-image on Hugging Face Diffusers."""
