"""DiLaServe: SLO-aware serving of diffusion language models on Ray."""

__version__ = "0.1.0"
