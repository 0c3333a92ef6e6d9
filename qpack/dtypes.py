"""The closed table of tensor dtypes a .qpk file may name (spec section "Dtypes").

Names map to torch dtypes through this table only: a stored name is never evaluated.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_from_name", "name_of_dtype", "itemsize", "is_float_name"]

#: spec name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float64": (torch.float64, 8),
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
    "int16": (torch.int16, 2),
    "int8": (torch.int8, 1),
    "uint8": (torch.uint8, 1),
    "bool": (torch.bool, 1),
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[_name] = (getattr(torch, _name), 1)
for _name, _size in (("uint16", 2), ("uint32", 4), ("uint64", 8)):
    if hasattr(torch, _name):
        DTYPES[_name] = (getattr(torch, _name), _size)

_BY_DTYPE = {dtype: name for name, (dtype, _) in DTYPES.items()}
_QUANTIZABLE = {"float64", "float32", "float16", "bfloat16"}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a spec dtype name; KeyError if the name is not in the table."""
    return DTYPES[name][0]


def name_of_dtype(dtype: torch.dtype) -> str | None:
    """The spec name of a torch dtype, or None when the format cannot store it."""
    return _BY_DTYPE.get(dtype)


def itemsize(name: str) -> int:
    """Bytes per element of a spec dtype name."""
    return DTYPES[name][1]


def is_float_name(name: str) -> bool:
    """True for the dtypes the quantizing encodings accept."""
    return name in _QUANTIZABLE
