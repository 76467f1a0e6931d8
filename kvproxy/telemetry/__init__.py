"""What kvproxy exports to Prometheus: the metric definitions, what deployments report into them,
GPU memory read at scrape time, and the ``--metrics-port`` server. The only home of
``prometheus_client`` besides the metrics route."""
