// MedSIGHT web page: upload an image or DICOM, ask, see the answer with its masks and boxes.
// Talks to the same server's OpenAI-compatible route; no external scripts or fonts.
"use strict";

const TOKEN_RE = /\[C\d+_\d+\]|\[SEG\]/g;
const MAX_VIEW = 640; // overlay drawing resolution (the longer side), in canvas pixels

const state = { model: null, file: null, dataUrl: null, result: null, layers: [], focus: null };
const $ = (id) => document.getElementById(id);

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = kind;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

async function checkModel() {
  try {
    const ready = await fetch("/v2/health/ready");
    const models = await fetch("/v2/models");
    if (!ready.ok || !models.ok) throw new Error(`server answered ${ready.status}/${models.status}`);
    const names = (await models.json()).models || [];
    state.model = names[0];
    setStatus(`model ${state.model} ready`, "ready");
  } catch (err) {
    setStatus("model unavailable", "error");
    showError(`Cannot reach the model server: ${err.message}`);
  }
  updateAsk();
}

function updateAsk() {
  $("ask").disabled = !(state.model && state.dataUrl && $("question").value.trim());
}

function readFile(file) {
  state.file = file;
  $("file-name").textContent = `${file.name} (${(file.size / 1024).toFixed(0)} KiB)`;
  const reader = new FileReader();
  reader.onload = () => { state.dataUrl = reader.result; showError(""); updateAsk(); };
  reader.onerror = () => showError(`Cannot read ${file.name}.`);
  reader.readAsDataURL(file);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the server sent an image the browser cannot draw"));
    img.src = src;
  });
}

// A black/white mask PNG -> a canvas of the image's size, coloured where the mask is set.
async function colourMask(pngBase64, colour, width, height) {
  const img = await loadImage(`data:image/png;base64,${pngBase64}`);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, width, height);
  const pixels = ctx.getImageData(0, 0, width, height);
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
  let count = 0;
  for (let i = 0; i < pixels.data.length; i += 4) {
    const on = pixels.data[i] > 127;
    pixels.data[i] = r; pixels.data[i + 1] = g; pixels.data[i + 2] = b;
    pixels.data[i + 3] = on ? 255 : 0;
    count += on ? 1 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  return { canvas, count };
}

function drawOverlay() {
  const overlay = $("overlay-canvas");
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, overlay.width, overlay.height);
  ctx.imageSmoothingEnabled = false;
  const opacity = Number($("opacity").value) / 100;
  let drawn = 0;
  state.layers.forEach((layer, index) => {
    if (!layer.visible) return;
    // Hovering a token or a row brings its mask forward and dims the others.
    ctx.globalAlpha = state.focus === null ? opacity : state.focus === index ? Math.max(opacity, 0.75) : opacity * 0.25;
    ctx.drawImage(layer.canvas, 0, 0, overlay.width, overlay.height);
    drawn += 1;
    const box = layer.region.box;
    if (box && $("show-boxes").checked) {
      const [x1, y1, x2, y2] = box.xyxy_normalized;
      ctx.globalAlpha = 1;
      ctx.strokeStyle = layer.region.color;
      ctx.lineWidth = 2;
      ctx.strokeRect(x1 * overlay.width + 1, y1 * overlay.height + 1, (x2 - x1) * overlay.width - 2, (y2 - y1) * overlay.height - 2);
    }
  });
  ctx.globalAlpha = 1;
  overlay.dataset.masksDrawn = String(drawn);
  document.querySelectorAll(".token[data-index]").forEach((el) => {
    const index = Number(el.dataset.index);
    el.classList.toggle("off", !state.layers[index].visible);
    el.classList.toggle("hover", state.focus === index);
  });
  document.querySelectorAll("#regions tr").forEach((row, index) => row.classList.toggle("focus", state.focus === index));
}

function setFocus(index) {
  state.focus = index;
  drawOverlay();
}

function setVisible(index, visible) {
  state.layers[index].visible = visible;
  const box = document.querySelector(`input[data-toggle="${index}"]`);
  if (box) box.checked = visible;
  drawOverlay();
}

