// loracap web: caption dropped images in the browser with onnxruntime-web. Nothing is uploaded.
//
// The decoding loop is the onnxruntime backend's (loracap/backends/onnx_captioner.py), step for step:
// greedy, one image at a time, the first decoder step with empty caches, each later step one token and
// the caches back. Image preprocessing repeats the image processor's resize, rescale and normalize in
// float32 as numpy does, so an image already at the model's input size gets the very same pixels.

const VENDOR = new URL("vendor/onnxruntime-web/dist/", location.href).href;
const $ = (id) => document.getElementById(id);

const state = { manifest: null, tokens: null, ort: null, sessions: null, results: [], provider: "wasm" };
window.loracap = { results: state.results };

async function loadJSON(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function loadRuntime() {
  const wanted = new URLSearchParams(location.search).get("ep");
  let gpu = false;
  if (wanted !== "wasm" && navigator.gpu) {
    try { gpu = !!(await navigator.gpu.requestAdapter()); } catch { gpu = false; }
  }
  const ort = await import(new URL(gpu ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs", VENDOR).href);
  ort.env.wasm.wasmPaths = VENDOR;
  // Threads need cross-origin isolation (SharedArrayBuffer); `loracap web` sends the headers for it.
  // ?threads=1 makes runs repeatable: several threads may split a float sum differently each time.
  const threads = Number(new URLSearchParams(location.search).get("threads")) || 4;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(threads, navigator.hardwareConcurrency || 1) : 1;
  state.provider = gpu ? "webgpu" : "wasm";
  return ort;
}

async function loadSessions(variant) {
  const graphs = state.manifest.variants[variant];
  const providers = state.provider === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const sessions = {};
  for (const [name, path] of Object.entries(graphs)) {
    setStatus(`Loading ${path} …`);
    sessions[name] = await state.ort.InferenceSession.create(`model/${path}`, { executionProviders: providers });
  }
  return sessions;
}

// --- image -> pixel_values (1, 3, H, W) ----------------------------------------------------------------

function targetSize(width, height, image) {
  if (image.height && image.width) return [image.width, image.height];
  const edge = image.shortest_edge;
  // transformers' get_resize_output_image_size: the short side to `edge`, the long one scaled (int()).
  return width <= height ? [edge, Math.trunc((edge * height) / width)] : [Math.trunc((edge * width) / height), edge];
}

async function pixelValues(file) {
  const image = state.manifest.image;
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const [width, height] = targetSize(bitmap.width, bitmap.height, image);
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, width, height);
  let [left, top, w, h] = [0, 0, width, height];
  if (image.crop) {
    [w, h] = [image.crop.width, image.crop.height];
    [left, top] = [Math.trunc((width - w) / 2), Math.trunc((height - h) / 2)];
  }
  const rgba = context.getImageData(left, top, w, h).data;
  const data = new Float32Array(3 * w * h);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const mean = image.mean ? f(image.mean[c]) : 0;
    const std = image.std ? f(image.std[c]) : 1;
    for (let i = 0; i < w * h; i++) {
      const scaled = f(rgba[4 * i + c] * image.rescale); // numpy: float64 product, stored as float32
      data[c * w * h + i] = image.mean ? f(f(scaled - mean) / std) : scaled;
    }
  }
  return new state.ort.Tensor("float32", data, [1, 3, h, w]);
}

// --- decoding --------------------------------------------------------------------------------------------

const int64 = (values, dims) => new state.ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);

function emptyCaches() {
  const feeds = {};
  for (const cache of state.manifest.caches) {
    feeds[cache.name] = new state.ort.Tensor("float32", new Float32Array(0), [1, cache.heads, 0, cache.width]);
  }
  return feeds;
}

function withCaches(feed, outputs) {
  for (const cache of state.manifest.caches) feed[cache.name] = outputs[cache.name.replace("past_key_values", "present")];
  return feed;
}

function concatTokens(a, b) {
  const [, n, d] = a.dims;
  const m = b.dims[1];
  const data = new Float32Array((n + m) * d);
  data.set(a.data, 0);
  data.set(b.data, n * d);
  return new state.ort.Tensor("float32", data, [1, n + m, d]);
}

async function embed(ids) {
  const out = await state.sessions.embed_tokens.run({ input_ids: int64(ids, [1, ids.length]) });
  return out.inputs_embeds;
}

