// KeyFace emotion curve editor: a DOM widget on the "KeyFace Emotion" node.
//
// The node's STRING input `curve` holds the versioned curve JSON (see js/curve_math.js). This editor
// draws valence and arousal over time and writes every edit back into that STRING widget, so the
// workflow JSON and the API prompt carry one plain string. The editor widget itself is never
// serialized. The JSON text is shown in the editor's own textarea (toggle "{ }"): the native `curve`
// textarea stays hidden, because the Vue renderer (Nodes 2.0) draws its own copy of it that an
// extension can neither hide nor size on every frontend version. Text typed in ours is written to the
// widget and re-renders the editor.
//
// Mouse: click a point to select it, drag to move it; double-click empty space to add a point to the
// active curve (the V/A button); right-click a point to delete it; click or drag in the time ruler
// (bottom strip) or on empty space to move the playhead. Keys while the editor has focus: Delete or
// Backspace removes the selected point, Ctrl+Z undoes, arrows nudge the point (Shift: finer), Escape
// deselects. The preset menu drops a named emotion (both curves) at the playhead.
//
// The status line shows the clip duration ("audio" when it comes from the connected audio, "duration
// hint" when from that widget), the playhead and the values the sampler gets at the playhead's frame
// (intensity applied); an invalid curve text shows its error there, in red.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  CurveError,
  NAMED_EMOTIONS,
  constantCurve,
  lastTime,
  movePoint,
  parseCurve,
  removePoint,
  sampleFrames,
  samplePoints,
  serializeCurve,
  upsertPoint,
} from "./curve_math.js";

const NODE_CLASS = "KeyFaceEmotion";
const WIDGET_NAME = "keyface_emotion_editor";
const CUSTOM = "custom curve";
const SERIES = ["valence", "arousal"];
const COLOR = { valence: "#f2a93b", arousal: "#4fb3ff" };
const LABEL = { valence: "valence", arousal: "arousal" };
const MARGIN = { left: 30, right: 10, top: 8, bottom: 18 };
const HIT_RADIUS = 8;
const MIN_GAP = 0.01; // seconds between neighbouring points
const UNDO_LIMIT = 100;
const EDITOR_MIN_HEIGHT = 200;
const TEXT_HEIGHT = 64; // the JSON textarea, when shown
const POLL_MS = 250; // the Vue renderer never calls onDrawForeground: poll what the editor follows
// The `curve` input's option that carries the sampler's frame rate (nodes/emotion.py FPS_OPTION, from
// keyface.planner.FPS): the status shows the values of the playhead's frame at that rate.
const FPS_OPTION = "keyface_fps";

function injectStyle() {
  if (document.getElementById("keyface-emotion-style")) return;
  const style = document.createElement("style");
  style.id = "keyface-emotion-style";
  style.textContent = `
.keyface-emotion-editor { display:flex; flex-direction:column; width:100%; height:100%; box-sizing:border-box;
  font: 11px sans-serif; color: var(--input-text, #ddd); user-select:none; gap:3px; min-height:160px; }
.keyface-emotion-editor .kf-bar { display:flex; gap:3px; align-items:center; flex-wrap:nowrap; overflow:hidden; }
.keyface-emotion-editor button, .keyface-emotion-editor select { font: 11px sans-serif; height:20px; padding:0 5px;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); border:1px solid var(--border-color, #555);
  border-radius:4px; cursor:pointer; white-space:nowrap; }
.keyface-emotion-editor button:hover, .keyface-emotion-editor select:hover { border-color:#888; }
.keyface-emotion-editor button:disabled { opacity:0.4; cursor:default; }
.keyface-emotion-editor select.kf-preset { flex:1 1 auto; min-width:40px; }
.keyface-emotion-editor .kf-series-valence { color:${COLOR.valence}; }
.keyface-emotion-editor .kf-series-arousal { color:${COLOR.arousal}; }
.keyface-emotion-editor .kf-plot { position:relative; flex:1 1 auto; min-height:80px; }
.keyface-emotion-editor canvas { position:absolute; inset:0; width:100%; height:100%; display:block;
  border-radius:4px; touch-action:none; outline:none; }
.keyface-emotion-editor .kf-keys { position:absolute; width:1px; height:1px; opacity:0; pointer-events:none;
  left:0; top:0; border:0; padding:0; }
.keyface-emotion-editor .kf-status { height:14px; line-height:14px; overflow:hidden; white-space:nowrap;
  text-overflow:ellipsis; opacity:0.85; }
.keyface-emotion-editor .kf-status.kf-error { color:#ff6b6b; opacity:1; }
.keyface-emotion-editor textarea.keyface-emotion-curve-text { flex:0 0 ${TEXT_HEIGHT}px; height:${TEXT_HEIGHT}px;
  box-sizing:border-box; resize:none; font: 10px monospace; background: var(--comfy-input-bg, #222);
  color: var(--input-text, #ddd); border:1px solid var(--border-color, #555); border-radius:4px; padding:3px; }
.keyface-emotion-editor.kf-text-hidden textarea.keyface-emotion-curve-text { display:none; }
.keyface-emotion-editor.kf-focus canvas { box-shadow: 0 0 0 1px #6a9fd8; }
`;
  document.head.appendChild(style);
}

