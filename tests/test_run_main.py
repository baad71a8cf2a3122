"""scripts/run.sh (the README's main command) and its Python half scripts/run_main.py: which device it
picks, where it finds models, its command line. The render itself is `bash scripts/run.sh --once`."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_main():
    spec = importlib.util.spec_from_file_location("keyface_run_main", ROOT / "scripts" / "run_main.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("real,force_cpu,cuda,expect_cpu", [
    (True, False, True, False),   # the only GPU case: real weights, a CUDA device, no --cpu
    (True, True, True, True),     # --cpu wins
    (True, False, False, True),   # no CUDA
    (False, False, True, True),   # smoke weights stay on the CPU even with a GPU
    (False, True, False, True),
])
def test_device_choice(run_main, real, force_cpu, cuda, expect_cpu):
    cpu, why = run_main.use_cpu(real, force_cpu, cuda)
    assert cpu is expect_cpu
    assert why


def _touch(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _comfy_layout(root: Path):
    for name in ("keyframe.pt", "interpolation.pt", "interpolation_bad.pt"):
        _touch(root / "keyface" / name)
    _touch(root / "audio_encoders" / "WavLM-Base+.pt")
    _touch(root / "audio_encoders" / "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    _touch(root / "audio_encoders" / "wav2vec2-base-960h" / "config.json")
    _touch(root / "audio_encoders" / "wav2vec2-base-960h" / "model.safetensors")
    _touch(root / "vae" / "svd_vae.safetensors")


def test_finds_the_comfyui_layout(run_main, tmp_path):
    _comfy_layout(tmp_path)
    found = run_main.find_layout(tmp_path)
    assert {k: folder for k, (folder, _) in found.items()} == {
        "keyframe": "keyface", "interpolation": "keyface", "interpolation_bad": "keyface",
        "wavlm": "audio_encoders", "beats": "audio_encoders", "wav2vec2": "audio_encoders", "vae": "vae"}
    assert run_main.combo_values(tmp_path, found) == {
        "keyframe": "keyframe.pt", "interpolation": "interpolation.pt", "interpolation_bad": "interpolation_bad.pt",
        "wavlm": "WavLM-Base+.pt", "beats": "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
        "wav2vec2": "wav2vec2-base-960h", "vae": "svd_vae.safetensors"}


def test_keyface_folder_first_and_only_the_kinds_secondary_folder(run_main, tmp_path):
    _touch(tmp_path / "keyface" / "svd_vae.safetensors")
    _touch(tmp_path / "vae" / "svd_vae.safetensors")
    _touch(tmp_path / "audio_encoders" / "keyframe.pt")  # the nodes never look for a UNet there
    found = run_main.find_layout(tmp_path)
    assert found["vae"] == ("keyface", tmp_path / "keyface" / "svd_vae.safetensors")
    assert "keyframe" not in found


def test_incomplete_models_fall_back_to_smoke_weights(run_main, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_main, "ROOT", tmp_path / "repo")
    _comfy_layout(tmp_path / "models")
    (tmp_path / "models" / "vae" / "svd_vae.safetensors").unlink()
    root, found, real = run_main.pick_models(tmp_path / "models")
    out = capsys.readouterr().out
    assert not real and root == tmp_path / "repo" / ".cache" / "smoke_models"
    assert "lacks ['vae']" in out and "NOISE" in out
    assert not run_main.model_files.missing(found)


def test_files_at_the_top_of_the_models_root_are_an_error_not_noise(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(run_main, "ROOT", tmp_path / "repo")
    _comfy_layout(tmp_path / "models")
    flat = tmp_path / "flat"
    (tmp_path / "models" / "keyface").rename(flat)  # the files directly in $KEYFACE_MODELS
    with pytest.raises(SystemExit, match=r"top level .* move them into .*flat/keyface/"):
        run_main.pick_models(flat)
    assert not (tmp_path / "repo").exists()  # no smoke weights written, nothing rendered


def test_complete_models_are_used(run_main, tmp_path):
    _comfy_layout(tmp_path)
    root, found, real = run_main.pick_models(tmp_path)
    assert real and root == tmp_path and len(found) == len(run_main.model_files.KINDS)


def test_smoke_models_are_never_taken_for_real_ones(run_main, tmp_path, monkeypatch):
    monkeypatch.setattr(run_main, "ROOT", tmp_path / "repo")
    _comfy_layout(tmp_path / "models")
    (tmp_path / "models" / "keyface" / "SMOKE_MODELS_ARE_RANDOM_NOISE.txt").write_text("smoke")
    _root, _found, real = run_main.pick_models(tmp_path / "models")
    assert not real


@pytest.mark.parametrize("given", ["keyface", "", "flat"])
def test_cli_and_library_find_the_comfyui_layout(run_main, tmp_path, given):
    """locate_models (CLI --models, README Python) finds every file from a models/keyface folder (the
    rest in ../audio_encoders and ../vae), from a models root, or from one flat folder."""
    if given == "flat":
        _comfy_layout(tmp_path / "layout")
        for p in sorted((tmp_path / "layout").rglob("*")):
            if p.is_file():
                dest = tmp_path / "flat" / p.relative_to(tmp_path / "layout").relative_to(p.relative_to(tmp_path / "layout").parts[0])
                dest.parent.mkdir(parents=True, exist_ok=True)
                p.rename(dest)
        folder = tmp_path / "flat"
    else:
        _comfy_layout(tmp_path)
        folder = tmp_path / given
    found = run_main.model_files.locate_models(folder)
    assert not run_main.model_files.missing(found)
    if given != "flat":
        assert found["wavlm"].parent.name == "audio_encoders" and found["vae"].parent.name == "vae"


def test_fill_prompt_points_loaders_at_found_files(run_main):
    prompt = {"1": {"class_type": "KeyFaceVAELoader", "inputs": {"vae_name": "svd_vae.safetensors"}},
              "2": {"class_type": "KeyFaceInterpolationModelLoader", "inputs": {"model_name": "a", "bad_model_name": "b"}},
              "3": {"class_type": "LoadAudio", "inputs": {"audio": "x.wav"}}}
    names = {"vae": "sub/v.safetensors", "interpolation": "i.pt", "interpolation_bad": "ib.pt"}
    run_main.fill_prompt(prompt, "face.jpg", "speech.wav", names)
    assert prompt["1"]["inputs"]["vae_name"] == "sub/v.safetensors"
    assert prompt["2"]["inputs"] == {"model_name": "i.pt", "bad_model_name": "ib.pt"}
    assert prompt["3"]["inputs"]["audio"] == "speech.wav"


def test_run_sh_command_line():
    """--help and a bad argument answer before any setup (no venv or ComfyUI needed)."""
    ok = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "--once" in ok.stdout and "--cpu" in ok.stdout and "audio_encoders/" in ok.stdout
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "run.sh"), "--gpu"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument: --gpu" in bad.stderr


FAKE_HF = r'''#!/usr/bin/env bash
# Stand-in for `hf download REPO FILE... --local-dir DIR`: writes DIR/FILE, as the real one does.
[ "$1" = download ] || exit 2
shift; repo=$1; shift; files=(); dir=
while [ $# -gt 0 ]; do case "$1" in --local-dir) dir=$2; shift 2 ;; *) files+=("$1"); shift ;; esac; done
for f in "${files[@]}"; do mkdir -p "$dir/$(dirname "$f")"; echo "$repo" > "$dir/$f"; done
'''


def test_readme_download_commands_give_what_run_sh_and_the_workflows_use(run_main, tmp_path):
    """The README's download block (with a stand-in `hf`) must yield a complete models root for
    scripts/run.sh whose names are the shipped workflows' default loader values."""
    import json

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```bash\n", text.index("## Models")) + len("```bash\n")
    (tmp_path / "download.sh").write_text(text[start:text.index("```", start)], encoding="utf-8")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text(FAKE_HF, encoding="utf-8")
    (tmp_path / "bin" / "hf").chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-euo", "pipefail", "download.sh"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    found = run_main.find_layout(tmp_path / "models")
    assert run_main.model_files.missing(found) == []
    names = run_main.combo_values(tmp_path / "models", found)
    for wf_path in sorted((ROOT / "workflows").glob("*.json")):
        wf = json.loads(wf_path.read_text(encoding="utf-8"))
        defaults = {n["type"]: n["widgets_values"] for n in wf["nodes"] if n["type"].endswith("Loader")}
        assert defaults["KeyFaceVAELoader"] == [names["vae"]], wf_path.name
        assert defaults["KeyFaceAudioEncoderLoader"] == [names["wavlm"], names["beats"], names["wav2vec2"]], wf_path.name
        assert defaults["KeyFaceKeyframeModelLoader"] == [names["keyframe"]], wf_path.name
        assert defaults["KeyFaceInterpolationModelLoader"] == [names["interpolation"], names["interpolation_bad"]], wf_path.name


