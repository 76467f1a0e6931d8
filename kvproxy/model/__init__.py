"""What kvproxy knows about a model without running it: the GGUF header, KV-cache byte accounting,
chat templates, reasoning formats, content specials and chat message spans (pure, no I/O but files)."""
