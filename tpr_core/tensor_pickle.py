"""Read tensors out of PyTorch zip archives without running any code they carry.

A ``torch.save`` file and a TorchScript archive (``torch.jit.save``, e.g. OpenAI's CLIP
``ViT-B-16.pt``) are both zip files holding ``<name>/data.pkl`` (a pickle) and one record
``<name>/data/<key>`` per storage. A pickle can name any importable callable, so the pickle
is read by an unpickler that resolves a fixed allow-list only:

- tensor rebuilds (``torch._utils._rebuild_tensor_v2``, ``_rebuild_tensor``,
  ``_rebuild_parameter``) and the typed storage classes, mapped to local functions that
  build a tensor from the storage record's bytes;
- ``collections.OrderedDict`` and the plain containers pickle builds itself;
- in a TorchScript archive, the ``__torch__.*`` module classes, mapped to an inert record of
  their attributes (its ``code/`` folder, the module's TorchScript source, is never read).

Anything else is refused with :class:`UnsafeCheckpointError` naming ``module.name``, before it
is imported. A file that is not a zip (the pre-1.6 legacy format) goes to
``torch.load(weights_only=True)``, whose unpickler is restricted in the same spirit.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = ["ScriptObject", "UnsafeCheckpointError", "flatten_script_module", "load_tensors"]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs more than tensors and plain containers to load; names the object."""


class ScriptObject:
    """An inert stand-in for a TorchScript module class: records the attribute dict it is given."""

    qualname = "?"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {"state": state}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    # ``storage`` is the flat typed tensor of the record (see ``_Reader.persistent_load``).
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
}


class _Reader(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._source = archive, prefix, source
        self._storages: dict[str, torch.Tensor] = {}
        self._script_classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self._script_classes:
                self._script_classes[qual] = type(name, (ScriptObject,), {"qualname": qual})
            return self._script_classes[qual]
        raise UnsafeCheckpointError(
            f"{self._source}: refused to load {module}.{name}: only tensors and plain containers are read "
            "from a checkpoint (the object would run code on load)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 4 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unknown persistent record {pid!r}")
        kind, key = pid[1], str(pid[2])
        if not isinstance(kind, _StorageType):
            raise UnsafeCheckpointError(f"{self._source}: storage {key} has no typed storage class")
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._zip.read(name)
            except KeyError:
                raise UnsafeCheckpointError(f"{self._source}: record {name} is missing") from None
            flat = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            self._storages[key] = flat
        return self._storages[key]


def _pickle_name(archive: zipfile.ZipFile, source: str) -> str:
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(names) != 1:
        raise UnsafeCheckpointError(f"{source}: expected one <name>/data.pkl in the archive, found {names}")
    return names[0]


def load_tensors(path: str | Path) -> Any:
    """The object tree of a checkpoint, with tensors and plain containers only.

    Args:
        path: a ``torch.save`` file or a TorchScript archive.

    Returns:
        What the pickle holds: dicts, lists, tuples, numbers, strings, tensors and, for a
        TorchScript archive, :class:`ScriptObject` records (see :func:`flatten_script_module`).

    Raises:
        UnsafeCheckpointError: the pickle names anything outside the allow-list (the error
            names it), or the archive is malformed.
        FileNotFoundError: no such file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if not zipfile.is_zipfile(p):
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{p}: refused by torch.load(weights_only=True): {e}") from None
    with zipfile.ZipFile(p) as archive:
        name = _pickle_name(archive, str(p))
        prefix = name[: -len("data.pkl")]
        order = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in archive.namelist() else "little"
        if order.strip() != "little":
            raise UnsafeCheckpointError(f"{p}: byte order {order!r} is not supported")
        try:
            return _Reader(archive.read(name), archive, prefix, str(p)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise UnsafeCheckpointError(f"{p}: {name} is not a readable tensor pickle: {e}") from None


def flatten_script_module(obj: ScriptObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript module tree, by dotted path (``visual.conv1.weight``).

    Parameters, buffers and plain tensor attributes (such as a causal ``attn_mask``) all
    appear: the archive's pickle does not say which is which.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, ScriptObject):
            out.update(flatten_script_module(value, f"{prefix}{key}."))
    return out
