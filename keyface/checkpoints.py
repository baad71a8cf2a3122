"""Safe reading of model files.

Model files are untrusted input. This module is the only place in the package that opens them:

* ``.safetensors`` through safetensors (no code at all);
* ``.pt`` / ``.ckpt`` / ``.bin`` / ``.pth`` pickles through ``torch.load(weights_only=True)`` and, only
  when that refuses the file, through a second restricted unpickler that resolves a short allow-list
  of globals (tensor rebuilding, storages, plain containers, a few inert metadata types). Any other
  global -- and with it any attempt to run code while unpickling -- raises :class:`CheckpointError`
  naming the global and the file. No code from a pickle is ever executed.

It also provides the :class:`KeyLedger` the model loaders use to account for every key of a file,
and :func:`convert_to_safetensors`, a one-call conversion of any supported file.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import io
import json
import os
import pickle
import tarfile
import types
import typing
import warnings
import zipfile
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from types import SimpleNamespace

import torch

from ._files import create_temp_beside
from ._pickle_limits import (
    CALL_POLICIES,
    PickleLimitError,
    PickleLimits,
    RefusedCall,
    empty_array_only,
    hashable,
    latin1_only,
    mapping_of,
    never_called,
    scalars_only,
    sequence_of,
)

__all__ = [
    "CheckpointError",
    "KeyLedger",
    "convert_to_safetensors",
    "load_torch_file",
    "read_audio_checkpoint",
    "read_state_dict",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
FORWARD_MODULE_PREFIX = "_forward_module."
AUDIO_CFG_METADATA_KEY = "keyface.audio_cfg"

_ADVICE = (
    "KeyFace never runs code from a model file, so it cannot open this one. If the file comes from a "
    "source you trust, re-save its tensors as safetensors with the tool that wrote it (in an "
    "environment you are prepared to run its code in) and load the .safetensors file instead."
)


class CheckpointError(ValueError):
    """A model file could not be read safely, or does not hold what the caller expected."""


# --------------------------------------------------------------------------------------------------
# Restricted unpickler (fallback when torch's weights_only loader refuses a file)
# --------------------------------------------------------------------------------------------------


class _InertDict(dict):
    """Stand-in for dict-like metadata classes of training frameworks (never imported)."""

    def __setstate__(self, state):  # BUILD with a plain state dict
        if isinstance(state, dict):
            self.update(state)


class _InertNamespace(SimpleNamespace):
    """Stand-in for ``argparse.Namespace`` (the real class is harmless too, but this needs no import)."""


class _InertVersion(str):
    """Stand-in for ``torch.torch_version.TorchVersion`` (a ``str`` subclass): the version string."""


class _InertObject:
    """Stand-in for a metadata object of a framework that is never imported (OmegaConf's
    ``DictConfig`` / ``ListConfig`` and their nodes): it keeps what the pickle hands it -- constructor
    arguments and ``BUILD`` state -- as plain data, and has no behaviour that could run code."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


