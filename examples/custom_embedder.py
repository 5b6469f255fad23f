"""A custom ImageEmbedder: PIL decoding and torchvision transforms instead of DALI (see docs/custom_embedder.md).

``ImageEmbedder`` runs the whole job: one Dask task per shard, the model and the heads loaded once
per worker, embeddings and scores joined to the metadata rows BY ID, ``image_status`` per row and
per-shard statistics. A subclass only says how to read a shard and how to build the model:

- ``load_dataset_shard(tar_path)`` yields ``(batch, metadata)``: a float tensor (N, 3, H, W) on the
  model's device, and N dicts that each hold the sample's id under ``"__key__"`` (or the id column);
- ``load_embedding_model(device)`` returns a callable mapping a batch to (N, D) embeddings.

Run it on a sample dataset (``--smoke``: a tiny random CLIP-shaped model and random heads, offline)::

    nemo-curator-image sample /tmp/sample
    python examples/custom_embedder.py /tmp/sample --smoke
"""
from __future__ import annotations

import argparse
import io
import tempfile
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from nemo_curator import get_client
from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.image.embedders import ImageEmbedder
from nemo_curator.utils.webdataset import DEFAULT_IMAGE_EXTENSIONS, iter_tar_samples, read_member_bytes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PilTimmImageEmbedder(ImageEmbedder):
    """Embed with a timm model; PIL decodes and torchvision resizes, crops and normalises on the CPU.

    Args:
        model_name: a timm model, e.g. ``"vit_large_patch14_clip_quickgelu_224.openai"`` (768-d: the
            aesthetic and NSFW heads accept its embeddings).
        pretrained: load timm's pretrained weights.
        batch_size: images per model call.
        model_kwargs: extra ``timm.create_model`` arguments (part of the worker cache key).
        image_size: side of the square crop, in pixels.
        classifiers: heads run on the L2-normalised embeddings.
    """

    def __init__(self, model_name: str, pretrained: bool = True, batch_size: int = 32, model_kwargs: dict | None = None,
                 image_size: int = 224, image_embedding_column: str = "image_embedding", classifiers=()):
        super().__init__(model_name, image_embedding_column, classifiers)
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.model_kwargs = dict(model_kwargs or {})
        self.image_size = image_size

    def config(self) -> dict:
        # Everything that changes the embeddings: the worker cache key and the resume fingerprint use it.
        return {**super().config(), "pretrained": self.pretrained, "image_size": self.image_size,
                "model_kwargs": repr(sorted(self.model_kwargs.items()))}

    def load_embedding_model(self, device: str):
        import timm

        model = timm.create_model(self.model_name, pretrained=self.pretrained, **self.model_kwargs).eval().to(device)
        return model  # called under torch.inference_mode() by ImageEmbedder

    def normalize(self, embeddings):
        return torch.nn.functional.normalize(embeddings.float(), dim=-1)  # the heads expect unit vectors

    def load_dataset_shard(self, tar_path: str) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        """Yield batches of (N, 3, image_size, image_size) tensors with ``{"__key__": id}`` per image.

        An image that PIL cannot decode is skipped: its row gets ``image_status="missing_image"``
        (override ``iter_shard``, as TimmImageEmbedder does, to report ``decode_failed`` instead).
        """
        preprocess = transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])
        device = self.worker_device()
        images, metadata = [], []
        with open(tar_path, "rb") as f:
            for key, members in iter_tar_samples(tar_path):
                member = next((m for m in members if m.ext in DEFAULT_IMAGE_EXTENSIONS), None)
                if member is None:
                    continue
                try:
                    image = Image.open(io.BytesIO(read_member_bytes(f, member))).convert("RGB")
                except (UnidentifiedImageError, OSError):
                    continue
                images.append(preprocess(image))
                metadata.append({"__key__": key})
                if len(images) == self.batch_size:
                    yield torch.stack(images).to(device), metadata
                    images, metadata = [], []
        if images:
            yield torch.stack(images).to(device), metadata


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="folder of NNNNN.tar + NNNNN.parquet shards (scored in place)")
    p.add_argument("--scheduler-address", help="a running Dask scheduler (default: a new local cluster)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and random heads: the scores mean nothing")
    args = p.parse_args(argv)

    from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier

    client = get_client(scheduler_address=args.scheduler_address) if args.scheduler_address else get_client("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            from nemo_curator.scripts.models import SMOKE_MODEL_KWARGS, SMOKE_WARNING, write_random_heads

            print(SMOKE_WARNING)
            heads = write_random_heads(scratch)
            embedder = PilTimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", pretrained=False,
                                            model_kwargs=SMOKE_MODEL_KWARGS, batch_size=8,
                                            classifiers=[AestheticClassifier(model_path=heads["aesthetic"]),
                                                         NsfwClassifier(model_path=heads["nsfw"])])
        else:
            embedder = PilTimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai",
                                            classifiers=[AestheticClassifier(), NsfwClassifier()])
        dataset = embedder(ImageTextPairDataset.from_webdataset(args.dataset, id_col="key"))
        summary = dataset.save_metadata()  # runs it; then `dataset` reads the saved parquets
    print(dataset.metadata[["key", "image_status", "aesthetic_score", "nsfw_score"]].compute().to_string())
    print(f"embedded {summary['totals'].get('embedded', 0)} images in {summary['seconds']} s")
    if args.scheduler_address:
        client.close()     # leave the running cluster to its owner
    else:
        client.shutdown()  # stop the local cluster started above


if __name__ == "__main__":  # the guard matters: local Dask workers are started as new processes
    main()
