"""llavactl: train LLaVA-style vision-language models, and catch the mistakes on a CPU first."""

__version__ = "0.1.0"