function renderAnswer(text, regions) {
  const el = $("answer");
  el.replaceChildren();
  let last = 0;
  let next = 0;
  for (const match of text.matchAll(TOKEN_RE)) {
    el.append(document.createTextNode(text.slice(last, match.index)));
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = match[0];
    if (next < regions.length && regions[next].token === match[0]) {
      const index = next++;
      span.dataset.index = String(index);
      span.style.background = regions[index].color;
      span.title = `${regions[index].class || "region"} · click to show or hide its mask`;
      span.addEventListener("click", () => setVisible(index, !state.layers[index].visible));
      span.addEventListener("mouseenter", () => setFocus(index));
      span.addEventListener("mouseleave", () => setFocus(null));
    }
    el.append(span);
    last = match.index + match[0].length;
  }
  el.append(document.createTextNode(text.slice(last)));
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = content;
  row.append(td);
  return td;
}

function renderRegions(regions) {
  const body = $("regions");
  body.replaceChildren();
  regions.forEach((region, index) => {
    const row = document.createElement("tr");
    row.addEventListener("mouseenter", () => setFocus(index));
    row.addEventListener("mouseleave", () => setFocus(null));
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.checked = true;
    toggle.dataset.toggle = String(index);
    toggle.setAttribute("aria-label", `show mask of ${region.token}`);
    toggle.addEventListener("change", () => setVisible(index, toggle.checked));
    cell(row, toggle);
    const token = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = region.color;
    token.append(swatch, document.createTextNode(region.token));
    cell(row, token);
    cell(row, region.class ? `${region.class} (${(region.class_probability * 100).toFixed(0)}%)` : "–");
    cell(row, region.modality || "–");
    cell(row, region.confidence.toFixed(2));
    cell(row, region.box ? region.box.xyxy_pixels.join(", ") : "empty mask");
    const link = document.createElement("a");
    link.className = "secondary";
    link.textContent = "PNG";
    link.href = `data:image/png;base64,${region.mask.data}`;
    link.download = `mask_${String(index).padStart(2, "0")}_${region.token.replace(/[^A-Za-z0-9_]/g, "")}.png`;
    cell(row, link);
    body.append(row);
  });
  $("no-regions").hidden = regions.length > 0;
  $("regions-box").hidden = false;
}

async function render(result, question) {
  const message = result.choices[0].message;
  const regions = message.regions || [];
  const image = await loadImage(`data:image/png;base64,${result.image.png}`);
  const { width, height } = result.image;
  const scale = Math.max(1, Math.floor(MAX_VIEW / Math.max(width, height)));
  for (const id of ["image-canvas", "overlay-canvas"]) {
    const canvas = $(id);
    canvas.width = width * scale;
    canvas.height = height * scale;
  }
  $("viewer").style.aspectRatio = `${width} / ${height}`;
  const ctx = $("image-canvas").getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, width * scale, height * scale);
  $("placeholder").hidden = true;
  state.layers = [];
  state.focus = null;
  for (const region of regions) {
    const { canvas, count } = await colourMask(region.mask.data, region.color, width, height);
    state.layers.push({ region, canvas, count, visible: true });
  }
  state.result = { question, answer: message.content, regions };
  renderAnswer(message.content, regions);
  const usage = result.usage;
  $("meta").textContent = `${width} × ${height} px · ${regions.length} region${regions.length === 1 ? "" : "s"} · ${usage.completion_tokens} tokens generated` +
    (result.choices[0].finish_reason === "length" ? " · answer cut at the token limit" : "");
  $("answer-box").hidden = false;
  renderRegions(regions);
  drawOverlay();
  document.body.dataset.state = "answered";
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  showError("");
  $("ask").disabled = true;
  $("ask").textContent = "Asking…";
  document.body.dataset.state = "asking";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: state.model,
        messages: [{ role: "user", content: [
          { type: "text", text: question },
          { type: "image_url", image_url: { url: state.dataUrl } },
        ] }],
        mask_format: "png",
        return_image: true,
      }),
    });
    const payload = await response.json().catch(() => ({}));
    if (!response.ok) {
      const err = payload.error;
      throw new Error((err && (err.message || err)) || `server answered ${response.status}`);
    }
    await render(payload, question);
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "error";
  } finally {
    $("ask").textContent = "Ask";
    updateAsk();
  }
}

function downloadAll() {
  if (!state.result) return;
  const blob = new Blob([JSON.stringify(state.result, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "medsight_masks.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  $("question").addEventListener("input", updateAsk);
  document.querySelectorAll(".chip").forEach((chip) => chip.addEventListener("click", () => {
    $("question").value = chip.textContent;
    updateAsk();
  }));
  $("ask-form").addEventListener("submit", ask);
  $("opacity").addEventListener("input", drawOverlay);
  $("show-boxes").addEventListener("change", drawOverlay);
  $("download-all").addEventListener("click", downloadAll);
  checkModel();
}

document.addEventListener("DOMContentLoaded", init);
