"""What operators watch: Prometheus metrics and ``hypha-celery top``."""
