"""keyface.emotion (named emotions, curve JSON, sampling) and the KeyFace Emotion node (no ComfyUI)."""

import importlib
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from keyface import emotion as kfe

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ named table
def test_named_table_is_spec_3_exactly():
    spec = {
        "happy": (0.85, 0.75), "angry": (-0.443, 0.908), "surprised": (0.0, 0.85),
        "sad": (-0.85, -0.35), "neutral": (0, 0), "fear": (0.181, 0.949),
        "disgusted": (-0.8, 0.5), "contempt": (0.307, 0.535), "calm": (0.65, -0.5),
        "excited": (0.9, 0.9), "bored": (-0.6, -0.9), "confused": (-0.3, 0.4),
        "anxious": (-0.85, 0.9), "confident": (0.7, 0.4), "frustrated": (-0.8, 0.6),
        "amused": (0.7, 0.5), "proud": (0.8, 0.4), "ashamed": (-0.8, -0.3),
        "grateful": (0.7, 0.2), "jealous": (-0.7, 0.5), "hopeful": (0.7, 0.3),
        "disappointed": (-0.7, -0.3), "curious": (0.5, 0.5), "overwhelmed": (-0.6, 0.8),
    }
    assert kfe.NAMED_EMOTIONS == spec
    assert len(kfe.NAMED_EMOTIONS) == 24


# ------------------------------------------------------------------------------------------ parse
GOOD = {"version": 1, "valence": [[0, 0], [1, 0.85], [2.5, -0.85]], "arousal": [[0, 0.2]],
        "interpolation": "linear"}


def test_parse_json_and_python_repr_and_dict_agree():
    a = kfe.parse_curve(json.dumps(GOOD))
    b = kfe.parse_curve(repr(GOOD))            # what a dict sent into a STRING input becomes
    c = kfe.parse_curve(GOOD)
    assert a == b == c
    assert a.valence == ((0.0, 0.0), (1.0, 0.85), (2.5, -0.85))
    assert a.arousal == ((0.0, 0.2),)
    assert a.interpolation == "linear" and a.warnings == ()


def test_round_trip_to_json():
    c = kfe.parse_curve(json.dumps(GOOD))
    assert kfe.parse_curve(c.to_json()) == c
    assert json.loads(c.to_json())["version"] == 1


