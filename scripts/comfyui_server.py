"""A real ComfyUI (``.comfyui/``, installed by scripts/setup_env.sh) with this pack and smoke models.

Used by scripts/run_main.py (the demo) and by the tests (``tests/comfy_server.py`` wraps it in a
session fixture); nothing here imports pytest or test code.

:func:`start_server`

* writes the tiny random-weight KeyFace models (``keyface.smoke``, released file formats) into a
  temporary ``models`` folder (unless the folder already holds models);
* writes a temporary ``extra_model_paths.yaml`` with ``custom_nodes:`` = a temporary folder that holds
  only a symlink ``keyface`` -> the repository root, and ``keyface:`` = the models folder;
* copies the real portrait and speech fixtures into a temporary input folder;
* starts ``.comfyui/main.py --cpu`` on a free port with the real installed frontend and waits for
  ``/object_info``.

The :class:`ComfyServer` it returns has ``.url``, ``.output_dir``, ``.input_dir``, ``.models_dir``,
``.log_path``, ``.base`` and helpers (``get``, ``post``, ``submit``, ``wait``, ``log_text``, ``stop``).
Environment: ``KEYFACE_COMFYUI`` (default ``.comfyui``), ``KEYFACE_E2E_THREADS`` (torch threads in
the server, default 1: on small shared CPUs oversubscribed threads are many times slower).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
PORTRAIT = "face_grace_hopper.jpg"
SPEECH = "speech_male_arctic_a0007.wav"  # what the shipped workflows load
# 3.095 s: round(seconds x 25) = 77 frames where the original's ceil(samples / 640) gives 78, so the
# end-to-end frame count tells the two apart (the 4.000 s clip gives 100 either way).
SPEECH_ODD = "speech_female_arctic_a0009.wav"
PACK_LINK_NAME = "keyface"
PHOTO_WIDE = "photo_wide_1920x1080.jpg"  # the face workflow's photo (tests/tools/make_face_fixtures.py)


def comfyui_dir() -> Path:
    return Path(os.environ.get("KEYFACE_COMFYUI", ROOT / ".comfyui")).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, models_dir: Path, python: str = sys.executable, threads: int = 1,
                 extra_args=(), cpu: bool = True, extra_folders=None):
        self.base = Path(base)
        self.cpu = cpu  # tests pin the CPU; the demo (scripts/run.sh) lets ComfyUI pick the GPU for real weights
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.models_dir = Path(models_dir)
        # {ComfyUI folder name: path} added to the yaml next to keyface (run.sh: audio_encoders, vae)
        self.extra_folders = {k: Path(v) for k, v in (extra_folders or {}).items()}
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.log_path = self.base / "comfyui.log"
        self.python = python
        self.threads = threads
        self.extra_args = list(extra_args)
        self.proc = None
        self._log = None

    # ------------------------------------------------------------------------------------ setup
    def prepare(self):
        for d in (self.input_dir, self.output_dir, self.base / "custom_nodes", self.base / "user",
                  self.base / "temp", self.base / "pack_parent"):
            d.mkdir(parents=True, exist_ok=True)
        link = self.base / "pack_parent" / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        for name in (PORTRAIT, PHOTO_WIDE, SPEECH, SPEECH_ODD):
            shutil.copy(MEDIA / name, self.input_dir / name)
        self.yaml_path = self.base / "extra_model_paths.yaml"
        self.yaml_path.write_text(
            "keyface_test:\n"
            f"    custom_nodes: {self.base / 'pack_parent'}\n"
            f"    keyface: {self.models_dir}\n"
            + "".join(f"    {name}: {path}\n" for name, path in self.extra_folders.items()),
            encoding="utf-8",
        )

    def command(self):
        return [
            self.python, str(comfyui_dir() / "main.py"), *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base),
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.base / "temp"), "--user-directory", str(self.base / "user"),
            "--database-url", f"sqlite:///{self.base / 'comfyui.db'}",
            "--extra-model-paths-config", str(self.yaml_path), "--disable-auto-launch", "--log-stdout",
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0):
        import requests

        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(self.threads)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=str(comfyui_dir()), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                r = requests.get(self.url + "/object_info/KeyFaceSampleKeyframes", timeout=5)
                if r.status_code == 200 and r.json():
                    self.startup_seconds = time.monotonic() - t0
                    return self
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /object_info in {timeout:.0f} s; log:\n{self.log_text()[-4000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------ client
    def get(self, path, **kw):
        import requests

        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path, payload, **kw):
        import requests

        return requests.post(self.url + path, json=payload, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self):
        if not hasattr(self, "_object_info"):
            self._object_info = self.get("/object_info", timeout=60)
        return self._object_info

    def submit(self, prompt: dict, client_id: str | None = None) -> str:
        r = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if r.status_code != 200:
            raise RuntimeError(f"/prompt refused the prompt ({r.status_code}): {r.text[:4000]}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished; returns its history entry."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def free(self):
        """Unload models and drop the execution cache (so the next run executes every node)."""
        self.post("/free", {"unload_models": True, "free_memory": True})


def start_server(base=None, models_dir=None, port=None, seed=0, threads=None, extra_args=()) -> ComfyServer:
    """Write smoke models (unless ``models_dir`` already has models), prepare folders, start ComfyUI."""
    from keyface import model_files, smoke

    if not (comfyui_dir() / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {comfyui_dir()} (run: bash scripts/setup_env.sh)")
    base = Path(base or tempfile.mkdtemp(prefix="keyface-e2e-"))
    models_dir = Path(models_dir or base / "models" / "keyface")
    if not model_files.is_complete(models_dir):
        smoke.write_smoke_models(models_dir, seed=seed)
    if threads is None:
        threads = int(os.environ.get("KEYFACE_E2E_THREADS", "1"))
    server = ComfyServer(base, port or free_port(), models_dir, threads=threads, extra_args=extra_args)
    server.prepare()
    return server.start()