# Metadata found beside the weights of Lightning / DeepSpeed checkpoints (hyper-parameters, configs,
# paths, versions). Each is mapped to an inert local stand-in (or a pure-data stdlib type) instead of
# being imported. They can only ever stand for metadata: the weight subtree (``module`` /
# ``state_dict``) must hold tensors only, which _tensor_dict checks after loading.
_INERT_STANDINS = {
    ("argparse", "Namespace"): _InertNamespace,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): _InertDict,
    ("lightning.fabric.utilities.data", "AttributeDict"): _InertDict,
    ("lightning_fabric.utilities.data", "AttributeDict"): _InertDict,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): _InertDict,
    ("torch.torch_version", "TorchVersion"): _InertVersion,
    # the concrete (filesystem) path classes become pure paths: the same parts, no I/O methods
    **{(mod, name): pure for mod in ("pathlib", "pathlib._local") for name, pure in (
        ("Path", PurePath), ("PurePath", PurePath),
        ("PosixPath", PurePosixPath), ("PurePosixPath", PurePosixPath),
        ("WindowsPath", PureWindowsPath), ("PureWindowsPath", PureWindowsPath),
    )},
    **{(f"omegaconf.{mod}", name): _InertObject for mod, name in (
        ("dictconfig", "DictConfig"), ("listconfig", "ListConfig"),
        ("base", "ContainerMetadata"), ("base", "Metadata"), ("base", "Node"), ("base", "Container"),
        ("nodes", "AnyNode"), ("nodes", "StringNode"), ("nodes", "IntegerNode"), ("nodes", "FloatNode"),
        ("nodes", "BooleanNode"), ("nodes", "BytesNode"), ("nodes", "PathNode"), ("nodes", "ValueNode"),
    )},
    # OmegaConf metadata names these as types; both are inert (a defaultdict only stores its factory,
    # which can itself only be one of these allowed globals)
    ("typing", "Any"): typing.Any,
    ("collections", "defaultdict"): collections.defaultdict,
    # protocol-2 pickles spell some builtins with their Python 2 names
    ("__builtin__", "long"): int,
    ("__builtin__", "unicode"): str,
}

_SAFE_BUILTINS = {
    "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
    "bytearray", "slice", "range",
}

_SAFE_TORCH = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"),
    ("torch", "TypedStorage"),
}

_SAFE_OTHER = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes as _codecs.encode(str, "latin1")
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
}


def _resolve_allowed(module: str, name: str):
    """Return the object for an allowed global, or None when it is not on the allow-list."""
    if (module, name) in _INERT_STANDINS:
        return _INERT_STANDINS[(module, name)]
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    if (module, name) in _SAFE_TORCH:
        return getattr(importlib.import_module(module), name)
    if module == "torch":
        # torch.__dict__, not getattr: torch's module __getattr__ imports submodules (_inductor ...)
        obj = torch.__dict__.get(name)
        if name.endswith("Storage") and isinstance(obj, type):
            return obj  # legacy typed storages (torch.FloatStorage ...)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    if (module, name) in _SAFE_OTHER:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return None
        return getattr(mod, name, None)
    if module.startswith("numpy") and module.endswith("dtypes") and name.endswith("DType"):
        # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float32DType etc.; the classes are inert.
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    return None


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module, name):
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _RefusedBuild(pickle.UnpicklingError):
    def __init__(self, target):
        super().__init__(f"state set on {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}")
        self.target = target


# Objects a pickle's BUILD must never set state on: they are shared by the whole process, so a
# file could otherwise re-point e.g. ``PurePath.__truediv__`` for every later caller.
_SHARED_KINDS = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


class _DryName:
    """The pre-scan's stand-in for a torch / numpy / unknown global: calling it (or ``__new__``)
    builds nothing, so the scan costs only what the pickle's own structure costs."""

    def __new__(cls, *args, **kwargs):
        if isinstance(cls, _DryName):  # NEWOBJ: placeholder.__new__(placeholder, *args)
            return _DryTensor()
        return super().__new__(cls)

    def __init__(self, module, name):
        self.module, self.name, self.__name__ = module, name, name

    def __call__(self, *args, **kwargs):
        return _DryTensor()


class _DryTensor:
    """What a placeholder call or a storage reference yields in the pre-scan."""

    def __setstate__(self, state):
        pass


def _stream_size(file) -> int:
    """Bytes from the current position to the end of a seekable stream (what the pickle may use)."""
    try:
        here = file.tell()
        end = file.seek(0, io.SEEK_END)
        file.seek(here)
        return max(0, end - here)
    except (AttributeError, OSError, ValueError):
        return 0


def _tensors_only(unpickler, func, args, kwargs):
    """torch.Tensor(...) / Parameter(...) allocate when given sizes; a pickle only wraps tensors."""
    for a in (*args, *kwargs.values()):
        if not isinstance(a, (torch.Tensor, bool, type(None), _DryTensor)):
            raise RefusedCall(f"it calls {func.__name__}() with {type(a).__name__}: only tensors are rebuilt there")


