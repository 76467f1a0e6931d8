"""Serving logic between the thin routes and the backends: one kind per deployment kind.

``embedded`` (llama.cpp in process), ``relay`` (llama-server over HTTP), ``guarded`` (either, or a
fallback while in drift) all offer :class:`~kvproxy.serving.base.Serving`; ``router`` picks one by
the request's ``model``.
"""
