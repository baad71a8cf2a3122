"""Tiny model files built to exhaust memory or time (issue 9 items 1-2 and their siblings).

Each file is read in a child process with an address-space limit and a timeout, so a regression
fails the test instead of taking the machine down; the child reports the error text, the time it
took and how much its peak RSS grew.
"""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
EXTRA_ADDRESS_SPACE = 1536 << 20  # what the child may map beyond torch's own import

_CHILD = r"""
import json, resource, sys, time
from keyface.checkpoints import CheckpointError, read_state_dict

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = vm_size() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[2:]:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        read_state_dict(path)
        outcome = "loaded"
    except CheckpointError as err:
        outcome = "CheckpointError: " + str(err)
    except BaseException as err:
        outcome = type(err).__name__ + ": " + str(err)
    print(json.dumps({
        "path": path, "outcome": outcome, "seconds": time.perf_counter() - t0,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
    }), flush=True)
"""

# Every hostile file of this module, written once and read by one child process (importing torch
# costs seconds; one child per file would make this module the slowest of the suite).
CASES = {}


def case(name):
    def register(build):
        CASES[name] = build
        return build
    return register


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    paths = []
    for name, build in CASES.items():
        path = folder / name
        build(path)
        paths.append(str(path))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(EXTRA_ADDRESS_SPACE), *paths],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
        lines, error = proc.stdout, proc.stderr[-2000:]
    except subprocess.TimeoutExpired as timeout:
        lines, error = (timeout.stdout or b"").decode(), f"the child did not finish within {TIMEOUT_S} s"
    results = {}
    for line in lines.splitlines():
        record = json.loads(line)
        results[Path(record["path"]).name] = record
    return folder, results, error


def assert_refused_cheaply(outcomes, name: str, *needles: str) -> str:
    folder, results, error = outcomes
    assert name in results, f"{name}: no result ({error})"
    result = results[name]
    outcome = result["outcome"]
    assert outcome.startswith("CheckpointError: "), outcome
    assert str(folder / name) in outcome, outcome
    for needle in needles:
        assert needle in outcome, outcome
    assert result["seconds"] < 10, result
    assert result["rss_growth_mb"] < 200, result
    return outcome


# ------------------------------------------------------------------------- pickle writers
# Raw opcodes: these files use only names the restricted unpickler allows.


def _int(n: int) -> bytes:
    if 0 <= n < 2**31:
        return b"J" + struct.pack("<i", n)  # BININT
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def list_of_range(n: int) -> bytes:
    """list(range(n)): a few dozen bytes, n list slots."""
    return (b"\x80\x02" + _global("builtins", "list") + _global("builtins", "range") + _int(n)
            + b"\x85R\x85R.")


def bytearray_of(n: int) -> bytes:
    """bytearray(n): n zero bytes (torch's weights-only loader allows bytearray too)."""
    return b"\x80\x02" + _global("builtins", "bytearray") + _int(n) + b"\x85R."


def rebuild_from_type_bytearray(n: int) -> bytes:
    """_rebuild_from_type_v2(bytearray, Tensor, (n,), {}): the rebuild helper calls bytearray(n)."""
    return (b"\x80\x02" + _global("torch._tensor", "_rebuild_from_type_v2") + b"(" + _global("builtins", "bytearray")
            + _global("torch", "Tensor") + _int(n) + b"\x85}tR.")


def shared_tuple_key(levels: int) -> bytes:
    """{t: 1} with t_{i+1} = (t_i, t_i) through the memo: the key's unfolded tree has 2**levels
    leaves, and hashing it visits every one (no globals at all)."""
    out = [b"\x80\x04}", b")\x940"]  # the dict; t_0 = () as memo 0
    for i in range(1, levels + 1):
        out.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86\x940")  # memo i = (t, t)
    out.append(b"h" + bytes([levels]) + b"K\x01s.")
    return b"".join(out)


def colliding_int_keys(count: int) -> bytes:
    """{k * (2**61 - 1): 0 ...}: Python hashes ints modulo 2**61 - 1, so every key has the same hash and
    each insert compares against all the keys before it (quadratic)."""
    body = b"".join(_int(k * (2**61 - 1)) + b"K\x00" for k in range(1, count + 1))
    return b"\x80\x02}(" + body + b"u."


def deep_tuple(depth: int) -> bytes:
    """{((((...)))): 1}, nested `depth` levels."""
    return b"\x80\x02})" + b"\x85" * depth + b"K\x01s."


def _bytes_case(name, data: bytes):
    case(name)(lambda path: path.write_bytes(data))


# ------------------------------------------------------------------------- issue 9 item 1