async function firstStep(pixels) {
  const m = state.manifest;
  const s = state.sessions;
  if (m.layout === "prefix") {
    let embeds = (await s.vision_encoder.run({ pixel_values: pixels })).image_features;
    if (m.prompt_ids.length) embeds = concatTokens(embeds, await embed(m.prompt_ids));
    const length = embeds.dims[1];
    const feed = {
      inputs_embeds: embeds,
      attention_mask: int64(Array(length).fill(1), [1, length]),
      position_ids: int64([...Array(length).keys()], [1, length]),
      ...emptyCaches(),
    };
    const next = async (token, outputs, position) => {
      const at = length + position;
      return s.decoder_model_merged.run(withCaches({
        inputs_embeds: await embed([token]),
        attention_mask: int64(Array(at + 1).fill(1), [1, at + 1]),
        position_ids: int64([at], [1, 1]),
      }, outputs));
    };
    return [await s.decoder_model_merged.run(feed), next];
  }
  if (m.layout === "florence2") return florenceFirstStep(pixels);
  const states = (await s.encoder_model.run({ pixel_values: pixels })).last_hidden_state;
  const bool = (value) => new state.ort.Tensor("bool", [value], [1]);
  const feed = { input_ids: int64([m.start_id], [1, 1]), encoder_hidden_states: states, use_cache_branch: bool(false), ...emptyCaches() };
  const next = (token, outputs) => s.decoder_model_merged.run(withCaches({
    input_ids: int64([token], [1, 1]), encoder_hidden_states: states, use_cache_branch: bool(true),
  }, outputs));
  return [await s.decoder_model_merged.run(feed), next];
}

// Florence-2: the image's features in place of the task prompt's <image> tokens, the encoder over both,
// then the decoder from the checkpoint's prefix ("</s><s>"), as Florence2OnnxBackend does.
async function florenceFirstStep(pixels) {
  const m = state.manifest;
  const s = state.sessions;
  const ids = m.modes[state.mode].input_ids;
  const features = (await s.vision_encoder.run({ pixel_values: pixels })).image_features;
  const embeds = await embed(ids);
  const width = embeds.dims[2];
  const data = new Float32Array(embeds.data);
  let next = 0;
  ids.forEach((id, i) => {
    if (id === m.image_token_id) data.set(features.data.subarray(next * width, ++next * width), i * width);
  });
  const mask = int64(Array(ids.length).fill(1), [1, ids.length]);
  const inputs = new state.ort.Tensor("float32", data, embeds.dims);
  const states = (await s.encoder_model.run({ inputs_embeds: inputs, attention_mask: mask })).last_hidden_state;
  const bool = (value) => new state.ort.Tensor("bool", [value], [1]);
  const common = { encoder_hidden_states: states, encoder_attention_mask: mask };
  const feed = { inputs_embeds: await embed(m.decoder_prefix), use_cache_branch: bool(false), ...common, ...emptyCaches() };
  const step = async (token, outputs) => s.decoder_model_merged.run(withCaches({
    inputs_embeds: await embed([token]), use_cache_branch: bool(true), ...common,
  }, outputs));
  return [await s.decoder_model_merged.run(feed), step];
}

// The greedy step's choice after the rules transformers' generate applies (loracap.backends.onnx_captioner
// Rules): no repeated n-grams, forced first / last tokens, suppressed ids; the first of equal maxima wins,
// as with numpy's argmax.
function choose(logits, history, position, limit) {
  const rules = state.manifest.rules;
  const [, length, vocab] = logits.dims;
  const row = Float32Array.from(logits.data.subarray((length - 1) * vocab, length * vocab));
  const n = rules.no_repeat_ngram_size;
  if (n && history.length + 1 >= n) {
    const tail = history.slice(history.length - n + 1).join(",");
    for (let i = 0; i + n <= history.length; i++) {
      if (history.slice(i, i + n - 1).join(",") === tail) row[history[i + n - 1]] = -Infinity;
    }
  }
  for (const [forced, at] of [[rules.forced_bos, 0], [rules.forced_eos, limit - 1]]) {
    if (forced !== null && forced !== undefined && position === at) {
      row.fill(-Infinity);
      row[forced] = 0;
    }
  }
  for (const id of rules.suppress) row[id] = -Infinity;
  let best = 0;
  for (let i = 1; i < vocab; i++) if (row[i] > row[best]) best = i;
  return best;
}

async function tokenIds(pixels) {
  const m = state.manifest;
  const limit = m.modes ? m.modes[state.mode].max_new_tokens : m.max_new_tokens;
  let [outputs, next] = await firstStep(pixels);
  const ids = [];
  for (let position = 0; position < limit; position++) {
    const token = choose(outputs.logits, [...m.rules.prefix, ...ids], position, limit);
    ids.push(token);
    if (token === m.eos_id || position === limit - 1) break;
    outputs = await next(token, outputs, position);
  }
  return ids;
}

