"""pakhsh: diffusion models (DDPM, Improved DDPM and the systems built on them) as one toolkit."""

__version__ = "0.1.0"
