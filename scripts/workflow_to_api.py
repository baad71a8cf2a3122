"""Convert a UI-format workflow (schema 0.4, as saved by the frontend) into an API prompt.

The frontend does this in ``graphToPrompt``; this is the same mapping for tests and scripts, driven
by ``/object_info``:

* every node with ``mode`` 0 becomes ``{"class_type", "inputs"}`` (muted = 2 and bypassed = 4 nodes are
  left out; a bypassed node's links are not followed through, so do not bypass in shipped workflows);
* linked inputs become ``[str(source_node_id), source_slot]``;
* ``widgets_values`` are assigned in widget order: the node's INT / FLOAT / STRING / BOOLEAN / COMBO
  inputs (required, then optional, in ``input_order`` when the server gives it), skipping
  ``forceInput`` ones. A widget converted to a socket keeps its slot in ``widgets_values``; the link
  wins. After a ``seed``-like INT (``control_after_generate``), the extra "fixed" / "increment" /
  "decrement" / "randomize" value is skipped. Trailing extras (the upload button of LoadImage /
  LoadAudio) are ignored.
* ``widgets_values`` given as a dict (some nodes save them by name) are used by name.

``python scripts/workflow_to_api.py WORKFLOW.json URL`` prints the API prompt.
"""

from __future__ import annotations

import json
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    if _options(spec).get("forceInput"):
        return False
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _has_control(name, spec) -> bool:
    opts = _options(spec)
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in ("seed", "noise_seed")


def widget_inputs(info: dict) -> list:
    """[(name, spec)] of a node's widget inputs in widget order, from its /object_info entry."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            spec = specs.get(name)
            if spec is not None and _is_widget(spec):
                out.append((name, spec))
    return out


def convert(workflow: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, src, slot = link["id"], link["origin_id"], link["origin_slot"]
        else:
            lid, src, slot = link[0], link[1], link[2]
        links[lid] = (src, slot)
    prompt = {}
    for nid, node in nodes.items():
        if node.get("mode", 0) != 0:
            continue
        ctype = node["type"]
        if ctype not in object_info:
            if ctype in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
                continue
            raise KeyError(f"node {nid}: type {ctype!r} is not known to the server")
        info = object_info[ctype]
        inputs = {}
        values = node.get("widgets_values", [])
        widgets = widget_inputs(info)
        if isinstance(values, dict):
            for name, _spec in widgets:
                if name in values:
                    inputs[name] = values[name]
        else:
            i = 0
            for name, spec in widgets:
                if i >= len(values):
                    break
                inputs[name] = values[i]
                i += 1
                if _has_control(name, spec) and i < len(values) and values[i] in CONTROL_VALUES:
                    i += 1
        for inp in node.get("inputs", []):
            lid = inp.get("link")
            if lid is None:
                continue
            src, slot = links[lid]
            if nodes[src].get("mode", 0) != 0:
                raise ValueError(f"node {nid} input {inp['name']!r} comes from muted/bypassed node {src}")
            inputs[inp["name"]] = [str(src), int(slot)]
        prompt[str(nid)] = {"class_type": ctype, "inputs": inputs}
    return prompt


def main(argv=None):
    import requests

    argv = sys.argv[1:] if argv is None else argv
    wf = json.load(open(argv[0], encoding="utf-8"))
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8188"
    info = requests.get(url.rstrip("/") + "/object_info", timeout=60).json()
    print(json.dumps(convert(wf, info), indent=1))


if __name__ == "__main__":
    main()
