// sam-drop-in serve: the page. Plain JavaScript, no build step, no network beyond this server.
// The server keeps one embedding per uploaded image (a session). Prompts are decoded either on
// the server (POST /api/predict) or here, by the exported ONNX decoder in onnxruntime-web over
// the embedding fetched once per image (as segment_anything's demo does); the toolbar switches.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  session: null, w: 0, h: 0,
  points: [], box: null, history: [],
  mask: null,            // {data: Uint8Array (h*w, row-major), score, area} of the prompt mask
  everything: null,      // records from /api/everything
  drag: null,            // {x0, y0, x1, y1, moved} while the mouse button is down
  hover: {inflight: false, pending: null, seq: 0},
  promptSeq: 0,
  inputSize: null,       // [h, w] of the image resized for the model (the decoder's point frame)
  decoder: "server",     // where prompts are decoded now: "server" or "browser"
  stats: {hoverMs: [], predictMs: []},
};
// The browser decoder: onnxruntime-web, the ONNX decoder session, the current image's embedding.
const B = {state: "off", note: "", ort: null, session: null, cfg: null, embedding: null, embeddingFor: null,
           loadingFor: null, threads: 1, zeros: null};
S.browser = B;
window.samPage = S;      // for the browser tests and for curious users

const imageCanvas = $("image"), overlay = $("overlay");
const maskCanvas = document.createElement("canvas");

function setState(state) { document.body.dataset.state = state; }
function status(text, busy) {
  $("status-text").textContent = text;
  $("progress").hidden = !busy;
}
function refreshButtons() {
  const ready = S.session !== null;
  $("undo").disabled = !ready || S.history.length === 0;
  $("clear").disabled = !ready || (S.points.length === 0 && !S.box && !S.everything);
  $("everything").disabled = !ready;
  $("download-png").disabled = !S.mask;
  $("download-json").disabled = !S.everything;
}

async function api(path, options) {
  const resp = await fetch(path, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* empty body (204) */ }
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}
const postJSON = (path, obj) =>
  api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(obj)});

// --- RLE decoding (pycocotools' formats: column-major runs, starting with background) ----------

function runsToMask(counts, h, w) {
  const out = new Uint8Array(h * w);
  let idx = 0, fg = false;
  for (const n of counts) {
    if (fg) {
      for (let j = idx; j < idx + n; j++) {
        const x = (j / h) | 0, y = j - x * h;
        out[y * w + x] = 1;
      }
    }
    idx += n; fg = !fg;
  }
  return out;
}

// The compressed string of COCO RLE (pycocotools' rleFrString): 5-bit groups, +48, with a
// continuation bit; counts after the second are stored as differences.
function cocoStringToCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function decodeRle(rle) {
  const [h, w] = rle.size;
  const counts = typeof rle.counts === "string" ? cocoStringToCounts(rle.counts) : rle.counts;
  return runsToMask(counts, h, w);
}

// --- drawing ------------------------------------------------------------------------------

function paintMasks(masks, colours) {
  maskCanvas.width = S.w; maskCanvas.height = S.h;
  const ctx = maskCanvas.getContext("2d");
  const img = ctx.createImageData(S.w, S.h);
  masks.forEach((m, i) => {
    const [r, g, b] = colours[i];
    for (let p = 0; p < m.length; p++) {
      if (m[p]) { const q = 4 * p; img.data[q] = r; img.data[q + 1] = g; img.data[q + 2] = b; img.data[q + 3] = 140; }
    }
  });
  ctx.putImageData(img, 0, 0);
}

