"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

from repro.errors import UserError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> torch.Tensor:
    """The array in an IDX file; a truncated or foreign file is a one-line error that names it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:  # a truncated gzip stream raises EOFError
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {err}); download it again") from None
    if len(data) < 4:
        raise UserError(f"{path}: truncated ({len(data)} bytes); download it again")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _DTYPES:
        raise UserError(f"{path}: not an IDX file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated header; download it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[dtype_code])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"{path}: {len(data)} bytes where its header promises {expected} (truncated or damaged); "
                        "download it again")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("=")).copy())


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write uint8 data as IDX (gzipped when the name ends in .gz); tests use it to make local copies."""
    array = tensor.numpy().astype(np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())
