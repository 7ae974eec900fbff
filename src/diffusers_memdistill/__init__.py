"""diffusers-memdistill: distil diffusion models into few-step students and measure what they memorize."""

__version__ = "0.1.0"
