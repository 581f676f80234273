// The search page: upload (or pick) an image, POST it to search, show the top-k as thumbnails.
// Plain DOM code, no build step; URLs are relative so the page works under any route prefix.
"use strict";

const $ = (id) => document.getElementById(id);
let queryBlob = null;
const TOKEN_KEY = "sscq-token";  // sessionStorage: gone when the tab closes, never in a URL

// Every API call carries the token (when one is set) as a bearer header.
function api(path, options) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({}, (options && options.headers) || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(path, Object.assign({}, options || {}, { headers }));
}

// <img src> cannot send a header: thumbnails are fetched with the token and shown as blob URLs.
async function loadThumb(img, id) {
  const resp = await api("thumb/" + encodeURIComponent(id));
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showQuery(blob) {
  queryBlob = blob;
  $("query").src = URL.createObjectURL(blob);
}

function labelText(label) {
  if (label === null || label === undefined) return "-";
  return Array.isArray(label) ? label.join(",") : String(label);
}

function render(answer) {
  const box = $("results");
  box.replaceChildren();
  answer.results.forEach((r, rank) => {
    const fig = document.createElement("figure");
    fig.className = "result";
    fig.dataset.id = String(r.id);
    fig.dataset.label = labelText(r.label);
    const img = document.createElement("img");
    img.className = "px";
    img.alt = "result " + r.id;
    loadThumb(img, r.id);
    const cap = document.createElement("figcaption");
    cap.textContent = "#" + (rank + 1) + " · id " + r.id + "\nd " + r.distance.toFixed(3) + " · label " + labelText(r.label);
    if (r.uri) fig.title = r.uri;
    fig.append(img, cap);
    box.append(fig);
  });
  setStatus(answer.results.length + " results from " + answer.version + " in " + answer.took_ms + " ms", false);
}

async function search() {
  if (!queryBlob) { setStatus("choose an image first", true); return; }
  const k = parseInt($("k").value || "10", 10);
  const body = new FormData();
  body.append("image", queryBlob, "query");
  setStatus("searching…", false);
  try {
    const resp = await api("search?k=" + k, { method: "POST", body });
    const answer = await resp.json();
    if (!resp.ok) { setStatus("error " + resp.status + ": " + answer.error, true); return; }
    render(answer);
  } catch (err) {
    setStatus("request failed: " + err, true);
  }
}

async function pickSample(id) {
  const resp = await api("thumb/" + encodeURIComponent(id));
  if (!resp.ok) { setStatus("sample " + id + " unavailable (" + resp.status + ")", true); return; }
  showQuery(await resp.blob());
  await search();
}

async function init() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("samples").replaceChildren();
    loadInfo();
  });
  $("file").addEventListener("change", () => {
    if ($("file").files.length) { showQuery($("file").files[0]); search(); }
  });
  $("form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  await loadInfo();
}

async function loadInfo() {
  try {
    const resp = await api("version");
    const v = await resp.json();
    if (resp.status === 401) { $("version").textContent = "enter the access token (" + v.error + ")"; return; }
    $("version").textContent = "snapshot " + v.version + " · " + v.rows + " images in " + v.parts +
      " parts · " + v.partitions + " partition(s)";
    $("k").value = v.default_k;
    $("k").max = v.max_k;
  } catch (err) {
    $("version").textContent = "version unavailable: " + err;
  }
  try {
    const s = await (await api("samples?n=8")).json();
    for (const id of s.ids || []) {
      const img = document.createElement("img");
      img.className = "px sample";
      loadThumb(img, id);
      img.alt = "sample " + id;
      img.dataset.id = String(id);
      img.addEventListener("click", () => pickSample(id));
      $("samples").append(img);
    }
  } catch (err) { /* samples are optional */ }
}

init();