function niceStep(range, pixels, minPx) {
  const steps = [0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600];
  for (const s of steps) if ((s / range) * pixels >= minPx) return s;
  return steps[steps.length - 1];
}

function fmt(x, digits = 2) {
  return Number(x).toFixed(digits);
}

// The frame rate the server serves with the node definition, or null (then the status has no frame
// readout: guessing a rate would show values of the wrong frame).
function servedFps(nodeData) {
  const fps = nodeData?.input?.required?.curve?.[1]?.[FPS_OPTION];
  if (typeof fps === "number" && Number.isFinite(fps) && fps > 0) return fps;
  console.error(`KeyFace Emotion: the node definition has no valid '${FPS_OPTION}' on its 'curve' input ` +
    `(got ${JSON.stringify(fps)}); the editor shows no frame values. Is the KeyFace pack's Python side the ` +
    `same version as its frontend files?`);
  return null;
}

class EmotionEditor {
  // fps: the sampler's frame rate as served by the node definition, or null (no frame readout)
  constructor(node, fps) {
    this.node = node;
    this.fps = fps;
    this.curveWidget = node.widgets.find((w) => w.name === "curve");
    this.emotionWidget = node.widgets.find((w) => w.name === "emotion");
    this.scheduleWidget = node.widgets.find((w) => w.name === "schedule");
    this.durationWidget = node.widgets.find((w) => w.name === "duration_hint");
    this.intensityWidget = node.widgets.find((w) => w.name === "intensity");
    this.curve = constantCurve("neutral");
    this.lastText = null;
    this.error = null;
    this.undoStack = [];
    this.selected = null; // {series, index}
    this.hover = null;
    this.active = "valence";
    this.playhead = 0;
    this.executedDuration = null; // seconds of the connected audio, reported by the last run
    this.audioDuration = null; // seconds of the LoadAudio file, read from its metadata
    this.audioKey = undefined;
    this.drag = null; // {kind: "point"|"playhead", series, index, moved, axisEnd}
    this.message = null;
    this.writing = false;
    this.buildDom();
    this.syncFromWidget(true);
  }

  // Every selection change refreshes the toolbar (the delete button follows the selection).
  get selected() {
    return this._selected;
  }

  set selected(sel) {
    this._selected = sel;
    this.refreshToolbar();
  }

  // ---------------------------------------------------------------------------------------- DOM
  buildDom() {
    injectStyle();
    const root = document.createElement("div");
    // widget-expands: the Vue renderer of frontend 1.32 lets a widget row holding this class take the
    // node's spare height (the plot then follows node resizes there too)
    root.className = "keyface-emotion-editor widget-expands";
    const bar = document.createElement("div");
    bar.className = "kf-bar";
    const button = (text, title, onClick, cls) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = text;
      b.title = title;
      if (cls) b.className = cls;
      b.addEventListener("click", (e) => {
        e.stopPropagation();
        onClick();
      });
      bar.appendChild(b);
      return b;
    };
    this.seriesButton = button("", "Curve that double-click adds points to (valence / arousal)", () => {
      this.active = this.active === "valence" ? "arousal" : "valence";
      this.refreshToolbar();
      this.draw();
    });
    const preset = document.createElement("select");
    preset.title = "Drop a named emotion (valence and arousal) at the playhead";
    preset.className = "kf-preset";
    const first = document.createElement("option");
    first.value = "";
    first.textContent = "preset @ playhead";
    preset.appendChild(first);
    for (const [name, [v, a]] of Object.entries(NAMED_EMOTIONS)) {
      const o = document.createElement("option");
      o.value = name;
      o.textContent = `${name} (${v}, ${a})`;
      preset.appendChild(o);
    }
    preset.addEventListener("change", () => {
      if (preset.value) this.dropPreset(preset.value);
      preset.value = "";
    });
    bar.appendChild(preset);
    this.presetSelect = preset;
    this.interpButton = button("", "Interpolation between points: monotone cubic or linear", () => this.toggleInterpolation());
    this.undoButton = button("↶ undo", "Undo the last edit (Ctrl+Z)", () => this.undo());
    this.deleteButton = button("✕", "Delete the selected point (Delete / Backspace / right-click)", () => this.deleteSelected());
    this.jsonButton = button("{ }", "Show or hide the curve JSON text", () => this.toggleText());

