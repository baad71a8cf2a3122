"""KeyFace Emotion node: a named emotion, named emotions over time, or a drawn valence/arousal curve.

The ``curve`` input is a plain STRING holding the versioned curve JSON (see keyface/emotion.py); the
frontend extension (js/emotion_editor.js) draws an editor over it and writes the JSON back, so the
workflow JSON and the API prompt carry one plain string and API users can type the JSON themselves.

Output ``KEYFACE_EMOTION``: a ``keyface.emotion.EmotionCurve`` (intensity included). The sampler turns
it into per-frame values with ``keyface.emotion.per_frame_emotion(curve, num_frames, fps)``.
"""

from dataclasses import replace

from . import _common as C

CUSTOM_CURVE = "custom curve"
DEFAULT_CURVE = '{"version":1,"valence":[[0,0]],"arousal":[[0,0]],"interpolation":"monotone"}'
PREVIEW_FPS = 25
_MAX_PREVIEW_SAMPLES = 1500


def _emotion_names():
    from ..keyface.emotion import NAMED_EMOTIONS

    return list(NAMED_EMOTIONS)


def _audio_duration(audio, input_name="audio"):
    """Seconds of a ComfyUI AUDIO dict ({"waveform": [B, C, S], "sample_rate": int}, any sample dtype);
    ValueError naming the input for anything else (a connected but broken input is not ignored)."""
    from ..keyface import validate

    try:
        wf, sr = audio["waveform"], audio["sample_rate"]
        samples = int(wf.shape[-1])
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{input_name}: expected a ComfyUI AUDIO dict with 'waveform' [batch, channels, samples] "
                         "and 'sample_rate'") from e
    return samples / validate.sample_rate(f"{input_name}: sample_rate", sr)


def build_curve(emotion, curve, intensity=1.0, schedule="", duration=None):
    """The node's logic without ComfyUI: returns an EmotionCurve or raises EmotionCurveError."""
    from ..keyface import emotion as kfe

    if not isinstance(emotion, str):  # an API prompt can send any JSON value (a dict is not hashable)
        raise kfe.EmotionCurveError(f"emotion: expected {CUSTOM_CURVE!r} or an emotion name (text), got "
                                    f"{type(emotion).__name__} {emotion!r}"[:300])
    if emotion == CUSTOM_CURVE:
        c = replace(kfe.parse_curve(curve), source=CUSTOM_CURVE)
    elif schedule is not None and str(schedule).strip():
        c = kfe.curve_from_named(str(schedule), duration=duration)
    elif emotion in kfe.NAMED_EMOTIONS:
        c = kfe.constant_curve(emotion)
    else:
        raise kfe.EmotionCurveError(
            f"emotion: unknown value {emotion!r}; expected {CUSTOM_CURVE!r} or one of {', '.join(kfe.NAMED_EMOTIONS)}")
    return c.with_intensity(intensity)