function hsl(i) {
  // Golden-angle hues: neighbouring indices get clearly different colours.
  const hue = (i * 137.508) % 360, s = 0.75, l = 0.55;
  const f = (n) => { const k = (n + hue / 30) % 12; return l - s * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  return [Math.round(255 * f(0)), Math.round(255 * f(8)), Math.round(255 * f(4))];
}

function redraw() {
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  ctx.drawImage(maskCanvas, 0, 0);
  const r = Math.max(4, Math.round(Math.max(S.w, S.h) / 160));
  ctx.lineWidth = Math.max(2, r / 2);
  const box = S.drag && S.drag.moved ? [S.drag.x0, S.drag.y0, S.drag.x1, S.drag.y1] : S.box;
  if (box) {
    ctx.strokeStyle = "#00e5ff";
    ctx.strokeRect(Math.min(box[0], box[2]), Math.min(box[1], box[3]), Math.abs(box[2] - box[0]), Math.abs(box[3] - box[1]));
  }
  for (const p of S.points) {
    ctx.beginPath(); ctx.arc(p.x, p.y, r, 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? "#2ecc40" : "#ff4136"; ctx.fill();
    ctx.strokeStyle = "#fff"; ctx.stroke();
  }
}

function showPromptMask(mask) {
  S.mask = mask;
  paintMasks([S.mask.data], [[30, 144, 255]]);
  redraw();
  refreshButtons();
}

function clearMaskLayer() {
  S.mask = null;
  maskCanvas.width = S.w; maskCanvas.height = S.h;
  redraw();
  refreshButtons();
}

// --- image loading --------------------------------------------------------------------------

async function openImage(file) {
  if (!file) return;
  setState("embedding");
  S.session = null; S.points = []; S.box = null; S.history = []; S.everything = null; S.mask = null;
  refreshButtons();
  const t0 = performance.now();
  status(`Computing the embedding of ${file.name}…`, true);
  const timer = setInterval(() => status(`Computing the embedding of ${file.name}… ${((performance.now() - t0) / 1000).toFixed(1)} s`, true), 200);
  try {
    const info = await api("/api/embed", {method: "POST", headers: {"Content-Type": file.type || "application/octet-stream"}, body: file});
    const bitmap = await createImageBitmap(file);
    S.session = info.session_id; S.w = info.width; S.h = info.height; S.inputSize = info.input_size;
    B.embedding = null; B.embeddingFor = null;
    for (const c of [imageCanvas, overlay, maskCanvas]) { c.width = S.w; c.height = S.h; }
    imageCanvas.getContext("2d").drawImage(bitmap, 0, 0, S.w, S.h);
    $("stage").hidden = false; $("hint").hidden = true;
    clearMaskLayer();
    if (S.decoder === "browser") {
      status(`${file.name}: ${S.w}×${S.h}, embedding ${info.embed_seconds.toFixed(2)} s (server); fetching it for the browser decoder…`, true);
      await ensureEmbedding();
    }
    status(`${file.name}: ${S.w}×${S.h}, embedding ${info.embed_seconds.toFixed(2)} s (server), decoding in the ${S.decoder}. Hover, click or drag.`, false);
    setState("ready");
  } catch (e) {
    status(`Could not use ${file.name}: ${e.message}`, false);
    setState(S.session ? "ready" : "error");
  } finally {
    clearInterval(timer);
    refreshButtons();
  }
}

$("file").addEventListener("change", (e) => openImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragover"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragover"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("dragover"); openImage(e.dataTransfer.files[0]); });

// --- prompts --------------------------------------------------------------------------------

function toImage(e) {
  const rect = overlay.getBoundingClientRect();
  const x = Math.min(S.w - 1, Math.max(0, ((e.clientX - rect.left) / rect.width) * S.w));
  const y = Math.min(S.h - 1, Math.max(0, ((e.clientY - rect.top) / rect.height) * S.h));
  return [x, y];
}

function promptBody() {
  const body = {session_id: S.session, best_only: true};
  if (S.points.length) { body.points = S.points.map((p) => [p.x, p.y]); body.labels = S.points.map((p) => p.label); }
  if (S.box) body.box = S.box;
  return body;
}

// --- decoding: on the server or in the browser ---------------------------------------------

// The prompt as the ONNX decoder takes it (SamOnnxModel): coordinates in the resized (long side
// 1024) frame, as ResizeLongestSide.apply_coords scales them; a box as two corners labelled 2
// and 3; without a box, a padding point labelled -1; no mask input.
function onnxFeeds(points, labels, box) {
  const ort = B.ort, [ih, iw] = S.inputSize, sx = iw / S.w, sy = ih / S.h;
  const coords = [], labs = [];
  points.forEach((p, i) => { coords.push(p[0] * sx, p[1] * sy); labs.push(labels[i]); });
  if (box) { coords.push(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy); labs.push(2, 3); }
  else { coords.push(0, 0); labs.push(-1); }
  if (!B.zeros) B.zeros = new ort.Tensor("float32", new Float32Array(256 * 256), [1, 1, 256, 256]);
  return {
    image_embeddings: B.embedding,
    point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, labs.length, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labs), [1, labs.length]),
    mask_input: B.zeros,
    has_mask_input: new ort.Tensor("float32", new Float32Array([0]), [1]),
    orig_im_size: new ort.Tensor("float32", new Float32Array([S.h, S.w]), [2]),
  };
}