def _tools_dir(tmp_path, tools) -> Path:
    """A folder of links to ``tools``: the whole PATH of a scripts/setup_env.sh run that must not
    find anything else (apt-get, python3, the real df)."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return bin_dir


@pytest.mark.parametrize("env,strict", [({}, False), ({"CI": "true"}, True), ({"KEYFACE_REQUIRE_BROWSER": "1"}, True)])
def test_chromium_is_best_effort_except_in_ci(tmp_path, env, strict):
    """scripts/setup_env.sh on a machine without apt-get: a notice for scripts/test.sh, a failure
    under .ci/run's variables. PATH holds only the tools the script needs besides apt-get."""
    import sys

    venv = Path(sys.prefix)
    stamp = venv / ".keyface-test-reqs"
    if not stamp.is_file() or stamp.read_bytes() != (ROOT / "requirements-test.txt").read_bytes():
        pytest.skip("runs only inside the venv scripts/setup_env.sh made (else it would pip install)")
    bin_dir = _tools_dir(tmp_path, ("bash", "cmp", "dirname", "cp", "id", "tr"))
    r = subprocess.run([str(bin_dir / "bash"), str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                       timeout=60, env={"PATH": str(bin_dir), "KEYFACE_VENV": str(venv), "KEYFACE_SKIP_COMFYUI": "1",
                                        "KEYFACE_WITH_BROWSER": "1", "KEYFACE_CHROMIUM": str(tmp_path / "none"), **env})
    if strict:
        assert r.returncode == 1 and "ERROR: chromium is required" in r.stdout
    else:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no apt-get" in r.stdout and "tests/browser/) will be SKIPPED" in r.stdout