class KeyFaceEmotion:
    """Emotion (valence/arousal over time) for the KeyFace keyframe sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "emotion": ([CUSTOM_CURVE] + _emotion_names(), {
                    "default": CUSTOM_CURVE,
                    "tooltip": "A named emotion held for the whole clip, or 'custom curve' to use the curve "
                               "drawn in the editor (the JSON in 'curve'). A non-empty 'schedule' overrides a "
                               "named emotion.",
                }),
                "curve": ("STRING", {
                    "default": DEFAULT_CURVE,
                    "multiline": True,
                    "tooltip": 'Valence/arousal over time, JSON: {"version": 1, "valence": [[t, v], ...], '
                               '"arousal": [[t, a], ...], "interpolation": "linear" | "monotone"}, t in '
                               "seconds, values in [-1, 1] (outside values are clamped with a warning). "
                               "Edited by the curve editor; used when emotion is 'custom curve'.",
                }),
                "intensity": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                    "tooltip": "Scales valence and arousal around neutral, then clamps to [-1, 1]. "
                               "1.5 is the reference's accentuate (applied once, not twice).",
                }),
            },
            "optional": {
                "schedule": ("STRING", {
                    "default": "",
                    "multiline": False,
                    "tooltip": "Named emotions over time, e.g. 'happy@0, sad@2.5, neutral@4' (seconds, "
                               "linear in between). Names without times are spread over the audio "
                               "duration. Used when emotion is not 'custom curve'.",
                }),
                "duration_hint": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 3600.0, "step": 0.1,
                    "tooltip": "Clip length in seconds for the editor's time axis and for untimed "
                               "schedules (0 = unknown; the connected audio's length wins).",
                }),
                "audio": ("AUDIO", {
                    "tooltip": "Optional: the speech audio, only to know the clip duration.",
                }),
            },
        }

    RETURN_TYPES = ("KEYFACE_EMOTION",)
    RETURN_NAMES = ("emotion",)
    OUTPUT_TOOLTIPS = ("Valence/arousal curve for KeyFace Sample Keyframes.",)
    FUNCTION = "build"
    CATEGORY = C.CATEGORY
    # An output node so that the sampled curve preview reaches the editor even when nothing downstream
    # runs; it is cheap (no model).
    OUTPUT_NODE = True
    DESCRIPTION = ("Emotion for KeyFace: a named emotion, named emotions over time, or a valence/arousal "
                   "curve drawn in the editor. Only the keyframe model uses it.")

    @classmethod
    def VALIDATE_INPUTS(cls, emotion=None, curve=None, intensity=1.0, schedule=""):
        # Listing an input here makes ComfyUI skip its own combo/min/max checks for it, so all of them
        # happen in build_curve. Inputs fed by links arrive as None here and are checked at run time.
        from ..keyface.emotion import EmotionCurveError

        if emotion is None or (emotion == CUSTOM_CURVE and curve is None):
            return True
        if intensity is None:
            intensity = 1.0
        if schedule is None:
            schedule = ""
        if not isinstance(schedule, str):
            return f"KeyFace Emotion schedule: expected text, got {type(schedule).__name__}"
        try:
            # Untimed multi-name schedules need the duration, known only at run time: check names only.
            build_curve(emotion, curve, intensity, schedule, duration=1.0)
        except EmotionCurveError as e:
            where = "curve" if emotion == CUSTOM_CURVE else "schedule" if (schedule or "").strip() else "emotion"
            return f"KeyFace Emotion {where}: {e}"
        return True

    def build(self, emotion, curve, intensity, schedule="", duration_hint=0.0, audio=None):
        C.check_widgets(type(self), duration_hint=duration_hint, schedule=schedule)
        duration = _audio_duration(audio) if audio is not None else None
        source = "audio" if duration is not None else None
        if duration is None and duration_hint and duration_hint > 0:
            duration, source = float(duration_hint), "duration_hint"
        c = build_curve(emotion, curve, intensity, schedule, duration=duration)
        end = duration if duration is not None else max(c.duration, 1.0)
        n = min(int(round(end * PREVIEW_FPS)) + 1, _MAX_PREVIEW_SAMPLES)
        fps = PREVIEW_FPS if n < _MAX_PREVIEW_SAMPLES else (n - 1) / end
        v, a = c.sample_lists([i / fps for i in range(n)])
        preview = {
            "source": c.source,
            "curve": c.to_json(),
            "intensity": c.intensity,
            "duration": duration,
            "duration_source": source,  # "audio" | "duration_hint" | None: the editor labels it
            "fps": fps,
            "valence": [round(x, 5) for x in v],
            "arousal": [round(x, 5) for x in a],
            "warnings": list(c.warnings),
        }
        return {"ui": {"keyface_emotion": [preview]}, "result": (c,)}


NODE_CLASS_MAPPINGS = {"KeyFaceEmotion": KeyFaceEmotion}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceEmotion": "KeyFace Emotion"}
