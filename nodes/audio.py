"""KeyFace Encode Audio: the per-video-frame audio features, the clip length and the fitted clip.

``KEYFACE_AUDIO_FEATURES``: ``keyface.audio.AudioFeatures`` (``.keyframe`` / ``.interpolation``
``[N, 2, 1536]``, ``.num_frames`` N = clip length in video frames, round(seconds x fps)).

Progress and cancel: the library reports after every unit of encoder work (a conv layer, an
attention block, a layer; see ``keyface.audio.compute_features``); the node moves one ComfyUI
progress bar and checks the interrupt flag at each report, so a cancel lands within one unit.
"""

from __future__ import annotations

from . import _common as C


def clip_audio(waveform, sample_rate, num_frames):
    """The audio of exactly ``num_frames`` video frames, as a single-item AUDIO batch at its own
    rate: the clip cut, or padded with silence, to round(N x sample_rate / fps) samples (the rule
    every KeyFace output follows, ``keyface.video_io.fit_audio_to_frames``)."""
    import torch
    from ..keyface.video_io import fit_audio_to_frames

    fitted = torch.from_numpy(fit_audio_to_frames(waveform, sample_rate, num_frames))
    # a copy: a cut mono clip would otherwise share memory with the input AUDIO of another node
    return {"waveform": fitted[None].clone(), "sample_rate": int(sample_rate)}


class EncoderProgress:
    """``compute_features``' progress callback: checks ComfyUI's interrupt flag at every report and
    moves one progress bar (only when its value changes: reports come many times per second)."""

    def __init__(self):
        self.bar = None
        self.shown = None

    def __call__(self, done, total):
        import comfy.utils

        C.check_interrupt()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(int(total))
        if (done, total) != self.shown:
            self.shown = (done, total)
            self.bar.update_absolute(int(done), int(total))


class KeyFaceEncodeAudio:
    DESCRIPTION = ("Computes KeyFace's per-video-frame audio features (WavLM+BEATs for keyframes, wav2vec2+BEATs "
                   f"for interpolation) and the clip length in frames, round(seconds x {C.FPS:g}). Also returns the clip "
                   "(first item of a batch) cut or padded to exactly that many frames, and the fps, for Create Video.")
    CATEGORY = C.CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("KEYFACE_AUDIO_FEATURES", "INT", "AUDIO", "FLOAT")
    RETURN_NAMES = ("audio_features", "frame_count", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "Audio features for Sample Keyframes and Interpolate.",
        f"Number of video frames the clip will have: round(seconds x {C.FPS:g}), within half a frame of the audio.",
        f"The clip cut, or padded with silence, to exactly frame_count / {C.FPS:g} s (feed it to Create Video with fps).",
        f"Frames per second of the KeyFace video ({C.FPS:g}).",
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
        with torch.inference_mode():
            # the encoders move the clip to their own device and dtype
            feats = compute_features(waveform, sr, enc.wavlm, enc.beats, enc.wav2vec2, progress=EncoderProgress())
        n = int(feats.num_frames)  # the features are float32 on the CPU (intermediate device)
        return (feats, n, clip_audio(waveform, sr, n), C.FPS)


NODE_CLASS_MAPPINGS = {"KeyFaceEncodeAudio": KeyFaceEncodeAudio}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceEncodeAudio": "KeyFace Encode Audio"}
