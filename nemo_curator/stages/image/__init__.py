"""Image stages: reader, writer, CLIP embedding, aesthetic and NSFW filters, duplicate removal."""