_bytes_case("range_5e7.pt", list_of_range(50_000_000))
_bytes_case("range_max.pt", list_of_range(2**31 - 1))
_bytes_case("bytearray_5e7.pt", bytearray_of(50_000_000))
_bytes_case("bytearray_max.pt", bytearray_of(2**31 - 1))
_bytes_case("rebuild_bytearray.pt", rebuild_from_type_bytearray(2**31 - 1))


@pytest.mark.parametrize("name", ["range_5e7.pt", "range_max.pt"])
def test_list_of_range_is_refused_without_allocating(outcomes, name):
    assert len(CASES) and (outcomes[0] / name).stat().st_size < 100
    assert_refused_cheaply(outcomes, name, "list() costs more than a pickle of this size may")


@pytest.mark.parametrize("name", ["bytearray_5e7.pt", "bytearray_max.pt"])
def test_bytearray_of_a_size_is_refused_without_allocating(outcomes, name):
    assert_refused_cheaply(outcomes, name, "it calls bytearray() with an int (a size to allocate)")


def test_rebuild_helper_cannot_call_bytearray(outcomes):
    assert_refused_cheaply(outcomes, "rebuild_bytearray.pt", "only tensor rebuild functions")


# ------------------------------------------------------------------------- issue 9 item 2

_bytes_case("hash_bomb.pt", shared_tuple_key(60))
_bytes_case("flood.pt", colliding_int_keys(60_000))
_bytes_case("deep.pt", deep_tuple(100_000))


def test_shared_tuple_keys_do_not_hang(outcomes):
    assert (outcomes[0] / "hash_bomb.pt").stat().st_size < 500
    assert_refused_cheaply(outcomes, "hash_bomb.pt", "hashing a dict key or set element costs more")


def test_hash_flooding_keys_are_refused(outcomes):
    assert_refused_cheaply(outcomes, "flood.pt", "share a hash value")


def test_deep_nesting_is_refused(outcomes):
    assert_refused_cheaply(outcomes, "deep.pt", "nested deeper than 100 levels")


# ------------------------------------------------------------------------- siblings: containers


class _Storage:
    """Pickled as a persistent id (a storage reference), as torch.save writes it."""


class _Rebuilt:
    def __init__(self, storage, numel):
        self.storage, self.numel = storage, numel

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict()))


def legacy_checkpoint(declared_numel: int, actual_numel: int) -> bytes:
    """A torch legacy (non-zip) file whose one float storage claims `declared_numel` elements."""
    storage = _Storage()

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", declared_numel, None)
            return None

    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buf, protocol=2)
    Writer(buf, protocol=2).dump({"w": _Rebuilt(storage, min(declared_numel, 4))})
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", actual_numel) + b"\0" * (4 * actual_numel))
    return buf.getvalue()


_bytes_case("legacy_claims.pt", legacy_checkpoint(declared_numel=2**33, actual_numel=4))


def test_legacy_storage_claiming_more_than_the_file_is_refused(outcomes):
    assert_refused_cheaply(outcomes, "legacy_claims.pt", "its storages claim 34,359,738,368 bytes but only")


def test_honest_legacy_checkpoint_still_loads(tmp_path):
    path = tmp_path / "legacy_ok.pt"
    path.write_bytes(legacy_checkpoint(declared_numel=4, actual_numel=4))
    from keyface.checkpoints import read_state_dict

    assert torch.equal(read_state_dict(path)["w"], torch.zeros(4))


