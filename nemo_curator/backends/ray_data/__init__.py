"""NeMo Curator 1.x's import path of ``RayDataExecutor``: it runs on Dask here, with one warning."""
from nemo_curator.pipeline.executors import RayDataExecutor

__all__ = ["RayDataExecutor"]
