"""Turning (prompt, tokens) into per-token divergences: the references (in process, llama-server
top-K, a ``kvproxy backend`` scoring server), the score contract, the job a scorer takes, and the
scorers the shadow pool drives. Nothing here decides what to score or when (kvproxy.shadow does)."""
