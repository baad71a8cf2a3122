"""Safe model-file reading, the key ledger, conversion to safetensors and wrong-file errors."""

import argparse
import os
import io
import pickle
import struct
from pathlib import Path

import pytest
import torch

from keyface.checkpoints import CheckpointError, KeyLedger, convert_to_safetensors, read_audio_checkpoint, read_state_dict

PARITY = Path(__file__).parent / "fixtures" / "parity"

TINY_UNET = {
    "adm_in_channels": 512, "num_classes": "sequential", "use_checkpoint": False, "in_channels": 8,
    "out_channels": 4, "model_channels": 64, "attention_resolutions": [2], "num_res_blocks": 1,
    "channel_mult": [1, 2], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 32, "spatial_transformer_attn_type": "softmax-xformers",
    "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
    "video_kernel_size": [3, 1, 1], "fine_tuning_method": None, "audio_cond_method": "both_keyframes",
    "additional_audio_frames": 0, "audio_dim": 32, "unfreeze_blocks": [],
}
TINY_CONFIG = {
    "network_config": {"params": TINY_UNET},
    "conditioner_config": {"params": {"emb_models": [
        {"input_key": "cond_frames"}, {"input_key": "valence"}, {"input_key": "arousal"},
        {"input_key": "audio_emb", "params": {"audio_dim": 48, "linear_dim": 32}},
    ]}},
}


def _marker_payload(marker: Path):
    class WritesMarker:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return WritesMarker()


# ------------------------------------------------------------------------------------ safety


@pytest.mark.parametrize("container", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_code_running_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "PWNED"
    payload = {"module": {"_forward_module.w": torch.ones(2)}, "extra": _marker_payload(marker)}
    path = tmp_path / "evil.pt"
    if container == "torch_zip":
        torch.save(payload, path)
    elif container == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle (a pickled tensor would already be refused for torch.storage._load_from_bytes)
        with open(path, "wb") as f:
            pickle.dump({"module": {"w": [1.0]}, "extra": payload["extra"]}, f)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert "system" in msg and str(path) in msg and "refusing" in msg
    assert "never runs code" in msg and ".safetensors" in msg  # says why, and what to do instead
    with pytest.raises(CheckpointError):
        convert_to_safetensors(path, tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError):
        read_audio_checkpoint(path)
    assert not marker.exists(), "code from the pickle ran"
    assert not (tmp_path / "out.safetensors").exists()


def _build_on_purepath_pickle() -> bytes:
    """Protocol-2 pickle: {"module": {"w": [1.0]}, "extra": <PurePath with __truediv__ := int>}: BUILD
    with a (None, slotstate) pair on the allowed class itself (no code runs, but the class changes)."""
    import pickletools

    p = pickle
    body = (p.PROTO + b"\x02" + p.EMPTY_DICT + p.MARK
            + p.BINUNICODE + (6).to_bytes(4, "little") + b"module" + p.EMPTY_DICT
            + p.BINUNICODE + (1).to_bytes(4, "little") + b"w" + p.EMPTY_LIST + p.BINFLOAT + struct.pack(">d", 1.0)
            + p.APPEND + p.SETITEM
            + p.BINUNICODE + (5).to_bytes(4, "little") + b"extra"
            + p.GLOBAL + b"pathlib\nPurePath\n"
            + p.NONE + p.EMPTY_DICT + p.BINUNICODE + (11).to_bytes(4, "little") + b"__truediv__"
            + p.GLOBAL + b"builtins\nint\n" + p.SETITEM + p.TUPLE2 + p.BUILD
            + p.SETITEMS + p.STOP)
    pickletools.dis(body, out=io.StringIO())  # a well-formed pickle
    return body


@pytest.mark.parametrize("container", ["torch_legacy", "plain_pickle"])
def test_pickle_cannot_change_an_allowed_class(tmp_path, container):
    """BUILD on an allow-listed global (here pathlib.PurePath) would re-point its methods for the whole
    process; the restricted loader refuses the file and the class is untouched."""
    import pathlib

    path = tmp_path / "sets_state.pt"
    body = _build_on_purepath_pickle()
    if container == "torch_legacy":  # the legacy torch container: magic number, protocol, sys info, then the object
        data = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
                + body + pickle.dumps([], protocol=2))
    else:
        data = body
    path.write_bytes(data)
    truediv = pathlib.PurePath.__dict__.get("__truediv__")
    with pytest.raises(CheckpointError, match="refusing to load this file: its pickle sets the state of a shared object"):
        read_state_dict(path)
    assert pathlib.PurePath.__dict__.get("__truediv__") is truediv
    assert pathlib.PurePath("a") / "b" == pathlib.PurePath("a/b")


