"""kvproxy: an OpenAI-compatible proxy for llama.cpp that measures what a quantized KV cache costs.

Importing the package loads nothing else: llama.cpp loads where a model is (kvproxy.backends.native
says in which order, and why).
"""

__version__ = "0.1.0"