async function decodeInBrowser(points, labels, box) {
  const t0 = performance.now();
  const out = await B.session.run(onnxFeeds(points, labels, box));
  const logits = out.masks.data, thr = B.cfg.mask_threshold, data = new Uint8Array(logits.length);
  let area = 0;
  for (let i = 0; i < logits.length; i++) if (logits[i] > thr) { data[i] = 1; area++; }
  return {mask: {data, score: out.iou_predictions.data[0], area}, decoderMs: performance.now() - t0, where: "browser"};
}

async function decodeOnServer(points, labels, box) {
  const body = {session_id: S.session, best_only: true};
  if (points.length) { body.points = points; body.labels = labels; }
  if (box) body.box = box;
  const result = await postJSON("/api/predict", body);
  const best = result.masks[0];
  return {mask: {data: decodeRle(best.segmentation), score: best.score, area: best.area},
          decoderMs: result.seconds * 1000, where: "server"};
}

// Points [[x, y]...] with labels, and/or a box [x0, y0, x1, y1], in pixels of the image.
function decodePrompt(points, labels, box) {
  // A box alone goes to the server even in browser mode: the exported decoder
  // (return_single_mask) would pick the best multimask output for it, the server (as
  // SamPredictor with multimask_output=False) the single-mask output; this keeps both modes'
  // masks the same for every prompt.
  const browser = S.decoder === "browser" && B.state === "ready" && B.embeddingFor === S.session
    && (points.length > 0 || !box);
  S.stats.lastDecodedIn = browser ? "browser" : "server";
  return browser ? decodeInBrowser(points, labels, box) : decodeOnServer(points, labels, box);
}

async function ensureEmbedding() {
  if (B.state !== "ready" || !S.session || B.embeddingFor === S.session || B.loadingFor === S.session) return;
  const session = B.loadingFor = S.session;
  try {
    const resp = await fetch(`/api/session/${session}/embedding`);
    if (!resp.ok) throw new Error(`${resp.status} ${resp.statusText}`);
    const shape = resp.headers.get("X-Shape").split(",").map(Number);
    const tensor = new B.ort.Tensor("float32", new Float32Array(await resp.arrayBuffer()), shape);
    if (session !== S.session) return;
    B.embedding = tensor; B.embeddingFor = session;
    // The first run of a session compiles kernels: do it now, not on the first hover.
    await decodeInBrowser([[S.w / 2, S.h / 2]], [1], null);
  } catch (e) {
    browserFailed(`the image embedding could not be fetched (${e.message})`);
  } finally {
    if (B.loadingFor === session) B.loadingFor = null;
  }
}

function browserFailed(why) {
  B.state = "failed"; B.note = `Browser decoding is off: ${why}; decoding on the server.`;
  S.decoder = "server";
  $("decoder").value = "server";
  $("decoder-browser").disabled = true;
  $("decoder-note").textContent = B.note;
  status(B.note, false);
}