    const plot = document.createElement("div");
    plot.className = "kf-plot";
    const canvas = document.createElement("canvas");
    canvas.className = "kf-canvas";
    plot.appendChild(canvas);
    // Keyboard sink: a focused <input> keeps ComfyUI's global shortcuts (graph undo, delete node)
    // away from keys meant for the editor.
    const keys = document.createElement("input");
    keys.className = "kf-keys";
    keys.readOnly = true;
    keys.setAttribute("aria-label", "KeyFace emotion curve editor");
    plot.appendChild(keys);
    const status = document.createElement("div");
    status.className = "kf-status";
    const text = document.createElement("textarea");
    text.className = "keyface-emotion-curve-text";
    text.spellcheck = false;
    text.title = "The curve JSON (what the node receives); typing here re-renders the editor";
    text.addEventListener("input", () => this.onTextInput());

    root.append(bar, plot, status, text);
    this.root = root;
    this.text = text;
    this.canvas = canvas;
    this.keys = keys;
    this.status = status;

    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointerleave", () => {
      if (!this.drag && this.hover) {
        this.hover = null;
        this.draw();
      }
    });
    canvas.addEventListener("mousedown", (e) => {
      if (e.button === 0 || e.button === 2) {
        e.preventDefault(); // keep the focus on the key sink, no text selection
        keys.focus({ preventScroll: true });
      }
    });
    canvas.addEventListener("dblclick", (e) => this.onDoubleClick(e));
    canvas.addEventListener("contextmenu", (e) => this.onContextMenu(e));
    canvas.addEventListener("wheel", (e) => {
      // zoom/pan the graph as over any other widget
      e.preventDefault();
      app.canvas?.processMouseWheel?.(e);
    }, { passive: false });
    keys.addEventListener("keydown", (e) => this.onKeyDown(e));
    keys.addEventListener("focus", () => root.classList.add("kf-focus"));
    keys.addEventListener("blur", () => root.classList.remove("kf-focus"));
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.draw());
      this.resizeObserver.observe(plot);
    }
    this.refreshToolbar();
  }

  destroy() {
    this.resizeObserver?.disconnect();
    clearInterval(this.pollTimer);
  }

  // Keeps the editor in step with what it follows (the curve text, the audio source, its size) in
  // every renderer; the classic one also calls it from onDrawForeground.
  poll() {
    if (!this.root.isConnected) return;
    if (!this.writing) this.syncFromWidget();
    this.refreshAudioSource();
    this.checkSize();
  }

  onTextInput() {
    const text = this.text.value;
    this.writing = true;
    try {
      if (this.curveWidget) this.curveWidget.value = text;
    } finally {
      this.writing = false;
    }
    this.adoptText(text);
    this.clampSelection();
    this.refreshToolbar();
    this.draw();
    this.node.setDirtyCanvas?.(true, true);
  }

  // ----------------------------------------------------------------------------- widget <-> curve
  // Hold exactly what ``text`` says; on a parse error keep the last curve and show the error.
  adoptText(text) {
    this.lastText = text;
    if (this.text && this.text.value !== text) this.text.value = text;
    try {
      this.curve = parseCurve(text);
      this.error = null;
    } catch (e) {
      this.error = e instanceof CurveError ? e.message : String(e);
    }
  }

  syncFromWidget(force = false) {
    const text = this.curveWidget?.value ?? "";
    if (!force && text === this.lastText) return;
    this.adoptText(text);
    this.clampSelection();
    this.refreshToolbar();
    this.draw();
  }

  writeWidget() {
    const text = serializeCurve(this.curve);
    // Re-read it: serializing rounds and may space points 1 ms apart, and text the node would
    // refuse must show as an error, not be written silently.
    this.adoptText(text);
    if (this.curveWidget) {
      this.writing = true;
      try {
        this.curveWidget.value = text;
      } finally {
        this.writing = false;
      }
    }
    if (this.emotionWidget && this.emotionWidget.value !== CUSTOM) {
      // drawing a curve means using it
      this.emotionWidget.value = CUSTOM;
      this.message = "emotion switched to 'custom curve'";
    }
    this.node.setDirtyCanvas?.(true, true);
    this.node.graph?.setDirtyCanvas?.(true, true);
  }

  pushUndo(text) {
    this.undoStack.push(text);
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
  }

  undo() {
    const text = this.undoStack.pop();
    if (text === undefined) {
      this.message = "nothing to undo";
      this.draw();
      return;
    }
    this.curve = parseCurve(text);
    this.clampSelection();
    this.writeWidget();
    this.message = "undone";
    this.refreshToolbar();
    this.draw();
  }

  edit(fn) {
    // apply fn() to this.curve as one undoable step; fn returns false to cancel
    if (this.error) {
      // never overwrite text the user is still typing with the last valid curve
      this.message = "fix the JSON text first";
      this.draw();
      return;
    }
    const before = serializeCurve(this.curve);
    const ok = fn();
    if (ok === false) return;
    if (serializeCurve(this.curve) === before) return;
    this.pushUndo(before);
    this.writeWidget();
    this.refreshToolbar();
    this.draw();
  }

  clampSelection() {
    if (this.selected && this.selected.index >= this.curve[this.selected.series].length) this.selected = null;
  }

  // ------------------------------------------------------------------------------------ actions
  dropPreset(name) {
    const va = NAMED_EMOTIONS[name];
    if (!va) return;
    const t = Math.round(this.playhead * 1000) / 1000;
    this.edit(() => {
      SERIES.forEach((s, k) => {
        const r = upsertPoint(this.curve[s], t, va[k], MIN_GAP / 2);
        this.curve[s] = r.points;
        if (s === this.active) this.selected = { series: s, index: r.index };
      });
    });
    this.message = `${name} at ${fmt(t)} s`;
    this.draw();
  }

  toggleInterpolation() {
    this.edit(() => {
      this.curve.interpolation = this.curve.interpolation === "monotone" ? "linear" : "monotone";
    });
  }

  deleteSelected() {
    if (!this.selected) {
      this.message = "select a point first";
      this.draw();
      return;
    }
    const { series, index } = this.selected;
    if (this.curve[series].length <= 1) {
      this.message = `${series} needs at least one point`;
      this.draw();
      return;
    }
    this.edit(() => {
      this.curve[series] = removePoint(this.curve[series], index);
      this.selected = null;
    });
  }

  get textVisible() {
    return !this.root.classList.contains("kf-text-hidden");
  }

  // Hidden, the text's height goes to the plot; shown again, the node grows only if it must.
  toggleText() {
    this.root.classList.toggle("kf-text-hidden");
    this.refreshToolbar();
    const min = this.node.computeSize?.();
    if (min && min[1] > this.node.size[1]) this.node.setSize?.([this.node.size[0], min[1]]);
    this.node.setDirtyCanvas?.(true, true);
    requestAnimationFrame(() => this.draw());
  }

  refreshToolbar() {
    if (!this.seriesButton) return;
    this.seriesButton.textContent = this.active === "valence" ? "✎ valence" : "✎ arousal";
    this.seriesButton.className = `kf-series-${this.active}`;
    this.interpButton.textContent = this.curve.interpolation;
    this.undoButton.disabled = this.undoStack.length === 0;
    this.deleteButton.disabled = !this.selected;
    this.jsonButton.textContent = this.textVisible ? "{ } hide" : "{ } show";
  }

  // ------------------------------------------------------------------------------------- geometry
  // {seconds, source} of the clip: the connected audio (after a run, or read from the LoadAudio file),
  // else the duration_hint widget; null when neither is known.
  knownDuration() {
    if (this.executedDuration > 0) return { seconds: this.executedDuration, source: "audio" };
    if (this.audioDuration > 0) return { seconds: this.audioDuration, source: "audio" };
    const hint = Number(this.durationWidget?.value);
    if (hint > 0) return { seconds: hint, source: "duration hint" };
    return null;
  }

  intensity() {
    const g = Number(this.intensityWidget?.value);
    return Number.isFinite(g) ? Math.min(Math.max(g, 0), 2) : 1;
  }

  // When `audio` comes straight from a LoadAudio-like node, read the file's duration from its metadata
  // (the browser fetches only the header) so the time axis fits the clip before anything runs.
  refreshAudioSource() {
    const src = this.audioSourceNode();
    const name = src?.widgets?.find((w) => w.name === "audio")?.value;
    const key = typeof name === "string" && name ? name : null;
    if (key === this.audioKey) return;
    this.audioKey = key;
    this.audioDuration = null;
    this.executedDuration = null;
    if (!key) {
      this.draw();
      return;
    }
    const cut = key.lastIndexOf("/");
    const params = new URLSearchParams({
      filename: cut >= 0 ? key.slice(cut + 1) : key,
      subfolder: cut >= 0 ? key.slice(0, cut) : "",
      type: "input",
    });
    const el = new Audio();
    el.preload = "metadata";
    el.addEventListener("loadedmetadata", () => {
      if (this.audioKey === key && Number.isFinite(el.duration)) {
        this.audioDuration = el.duration;
        this.draw();
      }
      el.removeAttribute("src");
    }, { once: true });
    el.src = api.apiURL(`/view?${params}`);
  }

  // The node feeding `audio`, or null. getInputLink is the frontend's API for this (reading
  // input.link directly is deprecated on frontend 1.58); older frontends without it fall back.
  audioSourceNode() {
    const node = this.node;
    const slot = node.inputs?.findIndex((i) => i.name === "audio") ?? -1;
    if (slot < 0) return null;
    let link;
    if (typeof node.getInputLink === "function") {
      link = node.getInputLink(slot);
    } else {
      const id = node.inputs[slot].link;
      link = id != null ? node.graph?.links?.[id] : null;
    }
    return link ? node.graph?.getNodeById(link.origin_id) ?? null : null;
  }

  axisEnd() {
    if (this.drag?.axisEnd) return this.drag.axisEnd;
    const last = lastTime(this.curve);
    const d = this.knownDuration()?.seconds;
    if (d) return Math.max(d, last + 0.25 * (last > d ? 1 : 0), this.playhead);
    return Math.max(4, Math.ceil(last * 1.2 + 0.5), Math.ceil(this.playhead));
  }

  layout() {
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    const x0 = MARGIN.left;
    const x1 = Math.max(x0 + 10, w - MARGIN.right);
    const y0 = MARGIN.top;
    const y1 = Math.max(y0 + 10, h - MARGIN.bottom);
    const T = this.axisEnd();
    return {
      w, h, x0, x1, y0, y1, T,
      tx: (t) => x0 + (t / T) * (x1 - x0),
      vy: (v) => y0 + ((1 - v) / 2) * (y1 - y0),
      xt: (x) => ((x - x0) / (x1 - x0)) * T,
      yv: (y) => 1 - (2 * (y - y0)) / (y1 - y0),
    };
  }

  eventPos(e) {
    // layout (unscaled CSS px) coordinates: the widget is scaled with the canvas zoom by a CSS transform
    const r = this.canvas.getBoundingClientRect();
    const sx = r.width ? this.canvas.clientWidth / r.width : 1;
    const sy = r.height ? this.canvas.clientHeight / r.height : 1;
    return { x: (e.clientX - r.left) * sx, y: (e.clientY - r.top) * sy };
  }

  hitTest(p, L) {
    let best = null;
    let bestD = HIT_RADIUS;
    const order = this.active === "valence" ? ["valence", "arousal"] : ["arousal", "valence"];
    for (const s of order) {
      this.curve[s].forEach(([t, v], i) => {
        const d = Math.hypot(L.tx(t) - p.x, L.vy(v) - p.y);
        if (d < bestD - 0.5) {
          bestD = d;
          best = { series: s, index: i };
        }
      });
    }
    return best;
  }

  // ------------------------------------------------------------------------------------- pointer
  onPointerDown(e) {
    if (e.button === 1) {
      app.canvas?.processMouseDown?.(e); // middle button pans the graph
      return;
    }
    if (e.button !== 0) return;
    e.stopPropagation();
    const L = this.layout();
    const p = this.eventPos(e);
    this.message = null;
    if (this.error) {
      this.message = "fix the JSON text first (or undo)";
      this.draw();
      return;
    }
    const hit = p.y <= L.y1 ? this.hitTest(p, L) : null;
    this.canvas.setPointerCapture?.(e.pointerId);
    if (hit) {
      this.selected = hit;
      this.active = hit.series;
      this.drag = { kind: "point", ...hit, moved: false, before: serializeCurve(this.curve), axisEnd: L.T };
    } else {
      if (p.y <= L.y1) this.selected = null;
      this.drag = { kind: "playhead", axisEnd: L.T };
      this.playhead = Math.max(0, Math.min(L.T, L.xt(p.x)));
    }
    this.refreshToolbar();
    this.draw();
  }

  onPointerMove(e) {
    if (e.buttons & 4) {
      app.canvas?.processMouseMove?.(e);
      return;
    }
    const L = this.layout();
    const p = this.eventPos(e);
    if (!this.drag) {
      const h = p.y <= L.y1 ? this.hitTest(p, L) : null;
      const changed = JSON.stringify(h) !== JSON.stringify(this.hover);
      this.hover = h;
      this.canvas.style.cursor = h ? "grab" : p.y > L.y1 ? "col-resize" : "crosshair";
      if (changed) this.draw();
      return;
    }
    e.stopPropagation();
    if (this.drag.kind === "playhead") {
      this.playhead = Math.max(0, Math.min(L.T, L.xt(p.x)));
      this.draw();
      return;
    }
    const { series, index } = this.drag;
    const t = Math.round(L.xt(p.x) * 1000) / 1000;
    const v = Math.round(L.yv(p.y) * 1000) / 1000;
    this.curve[series] = movePoint(this.curve[series], index, t, v, MIN_GAP);
    this.drag.moved = true;
    this.canvas.style.cursor = "grabbing";
    this.writeWidget();
    this.draw();
  }

  onPointerUp(e) {
    if (e.button === 1) {
      app.canvas?.processMouseUp?.(e);
      return;
    }
    if (!this.drag) return;
    const d = this.drag;
    this.drag = null;
    this.canvas.releasePointerCapture?.(e.pointerId);
    if (d.kind === "point" && d.moved && d.before !== serializeCurve(this.curve)) this.pushUndo(d.before);
    this.refreshToolbar();
    this.draw();
  }

  onDoubleClick(e) {
    e.preventDefault();
    e.stopPropagation();
    if (this.error) return;
    const L = this.layout();
    const p = this.eventPos(e);
    if (p.y > L.y1 || p.x < L.x0 - 4 || p.x > L.x1 + 4) return;
    if (this.hitTest(p, L)) return;
    const s = this.active;
    const t = Math.round(Math.max(0, L.xt(p.x)) * 1000) / 1000;
    const v = Math.round(L.yv(p.y) * 1000) / 1000;
    this.edit(() => {
      const r = upsertPoint(this.curve[s], t, v, MIN_GAP / 2);
      this.curve[s] = r.points;
      this.selected = { series: s, index: r.index };
    });
  }

  onContextMenu(e) {
    e.preventDefault();
    e.stopPropagation();
    const L = this.layout();
    const hit = this.hitTest(this.eventPos(e), L);
    if (!hit) return;
    this.selected = hit;
    this.deleteSelected();
  }

  onKeyDown(e) {
    const ctrl = e.ctrlKey || e.metaKey;
    let handled = true;
    if (ctrl && (e.key === "z" || e.key === "Z") && !e.shiftKey) {
      this.undo();
    } else if (e.key === "Delete" || e.key === "Backspace") {
      this.deleteSelected();
    } else if (e.key === "Escape") {
      this.selected = null;
      this.refreshToolbar();
      this.draw();
    } else if (this.selected && e.key.startsWith("Arrow")) {
      const { series, index } = this.selected;
      const dt = e.shiftKey ? 0.01 : 0.05;
      const dv = e.shiftKey ? 0.01 : 0.05;
      const [t, v] = this.curve[series][index];
      const nt = e.key === "ArrowLeft" ? t - dt : e.key === "ArrowRight" ? t + dt : t;
      const nv = e.key === "ArrowUp" ? v + dv : e.key === "ArrowDown" ? v - dv : v;
      this.edit(() => {
        this.curve[series] = movePoint(this.curve[series], index, Math.round(nt * 1000) / 1000,
          Math.round(nv * 1000) / 1000, MIN_GAP);
      });
    } else {
      handled = false;
    }
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  // ---------------------------------------------------------------------------------------- draw
  // Backing-store size {w, h} that is sharp on screen: layout size x device pixels x canvas zoom
  // (the widget is zoomed by a CSS transform). null while the canvas has no layout size.
  backingSize() {
    const c = this.canvas;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (!w || !h) return null;
    const r = c.getBoundingClientRect();
    const zoom = r.width ? r.width / w : 1;
    const scale = (window.devicePixelRatio || 1) * Math.max(0.25, Math.min(zoom, 4));
    return { w: Math.max(1, Math.round(w * scale)), h: Math.max(1, Math.round(h * scale)) };
  }

  ensureBacking() {
    const c = this.canvas;
    const size = this.backingSize();
    if (!size) return null;
    if (c.width !== size.w || c.height !== size.h) {
      c.width = size.w;
      c.height = size.h;
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(size.w / c.clientWidth, 0, 0, size.h / c.clientHeight, 0, 0);
    return ctx;
  }

  // Called from the node's onDrawForeground: redraw when the on-screen size changed (zoom, resize).
  checkSize() {
    const c = this.canvas;
    if (!c.isConnected) return;
    const size = this.backingSize();
    if (size && (Math.abs(size.w - c.width) > 1 || Math.abs(size.h - c.height) > 1)) this.draw();
  }

  draw() {
    const ctx = this.ensureBacking();
    if (!ctx) return;
    const L = this.layout();
    const { w, h, x0, x1, y0, y1, T } = L;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#1b1b1f";
    ctx.fillRect(0, 0, w, h);

    // known clip duration: shade what lies after it
    const d = this.knownDuration()?.seconds;
    if (d && d < T) {
      ctx.fillStyle = "rgba(255,255,255,0.05)";
      ctx.fillRect(L.tx(d), y0, x1 - L.tx(d), y1 - y0);
    }

    // grid + labels
    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    const step = niceStep(T, x1 - x0, 42);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let t = 0; t <= T + 1e-9; t += step) {
      const x = Math.round(L.tx(t)) + 0.5;
      ctx.strokeStyle = "rgba(255,255,255,0.08)";
      ctx.beginPath();
      ctx.moveTo(x, y0);
      ctx.lineTo(x, y1);
      ctx.stroke();
      ctx.fillStyle = "#999";
      ctx.fillText(`${+t.toFixed(2)}s`, Math.min(Math.max(x, x0 + 8), x1 - 8), y1 + 3);
    }
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of [1, 0.5, 0, -0.5, -1]) {
      const y = Math.round(L.vy(v)) + 0.5;
      ctx.strokeStyle = v === 0 ? "rgba(255,255,255,0.35)" : "rgba(255,255,255,0.08)";
      ctx.setLineDash(v === 0 ? [4, 3] : []);
      ctx.beginPath();
      ctx.moveTo(x0, y);
      ctx.lineTo(x1, y);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#999";
      ctx.fillText(v === 0 ? "0" : String(v), x0 - 4, y);
    }
    ctx.strokeStyle = "rgba(255,255,255,0.2)";
    ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0 - 1, y1 - y0 - 1);

    // duration marker
    if (d) {
      const x = Math.round(L.tx(Math.min(d, T))) + 0.5;
      ctx.strokeStyle = "rgba(140,220,140,0.8)";
      ctx.beginPath();
      ctx.moveTo(x, y0);
      ctx.lineTo(x, y1);
      ctx.stroke();
    }

    // curves: inactive when the node uses a named emotion / schedule
    const mode = this.emotionWidget?.value ?? CUSTOM;
    const inactive = mode !== CUSTOM;
    ctx.globalAlpha = inactive ? 0.35 : 1;
    const n = Math.max(2, Math.ceil(x1 - x0));
    const times = Array.from({ length: n + 1 }, (_, i) => (i / n) * T);
    for (const s of this.active === "valence" ? ["arousal", "valence"] : ["valence", "arousal"]) {
      const ys = samplePoints(this.curve[s], times, this.curve.interpolation);
      ctx.strokeStyle = COLOR[s];
      ctx.lineWidth = s === this.active ? 2 : 1.5;
      ctx.beginPath();
      ys.forEach((v, i) => {
        const x = L.tx(times[i]);
        const y = L.vy(v);
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
      this.curve[s].forEach(([t, v], i) => {
        const sel = this.selected && this.selected.series === s && this.selected.index === i;
        const hov = this.hover && this.hover.series === s && this.hover.index === i;
        ctx.beginPath();
        ctx.arc(L.tx(t), L.vy(v), sel ? 5.5 : hov ? 5 : 4, 0, Math.PI * 2);
        ctx.fillStyle = sel ? "#fff" : COLOR[s];
        ctx.fill();
        ctx.lineWidth = sel ? 2 : 1;
        ctx.strokeStyle = sel ? COLOR[s] : "#111";
        ctx.stroke();
      });
    }
    ctx.globalAlpha = 1;

    // playhead
    const px = Math.round(L.tx(Math.min(this.playhead, T))) + 0.5;
    ctx.strokeStyle = "#e8e8e8";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(px, y0);
    ctx.lineTo(px, y1 + 4);
    ctx.stroke();
    ctx.fillStyle = "#e8e8e8";
    ctx.beginPath();
    ctx.moveTo(px - 4, y1 + 1);
    ctx.lineTo(px + 4, y1 + 1);
    ctx.lineTo(px, y1 + 6);
    ctx.fill();

    // legend
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.font = "10px sans-serif";
    let lx = x0 + 5;
    for (const s of SERIES) {
      ctx.fillStyle = COLOR[s];
      ctx.fillRect(lx, y0 + 6, 10, 2);
      ctx.fillText(LABEL[s], lx + 13, y0 + 2);
      lx += 13 + ctx.measureText(LABEL[s]).width + 10;
    }
    if (inactive) {
      const sched = (this.scheduleWidget?.value ?? "").trim();
      const text = sched ? `schedule in use: ${sched}` : `'${mode}' in use (edit the curve to use it)`;
      ctx.fillStyle = "rgba(255,255,255,0.75)";
      ctx.fillText(text, lx, y0 + 2);
    }
    this.updateStatus();
  }

  updateStatus() {
    const parts = [];
    const d = this.knownDuration();
    parts.push(d ? `${d.source} ${fmt(d.seconds)} s` : "duration unknown");
    parts.push(`playhead ${fmt(this.playhead)} s`);
    if ((this.emotionWidget?.value ?? CUSTOM) === CUSTOM && this.fps) {
      // what the sampler gets at the playhead's frame (intensity applied)
      const frame = Math.round(this.playhead * this.fps);
      const g = this.intensity();
      const at = sampleFrames(this.curve, [frame], this.fps, g);
      const scaled = g === 1 ? "" : ` (x${fmt(g)})`;
      parts.push(`frame ${frame}${scaled}: v ${fmt(at.valence[0])} a ${fmt(at.arousal[0])}`);
    }
    if (this.selected) {
      const [t, v] = this.curve[this.selected.series][this.selected.index] ?? [0, 0];
      parts.push(`${this.selected.series} #${this.selected.index + 1}: ${fmt(t)} s, ${fmt(v, 3)}`);
    }
    if ((this.emotionWidget?.value ?? CUSTOM) === CUSTOM && (this.scheduleWidget?.value ?? "").trim()) {
      // the node refuses a schedule beside the drawn curve (nodes/emotion.py build_curve): say so now
      parts.push("schedule is set: clear it, or pick a named emotion to use it");
    }
    if (this.curve.warnings?.length) parts.push(this.curve.warnings.join("; "));
    if (this.message) parts.push(this.message);
    this.status.classList.toggle("kf-error", !!this.error);
    this.status.textContent = this.error ? `JSON: ${this.error}` : parts.join(" · ");
    this.status.title = this.status.textContent;
  }

  onExecuted(message) {
    const info = message?.keyface_emotion?.[0];
    if (!info) return;
    // only the audio's length: a duration_hint is read live from its widget
    if (info.duration_source === "audio" && info.duration > 0) this.executedDuration = info.duration;
    if (info.warnings?.length) this.message = info.warnings.join("; ");
    this.draw();
  }
}