function decode(ids) {
  const special = new Set(state.tokens.special);
  const hex = ids.filter((id) => !special.has(id)).map((id) => state.tokens.bytes[id] || "").join("");
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(2 * i, 2), 16);
  return new TextDecoder().decode(bytes).replace(PY_SPACE_AT_ENDS, "");
}

// Python's str.strip() (what the onnxruntime backend does to a caption) also takes \x1c-\x1f and \x85,
// which JavaScript's trim() keeps; and trim() takes \ufeff, which strip() keeps.
const PY_SPACE = "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
const PY_SPACE_AT_ENDS = new RegExp(`^[${PY_SPACE}]+|[${PY_SPACE}]+$`, "g");

// --- the page --------------------------------------------------------------------------------------------

function setStatus(text) { $("status").textContent = text; }

function addRow(result) {
  const row = document.createElement("tr");
  const preview = document.createElement("img");
  preview.src = result.url;
  preview.alt = result.name;
  const caption = document.createElement("textarea");
  caption.value = result.caption;
  caption.rows = 2;
  caption.addEventListener("input", () => { result.caption = caption.value; });
  for (const cell of [preview, document.createTextNode(result.name), caption]) {
    const td = document.createElement("td");
    td.append(cell);
    row.append(td);
  }
  $("results").append(row);
}

async function captionFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (!images.length) { setStatus("No images among the dropped files."); return; }
  const started = performance.now();
  for (const [index, file] of images.entries()) {
    try {
      const ids = await tokenIds(await pixelValues(file));
      const result = { name: file.name, ids, caption: decode(ids), url: URL.createObjectURL(file) };
      state.results.push(result);
      addRow(result);
    } catch (error) {
      state.results.push({ name: file.name, error: String(error) });
      console.error(file.name, error);
    }
    const done = index + 1;
    const rate = done / ((performance.now() - started) / 1000);
    const left = (images.length - done) / rate;
    setStatus(`${done} / ${images.length} captioned · ${rate.toFixed(2)} images/s · ` +
              (done < images.length ? `about ${Math.ceil(left)} s left` : "done"));
  }
  const failed = state.results.filter((r) => r.error).length;
  if (failed) setStatus(`${$("status").textContent} · ${failed} could not be read`);
  $("downloads").hidden = !state.results.some((r) => !r.error);
}

function save(name, blob) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
}

function stem(name) { return name.includes(".") ? name.slice(0, name.lastIndexOf(".")) : name; }

async function downloadSidecars() {
  const { zipSync, strToU8 } = await import("./vendor/fflate/esm/browser.js");
  const entries = {};
  for (const r of state.results) if (!r.error) entries[`${stem(r.name)}.txt`] = strToU8(r.caption + "\n");
  save("captions.zip", new Blob([zipSync(entries)], { type: "application/zip" }));
}

function downloadJsonl() {
  const lines = state.results.filter((r) => !r.error).map((r) => JSON.stringify({ file_name: r.name, text: r.caption }));
  save("metadata.jsonl", new Blob([lines.join("\n") + "\n"], { type: "application/jsonl" }));
}

async function start() {
  [state.manifest, state.tokens] = await Promise.all([loadJSON("model/manifest.json"), loadJSON("model/tokens.json")]);
  state.ort = await loadRuntime();
  if (state.manifest.modes) { // Florence-2: its caption tasks
    const modes = $("mode");
    for (const name of Object.keys(state.manifest.modes)) modes.append(new Option(name, name));
    modes.value = new URLSearchParams(location.search).get("mode") || (state.manifest.modes.caption ? "caption" : modes.options[0].value);
    state.mode = modes.value;
    modes.addEventListener("change", () => { state.mode = modes.value; });
    $("mode-choice").hidden = false;
  }
  const select = $("variant");
  for (const name of Object.keys(state.manifest.variants)) select.append(new Option(name, name));
  select.value = state.manifest.variants.int8 && !new URLSearchParams(location.search).get("variant")
    ? "int8" : new URLSearchParams(location.search).get("variant") || "fp32";
  const load = async () => {
    state.sessions = await loadSessions(select.value);
    setStatus(`Ready (${state.provider}, ${select.value}). Drop images here, or choose them.`);
  };
  select.addEventListener("change", load);
  await load();
  const zone = $("drop");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    window.loracap.done = captionFiles(event.dataTransfer.files);
  });
  $("files").addEventListener("change", (event) => { window.loracap.done = captionFiles(event.target.files); });
  $("zip").addEventListener("click", downloadSidecars);
  $("jsonl").addEventListener("click", downloadJsonl);
}

window.loracap.ready = start().catch((error) => { setStatus(`Could not start: ${error}`); throw error; });
