// KeyFace emotion curves: parsing and sampling, shared by the editor and the parity test.
//
// Pure ES module: no imports, no DOM. It mirrors keyface/emotion.py (same validation rules, same
// formulas, float64 maths); tests/test_curve_js_parity.py runs it under node and compares with Python
// to 1e-6. Curve JSON, version 1:
//   {"version": 1, "valence": [[t, v], ...], "arousal": [[t, a], ...], "interpolation": "linear"|"monotone"}
// t in seconds (>= 0, strictly increasing), values in [-1, 1] (outside values are clamped with a
// warning). Constant before the first / after the last point.

export const CURVE_VERSION = 1;
// Latest point time in seconds: keyface/emotion.py's MAX_TIME_S (tests/test_curve_js_parity.py checks
// they are equal), so a curve the server would refuse is refused while it is typed.
export const MAX_TIME_S = 86400;
export const INTERPOLATIONS = ["linear", "monotone"];
export const DEFAULT_INTERPOLATION = "monotone";
const KEYS = ["version", "valence", "arousal", "interpolation"];

// spec 3 table, (valence, arousal); same order and values as keyface.emotion.NAMED_EMOTIONS
export const NAMED_EMOTIONS = {
  neutral: [0.0, 0.0],
  happy: [0.85, 0.75],
  sad: [-0.85, -0.35],
  angry: [-0.443, 0.908],
  surprised: [0.0, 0.85],
  fear: [0.181, 0.949],
  disgusted: [-0.8, 0.5],
  contempt: [0.307, 0.535],
  calm: [0.65, -0.5],
  excited: [0.9, 0.9],
  bored: [-0.6, -0.9],
  confused: [-0.3, 0.4],
  anxious: [-0.85, 0.9],
  confident: [0.7, 0.4],
  frustrated: [-0.8, 0.6],
  amused: [0.7, 0.5],
  proud: [0.8, 0.4],
  ashamed: [-0.8, -0.3],
  grateful: [0.7, 0.2],
  jealous: [-0.7, 0.5],
  hopeful: [0.7, 0.3],
  disappointed: [-0.7, -0.3],
  curious: [0.5, 0.5],
  overwhelmed: [-0.6, 0.8],
};

export class CurveError extends Error {
  constructor(message) {
    super(message);
    this.name = "CurveError";
  }
}

export function clamp(x, lo = -1, hi = 1) {
  return x < lo ? lo : x > hi ? hi : x;
}

function isNumber(x) {
  return typeof x === "number";
}

function parseSeries(name, raw, warnings) {
  if (!Array.isArray(raw)) {
    throw new CurveError(`${name}: expected a list of [t, value] points`);
  }
  if (raw.length === 0) {
    throw new CurveError(`${name}: the list is empty; give at least one [t, value] point`);
  }
  const pts = [];
  let clamped = 0;
  raw.forEach((p, i) => {
    if (!Array.isArray(p) || p.length !== 2) {
      throw new CurveError(`${name}[${i}]: expected a pair [t, value], got ${JSON.stringify(p)}`);
    }
    let [t, v] = p;
    if (!isNumber(t) || !isNumber(v)) {
      throw new CurveError(`${name}[${i}]: t and value must be numbers, got ${JSON.stringify(p)}`);
    }
    if (!Number.isFinite(t) || !Number.isFinite(v)) {
      throw new CurveError(`${name}[${i}]: t and value must be finite`);
    }
    if (t < 0) throw new CurveError(`${name}[${i}]: time must be >= 0 seconds, got ${t}`);
    if (t > MAX_TIME_S) throw new CurveError(`${name}[${i}]: time must be in 0..${MAX_TIME_S} seconds, got ${t}`);
    if (pts.length && t <= pts[pts.length - 1][0]) {
      const prev = pts[pts.length - 1][0];
      const what = t === prev ? "duplicate time" : "times are not sorted";
      throw new CurveError(`${name}[${i}]: ${what} (${t} s after ${prev} s); times must be strictly increasing`);
    }
    if (v < -1 || v > 1) {
      clamped += 1;
      v = clamp(v);
    }
    pts.push([t, v]);
  });
  if (clamped) warnings.push(`${name}: ${clamped} value(s) outside [-1, 1] were clamped`);
  return pts;
}

