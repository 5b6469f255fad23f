"""Install the image curation toolkit: ``pip install -e .[test]`` (CPU) or ``.[gpu,test]``."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "nemo_curator" / "_version.py").read_text(), version)

setup(
    name="nemo-curator-image",
    version=version["__version__"],
    description="Dask-distributed curation of image-text webdataset shards: DALI + timm CLIP embeddings, "
    "aesthetic and NSFW scores, filtering and byte-exact resharding.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nemo_curator", "nemo_curator.*"]),
    python_requires=">=3.10",
    install_requires=[
        "dask[dataframe]>=2024.12",
        "distributed>=2024.12",
        "pandas>=2.0",
        "pyarrow>=14",
        "fsspec>=2023.1",
        "numpy>=1.24",
        # Pin torch to the release that has a CPU-usable local wheel on our machines; a bare
        # "torch" lets pip pull a multi-GB build of the newest release.
        "torch>=2.1,<=2.14.1",
        "torchvision>=0.16,<=0.29.1",
        "timm>=1.0",
        "safetensors>=0.4",
        # DALI's CUDA 12 wheel also runs its CPU operators on machines without a GPU.
        "nvidia-dali-cuda120>=1.40",
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # k-means and nearest-centroid search of the semantic deduplication (docs/dedup.md)
        "faiss-cpu>=1.8",
    ],
    extras_require={
        # CUDA 12 stack. For CUDA 13 install the *-cu13 / cuda13x / nvidia-dali-cuda130 wheels
        # instead (see README, "GPU install").
        "gpu": ["dask-cuda>=24.12", "cudf-cu12>=24.12", "dask-cudf-cu12>=24.12", "cupy-cuda12x>=13"],
        # sybil: every code block of README.md and docs/*.md runs as a test (conftest.py)
        # transformers: the mapping of a 1.x model_dir's CLIP weights to timm is checked against it
        "test": ["pytest>=7", "sybil>=9", "nbformat>=5", "nbclient>=0.9", "ipykernel>=6", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["nemo-curator-image=nemo_curator.scripts.cli:main"]},
)
