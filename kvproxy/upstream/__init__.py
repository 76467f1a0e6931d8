"""Talking to upstream HTTP servers: replica pools, the llama-server relay client and its message
delimiters. Nothing here knows the OpenAI error format or the metrics: failures are
:class:`~kvproxy.upstream.replicas.UpstreamFailure`, observers are passed in. Scoring on a
llama-server or a scoring server is kvproxy.scoring's."""
