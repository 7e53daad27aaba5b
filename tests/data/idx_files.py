"""Writes IDX files for the reader tests: a writer of its own, from the format description, so that a reader
bug cannot hide behind the same bug in the writer.

IDX (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): two zero bytes, a type code, the number of
dimensions, each dimension as a big-endian 32-bit integer, then the data in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import numpy.typing as npt

# The type codes of the format description and the big-endian dtypes they name.
TYPE_CODES: dict[np.dtype, int] = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def write_idx(path: str | Path, array: npt.ArrayLike, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``); uint8 arrays give the MNIST magics."""
    arr = np.asarray(array)
    big_endian = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    code = TYPE_CODES.get(big_endian)
    if code is None or not 0 < arr.ndim <= 255:
        raise ValueError(f"IDX cannot hold dtype {arr.dtype} with {arr.ndim} dimensions")
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.astype(big_endian).tobytes()
    # mtime=0: the same array always gives the same bytes.
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)
