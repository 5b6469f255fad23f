"""NeMo Curator 1.x's import path of ``RayActorPoolExecutor``: it runs on Dask here, with one warning."""
from nemo_curator.pipeline.executors import RayActorPoolExecutor

__all__ = ["RayActorPoolExecutor"]
