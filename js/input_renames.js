// KeyFace input renames: saved workflows that use an input's old name keep working.
//
// A workflow stores widget values by position (unaffected by a rename), but it also stores each
// widget's input slot by name ({"name": "ref_guidance", "widget": {"name": "ref_guidance"}, "link": 7}):
// a link into a renamed widget would land on a slot that no longer exists and be lost. Before such a
// node is configured from saved data, the old names are rewritten to the new ones.
//
// The node classes name these inputs in nodes/sampling.py; keep this table in step with it.

import { app } from "../../scripts/app.js";

export const INPUT_RENAMES = {
  KeyFaceSampleKeyframes: { ref_guidance: "reference_scale", audio_guidance: "audio_scale" },
  KeyFaceInterpolate: { guidance: "autoguidance_scale" },
};

// Rewrites old input names in a node's saved data (in place); returns how many it renamed.
export function migrateInputNames(nodeType, info) {
  const renames = INPUT_RENAMES[nodeType];
  if (!renames || !Array.isArray(info?.inputs)) return 0;
  let renamed = 0;
  for (const input of info.inputs) {
    const from = input?.name;
    const to = renames[from];
    if (!to) continue;
    input.name = to;
    if (input.widget?.name === from) input.widget.name = to;
    if (input.label === from) delete input.label; // a label the frontend copied from the old name
    renamed += 1;
  }
  return renamed;
}

app.registerExtension({
  name: "KeyFace.InputRenames",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const type = nodeData?.name;
    if (!INPUT_RENAMES[type]) return;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info, ...rest) {
      migrateInputNames(type, info);
      return configure.call(this, info, ...rest);
    };
  },
});