def _patch_zip_sizes(path: Path, member_suffix: str, new_size: int):
    """Rewrite the uncompressed size of one member in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    struct.pack_into("<I", data, info.header_offset + 22, new_size)
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46:pos + 46 + name_len]).decode()
        if name == info.filename:
            struct.pack_into("<I", data, pos + 24, new_size)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


@case("zip_bomb.pt")
def _zip_bomb(path):
    torch.save({"w": torch.ones(4)}, path)
    _patch_zip_sizes(path, "data.pkl", 0xFFFF0000)


def test_zip_member_declaring_a_huge_size_is_refused(outcomes):
    assert_refused_cheaply(outcomes, "zip_bomb.pt", "zip entries declare", "zip bomb")


@case("zip_claims.pt")
def _zip_claims(path):
    storage = _Storage()

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2**33) if obj is storage else None

    buf = io.BytesIO()
    Writer(buf, protocol=2).dump({"w": _Rebuilt(storage, 4)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", b"\0" * 16)
        zf.writestr("archive/version", "3\n")


def test_zip_storage_claiming_more_than_its_record_is_refused(outcomes):
    assert_refused_cheaply(outcomes, "zip_claims.pt", "claims 34,359,738,368 bytes but its record holds 16")


_ABSURD_HEADER = json.dumps({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4 * 2**40]}}).encode()
_bytes_case("absurd.safetensors", struct.pack("<Q", len(_ABSURD_HEADER)) + _ABSURD_HEADER + b"\0" * 16)
_bytes_case("huge_header.safetensors", struct.pack("<Q", 2**62) + b"{}")


@pytest.mark.parametrize("name", ["absurd.safetensors", "huge_header.safetensors"])
def test_safetensors_with_absurd_header_is_refused(outcomes, name):
    """safetensors checks its header against the file itself (guarded here, nothing changed)."""
    assert_refused_cheaply(outcomes, name, "not a readable safetensors file")


def test_limits_leave_real_checkpoints_alone(tmp_path):
    """A checkpoint with metadata beside thousands of tensors loads (the budget scales with the file)."""
    from keyface.checkpoints import read_state_dict

    weights = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(3000)}
    meta = {"hyper": {"lr": 1e-4, "betas": (0.9, 0.999), "names": [f"p{i}" for i in range(3000)]},
            "tuple_keys": {(i, "x"): i for i in range(500)}}
    for serialization in (True, False):
        path = tmp_path / f"real_{serialization}.ckpt"
        torch.save({"state_dict": weights, "meta": meta, "epoch": 3}, path,
                   _use_new_zipfile_serialization=serialization)
        sd = read_state_dict(path)
        assert len(sd) == 3000 and torch.equal(sd["layer7.weight"], torch.full((3,), 7.0))


# ------------------------------------------------------------------------- siblings: JSON configs


def test_oversized_sidecar_is_refused_without_reading_it_all(tmp_path):
    from keyface.model_files import MAX_CONFIG_BYTES, read_sidecar

    (tmp_path / "keyframe.json").write_text(json.dumps({"model_channels": 320, "pad": "x" * MAX_CONFIG_BYTES}))
    with pytest.raises(ValueError, match=r"keyframe.json is larger than 1,048,576 bytes; a model config is a few KB"):
        read_sidecar(tmp_path / "keyframe.safetensors")


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_configs_are_refused(tmp_path, depth):
    """100 000 levels used to raise a bare RecursionError from json; 40 would parse but is no config."""
    from keyface.audio._common import _read_json
    from keyface.checkpoints import CheckpointError
    from keyface.model_files import read_sidecar

    (tmp_path / "keyframe.json").write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError, match=r"keyframe.json nests deeper than 32 levels"):
        read_sidecar(tmp_path / "keyframe.safetensors")
    (tmp_path / "config.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(CheckpointError, match=r"config.json nests deeper than 32 levels"):
        _read_json(tmp_path / "config.json")


def test_real_sidecars_still_load(tmp_path):
    from keyface import smoke
    from keyface.model_files import read_sidecar, write_sidecar

    for name, config in smoke.sidecar_configs().items():
        write_sidecar(tmp_path / f"{name}.safetensors", config)
        assert read_sidecar(tmp_path / f"{name}.safetensors") == config


def test_legacy_tar_checkpoint_is_refused(tmp_path):
    """PyTorch's pre-0.4 tar format: torch's tar reader allocates the storage sizes it declares."""
    import tarfile

    from keyface.checkpoints import CheckpointError, read_state_dict

    member = tmp_path / "storages"
    member.write_bytes(b"\x80\x02K\x01.")
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(member, arcname="storages")
    with pytest.raises(CheckpointError, match=r"old.pt: a checkpoint in PyTorch's legacy tar format, which is not supported"):
        read_state_dict(path)


_bytes_case("long_bytes.pt", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"tiny")  # BINBYTES8 of 1 TB


def test_declared_pickle_lengths_are_not_allocated(outcomes):
    """A BINBYTES8 length of 2**40 in a 15-byte legacy file: nothing is allocated for it."""
    outcome = assert_refused_cheaply(outcomes, "long_bytes.pt", "not a readable torch checkpoint")
    assert "MemoryError" not in outcome


def test_many_small_dicts_with_the_same_keys_load(tmp_path):
    """Keys repeat across containers (optimizer param groups, per-layer metadata): the hash-flooding
    check counts per container (protocol 2 pickles sets as set([...]) calls, 4 with ADDITEMS)."""
    from keyface.checkpoints import read_state_dict

    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8} for _ in range(200)]
    sets = [{1, 2, i} for i in range(50)]
    for protocol, zipped in ((1, True), (2, True), (2, False), (4, True)):
        path = tmp_path / f"groups_{protocol}_{zipped}.pt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "param_groups": groups, "sets": sets}, path,
                   pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
        assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