@pytest.mark.parametrize("cpu", [True, False])
def test_server_command_and_model_folders(tmp_path, cpu):
    """What run.sh hands to ComfyUI: --cpu only when asked, and every folder of the models layout."""
    from comfyui_server import ComfyServer

    server = ComfyServer(tmp_path / "base", 8188, tmp_path / "models" / "keyface", cpu=cpu,
                         extra_folders={"vae": tmp_path / "models" / "vae"})
    server.prepare()
    assert ("--cpu" in server.command()) is cpu
    yaml = server.yaml_path.read_text(encoding="utf-8")
    assert f"    keyface: {tmp_path / 'models' / 'keyface'}\n" in yaml
    assert f"    vae: {tmp_path / 'models' / 'vae'}\n" in yaml


@pytest.mark.parametrize("free_kib, disks, warnings", [(1_000_000, "two", 2), (1_000_000, "one", 1),
                                                     (50_000_000, "two", 0), ("n/a", "two", 0)])
def test_setup_warns_before_installing_on_a_small_disk(tmp_path, free_kib, disks, warnings):
    """A fresh install of the test stack needs ~7.3 GB of disk (scripts/setup_env.sh, NEED_MIB): with
    less free where the venv or the temp folder goes, a warning with the numbers comes before pip, once
    per disk. A stand-in df reports the space (each folder its own disk, or both one); a missing python
    stops the script right after, where it would create the venv."""
    import shutil

    bin_dir = _tools_dir(tmp_path, ("bash", "cmp", "dirname", "awk"))
    mount = '"${@: -1}"' if disks == "two" else "/"
    df = bin_dir / "df"
    df.write_text(f"#!{shutil.which('bash')}\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  f"echo /dev/x 90000000 1 {free_kib} 99% {mount}\n")
    df.chmod(0o755)
    venv, tmp = tmp_path / "new" / "venv", tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([str(bin_dir / "bash"), str(ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                       timeout=60, env={"PATH": str(bin_dir), "KEYFACE_VENV": str(venv), "TMPDIR": str(tmp),
                                        "PYTHON": str(tmp_path / "no-python")})
    assert r.returncode != 0 and "no-python" in r.stderr  # stopped where it would create the venv
    found = [line for line in r.stdout.splitlines() if "WARNING: only" in line]
    assert len(found) == warnings, r.stdout
    if warnings:
        assert f"only {free_kib // 1024} MiB free on the disk of {venv}" in found[0]
        assert "7334 MiB at its peak" in r.stdout and "No space left on device" in r.stdout
    if warnings == 2:
        assert f"on the disk of {tmp};" in found[1]
    assert not venv.exists()
