"""Reading IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data in C order. Images have
magic 2051 (ubyte, 3 dims: N, rows, cols; a 16-byte header), labels 2049 (ubyte, 1 dim;
an 8-byte header). Files may be gzip-compressed; we tell by the content, not the name.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from convrecipes.errors import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

# Type codes of the IDX format; multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytearray:
    """The file's content, decompressed when it is gzip (a bytearray, so numpy views are writable)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is a damaged gzip file ({e}); re-install or re-download it, "
            f"or replace it with an intact copy"
        ) from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (plain or gzip) into a numpy array shaped by its header.

    Args:
        path: the file.
        expected_magic: if given, the magic number the file must carry (2051 images,
            2049 labels).

    Returns:
        The array, its dtype and shape taken from the header.

    Raises:
        DataError: the magic number, type code or size does not match the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    fix = "re-install or re-download the dataset, or point data.data_dir at intact IDX files"
    if len(data) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes); {fix}")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path} has IDX magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'}); "
            f"the file is not what its name says or is damaged; {fix}"
        )
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (magic number {magic}); {fix}")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header; {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} holds {len(data)} bytes but its header {shape} needs {expected}; "
            f"the file is truncated or damaged; {fix}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
