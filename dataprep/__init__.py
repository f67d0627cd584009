"""Preparing data: ImageFolder -> webdataset shards (`make_shards`), checks, and the demo data set."""
from .verify import verify_shards  # noqa: F401
from .writer import make_shards  # noqa: F401
