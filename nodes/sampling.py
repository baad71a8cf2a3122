"""Audio encoding, keyframe sampling, interpolation and decoding nodes.

Data passed between nodes:

* ``KEYFACE_AUDIO_FEATURES``: ``keyface.audio.AudioFeatures`` (``.keyframe`` / ``.interpolation``
  ``[N, 2, 1536]``, ``.num_frames`` N = clip length in video frames at 25 fps).
* ``KEYFACE_KEYFRAMES``: :class:`KeyFaceKeyframes` (keyframe latents ``[K, 4, h, w]`` on the CPU,
  the clip plan, the identity latent and the seed). KeyFace Sample Keyframes decodes them for its
  ``preview`` output only when its ``preview`` input is on.
* ``LATENT`` out of *KeyFace Interpolate*: ``{"samples": [S*14, 4, h, w]}`` - every interpolation
  segment's 14 frames in order, as *raw* SVD VAE latents like every ComfyUI LATENT (the samplers
  work on latents x 0.18215; the node divides by it, and KeyFace Decode / Save Video multiply it
  back), so native VAE Decode / VAE Encode agree on what the samples mean - plus
  ``keyface_num_frames`` (N) and ``keyface_segment_frames`` (14). Consecutive segments share their
  boundary keyframe, so a native VAE Decode shows those frames twice; *KeyFace Decode* merges
  them (pixel mean) and trims to exactly N frames.
"""

from __future__ import annotations

import contextlib

from . import _common as C

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SEGMENT_FRAMES = 14
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


def latent_scale():
    """The SVD VAE's latent scale factor (0.18215): sampler latents = raw VAE latents x this."""
    from ..keyface.vae import SCALE_FACTOR

    return SCALE_FACTOR


def clip_audio(waveform, sample_rate, num_frames):
    """The audio of exactly ``num_frames`` video frames, as a single-item AUDIO batch at its own
    rate: the clip cut, or padded with silence, to round(N x sample_rate / 25) samples (the rule
    every KeyFace output follows, ``keyface.video_io.fit_audio_to_frames``)."""
    import torch
    from ..keyface.video_io import fit_audio_to_frames

    fitted = torch.from_numpy(fit_audio_to_frames(waveform, sample_rate, num_frames))
    # a copy: a cut mono clip would otherwise share memory with the input AUDIO of another node
    return {"waveform": fitted[None].clone(), "sample_rate": int(sample_rate)}


