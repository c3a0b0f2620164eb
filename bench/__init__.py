"""Benchmark harness: ``sql+`` vs Celery's ``db+`` vs Redis (``python -m bench.run``)."""
