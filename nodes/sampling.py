"""The two sampling nodes: keyframes (stage 1) and interpolation (stage 2). Encode Audio: nodes/audio.py;
Decode: nodes/decode.py.

Data passed between nodes:

* ``KEYFACE_AUDIO_FEATURES``: ``keyface.audio.AudioFeatures`` (``.keyframe`` / ``.interpolation``
  ``[N, 2, 1536]``, ``.num_frames`` N = clip length in video frames at 25 fps).
* ``KEYFACE_KEYFRAMES``: :class:`KeyFaceKeyframes` (keyframe latents ``[K, 4, h, w]`` on the CPU,
  the clip plan, the identity latent and the seed). KeyFace Sample Keyframes decodes them for its
  ``preview`` output only when its ``preview`` input is on.
* ``LATENT`` out of *KeyFace Interpolate*: ``{"samples": [S*14, 4, h, w]}`` - every interpolation
  segment's 14 frames in order, as *raw* SVD VAE latents like every ComfyUI LATENT (the samplers
  work on scaled latents; ``keyface.latents.to_raw`` / ``to_scaled`` convert), so native VAE Decode / VAE Encode agree on what the samples mean - plus
  ``keyface_num_frames`` (N) and ``keyface_segment_frames`` (14). Consecutive segments share their
  boundary keyframe, so a native VAE Decode shows those frames twice; *KeyFace Decode* merges
  them (pixel mean) and trims to exactly N frames.
"""

from __future__ import annotations

from . import _common as C

MAX_SEED = 0xFFFFFFFFFFFFFFFF
PREVIEW_OFF_SIZE = 64  # the placeholder preview when it is off (nothing decoded)


class KeyFaceKeyframes:
    """KEYFACE_KEYFRAMES: what Sample Keyframes hands to Interpolate."""

    def __init__(self, latents, plan, identity_latent, seed, resolution):
        self.latents, self.plan, self.identity_latent = latents, plan, identity_latent
        self.seed, self.resolution = seed, resolution

    @property
    def num_frames(self):
        return self.plan.num_frames

    def __repr__(self):
        return f"KeyFaceKeyframes({tuple(self.latents.shape)}, N={self.num_frames})"


def _pipeline():
    from ..keyface import pipeline

    return pipeline