def _rebuild_from_type(unpickler, func, args, kwargs):
    """_rebuild_from_type_v2(func, type, args, state) calls ``func(*args)`` itself: only a tensor
    rebuild function, checked like any other call."""
    inner = args[0] if args else None
    if _policy_key(inner) not in _TENSOR_REBUILDERS:
        raise RefusedCall(
            f"it calls _rebuild_from_type_v2 with {getattr(inner, '__name__', type(inner).__name__)}: only tensor "
            "rebuild functions are allowed there"
        )
    unpickler.check_call(inner, args[2] if len(args) > 2 and isinstance(args[2], tuple) else ())


def _storage_not_called(unpickler, func, args, kwargs):
    raise RefusedCall(f"it calls {func.__name__}(): storages come from the file's data records, never from calls")


_TENSOR_REBUILDERS = {
    ("torch._utils", name) for name in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage",
    )
}
_TENSOR_REBUILDERS |= {getattr(torch._utils, name) for _, name in _TENSOR_REBUILDERS}


def _policy_key(func):
    """What the call-policy table knows ``func`` by: (module, name) for the dry scan's placeholders,
    the object itself otherwise."""
    if isinstance(func, _DryName):
        return (func.module, func.name)
    return func


def _with_objects(table: dict) -> dict:
    """Key every (module, name) entry by the object too (when importable), so real globals and the
    dry scan's placeholders find the same policy."""
    out = dict(table)
    for key, value in table.items():
        if isinstance(key, tuple):
            try:
                obj = getattr(importlib.import_module(key[0]), key[1])
            except (ImportError, AttributeError):
                continue
            if hashable(obj):
                out[obj] = value
    return out


def _call_policies() -> dict:
    table = dict(CALL_POLICIES)
    table.update({
        _InertDict: mapping_of, _InertNamespace: mapping_of, _InertVersion: scalars_only,
        PurePath: scalars_only, PurePosixPath: scalars_only, PureWindowsPath: scalars_only,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch._C", "TensorBase"): _tensors_only, ("torch", "Tensor"): _tensors_only,
        ("torch._tensor", "Tensor"): _tensors_only,
        ("torch.nn.parameter", "Parameter"): _tensors_only, ("torch", "Size"): sequence_of,
        ("torch", "device"): scalars_only, ("_codecs", "encode"): latin1_only,
        ("numpy.core.multiarray", "_reconstruct"): empty_array_only,
        ("numpy._core.multiarray", "_reconstruct"): empty_array_only,
        ("numpy", "ndarray"): empty_array_only,
        ("torch._utils", "_rebuild_qtensor"): never_called,
    })
    return _with_objects(table)


