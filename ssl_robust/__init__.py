"""ssl_robust: robust self-supervised image representations."""

__version__ = "0.1.0"