// Parse curve JSON text (or an already-decoded object). Throws CurveError with a clear message.
export function parseCurve(text) {
  let data = text;
  if (typeof text === "string") {
    const s = text.trim();
    if (!s) throw new CurveError("curve is empty");
    try {
      data = JSON.parse(s);
    } catch (e) {
      throw new CurveError(`curve is not valid JSON: ${e.message}`);
    }
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new CurveError("curve must be a JSON object");
  }
  const unknown = Object.keys(data).filter((k) => !KEYS.includes(k)).sort();
  if (unknown.length) {
    throw new CurveError(`curve has unknown key(s) ${JSON.stringify(unknown)}; allowed: ${JSON.stringify([...KEYS].sort())}`);
  }
  if (!("version" in data)) throw new CurveError(`curve needs "version": ${CURVE_VERSION}`);
  if (!isNumber(data.version) || data.version !== CURVE_VERSION) {
    throw new CurveError(`unknown curve version ${JSON.stringify(data.version)}; this KeyFace reads version ${CURVE_VERSION}`);
  }
  for (const key of ["valence", "arousal"]) {
    if (!(key in data)) throw new CurveError(`curve needs a "${key}" list of [t, value] points`);
  }
  const interpolation = "interpolation" in data ? data.interpolation : DEFAULT_INTERPOLATION;
  if (!INTERPOLATIONS.includes(interpolation)) {
    throw new CurveError(`unknown interpolation ${JSON.stringify(interpolation)}; expected one of ${JSON.stringify(INTERPOLATIONS)}`);
  }
  const warnings = [];
  const valence = parseSeries("valence", data.valence, warnings);
  const arousal = parseSeries("arousal", data.arousal, warnings);
  return { version: CURVE_VERSION, valence, arousal, interpolation, warnings };
}

// Fritsch-Carlson tangents (same as keyface.emotion._monotone_tangents).
export function monotoneTangents(xs, ys) {
  const n = xs.length;
  if (n < 2) return new Array(n).fill(0);
  const d = [];
  for (let k = 0; k < n - 1; k++) d.push((ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k]));
  const m = new Array(n).fill(0);
  m[0] = d[0];
  m[n - 1] = d[n - 2];
  for (let k = 1; k < n - 1; k++) m[k] = d[k - 1] * d[k] > 0 ? (d[k - 1] + d[k]) / 2.0 : 0.0;
  for (let k = 0; k < n - 1; k++) {
    if (d[k] === 0) {
      m[k] = 0.0;
      m[k + 1] = 0.0;
      continue;
    }
    const a = m[k] / d[k];
    const b = m[k + 1] / d[k];
    const s = a * a + b * b;
    if (s > 9.0) {
      const tau = 3.0 / Math.sqrt(s);
      m[k] = tau * a * d[k];
      m[k + 1] = tau * b * d[k];
    }
  }
  return m;
}

