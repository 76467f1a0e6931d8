"""kvproxy: an OpenAI-compatible proxy for llama.cpp that measures what a quantized KV cache costs."""

__version__ = "0.1.0"
