"""NeMo Curator 1.x's import path of ``XennaExecutor``: it runs on Dask here, with one warning."""
from nemo_curator.pipeline.executors import XennaExecutor

__all__ = ["XennaExecutor"]
