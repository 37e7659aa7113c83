"""The `cart eval` stage: every method on every held-out query set (`evaluate.py`), and what it shows:
the metrics table, hits.jsonl and report.html (`report.py`)."""