def test_interpolation_defaults_to_monotone():
    d = dict(GOOD)
    del d["interpolation"]
    assert kfe.parse_curve(json.dumps(d)).interpolation == "monotone"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("", "empty"),
    ('{"version": 3, "valence": [[0,0]], "arousal": [[0,0]]}', "unknown curve version 3"),
    ('{"valence": [[0,0]], "arousal": [[0,0]]}', '"version": 1'),
    ('{"version": 1, "valence": [[0,0]], "arousal": [[0,0]], "interpolation": "spline"}', "unknown interpolation 'spline'"),
    ('{"version": 1, "valence": [[0,0],[2,0],[1,0]], "arousal": [[0,0]]}', "valence[2]: times are not sorted"),
    ('{"version": 1, "valence": [[0,0]], "arousal": [[0,0],[0,1]]}', "arousal[1]: duplicate time"),
    ('{"version": 1, "valence": [[0,"x"]], "arousal": [[0,0]]}', "valence[0]: t and value must be numbers"),
    ('{"version": 1, "valence": [], "arousal": [[0,0]]}', "valence: the list is empty"),
    ('{"version": 1, "valence": [[0,0]], "arousal": [[0,NaN]]}', "finite"),
    ('{"version": 1, "valence": [[0,0]], "arousal": [[0,0]], "interp": "linear"}', "unknown key(s) ['interp']"),
])
def test_parse_errors_are_clear(text, message):
    with pytest.raises(kfe.EmotionCurveError) as e:
        kfe.parse_curve(text)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_out_of_range_values_are_clamped_with_warning(caplog):
    c = kfe.parse_curve('{"version": 1, "valence": [[0, 1.7], [1, -0.2]], "arousal": [[0, -4]]}')
    assert c.valence[0] == (0.0, 1.0) and c.arousal[0] == (0.0, -1.0)
    assert len(c.warnings) == 2 and "clamped" in c.warnings[0]
    assert any("clamped" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------- sampling
def test_linear_sampling_and_constant_extrapolation():
    c = kfe.parse_curve('{"version":1,"valence":[[1,-0.5],[3,0.5]],"arousal":[[2,0.4]],"interpolation":"linear"}')
    v, a = c.sample(torch.tensor([0.0, 1.0, 1.5, 2.0, 3.0, 10.0]))
    assert v.dtype == torch.float32
    assert torch.allclose(v, torch.tensor([-0.5, -0.5, -0.25, 0.0, 0.5, 0.5]))
    assert torch.allclose(a, torch.full((6,), 0.4))


def test_monotone_hits_points_never_overshoots_and_is_monotone_per_segment():
    pts = [[0, -1.0], [0.2, 0.95], [0.4, 1.0], [2.0, 1.0], [2.1, -1.0], [4, -0.2]]
    c = kfe.parse_curve(json.dumps({"version": 1, "valence": pts, "arousal": [[0, 0]], "interpolation": "monotone"}))
    for t, y in pts:
        assert abs(c.sample_lists([t])[0][0] - y) < 1e-12
    for (t0, y0), (t1, y1) in zip(pts, pts[1:]):
        ts = [t0 + (t1 - t0) * i / 200 for i in range(201)]
        ys = c.sample_lists(ts)[0]
        lo, hi = min(y0, y1), max(y0, y1)
        assert all(lo - 1e-12 <= y <= hi + 1e-12 for y in ys)
        diffs = [b - a for a, b in zip(ys, ys[1:])]
        assert all(d >= -1e-12 for d in diffs) or all(d <= 1e-12 for d in diffs)


def test_monotone_is_smooth_where_linear_has_a_kink():
    text = '{"version":1,"valence":[[0,0],[1,0.5],[2,1]],"arousal":[[0,0]],"interpolation":"%s"}'
    lin = kfe.parse_curve(text % "linear")
    mono = kfe.parse_curve(text % "monotone")
    # on a straight line both agree
    ts = [i / 10 for i in range(21)]
    assert max(abs(x - y) for x, y in zip(lin.sample_lists(ts)[0], mono.sample_lists(ts)[0])) < 1e-12
    bent = kfe.parse_curve('{"version":1,"valence":[[0,0],[1,0.8],[2,1]],"arousal":[[0,0]]}')
    e = 1e-6
    left = (bent.sample_lists([1])[0][0] - bent.sample_lists([1 - e])[0][0]) / e
    right = (bent.sample_lists([1 + e])[0][0] - bent.sample_lists([1])[0][0]) / e
    assert abs(left - right) < 1e-3  # C1 at the knot


def test_intensity_scales_once_then_clamps_not_b8():
    c = kfe.constant_curve("happy")  # (0.85, 0.75)
    v, a = c.with_intensity(1.5).sample([0.0])
    assert v.item() == pytest.approx(1.0) and a.item() == pytest.approx(min(0.75 * 1.5, 1.0))
    v, a = kfe.constant_curve("sad").with_intensity(1.2).sample([0.0])
    assert v.item() == pytest.approx(-1.0) and a.item() == pytest.approx(-0.35 * 1.2)  # not 2.25x
    v, a = c.with_intensity(0.0).sample([0.0, 5.0])
    assert v.abs().max() == 0 and a.abs().max() == 0
    with pytest.raises(ValueError, match="intensity"):
        c.with_intensity(2.5)


def test_per_frame_emotion_samples_frame_times():
    c = kfe.parse_curve('{"version":1,"valence":[[0,0],[1,1]],"arousal":[[0,1],[1,0]],"interpolation":"linear"}')
    v, a = kfe.per_frame_emotion(c, 30, fps=25)
    assert v.shape == a.shape == (30,) and v.dtype == torch.float32
    assert torch.allclose(v[:26], torch.arange(26) / 25.0, atol=1e-6)
    assert torch.allclose(v[25:], torch.ones(5))  # held after the last point
    assert torch.allclose(a[:26], 1 - torch.arange(26) / 25.0, atol=1e-6)
    v2, _ = kfe.per_frame_emotion(c, 30, fps=25, intensity=0.5)
    assert torch.allclose(v2, v * 0.5)


def test_per_frame_emotion_none_is_neutral_and_accepts_text():
    v, a = kfe.per_frame_emotion(None, 7)
    assert v.shape == (7,) and v.abs().sum() == 0 and a.abs().sum() == 0
    v, a = kfe.per_frame_emotion("happy", 3)
    assert torch.allclose(v, torch.full((3,), 0.85)) and torch.allclose(a, torch.full((3,), 0.75))
    v, _ = kfe.per_frame_emotion(json.dumps(GOOD), 2, fps=1)
    assert torch.allclose(v, torch.tensor([0.0, 0.85]))
    assert kfe.per_frame_emotion(None, 0)[0].shape == (0,)


# ---------------------------------------------------------------------------------------- schedules
def test_schedule_named_over_time():
    c = kfe.curve_from_named("happy@0, sad@2.5s; neutral@4")
    assert c.valence == ((0.0, 0.85), (2.5, -0.85), (4.0, 0.0))
    assert c.arousal == ((0.0, 0.75), (2.5, -0.35), (4.0, 0.0))
    assert c.interpolation == "linear"
    v, a = c.sample([1.25, 10])
    assert v[0].item() == pytest.approx(0.0) and v[1].item() == 0.0


def test_schedule_single_name_is_constant_and_names_are_case_insensitive():
    c = kfe.curve_from_named("  Happy ")
    v, a = c.sample([0, 3, 100])
    assert torch.allclose(v, torch.full((3,), 0.85))


def test_schedule_without_times_spreads_over_duration():
    c = kfe.curve_from_named("happy, sad, calm", duration=4.0)
    assert [t for t, _ in c.valence] == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="duration"):
        kfe.curve_from_named("happy, sad")


