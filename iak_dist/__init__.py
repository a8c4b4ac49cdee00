"""iak-dist: pre-train a multi-domain ranker, fine-tune it per domain with IAK, serve from one graph."""

__version__ = "0.1.0"
