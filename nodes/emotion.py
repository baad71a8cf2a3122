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
# Option key of the `curve` input that carries the sampler's frame rate (keyface.planner.FPS) to the
# frontend: ComfyUI serves input options as they are in /object_info, so js/emotion_editor.js reads the
# rate from there instead of keeping its own copy of the number.
FPS_OPTION = "keyface_fps"
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
    """The node's logic without ComfyUI: returns an EmotionCurve or raises EmotionCurveError.

    Every input is either used or refused: a schedule typed while ``emotion`` is 'custom curve' is an
    error, not silently ignored.
    """
    from ..keyface import emotion as kfe

    if not isinstance(emotion, str):  # an API prompt can send any JSON value (a dict is not hashable)
        raise kfe.EmotionCurveError(f"emotion: expected {CUSTOM_CURVE!r} or an emotion name (text), got "
                                    f"{type(emotion).__name__} {emotion!r}"[:300])
    typed_schedule = schedule is not None and str(schedule).strip()
    if emotion == CUSTOM_CURVE:
        if typed_schedule:
            raise kfe.EmotionCurveError(
                f"schedule: {str(schedule).strip()!r} is set but emotion is {CUSTOM_CURVE!r}, which uses the "
                "drawn curve; clear schedule, or choose a named emotion to use the schedule")
        c = replace(kfe.parse_curve(curve), source=CUSTOM_CURVE)
    elif emotion not in kfe.NAMED_EMOTIONS:
        raise kfe.EmotionCurveError(
            f"emotion: unknown value {emotion!r}; expected {CUSTOM_CURVE!r} or one of {', '.join(kfe.NAMED_EMOTIONS)}")
    elif typed_schedule:
        c = kfe.curve_from_named(str(schedule), duration=duration)
    else:
        c = kfe.constant_curve(emotion)
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
                               "drawn in the editor (the JSON in 'curve'). With a named emotion, a non-empty "
                               "'schedule' is used instead of it; with 'custom curve' the schedule must be empty.",
                }),
                "curve": ("STRING", {
                    "default": DEFAULT_CURVE,
                    "multiline": True,
                    "tooltip": 'Valence/arousal over time, JSON: {"version": 1, "valence": [[t, v], ...], '
                               '"arousal": [[t, a], ...], "interpolation": "linear" | "monotone"}, t in '
                               "seconds, values in [-1, 1] (outside values are clamped with a warning). "
                               "Edited by the curve editor; used when emotion is 'custom curve'.",
                    FPS_OPTION: C.FPS,  # read by the editor (not a widget setting; frontends pass it through)
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
                               "duration. Used instead of a named emotion; must be empty with 'custom curve'.",
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
    # Not an output node: it runs when a sampler uses it, and its "ui" preview (the sampled curve)
    # still reaches the editor then. As an output node it would run on its own and hide a broken graph
    # (e.g. no portrait connected: only this node ran, and nothing said the video was never made).
    DESCRIPTION = ("Emotion for KeyFace: a named emotion, named emotions over time, or a valence/arousal "
                   "curve drawn in the editor. Only the keyframe model uses it.")

    @classmethod
    def VALIDATE_INPUTS(cls, curve=None):
        # ComfyUI attaches a failed VALIDATE_INPUTS to every input it names, and skips its own checks
        # (combo list, min/max) for those: so only `curve` is named here, and an invalid curve is one
        # error on `curve`. ComfyUI checks `emotion` and `intensity` itself; `schedule` (its names, and
        # that it is not typed beside 'custom curve') is checked by build_curve when the node runs.
        # An empty curve is allowed here (API users of a named emotion may leave it empty); with
        # 'custom curve' it fails at run time. A linked curve arrives as None: checked at run time.
        from ..keyface.emotion import EmotionCurveError, parse_curve

        if curve is None or not str(curve).strip():
            return True
        try:
            parse_curve(curve)
        except EmotionCurveError as e:
            return f"KeyFace Emotion curve: {e}"
        return True

    def build(self, emotion, curve, intensity, schedule="", duration_hint=0.0, audio=None):
        C.check_widgets(type(self), duration_hint=duration_hint, schedule=schedule)
        duration = _audio_duration(audio) if audio is not None else None
        source = "audio" if duration is not None else None
        if duration is None and duration_hint and duration_hint > 0:
            duration, source = float(duration_hint), "duration_hint"
        c = build_curve(emotion, curve, intensity, schedule, duration=duration)
        end = duration if duration is not None else max(c.duration, 1.0)
        n = min(int(round(end * C.FPS)) + 1, _MAX_PREVIEW_SAMPLES)
        fps = C.FPS if n < _MAX_PREVIEW_SAMPLES else (n - 1) / end
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
