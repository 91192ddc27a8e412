"""Streaming benchmark for the gateway: ``python -m bench`` (``make bench``).

See ``bench/runner.py`` for what is measured and how.
"""
