"""KeyFace Long Render (resumable): keyframes, interpolation and the mp4 in one node, through a job
folder (``keyface.jobs``), so a cancelled or crashed render of the same prompt resumes.

The job folder is ``output/keyface_jobs/<job id>``, where the id is a digest of everything the blocks
depend on (identity, audio features, emotion, the three networks' weights, the sampling settings,
dtype and device type): queueing the same prompt again, after a cancel or a ComfyUI restart, finds
it and computes only the missing blocks; the mp4 is the same, byte for byte, as an uninterrupted
render. (ComfyUI empties its temp folder at start-up, hence the output folder.) The folder is removed
after a successful render unless ``keep_job`` is on. Never imports ray.
"""

from __future__ import annotations

import logging
import os
import shutil

from ..keyface.memory import LATENT_DOWNSCALE
from . import _common as C
from .sampling import MAX_SEED, encode_identity

log = logging.getLogger("keyface")

JOBS_FOLDER = "keyface_jobs"


def _job_folder(description: dict) -> str:
    import folder_paths
    from ..keyface import jobs

    job_id = jobs.RenderJob(".", description).job_id
    return os.path.join(folder_paths.get_output_directory(), JOBS_FOLDER, job_id)


class KeyFaceLongRender(C.Mp4OutputNode):
    DESCRIPTION = ("Keyframes + interpolation + streaming mp4 in one node, for long clips: every finished block is "
                   "kept in output/keyface_jobs/, so queueing the same prompt again after a cancel or a crash resumes "
                   "where it stopped (same file as an uninterrupted render). One seed for both stages.")
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        from ..keyface.settings import DEFAULT_CRF  # torch-free

        D = C.render_defaults()
        return {"required": {
            "keyframe_model": ("KEYFACE_KEYFRAME_MODEL", {"tooltip": "From KeyFace Load Keyframe Model."}),
            "interpolation_model": ("KEYFACE_INTERPOLATION_MODEL", {"tooltip": "From KeyFace Load Interpolation Model."}),
            "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE (identity encode and video decode)."}),
            "image": ("IMAGE", {"tooltip": "The portrait (first image of a batch)."}),
            "audio_features": ("KEYFACE_AUDIO_FEATURES", {"tooltip": "From KeyFace Encode Audio."}),
            "audio": ("AUDIO", {"tooltip": f"The speech, muxed into the mp4 (cut or padded to N / {C.FPS:g} s)."}),
            "seed": ("INT", {"default": D.seed, "min": 0, "max": MAX_SEED, "control_after_generate": False,
                             "tooltip": "Noise seed of both stages. Keep it fixed to resume: another seed is another job."}),
            "steps": ("INT", {"default": D.keyframe_steps, "min": 10, "max": 100, "tooltip": "Sampling steps of both stages (10 as released)."}),
            # the guidance scales carry the samplers' names (nodes/sampling.py)
            "reference_scale": ("FLOAT", {"default": D.ref_ratio, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Keyframe identity (reference portrait) guidance scale."}),
            "audio_scale": ("FLOAT", {"default": D.audio_ratio, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Keyframe audio guidance scale."}),
            "autoguidance_scale": ("FLOAT", {"default": D.scale, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Interpolation autoguidance scale."}),
            "autoguidance": ("BOOLEAN", {"default": D.autoguidance, "tooltip": "Off: the interpolation network alone."}),
            "segments_per_call": ("INT", {"default": D.segments_per_call, "min": 1, "max": 64,
                                          "tooltip": "Segments per network call (speed/memory). Part of the job: change it and the job starts over."}),
            "fit": (["crop", "pad"], {"default": "crop", "tooltip": "Square the portrait by centre crop or padding."}),
            "filename_prefix": ("STRING", {"default": "keyface/KeyFace", "tooltip": "Output file prefix, relative to the output folder."}),
            "crf": ("INT", {"default": DEFAULT_CRF, "min": 0, "max": 51, "tooltip": "H.264 quality (lower = better, bigger)."}),
            "keep_job": ("BOOLEAN", {"default": False, "tooltip": "Keep output/keyface_jobs/<id> after a successful render (re-encode later without sampling)."}),
        }, "optional": {
            "emotion": ("KEYFACE_EMOTION", {"tooltip": "From KeyFace Emotion; not connected = neutral."}),
        }}

    def render(self, keyframe_model, interpolation_model, vae, image, audio_features, audio, seed, steps, reference_scale,
               audio_scale, autoguidance_scale, autoguidance, segments_per_call, fit, filename_prefix, crf, keep_job=False,
               emotion=None):
        import folder_paths
        import torch
        from ..keyface import emotion as kemotion, jobs, memory, pipeline

        C.check_widgets(type(self), seed=seed, steps=steps, reference_scale=reference_scale, audio_scale=audio_scale,
                        autoguidance_scale=autoguidance_scale, autoguidance=autoguidance,
                        segments_per_call=segments_per_call, fit=fit, filename_prefix=filename_prefix, crf=crf,
                        keep_job=keep_job)

        model = interpolation_model
        if tuple(model.latent_hw) != (keyframe_model.resolution // LATENT_DOWNSCALE,) * 2:
            raise ValueError(f"interpolation_model makes {model.latent_hw[0] * LATENT_DOWNSCALE} px video but keyframe_model "
                             f"{keyframe_model.resolution} px: use models of the same resolution")
        if autoguidance and model.bad is None:
            raise ValueError("interpolation_model: autoguidance is on but no autoguidance (bad) model was loaded")
        n = int(audio_features.num_frames)
        identity = encode_identity(vae, image, keyframe_model.resolution, fit)
        valence, arousal = kemotion.per_frame_emotion(emotion, n, fps=C.FPS)
        settings = pipeline.RenderSettings(seed=int(seed), keyframe_steps=int(steps), interpolation_steps=int(steps),
                                           ref_ratio=float(reference_scale), audio_ratio=float(audio_scale),
                                           scale=float(autoguidance_scale), autoguidance=bool(autoguidance),
                                           segments_per_call=int(segments_per_call))
        networks = (keyframe_model.network, model.good, model.bad if autoguidance else None)
        lat_hw = tuple(identity.shape[-2:])
        working = max(memory.keyframe_call_bytes(lat_hw, keyframe_model.compute_dtype),
                      memory.interpolation_call_bytes(segments_per_call, lat_hw, model.compute_dtype))
        C.load([keyframe_model.patcher] + list(model.patchers if autoguidance else model.patchers[:1]), working)
        runner = jobs.LocalRunner(networks, device=keyframe_model.device, dtype=keyframe_model.compute_dtype)
        clip = jobs.clip_inputs(identity, audio_features, valence, arousal)
        description = jobs.job_description(clip, settings, runner.model_digests(), runner.compute_description())
        folder = _job_folder(description)
        waveform, sr = C.first_clip(audio)
        size = keyframe_model.resolution
        out_dir = folder_paths.get_output_directory()
        out_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, size, size)
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(out_folder, file)
        C.load([vae.patcher])
        with torch.inference_mode():
            report = jobs.render_job(folder, vae.vae, identity, audio_features, path, runner=runner,
                                     valence=valence, arousal=arousal, settings=settings, device=vae.device,
                                     audio=waveform, sample_rate=sr, crf=int(crf), callback=C.Progress())
        log.info("KeyFace: wrote %s (%d frames); job %s: %s", path, n, folder, report.summary())
        if report.reused.get("keyframes") or report.reused.get("interpolation"):
            C.notify(f"Resumed a stopped render: {report.summary()}", severity="info")
        if not keep_job:
            shutil.rmtree(folder, ignore_errors=True)
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": (True,),
                       "keyface_job": [report.summary()]},
                "result": (path, n)}


NODE_CLASS_MAPPINGS = {"KeyFaceLongRender": KeyFaceLongRender}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceLongRender": "KeyFace Long Render (resumable)"}