@contextlib.contextmanager
def encoder_progress(encoders):
    """One ComfyUI progress step and an interrupt check per audio encoder (forward hooks: the
    library's ``compute_features`` runs all three encoders in one call)."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(len(encoders))
    done = []

    def finished(*_):
        done.append(1)
        bar.update_absolute(len(done), len(encoders))
        C.check_interrupt()

    handles = [m.register_forward_pre_hook(lambda *_: C.check_interrupt()) for m in encoders]
    handles += [m.register_forward_hook(finished) for m in encoders]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ encode audio
class KeyFaceEncodeAudio:
    DESCRIPTION = ("Computes KeyFace's per-video-frame audio features (WavLM+BEATs for keyframes, wav2vec2+BEATs "
                   "for interpolation) and the clip length in frames, round(seconds x 25). Also returns the clip "
                   "(first item of a batch) cut or padded to exactly that many frames, and the fps, for Create Video.")
    CATEGORY = C.CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("KEYFACE_AUDIO_FEATURES", "INT", "AUDIO", "FLOAT")
    RETURN_NAMES = ("audio_features", "frame_count", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "Audio features for Sample Keyframes and Interpolate.",
        "Number of video frames the clip will have: round(seconds x 25), within half a frame of the audio.",
        "The clip cut, or padded with silence, to exactly frame_count / 25 s (feed it to Create Video with fps).",
        "Frames per second of the KeyFace video (25).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio_encoders": ("KEYFACE_AUDIO_ENCODERS", {"tooltip": "From KeyFace Load Audio Encoders."}),
            "audio": ("AUDIO", {"tooltip": "Speech (any sample rate, mono or stereo; the first clip of a batch is used)."}),
        }}

    def encode(self, audio_encoders, audio):
        import torch
        from ..keyface.audio import compute_features

        waveform, sr = C.first_clip(audio)
        enc = audio_encoders
        # fully: WavLM and wav2vec2 have torch layers, which a partial (lowvram) load would leave
        # on the CPU. One call, so loading one cannot partially unload another.
        C.load(enc.patchers, force_full_load=True)
        C.check_interrupt()
        with torch.inference_mode(), encoder_progress([enc.wavlm, enc.beats, enc.wav2vec2]):
            # the encoders move the clip to their own device and dtype
            feats = compute_features(waveform, sr, enc.wavlm, enc.beats, enc.wav2vec2)
        n = int(feats.num_frames)  # the features are float32 on the CPU (intermediate device)
        return (feats, n, clip_audio(waveform, sr, n), C.FPS)


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
        return {
            "required": {
                "keyframe_model": ("KEYFACE_KEYFRAME_MODEL", {"tooltip": "From KeyFace Load Keyframe Model."}),
                "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE (its encoder makes the identity latent)."}),
                "image": ("IMAGE", {"tooltip": "The portrait. Only the first image of a batch is used (a warning is logged otherwise)."}),
                "audio_features": ("KEYFACE_AUDIO_FEATURES", {"tooltip": "From KeyFace Encode Audio."}),
                "seed": ("INT", {"default": 23, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed (the reference uses 23). Noise is drawn on the CPU, so a seed gives the same result on any device."}),
                "steps": ("INT", {"default": 10, "min": 10, "max": 100,
                                  "tooltip": "Sampling steps: 10 as released (= its 11 AYS sigmas, 11 network evaluations); more interpolate the schedule."}),
                # Guidance scales are named <what it guides towards>_scale on both samplers (see
                # js/input_renames.js for the old names, migrated when a saved workflow loads).
                "reference_scale": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                              "tooltip": "Identity (reference portrait) guidance scale, 2.0 as released. Was 'ref_guidance'."}),
                "audio_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 20.0, "step": 0.1,
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
        from ..keyface import emotion as kemotion, planner

        n = int(audio_features.num_frames)
        plan = planner.plan_clip(n)
        identity = encode_identity(vae, image, keyframe_model.resolution, fit)
        valence, arousal = kemotion.per_frame_emotion(emotion, n, fps=C.FPS)
        progress = C.Progress()
        # one call = 3 guidance branches x 14 frames at the latent size
        lat_hw = tuple(identity.shape[-2:])
        C.load([keyframe_model.patcher], C.unet_memory(3 * planner.WINDOW, lat_hw, keyframe_model.dtype))
        with torch.inference_mode(), _pipeline().attention_backend(attention):
            latents = _pipeline().sample_keyframes(
                keyframe_model.network, identity.to(keyframe_model.device), audio_features.keyframe, valence, arousal,
                plan, seed=int(seed), steps=int(steps), ref_ratio=float(reference_scale), audio_ratio=float(audio_scale),
                device=keyframe_model.device, dtype=keyframe_model.dtype, callback=progress)
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


def decode_keyframes(keyframes, vae, chunk_frames=16):
    """IMAGE [K, H, W, 3] of the keyframes (one VAE decode each, ``chunk_frames`` per call), on the
    intermediate device; a progress step and an interrupt check per chunk."""
    import torch

    lat_hw = tuple(keyframes.latents.shape[-2:])
    C.load([vae.patcher], C.decode_memory(min(chunk_frames, keyframes.latents.shape[0]), lat_hw, vae.dtype))
    C.check_interrupt()
    with torch.inference_mode():
        images = _pipeline().decode_keyframe_preview(vae.vae, keyframes.latents, chunk_frames=chunk_frames,
                                                     device=vae.device, callback=C.Progress())
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
        return {"required": {
            "interpolation_model": ("KEYFACE_INTERPOLATION_MODEL", {"tooltip": "From KeyFace Load Interpolation Model."}),
            "keyframes": ("KEYFACE_KEYFRAMES", {"tooltip": "From KeyFace Sample Keyframes."}),
            "audio_features": ("KEYFACE_AUDIO_FEATURES", {"tooltip": "The same features the keyframes were sampled with."}),
            "seed": ("INT", {"default": 23, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                             "tooltip": "Noise seed for the interpolation stage."}),
            "steps": ("INT", {"default": 10, "min": 10, "max": 100, "tooltip": "Sampling steps (10 as released)."}),
            "autoguidance_scale": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                             "tooltip": "Autoguidance scale: D = D_bad + scale x (D_good - D_bad); 2.0 as released. Was 'guidance'."}),
            "autoguidance": ("BOOLEAN", {"default": True,
                                         "tooltip": "Off: the interpolation network alone (half the cost, lower quality)."}),
            "segments_per_call": ("INT", {"default": 2, "min": 1, "max": 64,
                                          "tooltip": "Segments (14 frames each) per network call: more is faster on a big GPU and needs more memory (a call that runs out of memory is retried in halves). Does not change the result."}),
        }, "optional": {
            "attention": C.attention_input(),
        }}

    def interpolate(self, interpolation_model, keyframes, audio_features, seed, steps, autoguidance_scale, autoguidance,
                    segments_per_call, attention="auto"):
        import torch

        n_feat, n_kf = int(audio_features.num_frames), int(keyframes.num_frames)
        if n_feat != n_kf:
            raise ValueError(
                f"audio_features: these features describe a clip of {n_feat} frames, but the keyframes were sampled "
                f"for {n_kf} frames; connect the same KeyFace Encode Audio output to both samplers")
        lat_hw = tuple(keyframes.latents.shape[-2:])
        model = interpolation_model
        if lat_hw != model.latent_hw:
            raise ValueError(
                f"keyframes: latents are {lat_hw[0] * 8}x{lat_hw[1] * 8} px but this interpolation model makes "
                f"{model.latent_hw[0] * 8}x{model.latent_hw[1] * 8} px (its learned mask is {model.latent_hw}); "
                "use a keyframe model of the same resolution")
        if autoguidance and model.bad is None:
            raise ValueError("interpolation_model: autoguidance is on but no autoguidance (bad) model was loaded")
        progress = C.Progress()
        # one call = segments_per_call x 14 frames; the good and bad networks run one after the
        # other (their weights are counted by load_models_gpu itself)
        memory = C.unet_memory(int(segments_per_call) * SEGMENT_FRAMES, lat_hw, model.dtype)
        C.load(model.patchers if autoguidance else model.patchers[:1], memory)
        with torch.inference_mode(), _pipeline().attention_backend(attention):
            seg = _pipeline().interpolate_segments(
                model.good, model.bad if autoguidance else None, keyframes.latents.to(model.device),
                audio_features.interpolation, keyframes.plan, seed=int(seed), steps=int(steps), scale=float(autoguidance_scale),
                segments_per_call=int(segments_per_call), autoguidance=bool(autoguidance), device=model.device,
                dtype=model.dtype, callback=progress)
        seg = seg.float().cpu() / latent_scale()  # raw VAE latents, as every ComfyUI LATENT
        s, t = seg.shape[:2]
        return ({"samples": seg.reshape(s * t, *seg.shape[2:]), "keyface_num_frames": n_kf,
                 "keyface_segment_frames": int(t)},)


def segments_from_latent(latent, input_name="latent"):
    """([S, 14, 4, h, w] sampler-scaled latents, N) from a KeyFace Interpolate LATENT (raw VAE
    latents); ValueError naming the input otherwise."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{input_name}: expected a LATENT dict")
    if "keyface_num_frames" not in latent:
        raise ValueError(f"{input_name}: this LATENT does not come from KeyFace Interpolate (no keyface_num_frames); "
                         "KeyFace Decode needs the segment layout that node records")
    x = latent["samples"]
    t = int(latent.get("keyface_segment_frames", SEGMENT_FRAMES))
    if x.ndim != 4 or x.shape[0] % t:
        raise ValueError(f"{input_name}: samples {tuple(x.shape)} are not whole {t}-frame segments")
    return x.reshape(x.shape[0] // t, t, *x.shape[1:]) * latent_scale(), int(latent["keyface_num_frames"])


def decode_chunks(vae, segments, num_frames, chunk_frames, progress):
    """Iterator of decoded frame chunks [n, H, W, 3] (0..1, on the intermediate device) of
    ``segments_from_latent``'s ([S, 14, 4, h, w], N)."""
    import torch
    from ..keyface.planner import STEP

    # a call decodes chunk_frames frames plus a second copy of each shared keyframe among them
    rows = int(chunk_frames) + int(chunk_frames) // STEP + 1
    C.load([vae.patcher], C.decode_memory(rows, tuple(segments.shape[-2:]), vae.dtype))
    out_device = C.mm().intermediate_device()
    with torch.inference_mode():
        for chunk in _pipeline().decode_segments(vae.vae, segments, num_frames, chunk_frames=int(chunk_frames),
                                                 device=vae.device, dtype=vae.dtype, callback=progress):
            C.check_interrupt()
            yield chunk.to(out_device, torch.float32)


class KeyFaceDecode:
    DESCRIPTION = ("Decodes KeyFace Interpolate's latents with the SVD temporal decoder in fixed chunks (moved to "
                   "the CPU one by one), merges the frames segments share, and returns exactly frame_count frames.")
    CATEGORY = C.CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The video frames (25 fps), as many as KeyFace Encode Audio's frame_count.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE."}),
            "latent": ("LATENT", {"tooltip": "From KeyFace Interpolate."}),
            "chunk_frames": ("INT", {"default": 16, "min": 1, "max": 256,
                                     "tooltip": "Frames per decoder call (each frame is decoded on its own, decoding_t = 1 as released, so this changes memory use and speed, not the result). Lower it if the decode runs out of memory."}),
        }}

    def decode(self, vae, latent, chunk_frames):
        import torch

        seg, n = segments_from_latent(latent)
        frames = list(decode_chunks(vae, seg, n, chunk_frames, C.Progress()))
        return (torch.cat(frames, 0),)


NODE_CLASS_MAPPINGS = {
    "KeyFaceEncodeAudio": KeyFaceEncodeAudio,
    "KeyFaceSampleKeyframes": KeyFaceSampleKeyframes,
    "KeyFaceInterpolate": KeyFaceInterpolate,
    "KeyFaceDecode": KeyFaceDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KeyFaceEncodeAudio": "KeyFace Encode Audio",
    "KeyFaceSampleKeyframes": "KeyFace Sample Keyframes",
    "KeyFaceInterpolate": "KeyFace Interpolate",
    "KeyFaceDecode": "KeyFace Decode",
}
