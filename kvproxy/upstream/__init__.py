"""Talking to upstream HTTP servers: replica pools, the llama-server client, the scoring-server
client. Nothing here knows the OpenAI error format or the metrics: failures are
:class:`~kvproxy.upstream.replicas.UpstreamFailure`, observers are passed in."""
