"""The editor's curve maths (js/curve_math.js, run under node) must match keyface/emotion.py.

Every case of tests/fixtures/curves/cases.json is parsed and sampled by both; samples must agree to
1e-6, both must report the same number of clamp warnings, and both must refuse every invalid case
with a message containing the case's ``error`` text. The named-emotion tables must be identical.
The ``per_frame`` cases go through the sampler's path: ``keyface.emotion.per_frame_emotion`` (frame i
at t = i / 25, intensity != 1) against ``curveMath.sampleFrames``, at every frame and at the keyframe
frames 13 k of ``keyface.planner.plan_clip``. The editor's serializer must always write text that
Python accepts (also for typed curves with points closer than its 1 ms rounding).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from keyface import emotion as kfe
from keyface.planner import plan_clip

ROOT = Path(__file__).resolve().parents[1]
CASES_PATH = ROOT / "tests" / "fixtures" / "curves" / "cases.json"
CASES = json.loads(CASES_PATH.read_text())
NODE = shutil.which("node")

# Reads cases.json, prints {"valid": {name: {...}}, "invalid": {name: message}, "named": {...}}.
RUNNER = r"""
import { readFileSync } from "node:fs";
import * as cm from "./curve_math.mjs";
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = { valid: {}, invalid: {}, per_frame: {}, named: cm.NAMED_EMOTIONS, order: Object.keys(cm.NAMED_EMOTIONS),
              max_time_s: cm.MAX_TIME_S };