class RestrictedUnpickler(PickleLimits, pickle._Unpickler):
    """An unpickler whose ``find_class`` resolves only allow-listed, inert globals, whose ``BUILD``
    refuses to set state on those globals (or any class, function or module), and whose work and
    memory are bounded by the size of the pickle (:mod:`keyface._pickle_limits`).

    Built on the pure-Python ``pickle._Unpickler``: the C unpickler's opcodes cannot be overridden.
    Only the fallback path and the pre-scan use it, and a checkpoint's pickle is small (tensor data
    is stored apart).
    """

    dispatch = PickleLimits.limited_dispatch(pickle._Unpickler.dispatch)
    call_policies = _call_policies()

    def __init__(self, file, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        self._globals = set()  # ids of what find_class handed out in this load
        self._init_limits(_stream_size(file))

    def check_call(self, func, args, kwargs=None):
        policy = self.call_policies.get(_policy_key(func)) if hashable(_policy_key(func)) else None
        if policy is not None:
            policy(self, func, tuple(args), dict(kwargs or {}))
        elif isinstance(func, type) and issubclass(func, (torch.storage.UntypedStorage, torch.storage.TypedStorage)):
            _storage_not_called(self, func, args, kwargs)
        elif isinstance(func, type) and func.__name__.endswith("Storage") and func.__module__.startswith("torch"):
            _storage_not_called(self, func, args, kwargs)

    def find_class(self, module, name):
        obj = _resolve_allowed(module, name)
        if obj is None:
            raise _RefusedGlobal(module, name)
        self._globals.add(id(obj))
        return obj

    def load_build(self):
        target = self.stack[-2]  # BUILD's stack: [..., object, state]
        if isinstance(target, _SHARED_KINDS) or id(target) in self._globals:
            raise _RefusedBuild(target)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load(self):
        result = super().load()
        self.check_result(result)
        return result


class _DryScan(RestrictedUnpickler):
    """Reads a pickle of a torch file with every torch / numpy / unknown global replaced by an
    inert placeholder and storage references recorded instead of loaded: the same structure, the
    same limits, nothing allocated for tensors. It runs before any loader (torch's weights-only one
    included, which has no limits of its own) so that a file that would cost unbounded memory or
    time is refused before anything else reads it."""

    def __init__(self, file):
        super().__init__(file)
        self.declared_bytes = {}  # storage key -> bytes its references claim
        self._placeholders = []

    def find_class(self, module, name):
        obj = _resolve_allowed(module, name)
        if obj is None or module.split(".")[0] in ("torch", "numpy"):
            obj = _DryName(module, name)
            self._placeholders.append(obj)  # alive for the whole scan: its id stays its own
        self._globals.add(id(obj))
        return obj

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], pid[2], pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise PickleLimitError(f"storage {key!r} declares {numel!r} elements")
            nbytes = numel * _storage_item_size(storage_type)
            self.declared_bytes[key] = max(self.declared_bytes.get(key, 0), nbytes)
        return _DryTensor()