function segment(xs, t) {
  let lo = 0;
  let hi = xs.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Sample one series of [t, value] points at `times`.
export function samplePoints(points, times, interpolation = DEFAULT_INTERPOLATION) {
  if (!INTERPOLATIONS.includes(interpolation)) throw new CurveError(`unknown interpolation ${interpolation}`);
  if (!points.length) throw new CurveError("cannot sample an empty list of points");
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const n = xs.length;
  const m = interpolation === "monotone" ? monotoneTangents(xs, ys) : null;
  return times.map((t) => {
    if (t <= xs[0] || n === 1) return ys[0];
    if (t >= xs[n - 1]) return ys[n - 1];
    const k = segment(xs, t);
    const h = xs[k + 1] - xs[k];
    const s = (t - xs[k]) / h;
    if (m === null) return ys[k] + (ys[k + 1] - ys[k]) * s;
    const s2 = s * s;
    const s3 = s2 * s;
    const h00 = 2 * s3 - 3 * s2 + 1;
    const h10 = s3 - 2 * s2 + s;
    const h01 = -2 * s3 + 3 * s2;
    const h11 = s3 - s2;
    return h00 * ys[k] + h10 * h * m[k] + h01 * ys[k + 1] + h11 * h * m[k + 1];
  });
}

// Both series at `times`; `intensity` scales around neutral, then values are clamped to [-1, 1].
export function sampleCurve(curve, times, intensity = 1.0) {
  const f = (pts) => samplePoints(pts, times, curve.interpolation).map((x) => clamp(x * intensity));
  return { valence: f(curve.valence), arousal: f(curve.arousal) };
}

export function lastTime(curve) {
  return Math.max(curve.valence[curve.valence.length - 1][0], curve.arousal[curve.arousal.length - 1][0]);
}

export function constantCurve(name, interpolation = DEFAULT_INTERPOLATION) {
  const va = NAMED_EMOTIONS[name];
  if (!va) throw new CurveError(`unknown emotion ${name}`);
  return { version: CURVE_VERSION, valence: [[0, va[0]]], arousal: [[0, va[1]]], interpolation, warnings: [] };
}

function round(x, digits) {
  const f = 10 ** digits;
  const r = Math.round(x * f) / f;
  return Object.is(r, -0) ? 0 : r;
}

export const TIME_STEP = 0.001; // serialized times are whole milliseconds

// Times of one series rounded to whole ms and kept strictly increasing: points closer than 1 ms (only
// typed text can hold them) would round onto the same ms, which both parsers refuse as a duplicate, so
// such a point moves to 1 ms after its predecessor.
function serializedTimes(list) {
  let prev = -Infinity;
  return list.map(([t]) => {
    let r = round(t, 3);
    if (r <= prev) r = round(prev + TIME_STEP, 3);
    prev = r;
    return r;
  });
}

// Canonical JSON text of a curve (key order fixed, t in whole ms, strictly increasing, values to 1e-4).
// The text always parses (here and in keyface/emotion.py) to the same number of points.
export function serializeCurve(curve) {
  const pts = (list) => {
    const ts = serializedTimes(list);
    return list.map(([, v], i) => [ts[i], round(v, 4)]);
  };
  return JSON.stringify({
    version: CURVE_VERSION,
    valence: pts(curve.valence),
    arousal: pts(curve.arousal),
    interpolation: curve.interpolation,
  });
}

// Values at video frames as the sampler gets them (keyface.emotion.per_frame_emotion(curve, n, fps,
// intensity)[frames]): frame i at t = i / fps, `intensity` applied, then clamped. `fps` has no default:
// the editor passes the rate the server serves (keyface.planner.FPS), never a copy of the number.
// Returns {valence, arousal}, one value per entry of `frames` (float64).
export function sampleFrames(curve, frames, fps, intensity = 1.0) {
  if (!(fps > 0)) throw new CurveError(`fps must be > 0, got ${fps}`);
  for (const i of frames) {
    if (!Number.isInteger(i) || i < 0) throw new CurveError(`frame indices must be integers >= 0, got ${i}`);
  }
  return sampleCurve(curve, frames.map((i) => i / fps), intensity);
}

// ---- editing helpers (pure; return new arrays) -------------------------------------------------

// Insert [t, v], or replace the value of a point closer than `tol` seconds. Returns {points, index}.
export function upsertPoint(points, t, v, tol = 1e-3) {
  const out = points.map((p) => [p[0], p[1]]);
  v = clamp(v);
  t = Math.max(0, t);
  for (let i = 0; i < out.length; i++) {
    if (Math.abs(out[i][0] - t) < tol) {
      out[i][1] = v;
      return { points: out, index: i };
    }
  }
  let i = 0;
  while (i < out.length && out[i][0] < t) i++;
  out.splice(i, 0, [t, v]);
  return { points: out, index: i };
}

// Move point i to (t, v), keeping times strictly increasing with at least `gap` seconds between
// neighbours, t >= 0 and v in [-1, 1]. Returns the new points array.
// Neighbours closer than the gap allows (typed text) shrink the gap, so the point still lands strictly
// between them (or between 0 and the second point) instead of onto a neighbour.
export function movePoint(points, i, t, v, gap = 0.01) {
  const out = points.map((p) => [p[0], p[1]]);
  const prev = i > 0 ? out[i - 1][0] : null;
  const next = i < out.length - 1 ? out[i + 1][0] : null;
  if (next !== null) gap = Math.min(gap, prev !== null ? (next - prev) / 2 : next);
  const lo = prev !== null ? prev + gap : 0;
  const hi = next !== null ? next - gap : Infinity;
  out[i] = [Math.min(Math.max(t, lo), hi), clamp(v)];
  return out;
}

export function removePoint(points, i) {
  if (points.length <= 1) throw new CurveError("a curve needs at least one point");
  return points.filter((_, k) => k !== i);
}