function chain(obj, name, fn) {
  const prev = obj[name];
  obj[name] = function (...args) {
    const r = prev?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

// The native `curve` textarea stays hidden in every renderer; the editor shows the text itself.
// `hidden` is what the classic canvas and frontend 1.58 read, `options.hidden` what the 1.32 Vue
// renderer reads; the element is hidden too where the frontend leaves it on the page. The classic
// canvas of 1.32 still hands a hidden DOM widget its share of the node's height unless computeSize
// says it takes none (LiteGraph adds 4 px of spacing to it).
function hideWidget(w) {
  w.hidden = true;
  w.computeSize = () => [0, -4];
  if (w.options) w.options.hidden = true;
  if (w.element) w.element.style.display = "none";
}

function attachEditor(node, fps) {
  if (node.keyfaceEmotionEditor) return node.keyfaceEmotionEditor;
  const editor = new EmotionEditor(node, fps);
  node.keyfaceEmotionEditor = editor;
  const widget = node.addDOMWidget(WIDGET_NAME, "keyface-emotion-curve", editor.root, {
    serialize: false, // never in the API prompt: the STRING `curve` carries the value
    getValue: () => editor.curveWidget?.value ?? "",
    setValue: () => {},
    getMinHeight: () => EDITOR_MIN_HEIGHT + (editor.textVisible ? TEXT_HEIGHT : 0),
  });
  widget.serialize = false; // nor in the workflow's widgets_values
  editor.widget = widget;

  // The STRING widget is the source of truth: re-render on any change (typing, loading, API).
  const cw = editor.curveWidget;
  if (cw) {
    chain(cw, "callback", () => {
      if (!editor.writing) editor.syncFromWidget();
    });
    hideWidget(cw);
  }
  for (const w of [editor.emotionWidget, editor.scheduleWidget, editor.durationWidget, editor.intensityWidget]) {
    if (w) chain(w, "callback", () => editor.draw());
  }
  chain(node, "onConfigure", () => editor.syncFromWidget(true));
  chain(node, "onExecuted", (message) => editor.onExecuted(message));
  chain(node, "onConnectionsChange", () => editor.refreshAudioSource());
  editor.pollTimer = setInterval(() => editor.poll(), POLL_MS);
  chain(node, "onDrawForeground", () => {
    // the graph redraws on zoom/pan/resize; keep the editor's backing store matched to the screen
    editor.poll();
    // the widget's CSS transform is updated after this draw: check again on the next frame
    if (!editor.sizeCheckPending) {
      editor.sizeCheckPending = true;
      requestAnimationFrame(() => {
        editor.sizeCheckPending = false;
        editor.checkSize();
      });
    }
  });
  chain(node, "onResize", () => requestAnimationFrame(() => editor.draw()));
  chain(node, "onRemoved", () => editor.destroy());
  const sz = node.computeSize();
  node.setSize([Math.max(node.size[0], 420, sz[0]), Math.max(node.size[1], sz[1])]);
  requestAnimationFrame(() => editor.draw());
  return editor;
}

app.registerExtension({
  name: "KeyFace.EmotionCurveEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;
    const fps = servedFps(nodeData);
    chain(nodeType.prototype, "onNodeCreated", function () {
      attachEditor(this, fps);
    });
  },
});

export { EmotionEditor, attachEditor };
