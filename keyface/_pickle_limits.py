"""Bounds on the work and memory an untrusted pickle may cost while it is read.

A restricted unpickler stops a model file from running code, but not from costing unbounded memory
or time with allowed names alone: ``list(range(10**10))`` or ``bytearray(10**10)`` in a 100-byte
file, or a few hundred bytes of tuples that share their children (each level doubles the size of
the tree without adding a byte to the file) used as dict keys, whose hashing then never finishes.

:class:`PickleLimits` is mixed into the restricted unpickler of ``keyface.checkpoints``. It keeps a
budget proportional to the size of the pickle and charges everything whose cost is not paid for by
bytes of the file: elements a constructor copies out of an iterable, the nodes a key's hash walks
through, keys whose hashes collide, the unfolded size of the finished object. Each check costs at
most what it charges, so reading any pickle costs O(budget) time and memory, or raises
:class:`PickleLimitError` saying which limit the file went past.
"""

from __future__ import annotations

import collections
import pickle
import types

# Allowance on top of what the file's own bytes pay for. Measured with keyface.checkpoints' pre-scan:
# the DeepSpeed + OmegaConf fixture uses 256 units for its 2,300-byte pickle (0.11 per byte), a
# Lightning-style file with 3,000 tensors and their optimizer state 39,038 for 656,949 bytes (0.06
# per byte); WORK_PER_BYTE leaves two orders of magnitude of margin.
BASE_WORK = 1_000_000
WORK_PER_BYTE = 16
MAX_NESTING = 100  # containers inside containers; checkpoints nest a handful of levels
MAX_SAME_HASH = 16  # keys of one dict/set sharing a hash: a hash-flooding file, not metadata


class PickleLimitError(pickle.UnpicklingError):
    """The pickle would cost more memory or time than its size can justify."""


class RefusedCall(pickle.UnpicklingError):
    """The pickle calls an allowed name with arguments that would build something unbounded."""


def work_budget(pickle_bytes: int) -> int:
    return BASE_WORK + WORK_PER_BYTE * max(0, int(pickle_bytes))


