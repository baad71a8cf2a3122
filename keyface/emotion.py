"""Emotion for KeyFace: named emotions, valence/arousal curves over time, per-frame sampling.

Only the keyframe model uses emotion: one (valence, arousal) pair per keyframe slot, each in [-1, 1]
(spec 3). This module turns what a user gives (a named emotion, a schedule of named emotions over
time, or a hand-drawn curve) into per-frame values. It is pure Python plus torch for the returned
tensors and never imports ComfyUI.

Curve JSON (version 1), the text the node's ``curve`` widget holds and the frontend editor writes::

    {"version": 1,
     "valence": [[t, v], ...],          # t in seconds, strictly increasing, t >= 0; v in [-1, 1]
     "arousal": [[t, a], ...],          # at least one point per list
     "interpolation": "linear" | "monotone"}

* ``version`` is required and must be 1. ``interpolation`` is optional (default ``"monotone"``).
  Unknown keys are refused, so a typo such as ``"interp"`` is reported instead of ignored.
* Between points: linear, or monotone cubic Hermite with Fritsch-Carlson tangents (never overshoots,
  so a curve drawn inside [-1, 1] stays inside). Before the first / after the last point the curve is
  constant (the first / last value).
* **Values outside [-1, 1] are clamped, with a warning** (``EmotionCurve.warnings``; the node shows it
  and logs it). The model was trained on values in [-1, 1] and the reference pipeline clamps to that
  range too; the editor never produces such values, so they only come from typed or generated JSON.
  Non-finite numbers (NaN, inf) are refused.
* The parser also accepts a Python ``repr`` of such a dict (``{'version': 1, ...}``), because a dict
  sent into a ComfyUI STRING input arrives as its repr.

``intensity`` (0..2) scales the sampled values around neutral (0, 0), then clamps once to [-1, 1].
The reference's ``--accentuate`` scaled by 1.5 twice (2.25x, bug B8, spec 1.9); intensity 1.5 here is
one 1.5x scaling of the sampled values.

The same parsing rules and interpolation formulas are implemented in ``js/curve_math.js`` (the
editor's preview); ``tests/test_curve_js_parity.py`` checks that both agree to 1e-6.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from .planner import FPS

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_VERSION",
    "INTERPOLATIONS",
    "NAMED_EMOTIONS",
    "EmotionCurve",
    "EmotionCurveError",
    "constant_curve",
    "curve_from_named",
    "parse_curve",
    "per_frame_emotion",
    "sample_points",
]


class EmotionCurveError(ValueError):
    """A curve, schedule or emotion name that cannot be used; the message says what was expected."""


# spec 3, ``create_emotion_list``: (valence, arousal)
NAMED_EMOTIONS: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "happy": (0.85, 0.75),
    "sad": (-0.85, -0.35),
    "angry": (-0.443, 0.908),
    "surprised": (0.0, 0.85),
    "fear": (0.181, 0.949),
    "disgusted": (-0.8, 0.5),
    "contempt": (0.307, 0.535),
    "calm": (0.65, -0.5),
    "excited": (0.9, 0.9),
    "bored": (-0.6, -0.9),
    "confused": (-0.3, 0.4),
    "anxious": (-0.85, 0.9),
    "confident": (0.7, 0.4),
    "frustrated": (-0.8, 0.6),
    "amused": (0.7, 0.5),
    "proud": (0.8, 0.4),
    "ashamed": (-0.8, -0.3),
    "grateful": (0.7, 0.2),
    "jealous": (-0.7, 0.5),
    "hopeful": (0.7, 0.3),
    "disappointed": (-0.7, -0.3),
    "curious": (0.5, 0.5),
    "overwhelmed": (-0.6, 0.8),
}

CURVE_VERSION = 1
INTERPOLATIONS = ("linear", "monotone")
DEFAULT_INTERPOLATION = "monotone"
INTENSITY_RANGE = (0.0, 2.0)
# Latest time a curve point or schedule entry may have (24 h): far beyond any clip, small enough that
# every time x fps stays an exact float (a point at 1e308 s overflowed the frame count).
MAX_TIME_S = 86400.0
_KEYS = {"version", "valence", "arousal", "interpolation"}

Point = tuple[float, float]


def _clamp(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


# ------------------------------------------------------------------------------------ interpolation
def _monotone_tangents(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """Fritsch-Carlson tangents (same formula as ``monotoneTangents`` in js/curve_math.js)."""
    n = len(xs)
    if n < 2:
        return [0.0] * n
    d = [(ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k]) for k in range(n - 1)]
    m = [0.0] * n
    m[0] = d[0]
    m[n - 1] = d[n - 2]
    for k in range(1, n - 1):
        m[k] = (d[k - 1] + d[k]) / 2.0 if d[k - 1] * d[k] > 0 else 0.0
    for k in range(n - 1):
        if d[k] == 0.0:
            m[k] = 0.0
            m[k + 1] = 0.0
            continue
        a = m[k] / d[k]
        b = m[k + 1] / d[k]
        s = a * a + b * b
        if s > 9.0:
            tau = 3.0 / math.sqrt(s)
            m[k] = tau * a * d[k]
            m[k + 1] = tau * b * d[k]
    return m


def _segment(xs: Sequence[float], t: float) -> int:
    """Index k with xs[k] <= t < xs[k+1] (binary search); caller handles the ends."""
    lo, hi = 0, len(xs) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if xs[mid] <= t:
            lo = mid
        else:
            hi = mid
    return lo


def sample_points(points: Sequence[Point], times: Iterable[float], interpolation: str = DEFAULT_INTERPOLATION) -> list[float]:
    """Sample one series of (t, value) points at ``times`` (float64 maths, Python floats out)."""
    if interpolation not in INTERPOLATIONS:
        raise EmotionCurveError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    if not points:
        raise EmotionCurveError("cannot sample an empty list of points")
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    n = len(xs)
    m = _monotone_tangents(xs, ys) if interpolation == "monotone" else None
    out = []
    for t in times:
        t = float(t)
        if t <= xs[0] or n == 1:
            out.append(ys[0])
            continue
        if t >= xs[-1]:
            out.append(ys[-1])
            continue
        k = _segment(xs, t)
        h = xs[k + 1] - xs[k]
        s = (t - xs[k]) / h
        if m is None:
            out.append(ys[k] + (ys[k + 1] - ys[k]) * s)
        else:
            s2 = s * s
            s3 = s2 * s
            h00 = 2 * s3 - 3 * s2 + 1
            h10 = s3 - 2 * s2 + s
            h01 = -2 * s3 + 3 * s2
            h11 = s3 - s2
            out.append(h00 * ys[k] + h10 * h * m[k] + h01 * ys[k + 1] + h11 * h * m[k + 1])
    return out


# ------------------------------------------------------------------------------------------- curve
@dataclass(frozen=True)
class EmotionCurve:
    """Valence and arousal over time (seconds). This is the ``KEYFACE_EMOTION`` value of the nodes.

    ``intensity`` scales the sampled values (then clamps to [-1, 1]); ``source`` says where the curve
    came from (for display); ``warnings`` lists what was clamped while parsing.
    """

    valence: tuple[Point, ...]
    arousal: tuple[Point, ...]
    interpolation: str = DEFAULT_INTERPOLATION
    intensity: float = 1.0
    source: str = "curve"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("valence", "arousal"):
            pts = getattr(self, name)
            if not pts:
                raise EmotionCurveError(f"{name}: needs at least one [t, value] point")
            for i in range(1, len(pts)):
                if not pts[i][0] > pts[i - 1][0]:
                    raise EmotionCurveError(f"{name}: times must be strictly increasing (point {i})")
        if self.interpolation not in INTERPOLATIONS:
            raise EmotionCurveError(
                f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        _check_intensity(self.intensity)

    # -- queries
    @property
    def duration(self) -> float:
        """Time of the last point of either series (seconds)."""
        return max(self.valence[-1][0], self.arousal[-1][0])

    def sample_lists(self, times: Iterable[float]) -> tuple[list[float], list[float]]:
        """Like :meth:`sample` but with Python floats (float64)."""
        times = [float(t) for t in times]
        g = self.intensity
        v = [_clamp(x * g) for x in sample_points(self.valence, times, self.interpolation)]
        a = [_clamp(x * g) for x in sample_points(self.arousal, times, self.interpolation)]
        return v, a

    def sample(self, times_s, dtype=None):
        """Sample at ``times_s`` (seconds; tensor, sequence or scalar) → (valence [n], arousal [n]).

        Constant before the first and after the last point; ``intensity`` applied, then clamped to
        [-1, 1]. Returns float32 tensors unless ``dtype`` says otherwise.
        """
        import torch

        t = torch.as_tensor(times_s, dtype=torch.float64).reshape(-1).tolist()
        v, a = self.sample_lists(t)
        dtype = dtype or torch.float32
        return torch.tensor(v, dtype=dtype), torch.tensor(a, dtype=dtype)

    # -- derived curves / serialisation
    def with_intensity(self, intensity: float) -> "EmotionCurve":
        return replace(self, intensity=_check_intensity(intensity))

    def to_dict(self) -> dict:
        return {
            "version": CURVE_VERSION,
            "valence": [[t, v] for t, v in self.valence],
            "arousal": [[t, a] for t, a in self.arousal],
            "interpolation": self.interpolation,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def _check_intensity(intensity) -> float:
    try:
        g = float(intensity)
    except (TypeError, ValueError):
        raise EmotionCurveError(f"intensity must be a number in [0, 2], got {intensity!r}") from None
    lo, hi = INTENSITY_RANGE
    if not (lo <= g <= hi):
        raise EmotionCurveError(f"intensity must be in [{lo:g}, {hi:g}], got {g:g}")
    return g


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_series(name: str, raw, warnings: list) -> tuple[Point, ...]:
    if not isinstance(raw, (list, tuple)):
        raise EmotionCurveError(f"{name}: expected a list of [t, value] points, got {type(raw).__name__}")
    if len(raw) == 0:
        raise EmotionCurveError(f"{name}: the list is empty; give at least one [t, value] point")
    pts = []
    clamped = 0
    for i, p in enumerate(raw):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise EmotionCurveError(f"{name}[{i}]: expected a pair [t, value], got {p!r}")
        t, v = p
        if not _is_number(t) or not _is_number(v):
            raise EmotionCurveError(f"{name}[{i}]: t and value must be numbers, got {p!r}")
        t, v = float(t), float(v)
        if not (math.isfinite(t) and math.isfinite(v)):
            raise EmotionCurveError(f"{name}[{i}]: t and value must be finite, got {p!r}")
        if t < 0:  # the same words as js/curve_math.js
            raise EmotionCurveError(f"{name}[{i}]: time must be >= 0 seconds, got {t:g}")
        if t > MAX_TIME_S:
            raise EmotionCurveError(f"{name}[{i}]: time must be in 0..{MAX_TIME_S:g} seconds, got {t:g}")
        if pts and t <= pts[-1][0]:
            what = "duplicate time" if t == pts[-1][0] else "times are not sorted"
            raise EmotionCurveError(
                f"{name}[{i}]: {what} ({t:g} s after {pts[-1][0]:g} s); times must be strictly increasing")
        if v < -1.0 or v > 1.0:
            clamped += 1
            v = _clamp(v)
        pts.append((t, v))
    if clamped:
        warnings.append(f"{name}: {clamped} value(s) outside [-1, 1] were clamped")
    return tuple(pts)


def _load_text(text):
    if isinstance(text, dict):
        return text
    if not isinstance(text, str):
        raise EmotionCurveError(f"curve must be a JSON string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise EmotionCurveError("curve is empty; expected JSON like "
                                '{"version": 1, "valence": [[0, 0]], "arousal": [[0, 0]]}')
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        json_error = e
    except RecursionError:
        raise EmotionCurveError("curve is nested too deeply to be a curve; expected JSON like "
                                '{"version": 1, "valence": [[0, 0]], "arousal": [[0, 0]]}') from None
    try:  # a dict sent into a STRING input arrives as its Python repr
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    raise EmotionCurveError(
        f"curve is not valid JSON: {json_error.msg} at line {json_error.lineno} column {json_error.colno}")


def parse_curve(text) -> EmotionCurve:
    """Parse curve JSON (or its Python repr, or an already-decoded dict) into an :class:`EmotionCurve`.

    Raises :class:`EmotionCurveError` with a message naming the field that is wrong. Values outside
    [-1, 1] are clamped and reported in ``curve.warnings`` (and logged).
    """
    data = _load_text(text)
    if not isinstance(data, dict):
        raise EmotionCurveError(f"curve must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _KEYS)
    if unknown:
        raise EmotionCurveError(f"curve has unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    if "version" not in data:
        raise EmotionCurveError(f'curve needs "version": {CURVE_VERSION}')
    version = data["version"]
    if not _is_number(version) or version != CURVE_VERSION:
        raise EmotionCurveError(f"unknown curve version {version!r}; this KeyFace reads version {CURVE_VERSION}")
    for key in ("valence", "arousal"):
        if key not in data:
            raise EmotionCurveError(f'curve needs a "{key}" list of [t, value] points')
    interpolation = data.get("interpolation", DEFAULT_INTERPOLATION)
    if interpolation not in INTERPOLATIONS:
        raise EmotionCurveError(
            f"unknown interpolation {interpolation!r}; expected one of {list(INTERPOLATIONS)}")
    warnings: list[str] = []
    valence = _parse_series("valence", data["valence"], warnings)
    arousal = _parse_series("arousal", data["arousal"], warnings)
    for w in warnings:
        log.warning("KeyFace emotion curve: %s", w)
    return EmotionCurve(valence, arousal, interpolation, source="curve", warnings=tuple(warnings))


# ------------------------------------------------------------------------------------ named emotions
def _lookup(name: str) -> tuple[float, float]:
    key = name.strip().lower()
    if key not in NAMED_EMOTIONS:
        shown = name.strip() if len(name.strip()) <= 60 else name.strip()[:60] + "..."  # not a 1 MB message
        raise EmotionCurveError(f"unknown emotion {shown!r}; known: {', '.join(NAMED_EMOTIONS)}")
    return NAMED_EMOTIONS[key]


def constant_curve(name: str) -> EmotionCurve:
    v, a = _lookup(name)
    return EmotionCurve(((0.0, v),), ((0.0, a),), "linear", source=name.strip().lower())


_TIME = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*s?\s*$")


def curve_from_named(schedule: str, duration: float | None = None, interpolation: str = "linear") -> EmotionCurve:
    """Named emotions over time → curve.

    ``"happy@0, sad@2.5, neutral@4"`` (times in seconds, an optional trailing ``s``; separators: comma,
    semicolon or newline) holds each emotion at its time and interpolates between them (linear by
    default, like the reference's linspace between states). A single name (``"happy"``) is constant.
    Several names without times (``"happy, sad"``) are spread evenly over ``duration`` seconds, like the
    reference spreads its emotion list over the clip; without a duration that is an error.
    """
    if not isinstance(schedule, str) or not schedule.strip():
        raise EmotionCurveError("schedule is empty; expected e.g. 'happy@0, sad@2.5, neutral@4'")
    items = [s for s in re.split(r"[,;\n]", schedule) if s.strip()]
    entries = []  # ((valence, arousal), time or None, the entry as written)
    for item in items:
        if "@" in item:
            name, _, t = item.partition("@")
            mt = _TIME.match(t)
            if not mt:
                raise EmotionCurveError(f"schedule entry {item.strip()!r}: time after '@' must be seconds, e.g. 'sad@2.5'")
            time = float(mt.group(1))
            if not 0 <= time <= MAX_TIME_S:
                raise EmotionCurveError(f"schedule entry {item.strip()!r}: time must be in 0..{MAX_TIME_S:g} seconds")
        else:
            name, time = item, None
        entries.append((_lookup(name), time, item.strip()))
    timed = [e for e in entries if e[1] is not None]
    if len(entries) == 1:
        (v, a), time, _ = entries[0]
        return EmotionCurve(((time or 0.0, v),), ((time or 0.0, a),), interpolation, source=schedule.strip())
    if timed and len(timed) != len(entries):
        missing = [e[2] for e in entries if e[1] is None]
        raise EmotionCurveError(f"schedule: give a time to every entry or to none; missing in {missing}")
    if not timed:
        if duration is None or not duration > 0:
            raise EmotionCurveError(
                "schedule: several emotions without times need a duration; write them as 'name@seconds' "
                "(e.g. 'happy@0, sad@2.5') or give a duration")
        step = float(duration) / (len(entries) - 1)
        entries = [(va, i * step, raw) for i, (va, _, raw) in enumerate(entries)]
    for i in range(1, len(entries)):
        if not entries[i][1] > entries[i - 1][1]:
            raise EmotionCurveError(
                f"schedule: times must be strictly increasing ({entries[i][2]!r} after {entries[i - 1][2]!r})")
    valence = tuple((t, va[0]) for va, t, _ in entries)
    arousal = tuple((t, va[1]) for va, t, _ in entries)
    return EmotionCurve(valence, arousal, interpolation, source=schedule.strip())


# ----------------------------------------------------------------------------------- per frame
def as_curve(emotion) -> EmotionCurve | None:
    """Accept an EmotionCurve, None, curve JSON / repr / dict, an emotion name or a schedule."""
    if emotion is None or isinstance(emotion, EmotionCurve):
        return emotion
    if all(hasattr(emotion, k) for k in ("valence", "arousal", "interpolation", "with_intensity", "sample")):
        return emotion  # an EmotionCurve from another import of this module (duck-typed)
    if isinstance(emotion, dict):
        return parse_curve(emotion)
    if isinstance(emotion, str):
        s = emotion.strip()
        if s.startswith("{"):
            return parse_curve(s)
        return curve_from_named(s)
    raise EmotionCurveError(f"expected an emotion curve, name or schedule, got {type(emotion).__name__}")


def per_frame_emotion(curve, num_frames: int, fps: float = FPS, intensity: float | None = None):
    """Per-frame (valence [N], arousal [N]) float32 tensors, frame i sampled at t = i / fps.

    ``curve`` is an :class:`EmotionCurve` (the ``KEYFACE_EMOTION`` value), ``None`` (neutral: zeros,
    the reference default), or anything :func:`as_curve` accepts. ``intensity`` overrides the curve's
    own intensity when given.
    """
    import torch

    n = int(num_frames)
    if n < 0:
        raise EmotionCurveError(f"num_frames must be >= 0, got {num_frames}")
    try:
        fps_ok = math.isfinite(float(fps)) and float(fps) > 0
    except (TypeError, ValueError):
        fps_ok = False
    if not fps_ok:
        raise EmotionCurveError(f"fps must be a finite number > 0, got {fps!r}")
    if intensity is not None:
        _check_intensity(intensity)  # also without a curve: a NaN intensity is an error, not ignored
    c = as_curve(curve)
    if c is None:
        return torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.float32)
    if intensity is not None:
        c = c.with_intensity(intensity)
    return c.sample([i / float(fps) for i in range(n)])
