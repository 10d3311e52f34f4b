"""Finding image files in a folder and decoding them into plain RGB images."""

from loracap.inputs.decode import (
    ImageDecodeError,
    load_image,
    load_image_bytes,
    read_size,
    register_optional_formats,
    to_rgb,
)
from loracap.inputs.discover import (
    IMAGE_EXTENSIONS,
    content_fingerprint,
    file_sha256,
    find_images,
    remove_stale_temp_files,
    supported_extensions,
)
from loracap.inputs.prefetch import DecodedBatch, decode_batch, map_ahead, prefetch_batches

__all__ = [
    "DecodedBatch",
    "decode_batch",
    "map_ahead",
    "prefetch_batches",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "content_fingerprint",
    "file_sha256",
    "find_images",
    "load_image",
    "load_image_bytes",
    "read_size",
    "register_optional_formats",
    "remove_stale_temp_files",
    "supported_extensions",
    "to_rgb",
]
