"""NeMo Curator 1.x's executor import paths (``nemo_curator.backends.xenna`` ...): here every
executor runs on Dask (``nemo_curator.pipeline.executors``)."""