async function loadBrowserDecoder(cfg) {
  B.cfg = cfg; B.state = "loading";
  $("decoder-note").textContent = "loading onnxruntime-web and the ONNX decoder…";
  try {
    const ort = await import(cfg.runtime);
    ort.env.wasm.wasmPaths = {wasm: cfg.wasm};
    // One thread by default: it was faster than two in docs/serve.md's figures (a busy 2-core
    // machine). ?threads=N asks for more; WebAssembly threads need a cross-origin isolated
    // page, which the server's COOP/COEP headers make it.
    const asked = Number(new URLSearchParams(location.search).get("threads"));
    B.threads = self.crossOriginIsolated && asked > 1 ? Math.min(asked, navigator.hardwareConcurrency || 1) : 1;
    ort.env.wasm.numThreads = B.threads;
    const resp = await fetch(cfg.model);
    if (!resp.ok) {
      let msg = `${resp.status}`;
      try { msg = (await resp.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    B.session = await ort.InferenceSession.create(await resp.arrayBuffer(), {executionProviders: ["wasm"]});
    B.ort = ort; B.state = "ready";
    $("decoder-note").textContent = `onnxruntime-web ${ort.env.versions ? ort.env.versions.web || "" : ""}, wasm, ${B.threads} thread(s)`;
    await ensureEmbedding();
  } catch (e) {
    browserFailed(`onnxruntime-web or the decoder did not load (${e.message})`);
  }
}

async function predictCommitted() {
  const seq = ++S.promptSeq;
  if (!S.points.length && !S.box) { clearMaskLayer(); return; }
  S.everything = null;
  setState("predicting");
  const t0 = performance.now();
  try {
    const body = promptBody();
    const result = await decodePrompt(body.points || [], body.labels || [], body.box || null);
    if (seq !== S.promptSeq) return;   // a newer prompt was sent meanwhile
    S.stats.predictMs.push(performance.now() - t0);
    showPromptMask(result.mask);
    status(`Mask: predicted IoU ${result.mask.score.toFixed(3)}, ${result.mask.area} px; ${(performance.now() - t0).toFixed(0)} ms (decoded in the ${result.where})`, false);
  } catch (e) {
    status(`Prediction failed: ${e.message}`, false);
  }
  if (seq === S.promptSeq) setState("ready");
}

function commit(change) {
  S.history.push({points: S.points.slice(), box: S.box});
  change();
  predictCommitted();
  refreshButtons();
}

// Hover: one request in flight at a time; the newest cursor position waits for it. This keeps
// the mask at most one round trip behind the cursor without queueing requests on the server.
function hoverAt(xy) {
  if (S.hover.inflight) { S.hover.pending = xy; return; }
  S.hover.inflight = true;
  const seq = S.promptSeq, t0 = performance.now();
  decodePrompt([xy], [1], null)
    .then((result) => {
      // Prompt to mask ready (decoded to pixels), painting excluded: the same span both ways.
      const ms = performance.now() - t0;
      S.stats.hoverMs.push(ms);
      if (seq === S.promptSeq && !S.points.length && !S.box && !S.everything && !S.drag) {
        showPromptMask(result.mask);
        status(`Hover: ${ms.toFixed(0)} ms (decoder ${result.decoderMs.toFixed(0)} ms in the ${result.where})`, false);
      }
    })
    .catch((e) => status(`Hover failed: ${e.message}`, false))
    .finally(() => {
      S.hover.inflight = false;
      const next = S.hover.pending; S.hover.pending = null;
      if (next && S.session) hoverAt(next);
    });
}

overlay.addEventListener("contextmenu", (e) => e.preventDefault());
overlay.addEventListener("mousedown", (e) => {
  if (!S.session) return;
  const [x, y] = toImage(e);
  S.drag = {x0: x, y0: y, x1: x, y1: y, moved: false, button: e.button, shift: e.shiftKey, sx: e.clientX, sy: e.clientY};
});
overlay.addEventListener("mousemove", (e) => {
  if (!S.session) return;
  const [x, y] = toImage(e);
  if (S.drag) {
    S.drag.x1 = x; S.drag.y1 = y;
    if (Math.hypot(e.clientX - S.drag.sx, e.clientY - S.drag.sy) > 5) S.drag.moved = true;
    if (S.drag.moved) redraw();
    return;
  }
  if (!S.points.length && !S.box && !S.everything) hoverAt([x, y]);
});
window.addEventListener("mouseup", (e) => {
  const d = S.drag;
  if (!d) return;
  S.drag = null;
  if (d.moved && d.button === 0) {
    const box = [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
    commit(() => { S.box = box; });
  } else if (!d.moved) {
    const label = d.button === 0 && !d.shift ? 1 : 0;
    commit(() => { S.points.push({x: d.x0, y: d.y0, label}); });
  } else {
    redraw();
  }
});

function undo() {
  const prev = S.history.pop();
  if (!prev) return;
  S.points = prev.points; S.box = prev.box;
  predictCommitted();
  refreshButtons();
}
function clearAll() {
  S.history = []; S.points = []; S.box = null; S.everything = null;
  S.promptSeq++;
  clearMaskLayer();
  status("Cleared.", false);
}
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);
window.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
  if (e.key === "Escape") clearAll();
});

// --- everything -----------------------------------------------------------------------------

function everythingOptions() {
  const num = (id) => Number($(id).value);
  return {points_per_side: num("opt-points"), pred_iou_thresh: num("opt-iou"), stability_score_thresh: num("opt-stab"),
          box_nms_thresh: num("opt-nms")};
}

$("everything").addEventListener("click", async () => {
  if (!S.session) return;
  const session = S.session, t0 = performance.now();
  setState("everything-running");
  $("everything").disabled = true;
  status("Everything: running on the server…", true);
  // The server counts the generator's decoded point batches: a real fraction done.
  const poll = setInterval(async () => {
    try {
      const st = await api(`/api/session/${session}`);
      const p = st.everything_progress;
      if (st.everything_running && p) {
        $("progress").max = 1; $("progress").value = p.fraction;
        S.stats.everythingFractions = (S.stats.everythingFractions || []).concat([p.fraction]);
        status(`Everything: ${(100 * p.fraction).toFixed(0)}% (${p.done} of ${p.total} point batches; ${p.stage}) ${st.everything_elapsed_seconds.toFixed(1)} s`, true);
      }
    } catch (e) { /* the answer of the main request reports errors */ }
  }, 400);
  try {
    const result = await postJSON("/api/everything", {session_id: session, hierarchical: $("hierarchical").checked, options: everythingOptions()});
    if (session !== S.session) return;
    S.promptSeq++; S.points = []; S.box = null; S.history = [];
    S.everything = result.records;
    const order = result.records.map((r, i) => i).sort((a, b) => result.records[b].area - result.records[a].area);
    paintMasks(order.map((i) => decodeRle(result.records[i].segmentation)), order.map((i) => hsl(i)));
    S.mask = null;
    redraw();
    status(`Everything: ${result.count} masks in ${result.seconds.toFixed(1)} s${result.hierarchical ? " (hierarchical)" : ""}.`, false);
    setState("everything-done");
  } catch (e) {
    status(`Everything failed: ${e.message}`, false);
    setState("ready");
  } finally {
    clearInterval(poll);
    $("progress").removeAttribute("value");   // back to an indeterminate bar
    refreshButtons();
  }
});

// --- downloads ------------------------------------------------------------------------------

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("download-png").addEventListener("click", () => {
  if (!S.mask) return;
  const c = document.createElement("canvas"); c.width = S.w; c.height = S.h;
  const ctx = c.getContext("2d"), img = ctx.createImageData(S.w, S.h);
  for (let p = 0; p < S.mask.data.length; p++) {
    const v = S.mask.data[p] ? 255 : 0, q = 4 * p;
    img.data[q] = img.data[q + 1] = img.data[q + 2] = v; img.data[q + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  c.toBlob((blob) => download(blob, "mask.png"), "image/png");
});
$("download-json").addEventListener("click", () => {
  if (!S.everything) return;
  download(new Blob([JSON.stringify(S.everything)], {type: "application/json"}), "masks.json");
});

// --- start ----------------------------------------------------------------------------------

$("decoder").addEventListener("change", (e) => {
  S.decoder = e.target.value;
  if (S.decoder === "browser" && B.state === "off" && B.cfg) loadBrowserDecoder(B.cfg);
  if (S.decoder === "browser") ensureEmbedding();
  status(`Decoding in the ${S.decoder} from now on.`, false);
});

api("/api/info").then((info) => {
  $("model-info").textContent = `${info.model_type}, ${info.checkpoint}`;
  $("random-warning").hidden = !info.random_weights;
  // ?decoder=server|browser overrides the server's default for this tab.
  const asked = new URLSearchParams(location.search).get("decoder");
  const want = asked === "server" || asked === "browser" ? asked : info.decoder;
  $("decoder-note").textContent = info.decoder_note || "";
  if (!info.browser_decoder) {
    $("decoder-browser").disabled = true;
    S.decoder = "server";
  } else {
    S.decoder = want; B.cfg = info.browser_decoder;
    // The decoder file is exported on first request: fetch it only when browser decoding is used.
    if (S.decoder === "browser") loadBrowserDecoder(info.browser_decoder);
  }
  $("decoder").value = S.decoder;
}).catch((e) => { $("model-info").textContent = `server unreachable: ${e.message}`; });
refreshButtons();