# --------------------------------------------------------------------------------- sample keyframes
class KeyFaceSampleKeyframes:
    DESCRIPTION = ("Stage 1: samples one keyframe every 13 video frames (0.52 s) from the identity image, the "
                   "audio features and the emotion, with KeyFace's 3-branch guidance (Euler EDM, AYS sigmas).")
    CATEGORY = C.CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("KEYFACE_KEYFRAMES", "IMAGE")
    RETURN_NAMES = ("keyframes", "preview")
    OUTPUT_TOOLTIPS = (
        "Keyframe latents + clip plan, for KeyFace Interpolate.",
        "The keyframes decoded (frames 0, 13, 26, ...) when 'preview' is on; otherwise one black "
        f"{PREVIEW_OFF_SIZE}x{PREVIEW_OFF_SIZE} image (nothing is decoded).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        D = C.render_defaults()
        return {
            "required": {
                "keyframe_model": ("KEYFACE_KEYFRAME_MODEL", {"tooltip": "From KeyFace Load Keyframe Model."}),
                "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE (its encoder makes the identity latent)."}),
                "image": ("IMAGE", {"tooltip": "The portrait. Only the first image of a batch is used (a warning is logged otherwise)."}),
                "audio_features": ("KEYFACE_AUDIO_FEATURES", {"tooltip": "From KeyFace Encode Audio."}),
                "seed": ("INT", {"default": D.seed, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed (the reference uses 23). Noise is drawn on the CPU, so a seed gives the same result on any device."}),
                "steps": ("INT", {"default": D.keyframe_steps, "min": 10, "max": 100,
                                  "tooltip": "Sampling steps: 10 as released (= its 11 AYS sigmas, 11 network evaluations); more interpolate the schedule."}),
                # Guidance scales are named <what it guides towards>_scale on both samplers (see
                # js/input_renames.js for the old names, migrated when a saved workflow loads).
                "reference_scale": ("FLOAT", {"default": D.ref_ratio, "min": 0.0, "max": 20.0, "step": 0.1,
                                              "tooltip": "Identity (reference portrait) guidance scale, 2.0 as released. Was 'ref_guidance'."}),
                "audio_scale": ("FLOAT", {"default": D.audio_ratio, "min": 0.0, "max": 20.0, "step": 0.1,
                                          "tooltip": "Audio guidance scale, 5.0 as released. Was 'audio_guidance'."}),
                "fit": (["crop", "pad"], {"default": "crop",
                                          "tooltip": "How a non-square portrait becomes square: centre-crop, or pad the short side (border pixels repeated). Never squashed."}),
                "preview": ("BOOLEAN", {"default": False,
                                        "tooltip": "Decode the keyframes for the preview output, to review them before the (expensive) interpolation. Costs one VAE decode per keyframe (13 frames apart); off, nothing is decoded."}),
            },
            "optional": {
                "emotion": ("KEYFACE_EMOTION", {"tooltip": "From KeyFace Emotion; not connected = neutral (valence 0, arousal 0)."}),
                "attention": C.attention_input(),
            },
        }

    def sample(self, keyframe_model, vae, image, audio_features, seed, steps, reference_scale, audio_scale, fit,
               preview=False, emotion=None, attention="auto"):
        import torch
        from ..keyface import emotion as kemotion, memory, planner

        C.check_widgets(type(self), seed=seed, steps=steps, reference_scale=reference_scale, audio_scale=audio_scale,
                        fit=fit, preview=preview, attention=attention)
        n = int(audio_features.num_frames)
        plan = planner.plan_clip(n)
        identity = encode_identity(vae, image, keyframe_model.resolution, fit)
        valence, arousal = kemotion.per_frame_emotion(emotion, n, fps=C.FPS)
        progress = C.Progress()
        # one call = 3 guidance branches x 14 frames at the latent size
        lat_hw = tuple(identity.shape[-2:])
        C.load([keyframe_model.patcher], memory.keyframe_call_bytes(lat_hw, keyframe_model.compute_dtype))
        with torch.inference_mode(), _pipeline().attention_backend(attention):
            latents = _pipeline().sample_keyframes(
                keyframe_model.network, identity.to(keyframe_model.device), audio_features.keyframe, valence, arousal,
                plan, seed=int(seed), steps=int(steps), ref_ratio=float(reference_scale), audio_ratio=float(audio_scale),
                device=keyframe_model.device, dtype=keyframe_model.compute_dtype, callback=progress)
        keyframes = KeyFaceKeyframes(latents.float().cpu(), plan, identity.float().cpu(), int(seed),
                                     keyframe_model.resolution)
        return keyframes, (decode_keyframes(keyframes, vae) if preview else
                           torch.zeros(1, PREVIEW_OFF_SIZE, PREVIEW_OFF_SIZE, 3))


def encode_identity(vae, image, resolution, fit, input_name="image"):
    """Identity latent [1,4,res/8,res/8] (CPU) of the first portrait of ``image``, squared by ``fit``
    (centre crop or border padding, never squashed) and resized to ``resolution``."""
    import torch

    pipeline = _pipeline()
    try:
        pixels = pipeline.prepare_identity(C.first_image(image, input_name)[0], int(resolution), fit)
    except ValueError as e:
        raise ValueError(f"{input_name}: {e}") from e
    C.load([vae.patcher])
    C.check_interrupt()
    with torch.inference_mode():
        return pipeline.encode_identity(vae.vae, pixels, device=vae.device).float().cpu()


def decode_keyframes(keyframes, vae, chunk_frames=None):
    """IMAGE [K, H, W, 3] of the keyframes (one VAE decode each, ``chunk_frames`` per call), on the
    intermediate device; a progress step and an interrupt check per chunk."""
    import torch

    chunk_frames = chunk_frames or C.render_defaults().chunk_frames
    lat_hw = tuple(keyframes.latents.shape[-2:])
    C.load([vae.patcher], C.decode_memory(vae, min(chunk_frames, keyframes.latents.shape[0]), lat_hw))
    C.check_interrupt()
    with torch.inference_mode():
        images = _pipeline().decode_keyframe_preview(vae.vae, keyframes.latents, chunk_frames=chunk_frames,
                                                     device=vae.device, callback=C.Progress(),
                                                     free_memory=C.free_memory(vae.device))
    return images.to(C.mm().intermediate_device())


# ------------------------------------------------------------------------------------- interpolate
class KeyFaceInterpolate:
    DESCRIPTION = ("Stage 2: fills the 12 frames between each pair of keyframes (14-frame segments) with the "
                   "interpolation model, guided by the autoguidance model. Output: a LATENT of all segments' "
                   "frames for KeyFace Decode.")
    CATEGORY = C.CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("{'samples': [segments*14, 4, h, w]} + KeyFace metadata; decode with KeyFace Decode "
                       "(merges the shared boundary frames and trims to the clip length).",)

    @classmethod
    def INPUT_TYPES(cls):
        D = C.render_defaults()
        return {"required": {
            "interpolation_model": ("KEYFACE_INTERPOLATION_MODEL", {"tooltip": "From KeyFace Load Interpolation Model."}),
            "keyframes": ("KEYFACE_KEYFRAMES", {"tooltip": "From KeyFace Sample Keyframes."}),
            "audio_features": ("KEYFACE_AUDIO_FEATURES", {"tooltip": "The same features the keyframes were sampled with."}),
            "seed": ("INT", {"default": D.seed, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed for the interpolation stage."}),
            "steps": ("INT", {"default": D.interpolation_steps, "min": 10, "max": 100, "tooltip": "Sampling steps (10 as released)."}),
            "autoguidance_scale": ("FLOAT", {"default": D.scale, "min": 0.0, "max": 20.0, "step": 0.1,
                                             "tooltip": "Autoguidance scale: D = D_bad + scale x (D_good - D_bad); 2.0 as released. Was 'guidance'."}),
            "autoguidance": ("BOOLEAN", {"default": D.autoguidance,
                                         "tooltip": "Off: the interpolation network alone (half the cost, lower quality)."}),
            "segments_per_call": ("INT", {"default": D.segments_per_call, "min": 1, "max": 64,
                                          "tooltip": "Segments (14 frames each) per network call: more is faster on a big GPU and needs more memory (a call that runs out of memory is retried in halves). Does not change the result."}),
        }, "optional": {
            "attention": C.attention_input(),
        }}

    def interpolate(self, interpolation_model, keyframes, audio_features, seed, steps, autoguidance_scale, autoguidance,
                    segments_per_call, attention="auto"):
        import torch
        from ..keyface import latents, memory

        C.check_widgets(type(self), seed=seed, steps=steps, autoguidance_scale=autoguidance_scale, autoguidance=autoguidance,
                        segments_per_call=segments_per_call, attention=attention)
        n_feat, n_kf = int(audio_features.num_frames), int(keyframes.num_frames)
        if n_feat != n_kf:
            raise ValueError(
                f"audio_features: these features describe a clip of {n_feat} frames, but the keyframes were sampled "
                f"for {n_kf} frames; connect the same KeyFace Encode Audio output to both samplers")
        lat_hw = tuple(keyframes.latents.shape[-2:])
        model = interpolation_model
        model.good.check_latent_size(lat_hw, "keyframes: the keyframe latent",
                                     "; use a keyframe model of the same resolution")
        if autoguidance and model.bad is None:
            raise ValueError("interpolation_model: autoguidance is on but no autoguidance (bad) model was loaded")
        progress = C.Progress()
        # one call = segments_per_call x 14 frames; the good and bad networks run one after the
        # other (their weights are counted by load_models_gpu itself)
        C.load(model.patchers if autoguidance else model.patchers[:1],
               memory.interpolation_call_bytes(segments_per_call, lat_hw, model.compute_dtype))
        with torch.inference_mode(), _pipeline().attention_backend(attention):
            seg = _pipeline().interpolate_segments(
                model.good, model.bad if autoguidance else None, keyframes.latents.to(model.device),
                audio_features.interpolation, keyframes.plan, seed=int(seed), steps=int(steps), scale=float(autoguidance_scale),
                segments_per_call=int(segments_per_call), autoguidance=bool(autoguidance), device=model.device,
                dtype=model.compute_dtype, callback=progress)
        seg = latents.to_raw(seg.float().cpu())  # raw VAE latents, as every ComfyUI LATENT
        s, t = seg.shape[:2]
        return ({"samples": seg.reshape(s * t, *seg.shape[2:]), "keyface_num_frames": n_kf,
                 "keyface_segment_frames": int(t)},)


NODE_CLASS_MAPPINGS = {
    "KeyFaceSampleKeyframes": KeyFaceSampleKeyframes,
    "KeyFaceInterpolate": KeyFaceInterpolate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KeyFaceSampleKeyframes": "KeyFace Sample Keyframes",
    "KeyFaceInterpolate": "KeyFace Interpolate",
}