def _storage_item_size(storage_type) -> int:
    name = getattr(storage_type, "name", "")
    if name in ("UntypedStorage", "ByteStorage", "CharStorage", "BoolStorage", "QUInt8Storage", "QInt8Storage"):
        return 1
    real = torch.__dict__.get(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "TypedStorage is deprecated"
        dtype = getattr(real, "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 8  # unknown: the widest element


_LEGACY_PICKLES = 5  # magic number, protocol version, sys info, the object, the storage keys
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _prescan_torch_file(path: Path, is_zip: bool) -> None:
    """Refuse a torch file whose pickles break the limits, or whose storages claim more bytes than
    the file holds (the loaders would allocate what is claimed)."""
    if is_zip:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_zip_sizes(path, infos)
            for info in infos:
                if info.filename.rsplit("/", 1)[-1] == "data.pkl":
                    scan = _DryScan(io.BytesIO(zf.read(info)))
                    scan.load()
                    _check_zip_storages(zf, info.filename[: -len("data.pkl")], scan.declared_bytes)
        return
    if tarfile.is_tarfile(path):
        raise CheckpointError(
            f"{path}: a checkpoint in PyTorch's legacy tar format, which is not supported; re-save it "
            "with torch.save from a current PyTorch (or convert it to safetensors)"
        )
    declared = {}
    with open(path, "rb") as raw:
        f = _ClampedReader(raw, os.fstat(raw.fileno()).st_size)
        for index in range(_LEGACY_PICKLES):
            scan = _DryScan(f)
            start = f.tell()
            try:
                obj = scan.load()
            except EOFError:
                if f.tell() != start:
                    raise pickle.UnpicklingError("pickle data was truncated") from None
                return  # the file ends between two pickles
            declared.update(scan.declared_bytes)
            if index == 0 and obj != _LEGACY_MAGIC:
                return  # not a torch legacy file: torch stops here too, after this (bounded) pickle
        room = f.size - f.tell()
    if sum(declared.values()) > room:
        raise PickleLimitError(
            f"its storages claim {sum(declared.values()):,} bytes but only {room:,} bytes of data follow"
        )


class _ClampedReader:
    """A file whose reads never ask for more than what is left: a pickle's FRAME / BINBYTES8 lengths
    come from the file, and a buffered read of 2**40 bytes allocates that much before reading."""

    def __init__(self, file, size: int):
        self.file, self.size = file, int(size)

    def _room(self, n, exact=True):
        left = max(0, self.size - self.file.tell())
        if n is None or n < 0:
            return left
        if exact and 0 < left < n:
            raise pickle.UnpicklingError(f"pickle data was truncated: it declares {n:,} bytes, {left:,} are left")
        return min(int(n), left)

    def read(self, n=-1):
        return self.file.read(self._room(n))

    def readline(self, limit=-1):
        return self.file.readline(self._room(limit, exact=False))

    def readinto(self, buffer):
        view = memoryview(buffer)
        return self.file.readinto(view[: self._room(len(view))])

    def tell(self):
        return self.file.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        return self.file.seek(offset, whence)


def _check_zip_sizes(path, infos) -> None:
    """torch's reader extracts each record whole: declared sizes must fit in the file (torch writes
    records uncompressed, so a larger total is a zip bomb or a corrupt archive)."""
    on_disk = os.path.getsize(path)
    declared = sum(info.file_size for info in infos)
    if declared > on_disk:
        raise PickleLimitError(
            f"its zip entries declare {declared:,} bytes uncompressed in a {on_disk:,}-byte file "
            "(torch saves entries uncompressed; this looks like a zip bomb)"
        )


def _check_zip_storages(zf, prefix, declared_bytes) -> None:
    for key, nbytes in declared_bytes.items():
        record = f"{prefix}data/{key}"
        try:
            have = zf.getinfo(record).file_size
        except KeyError:
            raise PickleLimitError(f"storage {key!r} has no data record {record!r}") from None
        if nbytes > have:
            raise PickleLimitError(f"storage {key!r} claims {nbytes:,} bytes but its record holds {have:,}")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# A module-like namespace torch.load accepts as ``pickle_module``: torch subclasses ``Unpickler`` and
# calls ``super().find_class`` for everything that is not a storage type, so our allow-list applies.
_RESTRICTED_PICKLE = SimpleNamespace(
    __name__="keyface_restricted_pickle",
    Unpickler=RestrictedUnpickler,
    load=_restricted_load,
    loads=lambda data, **kw: _restricted_load(io.BytesIO(data), **kw),
    UnpicklingError=pickle.UnpicklingError,
)


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torch_file(path):
    """Load a torch pickle (``.pt``/``.ckpt``/``.bin``/``.pth``) without ever running code from it.

    First ``torch.load(weights_only=True)``; if torch refuses the file, a second pass with
    :class:`RestrictedUnpickler`. Raises :class:`CheckpointError` when neither can read it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript_archive(path):
        raise CheckpointError(f"{path} is a TorchScript archive, not a checkpoint of tensors; it cannot be loaded.")
    _prescan_or_refuse(path, is_zip)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note about non-default pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as first:  # noqa: BLE001 - any failure moves on to the restricted loader
        first_error = first
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE, mmap=is_zip)
    except _RefusedGlobal as refused:
        raise CheckpointError(
            f"{path}: refusing to load this file: its pickle needs the global "
            f"'{refused.module}.{refused.name}', which is not a tensor or a plain container and could "
            f"run code while loading. {_ADVICE}"
        ) from None
    except _RefusedBuild as refused:
        raise CheckpointError(
            f"{path}: refusing to load this file: its pickle sets the state of a shared object ({refused}), "
            f"which would change it for the whole process. {_ADVICE}"
        ) from None
    except CheckpointError:
        raise
    except Exception as second:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(second).__name__}: {second}; "
            f"weights-only loader: {type(first_error).__name__}: {str(first_error).splitlines()[0] if str(first_error) else ''})"
        ) from None


def _prescan_or_refuse(path: Path, is_zip: bool) -> None:
    try:
        _prescan_torch_file(path, is_zip)
    except CheckpointError:
        raise
    except _RefusedBuild as refused:
        raise CheckpointError(
            f"{path}: refusing to load this file: its pickle sets the state of a shared object ({refused}), "
            f"which would change it for the whole process. {_ADVICE}"
        ) from None
    except RefusedCall as err:
        raise CheckpointError(f"{path}: refusing to load this file: {err}. {_ADVICE}") from None
    except PickleLimitError as err:
        raise CheckpointError(
            f"{path}: refusing to load this file: {err}. A real checkpoint's metadata stays far below "
            f"these limits, so the file is damaged or was made to exhaust memory or time."
        ) from None
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (its pickle is malformed: {err})") from None
    except Exception as err:  # noqa: BLE001 - malformed pickles fail in many ways; none is a crash
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def _strip_forward_module(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith(FORWARD_MODULE_PREFIX):
            k = k[len(FORWARD_MODULE_PREFIX):]
        if k in out:
            raise CheckpointError(f"duplicate key {k!r} after removing the '{FORWARD_MODULE_PREFIX}' prefix")
        out[k] = v
    return out


KEYS_SHOWN = 10  # how many keys an error message lists before "... and N more"
_NESTED = "\n    "  # indent of a key list inside an indented message part


def format_keys(keys, indent: str = "\n  ") -> str:
    """The first KEYS_SHOWN of ``keys``, each after ``indent``, then "... and N more" when there are more."""
    keys = [str(k) for k in keys]
    more = f"{indent}... and {len(keys) - KEYS_SHOWN} more" if len(keys) > KEYS_SHOWN else ""
    return "".join(indent + k for k in keys[:KEYS_SHOWN]) + more


def load_strict(module, sd: dict, source: str, what: str, hint: str = "", assign: bool = False):
    """Load ``sd`` into ``module`` with every key accounted for, or raise one :class:`CheckpointError`
    naming ``source`` and listing the file's unused keys, the module's missing ones and shape
    mismatches. ``assign``: take the tensors as they are (a module built on ``meta``)."""
    own = module.state_dict()
    unused = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if unused or missing or wrong:
        parts = []
        if unused:
            parts.append(f"  {len(unused)} key(s) of the file are not used by the {what}:{format_keys(unused, _NESTED)}")
        if missing:
            parts.append(f"  {len(missing)} weight(s) the {what} needs are missing from the file:"
                         f"{format_keys(missing, _NESTED)}")
        if wrong:
            shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
            parts.append(f"  {len(wrong)} shape mismatch(es) (file vs model):{format_keys(shapes, _NESTED)}")
        raise CheckpointError(f"{source}: the weights do not match the {what}:\n" + "\n".join(parts)
                              + (f"\n{hint}" if hint else ""))
    module.load_state_dict(sd, strict=True, assign=assign)
    return module


def _tensor_dict(sd, path, where) -> dict:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors{where}, found {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected only tensors{where}, but these entries are not tensors:"
                              f"{format_keys([repr(k) for k in bad])}")
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: state dict keys must be strings{where}, found:{format_keys(map(repr, bad_keys))}")
    return dict(sd)


def _unwrap(obj, path) -> dict:
    """DeepSpeed ``module`` / Lightning ``state_dict`` / plain dict of tensors -> dict[str, Tensor]."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict at the top of the file, found {type(obj).__name__}")
    if "module" in obj and isinstance(obj["module"], dict):
        # DeepSpeed model states: everything beside "module" (optimizer, ds_config, ...) is dropped.
        sd = _tensor_dict(obj["module"], path, " under 'module' (DeepSpeed model states)")
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        # Lightning checkpoint: the rest (epoch, callbacks, hyper_parameters, ...) is dropped.
        sd = _tensor_dict(obj["state_dict"], path, " under 'state_dict' (Lightning checkpoint)")
    elif "module" in obj and obj["module"] is None and ("ds_version" in obj or "ds_config" in obj):
        raise CheckpointError(
            f"{path}: a DeepSpeed checkpoint whose weights are partitioned (ZeRO stage 3, 'module' is empty); "
            "consolidate it first with DeepSpeed's zero_to_fp32.py and load the resulting file"
        )
    elif "cfg" in obj and "model" in obj:
        raise CheckpointError(
            f"{path}: this is an audio-encoder checkpoint ({{'cfg', 'model'}}), not a KeyFace model file"
        )
    else:
        sd = _tensor_dict(obj, path, "")
    return _strip_forward_module(sd)


def _read_safetensors(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device="cpu"), metadata
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def _check_suffix(path: Path):
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES)
        raise CheckpointError(
            f"{path} is a folder; expected one model file (.safetensors, {', '.join(PICKLE_SUFFIXES)})"
            + (f": pass the weights file inside it ({', '.join(inside)})" if inside else "")
            + ". Hugging Face folders (wav2vec2-base-960h/, a WavLM folder) load directly with "
            "keyface.audio.load_wav2vec2 / load_wavlm and need no conversion"
        )
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported model file extension {suffix!r}; expected .safetensors, "
            + ", ".join(PICKLE_SUFFIXES)
        )
    return suffix