def test_inert_metadata_loads_without_importing(tmp_path):
    # argparse.Namespace beside the weights: torch's weights-only loader refuses it, the restricted
    # fallback maps it to an inert stand-in.
    path = tmp_path / "ds.pt"
    torch.save({"module": {"_forward_module.a.weight": torch.arange(3.0)}, "args": argparse.Namespace(lr=1e-4)}, path)
    sd = read_state_dict(path)
    assert list(sd) == ["a.weight"] and torch.equal(sd["a.weight"], torch.arange(3.0))


def test_training_metadata_loads_without_importing(tmp_path):
    """OmegaConf configs, pathlib paths, TorchVersion and argparse.Namespace beside the weights (what
    training runs store) are read as inert stand-ins; no framework module is imported."""
    import sys

    fixture = Path(__file__).parent / "fixtures" / "checkpoints" / "deepspeed_omegaconf_metadata.pt"
    before = set(sys.modules)
    sd = read_state_dict(fixture)  # written with the real omegaconf: tests/tools/make_metadata_checkpoint.py
    assert sorted(sd) == ["model.b", "model.w"]
    assert torch.equal(sd["model.w"], torch.arange(6.0).reshape(2, 3)) and torch.equal(sd["model.b"], torch.tensor([0.5, -1.5]))
    assert not any(m.split(".")[0] in ("omegaconf", "yaml") for m in set(sys.modules) - before)

    path = tmp_path / "ds.pt"
    torch.save({"module": {"_forward_module.a": torch.ones(2)}, "dir": Path("/runs/x"),
                "torch_version": torch.__version__, "args": argparse.Namespace(out=Path("o"))}, path)
    assert torch.equal(read_state_dict(path)["a"], torch.ones(2))
    assert convert_to_safetensors(path, tmp_path / "ds.safetensors").is_file()


def test_metadata_stand_ins_are_refused_among_the_weights(tmp_path):
    path = tmp_path / "ds.pt"
    torch.save({"module": {"_forward_module.a": torch.ones(2), "_forward_module.p": Path("/x")}}, path)
    with pytest.raises(CheckpointError, match=r"not tensors:\s+'_forward_module.p'"):
        read_state_dict(path)


def test_folder_is_refused_with_what_to_pass(tmp_path):
    hf = tmp_path / "wav2vec2-base-960h"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    for call in (lambda: convert_to_safetensors(hf, tmp_path / "w.safetensors"), lambda: read_state_dict(hf),
                 lambda: read_audio_checkpoint(hf)):
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        assert "is a folder" in msg and "model.safetensors" in msg and "need no conversion" in msg
        assert "extension" not in msg


def test_containers(tmp_path):
    t = torch.randn(3, 2)
    torch.save({"state_dict": {"_forward_module.x": t}, "epoch": 3}, tmp_path / "l.ckpt")
    torch.save({"x": t}, tmp_path / "p.bin")
    for name in ("l.ckpt", "p.bin"):
        sd = read_state_dict(tmp_path / name)
        assert list(sd) == ["x"] and torch.equal(sd["x"], t)
    torch.save({"x": t, "note": "hello"}, tmp_path / "mixed.bin")
    with pytest.raises(CheckpointError, match="note"):
        read_state_dict(tmp_path / "mixed.bin")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extension"):
        read_state_dict(tmp_path / "w.onnx")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")


def test_audio_checkpoint_conversion_roundtrip(tmp_path):
    for name in ("wavlm.pt", "beats.pt"):
        ref = read_audio_checkpoint(PARITY / name)
        dst = convert_to_safetensors(PARITY / name, tmp_path / (name + ".safetensors"))
        got = read_audio_checkpoint(dst)
        assert got["cfg"] == ref["cfg"]
        assert got["model"].keys() == ref["model"].keys()
        assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])
        with pytest.raises(CheckpointError, match="audio"):
            read_state_dict(dst)


def test_conversion_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    dst = tmp_path / "k.safetensors"
    dst.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        convert_to_safetensors(PARITY / "wavlm.pt", dst)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


# ------------------------------------------------------------------------------------ ledger