@pytest.mark.parametrize("schedule, message", [
    ("happy@0, grumpy@1", "unknown emotion 'grumpy'"),
    ("happy@1, sad@1", "strictly increasing"),
    ("happy@0, sad", "every entry or to none"),
    ("happy@soon", "seconds"),
    ("", "empty"),
])
def test_schedule_errors(schedule, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        kfe.curve_from_named(schedule)


# ------------------------------------------------------------------------------------------ node
@pytest.fixture(scope="module")
def node_module():
    """Import nodes/emotion.py as ComfyUI does (inside a package, relative imports), without running
    the pack's or nodes/ package __init__ (other engineers' modules)."""
    name = "_kf_emotion_pack"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(ROOT)]
        sys.modules[name] = pkg
        sub = types.ModuleType(name + ".nodes")
        sub.__path__ = [str(ROOT / "nodes")]
        sys.modules[name + ".nodes"] = sub
    return importlib.import_module(name + ".nodes.emotion")


def test_node_mapping_and_inputs(node_module):
    cls = node_module.NODE_CLASS_MAPPINGS["KeyFaceEmotion"]
    assert node_module.NODE_DISPLAY_NAME_MAPPINGS["KeyFaceEmotion"] == "KeyFace Emotion"
    it = cls.INPUT_TYPES()
    names = it["required"]["emotion"][0]
    assert names[0] == "custom curve" and set(names[1:]) == set(kfe.NAMED_EMOTIONS)
    assert it["required"]["curve"][0] == "STRING" and it["required"]["curve"][1]["multiline"]
    assert list(it["required"]) == ["emotion", "curve", "intensity"]
    assert list(it["optional"]) == ["schedule", "duration_hint", "audio"]
    assert cls.RETURN_TYPES == ("KEYFACE_EMOTION",)
    # the default curve parses
    kfe.parse_curve(it["required"]["curve"][1]["default"])


def test_node_serves_the_library_frame_rate(node_module):
    """The editor (js/emotion_editor.js) reads the sampler's frame rate from the `curve` input's
    options, under the key both sides name: the served value is the library's constant."""
    from keyface import planner

    options = node_module.KeyFaceEmotion.INPUT_TYPES()["required"]["curve"][1]
    assert options[node_module.FPS_OPTION] == planner.FPS
    js = (ROOT / "js" / "emotion_editor.js").read_text(encoding="utf-8")
    assert f'const FPS_OPTION = "{node_module.FPS_OPTION}";' in js
    # the preview the node sends after a run is sampled at the same rate
    ui = node_module.KeyFaceEmotion().build("happy", "", 1.0, duration_hint=2.0)["ui"]["keyface_emotion"][0]
    assert ui["fps"] == planner.FPS and len(ui["valence"]) == 2 * planner.FPS + 1


