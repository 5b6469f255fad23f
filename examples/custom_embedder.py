"""A custom ImageEmbedder: PIL decoding and torchvision transforms instead of DALI (see docs/custom_embedder.md).

``ImageEmbedder`` runs the whole job: one Dask task per shard, the model and the heads loaded once
per worker, embeddings and scores joined to the metadata rows BY ID, ``image_status`` per row and
per-shard statistics. A subclass only says how to read a shard and how to build the model:

- ``iter_shard(tar_path, wanted_ids, id_col, device)`` yields ``ShardItems``: a float tensor
  (N, 3, H, W) on ``device`` with its N ids, or ids that could not be used with their status
  (``decode_failed``, ``missing_image``); the legacy ``load_dataset_shard(tar_path)`` of NeMo Curator
  0.x (``(batch, metadata)`` pairs) still works in its place;
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
from nemo_curator.image.shard_reader import ShardItems
from nemo_curator.utils.constants import DECODE_FAILED, EXTRA_IN_TAR, MISSING_IMAGE
from nemo_curator.utils.webdataset import iter_tar_samples, pick_image_member, read_member_bytes

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

    def iter_shard(self, tar_path: str, wanted_ids, id_col: str, device: str) -> Iterator[ShardItems]:
        """Yield batches of (N, 3, image_size, image_size) tensors on ``device`` with their ids; an
        image that PIL cannot decode is reported ``decode_failed``, a sample without an image
        ``missing_image``, samples without a metadata row ``extra_in_tar``."""
        preprocess = transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])
        images, ids, seen = [], [], set()
        with open(tar_path, "rb") as f:
            for key, members in iter_tar_samples(tar_path):
                if key not in wanted_ids or key in seen:  # no metadata row, or a key repeated in the tar
                    yield ShardItems(None, [key], EXTRA_IN_TAR)
                    continue
                seen.add(key)
                member = pick_image_member(members)
                if member is None:
                    yield ShardItems(None, [key], MISSING_IMAGE)
                    continue
                try:
                    image = Image.open(io.BytesIO(read_member_bytes(f, member))).convert("RGB")
                except (UnidentifiedImageError, OSError) as err:
                    yield ShardItems(None, [key], DECODE_FAILED, f"{type(err).__name__}: {err}")
                    continue
                images.append(preprocess(image))
                ids.append(key)
                if len(images) == self.batch_size:
                    yield ShardItems(torch.stack(images).to(device), ids)
                    images, ids = [], []
        if images:
            yield ShardItems(torch.stack(images).to(device), ids)


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
            from nemo_curator.image.classifiers import write_random_heads
            from nemo_curator.utils.constants import SMOKE_WARNING, TINY_MODEL_KWARGS

            print(SMOKE_WARNING)
            heads = write_random_heads(scratch)
            embedder = PilTimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", pretrained=False,
                                            model_kwargs=TINY_MODEL_KWARGS, batch_size=8,
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