def test_key_ledger_names_leftovers():
    sd = {f"model.diffusion_model.b{i}": torch.zeros(1) for i in range(3)}
    sd.update({f"stray.k{i}": torch.zeros(1) for i in range(14)})
    sd["first_stage_model.decoder.x"] = torch.zeros(1)
    ledger = KeyLedger(sd, "file.pt")
    assert set(ledger.take("model.diffusion_model.")) == {"b0", "b1", "b2"}
    assert ledger.ignore("first_stage_model.decoder.", "VAE decoder") == 1
    assert ledger.take("model.diffusion_model.") == {}  # already consumed
    with pytest.raises(CheckpointError) as err:
        ledger.finish()
    msg = str(err.value)
    assert "file.pt" in msg and "14 key(s)" in msg and "stray.k0" in msg and "4 more" in msg
    assert "b0" not in msg and "decoder" not in msg
    ok = KeyLedger({"a.x": torch.zeros(1)}, "f")
    ok.take("a.")
    ok.finish()


# ------------------------------------------------------------------------------------ engines


def test_wrong_model_errors():
    from keyface.engines import load_interpolation_networks, load_keyframe_network

    with pytest.raises(CheckpointError, match="interpolation model") as err:
        load_keyframe_network(PARITY / "interpolation_engine.pt")
    assert "load_interpolation_networks" in str(err.value)
    with pytest.raises(CheckpointError, match="keyframe model") as err:
        load_interpolation_networks(PARITY / "keyframe_engine.pt", PARITY / "interpolation_bad.pt")
    assert "load_keyframe_network" in str(err.value)
    with pytest.raises(CheckpointError, match="keyframe model"):
        load_interpolation_networks(PARITY / "interpolation_engine.pt", PARITY / "keyframe_engine.pt")
    with pytest.raises(CheckpointError, match="VAE"):
        load_keyframe_network(PARITY / "vae.safetensors")
    with pytest.raises(CheckpointError, match="audio"):
        load_keyframe_network(PARITY / "wavlm.pt")


def test_engine_leftover_keys_are_named(tmp_path):
    from keyface.engines import load_keyframe_network

    sd = read_state_dict(PARITY / "keyframe_engine.pt")
    sd["conditioner.embedders.5.linear.weight"] = torch.zeros(2, 2)
    sd["model.something_new"] = torch.zeros(1)
    cfg = _manifest_config("denoiser_keyframe")
    with pytest.raises(CheckpointError) as err:
        load_keyframe_network(sd, config=cfg)
    assert "conditioner.embedders.5.linear.weight" in str(err.value) and "model.something_new" in str(err.value)


def _manifest_config(name):
    import json

    manifest = json.loads((PARITY / "manifest.json").read_text())
    return next(c for c in manifest["cases"] if c["name"] == name)["config"]


def _tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(28, 4, 4, 4, generator=g),
        sigma=torch.tensor([4.248] * 14 + [0.4] * 14),
        concat=torch.randn(2, 4, 4, 4, generator=g),
        crossattn=torch.randn(2, 14, 32, generator=g),
        vector=torch.randn(28, 512, generator=g),
    )


def test_deepspeed_file_convert_gives_identical_outputs(tmp_path):
    from keyface.engines import build_keyframe_network, load_keyframe_network

    torch.manual_seed(0)
    net = build_keyframe_network(TINY_CONFIG)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sd = {"model.diffusion_model." + k: v for k, v in net.diffusion_model.state_dict().items()}
    sd.update({f"conditioner.embedders.3.{k}": v for k, v in net.audio_projection.state_dict().items()})
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    ds = {
        "module": {"_forward_module." + k: v for k, v in sd.items()},
        "ds_version": "0.14.4",
        "args": argparse.Namespace(seed=1),  # needs the restricted fallback loader
    }
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(ds, src)
    dst = convert_to_safetensors(src, tmp_path / "keyframe.safetensors")

    a = load_keyframe_network(src, config=TINY_CONFIG)
    b = load_keyframe_network(dst, config=TINY_CONFIG)
    c = load_keyframe_network(dst)  # sizes inferred from the shapes
    inp = _tiny_inputs()
    with torch.no_grad():
        ref = net.denoise(inp["x"], inp["sigma"], concat=inp["concat"], crossattn=inp["crossattn"], vector=inp["vector"])
        outs = [
            m.denoise(inp["x"], inp["sigma"], concat=inp["concat"], crossattn=inp["crossattn"], vector=inp["vector"])
            for m in (a, b, c)
        ]
    for out in outs:
        assert torch.equal(out, ref)
    audio = torch.randn(2, 14, 2, 48)
    assert torch.equal(a.audio_projection(audio), b.audio_projection(audio))
