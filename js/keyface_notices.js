// KeyFace notices: shows the server's "keyface.notice" websocket events (sent by nodes/_common.py
// notify(), e.g. "image holds 3 images; using the first one") as a toast, so a choice the nodes make
// for the user is seen in the UI and not only in the server log.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "keyface.notice";
const TOAST_LIFE_MS = 10000;

function showNotice({ severity = "warn", summary = "KeyFace", detail = "" } = {}) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity, summary, detail, life: TOAST_LIFE_MS });
  } else {
    console.warn(`${summary}: ${detail}`); // frontends without the toast API
  }
}

app.registerExtension({
  name: "KeyFace.Notices",
  setup() {
    api.addEventListener(EVENT, (event) => showNotice(event.detail));
  },
});