def test_node_custom_curve_output_and_ui(node_module):
    node = node_module.KeyFaceEmotion()
    out = node.build("custom curve", json.dumps(GOOD), 1.0)
    (curve,) = out["result"]
    assert curve.valence == ((0.0, 0.0), (1.0, 0.85), (2.5, -0.85))
    ui = out["ui"]["keyface_emotion"][0]
    assert ui["source"] == "custom curve" and ui["duration"] is None and ui["duration_source"] is None
    assert json.loads(ui["curve"])["valence"][1] == [1.0, 0.85]
    assert len(ui["valence"]) == len(ui["arousal"]) == int(2.5 * 25) + 1
    # the sampler's view of it
    v, a = curve.sample([1.0])
    assert v.item() == pytest.approx(0.85)


def test_node_audio_sets_duration_and_untimed_schedule(node_module):
    node = node_module.KeyFaceEmotion()
    audio = {"waveform": torch.zeros(1, 1, 16000 * 3), "sample_rate": 16000}
    out = node.build("happy", "", 1.0, schedule="happy, sad", audio=audio)
    ui = out["ui"]["keyface_emotion"][0]
    assert ui["duration"] == pytest.approx(3.0) and len(ui["valence"]) == 76
    assert ui["duration_source"] == "audio"  # the editor labels it "audio", not "duration hint"
    ui = node.build("happy", "", 1.0, duration_hint=4.0, audio=audio)["ui"]["keyface_emotion"][0]
    assert ui["duration"] == pytest.approx(3.0) and ui["duration_source"] == "audio"  # the audio wins
    ui = node.build("happy", "", 1.0, duration_hint=4.0)["ui"]["keyface_emotion"][0]
    assert ui["duration"] == 4.0 and ui["duration_source"] == "duration_hint"
    (curve,) = out["result"]
    assert [t for t, _ in curve.valence] == [0.0, 3.0]
    out = node.build("calm", "not used", 0.5)
    (curve,) = out["result"]
    v, a = kfe.per_frame_emotion(curve, 4)
    assert torch.allclose(v, torch.full((4,), 0.325)) and torch.allclose(a, torch.full((4,), -0.25))


def test_node_validate_inputs_names_only_the_curve(node_module):
    """ComfyUI reports a failed VALIDATE_INPUTS on every input it takes: it takes only `curve`."""
    cls = node_module.KeyFaceEmotion
    assert list(inspect.signature(cls.VALIDATE_INPUTS).parameters) == ["curve"]
    V = cls.VALIDATE_INPUTS
    assert V(curve=json.dumps(GOOD)) is True
    assert V(curve="") is True  # a named emotion needs no curve; 'custom curve' refuses it at run time
    assert V(curve=None) is True  # linked input: checked at run time
    msg = V(curve='{"version": 1, "valence": [], "arousal": [[0,0]]}')
    assert msg.startswith("KeyFace Emotion curve:") and "valence: the list is empty" in msg
    assert "not valid JSON" in V(curve="garbage")


def test_node_refuses_what_it_would_ignore(node_module):
    """A schedule typed beside 'custom curve' is an error naming `schedule`, never silently ignored."""
    build = node_module.build_curve
    with pytest.raises(ValueError, match=r"^schedule: 'happy@0' is set but emotion is 'custom curve'"):
        build("custom curve", json.dumps(GOOD), 1.0, schedule=" happy@0 ")
    assert build("custom curve", json.dumps(GOOD), 1.0, schedule="  ").source == "custom curve"
    with pytest.raises(ValueError, match="nope"):
        build("happy", "", 1.0, schedule="happy@0, nope@1")
    with pytest.raises(ValueError, match="^emotion: unknown value 'grumpy'"):
        build("grumpy", "", 1.0, schedule="happy@0")
    with pytest.raises(ValueError, match="intensity"):
        build("happy", "", 3.0)
    assert build("sad", "", 1.0, schedule="happy@0, sad@1").source == "happy@0, sad@1"  # schedule wins
