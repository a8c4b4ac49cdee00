"""iak-dist: pre-train a multi-domain ranker, fine-tune it per domain with IAK, serve from one graph."""

__version__ = "0.1.0"

from iak_dist.runtime import quiet_root_logging  # noqa: E402  (light: no torch)

quiet_root_logging()  # before anything imports FBGEMM, in every process that imports us (see there)