# What the walks below visit: container elements, dict keys and values, namespace attributes;
# everything else is a leaf (tensors, strings, numbers, inert stand-ins).
def _children(obj):
    if isinstance(obj, (tuple, list, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        return [x for kv in obj.items() for x in kv]
    if isinstance(obj, types.SimpleNamespace):  # argparse-style hyper-parameters
        return list(vars(obj).values())
    return ()  # not the stand-ins' attributes: OmegaConf nodes point back at their parents


class PickleLimits:
    """Mixin for a ``pickle._Unpickler`` subclass: call ``_init_limits(pickle_bytes)`` first."""

    def _init_limits(self, pickle_bytes: int):
        self._work_left = work_budget(pickle_bytes)
        self._hashes_seen = {}  # id(container) -> (container, {hash: count})

    def _charge(self, units: int, what: str):
        self._work_left -= int(units)
        if self._work_left < 0:
            raise PickleLimitError(
                f"{what} costs more than a pickle of this size may (limit {WORK_PER_BYTE} units per byte "
                f"+ {BASE_WORK:,}); the file is malformed or built to exhaust memory or time"
            )

    def _walk(self, obj, what: str) -> None:
        """Visit ``obj``'s unfolded tree (shared children counted every time, as hashing and
        printing do), charging one unit per node; refuse nesting deeper than MAX_NESTING."""
        stack = [(obj, 0)]
        while stack:
            item, depth = stack.pop()
            self._charge(1, what)
            kids = _children(item)
            if kids:
                if depth >= MAX_NESTING:
                    raise PickleLimitError(f"{what} is nested deeper than {MAX_NESTING} levels")
                stack.extend((k, depth + 1) for k in kids)

    def _check_key(self, container, key) -> None:
        """Charge the cost of hashing ``key`` into ``container`` and refuse hash flooding."""
        self._walk(key, "hashing a dict key or set element")
        try:
            h = hash(key)
        except TypeError:
            return  # the insert itself raises "unhashable type"
        # the container is kept with its counts so that its id cannot be reused by another one
        seen = self._hashes_seen.setdefault(id(container), (container, {}))[1]
        seen[h] = seen.get(h, 0) + 1
        if seen[h] > MAX_SAME_HASH:
            raise PickleLimitError(
                f"more than {MAX_SAME_HASH} keys of one dict or set share a hash value (hash flooding)"
            )

    def _check_keys(self, container, keys) -> None:
        for key in keys:
            self._check_key(container, key)

    def check_result(self, obj) -> None:
        """Bound the unfolded size and depth of the finished object: whoever reads it next (printing,
        comparing, json.dumps of metadata) pays for every shared reference again."""
        self._walk(obj, "the unpickled object")

    # ---- opcodes that insert keys ---------------------------------------------------------------

    def _limited_setitem(self):
        target = self.stack[-3]
        self._require_mapping(target, "SETITEM")
        self._check_key(target, self.stack[-2])
        pickle._Unpickler.load_setitem(self)

    def _limited_setitems(self):
        target = self.metastack[-1][-1] if self.metastack else None
        self._require_mapping(target, "SETITEMS")
        self._check_keys(target, self.stack[0::2])
        pickle._Unpickler.load_setitems(self)

    def _limited_additems(self):
        target = self.metastack[-1][-1] if self.metastack else None
        if not isinstance(target, (set, frozenset)):
            raise RefusedCall(f"it adds set items to {_a(target)}")
        self._check_keys(target, self.stack)
        pickle._Unpickler.load_additems(self)

    def _limited_frozenset(self):
        self._check_keys(self.stack, self.stack)  # this MARK's items form the new frozenset
        pickle._Unpickler.load_frozenset(self)

    def _limited_dict(self):
        self._check_keys(self.stack, self.stack[0::2])
        pickle._Unpickler.load_dict(self)

    @staticmethod
    def _require_mapping(target, opcode):
        # weights_only torch does the same: SETITEM on a tensor or list would index it instead
        if not isinstance(target, dict):
            raise RefusedCall(f"it sets dict items on {_a(target)} ({opcode})")

    # ---- calls ----------------------------------------------------------------------------------

    def _charge_iterable(self, arg, what):
        """An iterable a constructor copies: only finished containers (their length is known and was
        paid for) and ranges (charged by length; ``list(range(10**10))`` is refused here)."""
        if isinstance(arg, (str, bytes, bytearray, tuple, list, dict, set, frozenset, range)):
            self._charge(len(arg), what)
            return
        raise RefusedCall(f"it calls {what} with {_a(arg)}: only a finished container can be copied")

    def check_call(self, func, args, kwargs=None):
        """Called before a REDUCE / NEWOBJ / OBJ / INST runs ``func(*args, **kwargs)``."""
        policy = self.call_policies.get(func) if hashable(func) else None
        if policy is None:
            return  # inert: stores its arguments (stand-ins, rebuild functions, dtypes)
        policy(self, func, tuple(args), dict(kwargs or {}))

    # the unpickler's opcodes, with the check before the call
    def _limited_reduce(self):
        self.check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_reduce(self)

    def _limited_newobj(self):
        self.check_call(self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_newobj(self)

    def _limited_newobj_ex(self):
        self.check_call(self.stack[-3], self.stack[-2], self.stack[-1])
        pickle._Unpickler.load_newobj_ex(self)

    def _instantiate(self, klass, args):  # OBJ and INST
        self.check_call(klass, args)
        pickle._Unpickler._instantiate(self, klass, args)

    @classmethod
    def limited_dispatch(cls, base: dict) -> dict:
        table = dict(base)
        for opcode, method in (
            (pickle.SETITEM, cls._limited_setitem), (pickle.SETITEMS, cls._limited_setitems),
            (pickle.ADDITEMS, cls._limited_additems), (pickle.FROZENSET, cls._limited_frozenset),
            (pickle.DICT, cls._limited_dict), (pickle.REDUCE, cls._limited_reduce),
            (pickle.NEWOBJ, cls._limited_newobj), (pickle.NEWOBJ_EX, cls._limited_newobj_ex),
        ):
            table[opcode[0]] = method
        return table


def hashable(obj) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


# ---- call policies: what each allowed callable may be given ----------------------------------------

_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def scalars_only(unpickler, func, args, kwargs):
    """str(), int(), ...: a container argument would be printed (repr of a shared tree is
    exponential) or parsed; only scalars, paid for by their bytes."""
    for a in (*args, *kwargs.values()):
        if not isinstance(a, _SCALARS):
            raise RefusedCall(f"it calls {_name(func)}() with {_a(a)}: only strings and numbers are allowed there")
        if isinstance(a, (str, bytes)):
            unpickler._charge(len(a), f"{_name(func)}()")


def sequence_of(unpickler, func, args, kwargs):
    """list(x), tuple(x), torch.Size(x): copies x, charged by its length."""
    for a in args[:1]:
        unpickler._charge_iterable(a, f"{_name(func)}()")


def hashing_of(unpickler, func, args, kwargs):
    """set(x), frozenset(x): copies and hashes every element."""
    sequence_of(unpickler, func, args, kwargs)
    for a in args[:1]:
        unpickler._check_keys(args, a)


def mapping_of(unpickler, func, args, kwargs):
    """dict(x), OrderedDict(x), defaultdict(factory, x): x a dict or a sequence of pairs."""
    source = args[1:2] if func is collections.defaultdict else args[:1]
    for a in source:
        unpickler._charge_iterable(a, f"{_name(func)}()")
        if isinstance(a, dict):
            continue  # copying a dict reuses the hashes it already paid for
        for pair in a:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise RefusedCall(f"it calls {_name(func)}() with something that is not key/value pairs")
            unpickler._check_key(args, pair[0])
    unpickler._charge(len(kwargs), f"{_name(func)}()")


def bytes_of(unpickler, func, args, kwargs):
    """bytes(x) / bytearray(x): refuse ``bytearray(N)`` (N zero bytes for a few bytes of file) and
    ``bytes(range(N))``; a string or bytes to copy is fine."""
    if args and not isinstance(args[0], (str, bytes, bytearray, list, tuple)):
        raise RefusedCall(
            f"it calls {_name(func)}() with {_a(args[0])} (a size to allocate): only a copy of bytes or a "
            "string is allowed"
        )
    if args:
        unpickler._charge(len(args[0]), f"{_name(func)}()")
    scalars_only(unpickler, func, args[1:], kwargs)


def latin1_only(unpickler, func, args, kwargs):
    """_codecs.encode: protocol-2 pickles spell bytes as encode(str, 'latin1'); nothing else."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise RefusedCall("it calls _codecs.encode other than as encode(str, 'latin1')")
    unpickler._charge(len(args[0]), "_codecs.encode()")


def _a(value) -> str:
    kind = type(value).__name__
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def empty_array_only(unpickler, func, args, kwargs):
    """numpy ``_reconstruct(ndarray, shape, dtype)`` / ``ndarray(shape, ...)`` allocate ``shape``;
    numpy's own pickles always pass ``(0,)`` and set the real data with BUILD (checked by numpy
    against the bytes given)."""
    shape = args[1] if func.__name__ == "_reconstruct" and len(args) > 1 else (args[0] if args else ())
    dims = shape if isinstance(shape, (tuple, list)) else (shape,)
    if not all(isinstance(d, int) for d in dims) or any(d > 1 for d in dims):
        raise RefusedCall(f"it calls numpy {_name(func)}() with shape {shape!r}: only empty arrays are built there")


def never_called(unpickler, func, args, kwargs):
    raise RefusedCall(f"it calls {_name(func)}, which a supported checkpoint never does")


# What each builtin an allowed pickle may call may be given; the checkpoints module adds its own
# stand-ins and torch / numpy names.
CALL_POLICIES = {
    str: scalars_only, int: scalars_only, float: scalars_only, complex: scalars_only,
    bool: scalars_only, range: scalars_only, slice: scalars_only,
    list: sequence_of, tuple: sequence_of,
    set: hashing_of, frozenset: hashing_of,
    dict: mapping_of, collections.OrderedDict: mapping_of, collections.defaultdict: mapping_of,
    bytes: bytes_of, bytearray: bytes_of,
}