for (const c of cases.valid) {
  try {
    const curve = cm.parseCurve(c.text);
    const s = cm.sampleCurve(curve, c.times, c.intensity ?? 1.0);
    // round trip through the editor's serializer must parse again to the same points (to its rounding)
    const again = cm.parseCurve(cm.serializeCurve(curve));
    out.valid[c.name] = { valence: s.valence, arousal: s.arousal, warnings: curve.warnings.length,
                          interpolation: curve.interpolation, roundtrip: [again.valence, again.arousal] };
  } catch (e) {
    out.valid[c.name] = { error: String(e && e.message) };
  }
}
for (const c of cases.per_frame) {
  const curve = cm.parseCurve(c.text);
  const all = Array.from({ length: c.num_frames }, (_, i) => i);
  out.per_frame[c.name] = { frames: cm.sampleFrames(curve, all, c.fps, c.intensity),
                            keyframes: cm.sampleFrames(curve, c.keyframe_frames, c.fps, c.intensity) };
}
for (const c of cases.invalid) {
  try { cm.parseCurve(c.text); out.invalid[c.name] = null; }
  catch (e) { out.invalid[c.name] = { name: e.name, message: e.message }; }
}
process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def js_results(tmp_path_factory):
    if NODE is None:
        pytest.skip("node (Node.js) is not on PATH: cannot run js/curve_math.js; install Node >= 18 to run this test")
    d = tmp_path_factory.mktemp("curve_js")
    # .mjs copies: node then loads them as ES modules without a package.json in js/
    shutil.copy(ROOT / "js" / "curve_math.js", d / "curve_math.mjs")
    (d / "run.mjs").write_text(RUNNER)
    proc = subprocess.run([NODE, str(d / "run.mjs"), str(CASES_PATH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"node failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_named_emotions_identical(js_results):
    assert js_results["order"] == list(kfe.NAMED_EMOTIONS)
    assert {k: tuple(v) for k, v in js_results["named"].items()} == kfe.NAMED_EMOTIONS


def test_latest_point_time_identical(js_results):
    assert js_results["max_time_s"] == kfe.MAX_TIME_S


@pytest.mark.parametrize("case", CASES["valid"], ids=[c["name"] for c in CASES["valid"]])
def test_valid_case_matches(case, js_results):
    js = js_results["valid"][case["name"]]
    assert "error" not in js, f"JS refused a valid case: {js.get('error')}"
    curve = kfe.parse_curve(case["text"]).with_intensity(case.get("intensity", 1.0))
    v, a = curve.sample_lists(case["times"])
    assert len(js["valence"]) == len(v) == len(case["times"])
    assert max(abs(x - y) for x, y in zip(v, js["valence"])) <= 1e-6
    assert max(abs(x - y) for x, y in zip(a, js["arousal"])) <= 1e-6
    assert js["interpolation"] == curve.interpolation
    assert js["warnings"] == len(curve.warnings) == case.get("warnings", 0)
    # the sampled values stay in [-1, 1] (monotone never overshoots; intensity clamps)
    assert all(-1.0 <= x <= 1.0 for x in v + a)
    # the JS serializer round-trips to the same points (to its 1 ms / 1e-4 rounding)
    for series, pts in zip((curve.valence, curve.arousal), js["roundtrip"]):
        assert len(series) == len(pts)
        for (t0, v0), (t1, v1) in zip(series, pts):
            assert abs(t0 - t1) <= 5e-4 and abs(v0 - v1) <= 5e-5


def _max_diff(xs, ys):
    assert len(xs) == len(ys)
    return max(abs(float(x) - float(y)) for x, y in zip(xs, ys))


@pytest.mark.parametrize("case", CASES["per_frame"], ids=[c["name"] for c in CASES["per_frame"]])
def test_per_frame_sampling_matches_at_frames_and_keyframes(case, js_results):
    """What the sampler conditions on (per_frame_emotion rows) equals the editor's sampleFrames."""
    js = js_results["per_frame"][case["name"]]
    n, fps, g = case["num_frames"], case["fps"], case["intensity"]
    assert g != 1.0, "per-frame cases must exercise the intensity scaling"
    plan = plan_clip(n)
    assert list(plan.keyframe_frames) == case["keyframe_frames"], "case file out of date with the planner"
    curve = kfe.parse_curve(case["text"])
    v, a = kfe.per_frame_emotion(curve, n, fps=fps, intensity=g)
    assert _max_diff(v.tolist(), js["frames"]["valence"]) <= 1e-6
    assert _max_diff(a.tolist(), js["frames"]["arousal"]) <= 1e-6
    # keyframe times t = 13 k / fps, including a last keyframe past the clip end
    last = max(case["keyframe_frames"]) + 1
    vk, ak = kfe.per_frame_emotion(curve, last, fps=fps, intensity=g)
    kf = case["keyframe_frames"]
    assert _max_diff(vk[kf].tolist(), js["keyframes"]["valence"]) <= 1e-6
    assert _max_diff(ak[kf].tolist(), js["keyframes"]["arousal"]) <= 1e-6
    # the rows the pipeline conditions keyframes on (clamped to N-1)
    rows = list(plan.keyframe_rows)
    assert _max_diff(v[rows].tolist(), [js["frames"]["valence"][r] for r in rows]) <= 1e-6
    # the case is not trivial: intensity changed the values and the curve varies over the keyframes
    v1, _ = kfe.per_frame_emotion(curve, n, fps=fps, intensity=1.0)
    assert (v - v1).abs().max().item() > 0.01
    assert max(js["keyframes"]["valence"]) - min(js["keyframes"]["valence"]) > 0.1


@pytest.mark.parametrize("case", CASES["invalid"], ids=[c["name"] for c in CASES["invalid"]])
def test_invalid_case_refused_by_both(case, js_results):
    js = js_results["invalid"][case["name"]]
    assert js is not None, "JS accepted an invalid curve"
    assert js["name"] == "CurveError"
    assert case["error"] in js["message"]
    with pytest.raises(kfe.EmotionCurveError) as e:
        kfe.parse_curve(case["text"])
    assert case["error"] in str(e.value)


EDIT_RUNNER = r"""
import * as cm from "./curve_math.mjs";
const r = {};
r.insert = cm.upsertPoint([[0, 0], [2, 0.5]], 1, 0.2);
r.replace = cm.upsertPoint([[0, 0], [2, 0.5]], 2.0004, -0.3);
r.clampInsert = cm.upsertPoint([[1, 0]], -3, 4);
r.moveBetween = cm.movePoint([[0, 0], [1, 0.5], [2, 0]], 1, 5, -7, 0.01);
r.moveFirst = cm.movePoint([[0.5, 0], [1, 0.5]], 0, -1, 0.25, 0.01);
r.remove = cm.removePoint([[0, 0], [1, 0.5]], 0);
try { cm.removePoint([[0, 0]], 0); r.removeLast = "accepted"; } catch (e) { r.removeLast = e.name; }
r.serialized = cm.serializeCurve({ valence: [[0.12345, -0.000001], [1, 0.123456]], arousal: [[0, 1]], interpolation: "linear" });
// typed points closer than the 1 ms rounding: the text must keep them apart
r.subMs = cm.serializeCurve({ valence: [[1.0001, 0], [1.0004, 0.5]], arousal: [[0, 0], [0.0002, 0.1], [0.0004, 0.2], [0.0011, 0.3]], interpolation: "monotone" });
// moving a point between neighbours closer than the gap, or the first point before a close second one
r.moveTight = cm.movePoint([[1, 0], [1.005, 0], [1.01, 0]], 1, 0.5, 0.2, 0.01);
r.moveFirstTight = cm.movePoint([[0, 0], [0.004, 0]], 0, 0.5, 0.1, 0.01);
r.frames = cm.sampleFrames({ valence: [[0, 0], [1, 1]], arousal: [[0, 1]], interpolation: "linear" }, [0, 13, 25, 30], 25, 0.5);
for (const [name, args] of [["badFrame", [[-1], 25]], ["fracFrame", [[1.5], 25]], ["badFps", [[0], 0]], ["noFps", [[0]]]]) {
  try { cm.sampleFrames({ valence: [[0, 0]], arousal: [[0, 0]], interpolation: "linear" }, ...args); r[name] = "accepted"; }
  catch (e) { r[name] = `${e.name}: ${e.message}`; }
}
// random curves with points 0..2 ms apart and random drags: every serialized text must parse
let seed = 12345;
const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
r.fuzz = [];
for (let k = 0; k < 200; k++) {
  const series = () => {
    let t = rnd() * 0.002;
    return Array.from({ length: 2 + Math.floor(rnd() * 6) }, () => [(t += 1e-6 + rnd() * 0.002), rnd() * 2 - 1]);
  };
  const curve = { valence: series(), arousal: series(), interpolation: k % 2 ? "linear" : "monotone" };
  const i = Math.floor(rnd() * curve.valence.length);
  curve.valence = cm.movePoint(curve.valence, i, rnd() * 0.02 - 0.005, rnd() * 2 - 1, 0.01);
  r.fuzz.push([curve.valence.length, curve.arousal.length, cm.serializeCurve(curve)]);
}
process.stdout.write(JSON.stringify(r));
"""


def test_js_edit_helpers(tmp_path):
    """The editor's pure edit helpers keep curves valid (sorted, >= 1 point, values in [-1, 1])."""
    if NODE is None:
        pytest.skip("node (Node.js) is not on PATH")
    shutil.copy(ROOT / "js" / "curve_math.js", tmp_path / "curve_math.mjs")
    (tmp_path / "edit.mjs").write_text(EDIT_RUNNER)
    proc = subprocess.run([NODE, str(tmp_path / "edit.mjs")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["insert"] == {"points": [[0, 0], [1, 0.2], [2, 0.5]], "index": 1}
    assert r["replace"] == {"points": [[0, 0], [2, -0.3]], "index": 1}
    assert r["clampInsert"] == {"points": [[0, 1], [1, 0]], "index": 0}
    assert r["moveBetween"] == [[0, 0], [1.99, -1], [2, 0]]
    assert r["moveFirst"] == [[0, 0.25], [1, 0.5]]
    assert r["remove"] == [[1, 0.5]]
    assert r["removeLast"] == "CurveError"
    text = r["serialized"]
    assert json.loads(text) == {"version": 1, "valence": [[0.123, 0], [1, 0.1235]], "arousal": [[0, 1]],
                                "interpolation": "linear"}
    kfe.parse_curve(text)  # what the editor writes, Python reads
    # sub-ms typed points: rounding to 1 ms would give [[1, 0], [1, 0.5]] (a duplicate time)
    sub = json.loads(r["subMs"])
    assert sub["valence"] == [[1, 0], [1.001, 0.5]]
    assert [t for t, _ in sub["arousal"]] == [0, 0.001, 0.002, 0.003]
    kfe.parse_curve(r["subMs"])
    assert r["moveTight"] == [[1, 0], [1.005, 0.2], [1.01, 0]]
    assert r["moveFirstTight"] == [[0, 0.1], [0.004, 0]]
    assert r["frames"]["valence"] == pytest.approx([0, 0.26, 0.5, 0.5]) and r["frames"]["arousal"] == [0.5] * 4
    assert r["badFrame"] == "CurveError: frame indices must be integers >= 0, got -1"
    assert r["fracFrame"] == "CurveError: frame indices must be integers >= 0, got 1.5"
    assert r["badFps"] == "CurveError: fps must be > 0, got 0"
    assert r["noFps"] == "CurveError: fps must be > 0, got undefined"  # no default rate: the caller passes the served one
    for n_v, n_a, text in r["fuzz"]:
        c = kfe.parse_curve(text)
        assert (len(c.valence), len(c.arousal)) == (n_v, n_a)
        assert all(t >= 0 for t, _ in c.valence)
