// ssbctl serve: the search page. No framework; everything it loads comes from this server.
// State lives in the URL (/?q=...&k=... or /?like=VIDEO_ID&k=...), so a search can be shared or reloaded.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const token = params.get("token");  // carried by every request when the server wants one
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
let current = null;  // {kind: "text" | "like", value}
let playing = null;  // the hit being played

function url(path, query) {
  const q = new URLSearchParams(query || {});
  if (token) q.set("token", token);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

function media(kind, videoId) {
  return url(`/media/${kind}/${encodeURIComponent(videoId)}`);
}

async function api(path, query) {
  const response = await fetch(url(path, query), {headers: {"Accept": "application/json"}});
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 100) : 12;
}

function keepInUrl(query) {
  const q = new URLSearchParams(query);
  if (token) q.set("token", token);
  history.replaceState(null, "", `/?${q.toString()}`);
}

function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

function card(hit) {
  const img = el("img", {src: media("thumb", hit.video_id), alt: `thumbnail of ${hit.video_id}`, loading: "lazy"});
  const score = hit.score === null ? "n/a" : hit.score.toFixed(3);
  const meta = el("div", {className: "meta"}, [
    el("span", {className: "rank", textContent: `#${hit.rank}`}),
    el("span", {className: "score", textContent: score, title: "cosine similarity"}),
    el("span", {className: "vid", textContent: hit.video_id}),
  ]);
  if (hit.captions && hit.captions.length) {
    meta.append(el("ul", {className: "captions"}, hit.captions.slice(0, 2).map((c) => el("li", {textContent: c}))));
  }
  const item = el("li", {className: "card", tabIndex: 0}, [img, meta]);
  item.dataset.videoId = hit.video_id;
  item.dataset.rank = hit.rank;
  item.addEventListener("click", () => play(hit, item));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") play(hit, item); });
  return item;
}

function show(hits, heading) {
  $("heading").textContent = heading;
  $("heading").hidden = false;
  $("grid").replaceChildren(...hits.map(card));
  status(`${hits.length} result${hits.length === 1 ? "" : "s"}`);
}

async function searchText(text, k) {
  current = {kind: "text", value: text};
  keepInUrl({q: text, k});
  status("searching…");
  try {
    const started = performance.now();
    const hits = await api("/api/search", {q: text, k, captions: "1"});
    show(hits, `top ${hits.length} for “${text}”`);
    status(`${hits.length} results in ${Math.round(performance.now() - started)} ms`);
  } catch (e) {
    status(e.message, true);
  }
}

async function searchLike(videoId, k) {
  current = {kind: "like", value: videoId};
  keepInUrl({like: videoId, k});
  status("searching…");
  try {
    const hits = await api(`/api/similar/${encodeURIComponent(videoId)}`, {k, captions: "1"});
    show(hits, `more like ${videoId}`);
  } catch (e) {
    status(e.message, true);
  }
}

function play(hit, item) {
  playing = hit;
  for (const c of document.querySelectorAll(".card.playing")) c.classList.remove("playing");
  if (item) item.classList.add("playing");
  $("player").hidden = false;
  $("playing").textContent = `#${hit.rank} ${hit.video_id}`;
  $("playing-captions").replaceChildren(...(hit.captions || []).map((c) => el("li", {textContent: c})));
  $("explain").hidden = true;
  const video = $("video");
  video.muted = true;
  video.src = media("video", hit.video_id);
  const started = video.play();
  if (started) started.catch((e) => status(`cannot play ${hit.video_id}: ${e.message}`, true));
  $("player").scrollIntoView({block: "nearest"});
}

function colour(value) {
  const v = Math.min(Math.max(value, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(v), VIRIDIS.length - 2);
  const t = v - i;
  const c = VIRIDIS[i].map((a, j) => Math.round(a + (VIRIDIS[i + 1][j] - a) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function heatmap(result) {
  const peak = Math.max(...result.weights.flat(), 1e-9);
  const head = el("tr", {}, [el("th"), ...result.videos.map((v) => el("th", {textContent: v, title: v}))]);
  const rows = result.weights.map((row, i) => el("tr", {}, [
    el("th", {textContent: result.videos[i], title: result.videos[i]}),
    ...row.map((w) => {
      const cell = el("td", {textContent: w.toFixed(2), className: w >= 0.6 * peak ? "bright" : ""});
      cell.style.backgroundColor = colour(w / peak);
      return cell;
    }),
  ]));
  const draws = result.draws_on.slice(0, 5).map((d) => `${d.video_id} (${d.weight.toFixed(2)})`).join(", ");
  return [
    el("p", {textContent: `Support-set attention (${result.mask}) among the top ${result.videos.length}: ` +
      "row i is how reconstructing video i's caption draws on the others."}),
    el("table", {}, [head, ...rows]),
    el("p", {textContent: `The top result draws on: ${draws || "nothing"}`}),
  ];
}

async function why() {
  if (!current) return;
  const query = current.kind === "text" ? {q: current.value} : {video_id: current.value};
  try {
    const result = await api("/api/explain", {...query, k: Math.min(kValue(), 8)});
    $("explain").replaceChildren(...heatmap(result));
    $("explain").hidden = false;
  } catch (e) {
    status(e.message, true);
  }
}

function fromUrl() {
  const k = parseInt(params.get("k") || "", 10);
  if (Number.isFinite(k)) $("k").value = Math.min(Math.max(k, 1), 100);
  if (params.get("q")) {
    $("q").value = params.get("q");
    searchText(params.get("q"), kValue());
  } else if (params.get("like")) {
    searchLike(params.get("like"), kValue());
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("q").value.trim();
    if (text) searchText(text, kValue());
  });
  $("like").addEventListener("click", () => { if (playing) searchLike(playing.video_id, kValue()); });
  $("why").addEventListener("click", why);
  $("close").addEventListener("click", () => {
    $("video").pause();
    $("video").removeAttribute("src");
    $("player").hidden = true;
  });
  api("/api/health").then((h) => {
    if (!$("status").textContent) status(`${h.videos} videos indexed`);
  }).catch((e) => status(e.message, true));
  fromUrl();
});