def _model_file(path) -> tuple[Path, str]:
    """(path, suffix) of an existing model file of a supported kind; CheckpointError otherwise."""
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    return path, suffix


def read_state_dict(path) -> dict:
    """Read a model file into ``dict[str, Tensor]`` (CPU), whatever its container.

    ``.safetensors``; DeepSpeed ``.pt`` (``{"module": ...}``); Lightning ``.ckpt``
    (``{"state_dict": ...}``); a plain ``.bin``/``.pt``/``.pth`` dict of tensors. The DeepSpeed /
    Lightning ``_forward_module.`` key prefix is removed.
    """
    path, suffix = _model_file(path)
    if suffix == ".safetensors":
        sd, metadata = _read_safetensors(path)
        if AUDIO_CFG_METADATA_KEY in metadata:
            raise CheckpointError(f"{path}: this is a converted audio-encoder checkpoint, not a KeyFace model file")
        return _strip_forward_module(sd)
    return _unwrap(load_torch_file(path), path)


def read_audio_checkpoint(path) -> dict:
    """Read a unilm WavLM / BEATs checkpoint: ``{"cfg": dict, "model": dict[str, Tensor]}``.

    Accepts the original pickles and their safetensors conversions (cfg stored as JSON metadata).
    """
    path, suffix = _model_file(path)
    if suffix == ".safetensors":
        sd, metadata = _read_safetensors(path)
        if AUDIO_CFG_METADATA_KEY not in metadata:
            raise CheckpointError(
                f"{path}: safetensors file without the '{AUDIO_CFG_METADATA_KEY}' metadata; convert the "
                "original unilm .pt with keyface.checkpoints.convert_to_safetensors"
            )
        try:
            cfg = json.loads(metadata[AUDIO_CFG_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: corrupt '{AUDIO_CFG_METADATA_KEY}' metadata ({err})") from None
        return {"cfg": cfg, "model": sd}
    return _audio_from_obj(load_torch_file(path), path)


def _audio_from_obj(obj, path) -> dict:
    if not (isinstance(obj, dict) and "cfg" in obj and "model" in obj):
        found = f"the keys:{format_keys(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a unilm checkpoint {{'cfg': ..., 'model': ...}}, found {found}")
    cfg = obj["cfg"]
    if isinstance(cfg, SimpleNamespace) or type(cfg).__name__ == "Namespace":
        cfg = vars(cfg)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: 'cfg' should be a dict, found {type(cfg).__name__}")
    return {"cfg": dict(cfg), "model": _tensor_dict(obj["model"], path, " under 'model'")}


# --------------------------------------------------------------------------------------------------
# Key ledger
# --------------------------------------------------------------------------------------------------


class KeyLedger:
    """Tracks which keys of a state dict a loader has used, so none goes unnoticed.

    ``take(prefix)`` hands out (and marks) the keys under ``prefix`` with the prefix removed;
    ``ignore(prefix, why)`` marks keys as deliberately unused; ``finish()`` raises
    :class:`CheckpointError` naming any key that was neither taken nor ignored.
    """

    def __init__(self, state_dict: dict, source_name: str):
        self.state_dict = state_dict
        self.source_name = str(source_name)
        self._used: set[str] = set()
        self.ignored: dict[str, str] = {}  # key -> reason

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.state_dict)

    def take(self, prefix: str) -> dict:
        out = {}
        for k, v in self.state_dict.items():
            if k.startswith(prefix) and k not in self._used:
                out[k[len(prefix):]] = v
                self._used.add(k)
        return out

    def take_key(self, key: str):
        """Take one exact key; returns the tensor or None when absent."""
        if key not in self.state_dict:
            return None
        self._used.add(key)
        return self.state_dict[key]

    def ignore(self, prefix: str, why: str) -> int:
        n = 0
        for k in self.state_dict:
            if k.startswith(prefix) and k not in self._used:
                self._used.add(k)
                self.ignored[k] = why
                n += 1
        return n

    def leftover(self) -> list:
        return [k for k in self.state_dict if k not in self._used]

    def finish(self, hint: str = "") -> None:
        left = self.leftover()
        if not left:
            return
        raise CheckpointError(
            f"{self.source_name}: {len(left)} key(s) of the file are not used by this model:{format_keys(left)}"
            + (f"\n{hint}" if hint else "")
        )


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _unshare(sd: dict) -> dict:
    """safetensors refuses tensors that share storage: give every tensor its own contiguous memory."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        try:
            ptr = v.untyped_storage().data_ptr()
        except RuntimeError:
            ptr = None
        if ptr is not None and ptr in seen and v.numel() > 0:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v.contiguous()
    return out


def convert_to_safetensors(src, dst) -> Path:
    """Convert any supported model file to ``dst`` (safetensors), atomically.

    KeyFace engine files (DeepSpeed / Lightning / plain), VAE files and unilm WavLM/BEATs pickles
    (whose ``cfg`` is stored as JSON metadata). The result loads through the same loaders with
    identical tensors. ``src`` is read with the same safety rules as everywhere else: no code from
    a pickle ever runs, here either.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the converted file must end in .safetensors")
    src, suffix = _model_file(src)
    metadata = {"format": "pt", "converted_by": "keyface", "source": src.name}
    if suffix == ".safetensors":
        sd, old_meta = _read_safetensors(src)
        metadata.update({k: v for k, v in old_meta.items() if k == AUDIO_CFG_METADATA_KEY})
        sd = sd if AUDIO_CFG_METADATA_KEY in old_meta else _strip_forward_module(sd)
    else:
        obj = load_torch_file(src)
        if isinstance(obj, dict) and "cfg" in obj and "model" in obj:
            audio = _audio_from_obj(obj, src)
            try:
                metadata[AUDIO_CFG_METADATA_KEY] = json.dumps(audio["cfg"], sort_keys=True)
            except TypeError as err:
                raise CheckpointError(f"{src}: the audio 'cfg' is not JSON-serialisable ({err})") from None
            sd = audio["model"]
        else:
            sd = _unwrap(obj, src)
    sd = _unshare(sd)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_beside(dst, ".tmp")  # mode 0o666 & ~umask, as a normally created file
    mode = os.stat(tmp).st_mode & 0o777
    try:
        save_file(sd, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors writes the file anew, private (0600)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return dst


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keyface.checkpoints", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert a model file to safetensors")
    conv.add_argument("src")
    conv.add_argument("dst")
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        try:
            out = convert_to_safetensors(args.src, args.dst)
        except (CheckpointError, OSError) as err:
            parser.exit(2, f"error: {err}\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    _main()
