// KeyFace Save Video and KeyFace Long Render: their output is an mp4, so their preview is a video.
//
// The node returns {"images": [<mp4>], "animated": [true]}, like ComfyUI's own Save Video. Frontends
// decide how to preview such an output from the node, not from the file: the Nodes 2.0 renderer of
// frontend 1.32 shows a video only when node.previewMediaType is "video" or the node has a VIDEO
// input (ComfyUI's Save Video has one; ours takes latents), and otherwise loads the mp4 as an image
// ("Image failed to load / Invalid URL"). Declaring the media type fixes that and changes nothing
// where the frontend already recognises the mp4.

import { app } from "../../scripts/app.js";

const NODE_CLASSES = ["KeyFaceSaveVideo", "KeyFaceLongRender"]; // both return an mp4 as their preview

app.registerExtension({
  name: "KeyFace.SaveVideoPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_CLASSES.includes(nodeData?.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = created?.apply(this, args);
      this.previewMediaType = "video";
      return r;
    };
  },
});
