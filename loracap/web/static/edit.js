// The script of `loracap edit`'s page (loracap/web/templates/edit.html), inlined into it when it is served.
// Plain JS, no framework, no build step, nothing fetched but the editor's own API (see loracap/edit/app.py):
//   the grid       /api/images, a page at a time; a card's caption edits in place (a textarea for prose,
//                  chips with autocomplete for tag captions) with a CLIP-token counter (/api/tokens); a
//                  save sends the caption as loaded (`base`), and a 409 opens the conflict dialog
//   filters        search, tags with / without, flag, sort; kept in the URL's #fragment
//   selection      ticked images, or everything the filter matches (sent as a query)
//   bulk edits     preview, apply, and the undo log
//   tags, jobs     the tag panel; re-captioning and CLIP scoring as jobs whose progress streams as
//                  server-sent events; re-captions arrive as proposals to accept or reject
// Every request carries the page's token (X-Loracap-Token) when it has one; what cannot send a header
// (images, EventSource) carries it as ?token=. Inlined into a <script> element, this file must never hold
// a closing-tag sequence (less-than then slash): loracap.quality.html.static_asset refuses it.
(function () {
  "use strict";

  var TOKEN = document.body.dataset.token || "";
  var LOW_CLIP = 20; // the report's threshold: scores below it are drawn red
  var MAX_DIFF_CELLS = 40000; // word diffs longer than this are shown whole

  // ---- small helpers ------------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  // h("div", {class: "x", testid: "y", onclick: f}, child, "text", ...)
  function h(tag, attrs) {
    var el = document.createElement(tag);
    var a = attrs || {};
    Object.keys(a).forEach(function (k) {
      var v = a[k];
      if (v === undefined || v === null || v === false) return;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k === "testid") el.setAttribute("data-testid", v);
      else if (k.slice(0, 2) === "on") el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.keys(v).forEach(function (d) { el.dataset[d] = v[d]; });
      else if (v === true) el.setAttribute(k, "");
      else el.setAttribute(k, String(v));
    });
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }

  function append(el, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(el, c); }); return; }
    el.appendChild(typeof child === "string" || typeof child === "number"
      ? document.createTextNode(String(child)) : child);
  }

  function withToken(url) {
    if (!TOKEN) return url;
    return url + (url.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
  }

  function plural(n, one, many) { return n + " " + (n === 1 ? one : (many || one + "s")); }

  function splitTags(text) {
    // loracap.postprocess.split_tags: commas and newlines, inner spaces collapsed, empties dropped
    return (text || "").split(/[,\n]/).map(function (t) { return t.split(/\s+/).filter(Boolean).join(" "); })
      .filter(Boolean);
  }

  function unique(list) {
    var seen = new Set();
    return list.filter(function (x) { if (seen.has(x)) return false; seen.add(x); return true; });
  }

  function debounce(fn, ms) {
    var timer = null;
    var wrapped = function () {
      var args = arguments, self = this;
      clearTimeout(timer);
      timer = setTimeout(function () { timer = null; fn.apply(self, args); }, ms);
    };
    wrapped.cancel = function () { clearTimeout(timer); timer = null; };
    return wrapped;
  }

  function isField(el) {
    if (!el || !el.tagName) return false;
    var t = el.tagName;
    return t === "INPUT" || t === "TEXTAREA" || t === "SELECT" || el.isContentEditable;
  }

  function seconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  // ---- the API --------------------------------------------------------------------------------------

  function ApiError(status, message, data) {
    this.status = status;
    this.message = message;
    this.data = data;
  }
  ApiError.prototype = Object.create(Error.prototype);

  function detailText(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation errors: [{loc: [...], msg}]
      return detail.map(function (d) {
        return (d.loc ? d.loc.filter(function (x) { return x !== "body"; }).join(".") + ": " : "") + d.msg;
      }).join("; ");
    }
    return JSON.stringify(detail);
  }

  function api(method, path, body) {
    var opts = { method: method, headers: {} };
    if (TOKEN) opts.headers["X-Loracap-Token"] = TOKEN;
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(path, opts).then(function (res) {
      return res.json().catch(function () { return null; }).then(function (data) {
        if (res.ok) return data;
        var message = data && data.detail !== undefined ? detailText(data.detail)
          : res.status + " " + res.statusText;
        if (res.status === 401) showBanner("This editor needs its token: open the address it printed at start (with ?token=…).");
        throw new ApiError(res.status, message, data);
      });
    }, function () {
      throw new ApiError(0, "the editor's server does not answer (was it stopped?)", null);
    });
  }

  function showBanner(text) {
    var b = $("banner");
    b.textContent = text;
    b.hidden = !text;
  }

  // ---- state ----------------------------------------------------------------------------------------

  var S = {
    info: null,
    query: { q: "", tags: [], without: [], flag: "" },
    sort: "path", order: "asc",
    offset: 0, limit: 100,
    total: 0,
    items: [],
    byId: new Map(),
    focusId: null,
    selected: new Set(),
    allMatching: false,
    drafts: new Map(), // id -> {text, base}: edits not saved yet
    cardState: new Map(), // id -> "unsaved" | "saving" | "saved" | "conflict" | "error"
    cardTitle: new Map(), // id -> why (an error's message)
    editor: null,
    tags: { tags: [], common: [], once: [] },
    tagsByCount: [],
    tagCount: new Map(),
    tagSort: "count",
    previewKey: null,
    jobRunning: false,
    undoOpen: null,
    pendingReload: false,
    lastDone: "",
  };

  // ---- the save state (one line for the whole page) --------------------------------------------------

  function setSaveState(state, text) {
    var el = $("save-state");
    el.dataset.state = state;
    el.textContent = text;
  }

  function unsavedCount() {
    var n = S.drafts.size;
    if (S.editor && editorDirty(S.editor) && !S.drafts.has(S.editor.id)) n += 1;
    return n;
  }

  // `done`: what just happened ("Saved a.png"), shown until the next change
  function refreshSaveState(done) {
    if (done !== undefined) S.lastDone = done;
    var n = unsavedCount();
    if (n) setSaveState("dirty", "Unsaved: " + plural(n, "caption") + (done ? " · " + done : ""));
    else setSaveState(S.lastDone ? "saved" : "idle", S.lastDone || "All changes saved");
  }

  var STATE_LABELS = { unsaved: "unsaved", saving: "saving…", saved: "saved", conflict: "changed on disk", error: "not saved" };

  function setCardState(id, state, title) {
    if (state) S.cardState.set(id, state); else S.cardState.delete(id);
    if (title !== undefined) S.cardTitle.set(id, title); else S.cardTitle.delete(id);
    var card = cardEl(id);
    if (card) paintCardState(card, id);
  }

  function paintCardState(card, id) {
    var state = S.cardState.get(id) || "";
    var el = card.querySelector(".card-state");
    el.textContent = state ? STATE_LABELS[state] : "";
    el.dataset.state = state;
    el.title = S.cardTitle.get(id) || "";
    card.classList.toggle("dirty", state === "unsaved" || state === "conflict" || state === "error");
  }

  // ---- filters in the URL ---------------------------------------------------------------------------

  function readHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    S.query.q = p.get("q") || "";
    S.query.tags = splitTags(p.get("tags") || "");
    S.query.without = splitTags(p.get("without") || "");
    S.query.flag = p.get("flag") || "";
    S.sort = p.get("sort") === "clip" ? "clip" : "path";
    S.order = p.get("order") === "desc" ? "desc" : "asc";
    var limit = parseInt(p.get("limit") || "100", 10);
    S.limit = [50, 100, 200, 500].indexOf(limit) >= 0 ? limit : 100;
    S.offset = Math.max(0, parseInt(p.get("offset") || "0", 10) || 0);
  }

  function writeHash() {
    var p = new URLSearchParams();
    if (S.query.q) p.set("q", S.query.q);
    if (S.query.tags.length) p.set("tags", S.query.tags.join(","));
    if (S.query.without.length) p.set("without", S.query.without.join(","));
    if (S.query.flag) p.set("flag", S.query.flag);
    if (S.sort !== "path") p.set("sort", S.sort);
    if (S.order !== "asc") p.set("order", S.order);
    if (S.limit !== 100) p.set("limit", String(S.limit));
    if (S.offset) p.set("offset", String(S.offset));
    var hash = p.toString();
    history.replaceState(null, "", location.pathname + location.search + (hash ? "#" + hash : ""));
  }

  function syncFilterControls() {
    $("search").value = S.query.q;
    $("flag").value = S.query.flag;
    $("sort").value = S.sort + ":" + S.order;
    $("page-size").value = String(S.limit);
    renderActiveFilters();
  }

  function queryBody() {
    return { q: S.query.q, tags: S.query.tags.slice(), without: S.query.without.slice(), flag: S.query.flag };
  }

  function filtersChanged() {
    S.offset = 0;
    writeHash();
    renderActiveFilters();
    renderTagPanel();
    loadGrid({ keepFocus: false });
    updateSelectionUi();
  }

  function includeTag(tag) {
    var i = S.query.tags.indexOf(tag);
    if (i >= 0) S.query.tags.splice(i, 1);
    else {
      S.query.tags.push(tag);
      S.query.without = S.query.without.filter(function (t) { return t !== tag; });
    }
    filtersChanged();
  }

  function excludeTag(tag) {
    var i = S.query.without.indexOf(tag);
    if (i >= 0) S.query.without.splice(i, 1);
    else {
      S.query.without.push(tag);
      S.query.tags = S.query.tags.filter(function (t) { return t !== tag; });
    }
    filtersChanged();
  }

  function renderActiveFilters() {
    var box = $("active-filters");
    box.textContent = "";
    function chip(tag, without) {
      var label = (without ? "without " : "with ") + tag;
      return h("span", { class: "chip filter " + (without ? "exc" : "inc"), testid: (without ? "filter-without-" : "filter-tag-") + tag },
        (without ? "−" : "") + tag,
        h("button", { type: "button", class: "x", "aria-label": "remove the filter: " + label, title: "remove this filter",
          onclick: function () { (without ? excludeTag : includeTag)(tag); } }, "×"));
    }
    S.query.tags.forEach(function (t) { box.appendChild(chip(t, false)); });
    S.query.without.forEach(function (t) { box.appendChild(chip(t, true)); });
    if (S.query.tags.length || S.query.without.length || S.query.q || S.query.flag) {
      box.appendChild(h("button", { type: "button", class: "link", testid: "filters-clear", onclick: function () {
        S.query = { q: "", tags: [], without: [], flag: "" };
        syncFilterControls();
        filtersChanged();
      } }, "clear all filters"));
    }
  }

  // ---- info and indexing ----------------------------------------------------------------------------

  var infoTimer = null;

  function loadInfo() {
    return api("GET", "/api/info").then(function (info) {
      var wasIndexing = S.info && S.info.indexing;
      S.info = info;
      var parts = [info.root, "captions: " + info.layout, plural(info.total, "image")];
      if (info.indexing) parts.push("indexing…");
      $("info").textContent = parts.join(" · ");
      $("info").title = info.tokenizer ? "" : "no CLIP tokenizer (yet): the token counter shows –";
      if (info.error) showBanner("Indexing failed: " + info.error);
      $("panel-explain").hidden = !info.explain;
      fillModels(info);
      clearTimeout(infoTimer);
      if (info.indexing) {
        infoTimer = setTimeout(function () {
          loadInfo().then(function () { if (S.items.length < S.limit) reloadSoon(); }).catch(function () {});
        }, 1000);
      } else if (wasIndexing) {
        reloadSoon();
        loadTags();
      }
      return info;
    });
  }

  function reloadSoon() {
    // Never pull the grid from under an open editor: reload when it closes.
    if (S.editor) { S.pendingReload = true; return; }
    loadGrid({ keepFocus: true });
  }

  function fillModels(info) {
    var list = $("model-options");
    list.textContent = "";
    (info.models || []).forEach(function (m) { list.appendChild(h("option", { value: m })); });
    var model = $("recaption-model");
    if (!model.value && info.models && info.models.length) model.value = info.models[0];
    var style = $("recaption-style");
    if (!style.options.length) {
      (info.styles || []).forEach(function (s) { style.appendChild(h("option", { value: s }, s)); });
    }
  }

  // ---- the grid -------------------------------------------------------------------------------------

  var gridSeq = 0;

  function loadGrid(opts) {
    opts = opts || {};
    var seq = ++gridSeq;
    var p = new URLSearchParams({ offset: String(S.offset), limit: String(S.limit), sort: S.sort, order: S.order });
    if (S.query.q) p.set("q", S.query.q);
    if (S.query.tags.length) p.set("tags", S.query.tags.join(","));
    if (S.query.without.length) p.set("without", S.query.without.join(","));
    if (S.query.flag) p.set("flag", S.query.flag);
    $("grid").setAttribute("aria-busy", "true");
    return api("GET", "/api/images?" + p.toString()).then(function (data) {
      if (seq !== gridSeq) return;
      if (!data.items.length && S.offset > 0 && data.total > 0) {
        S.offset = Math.floor((data.total - 1) / S.limit) * S.limit;
        writeHash();
        return loadGrid(opts);
      }
      stashEditor();
      S.total = data.total;
      S.items = data.items;
      S.byId = new Map(data.items.map(function (it) { return [it.id, it]; }));
      renderGrid(opts);
    }).catch(function (e) {
      if (seq !== gridSeq) return;
      showBanner("Could not load the images: " + e.message);
    }).then(function () {
      if (seq === gridSeq) $("grid").removeAttribute("aria-busy");
    });
  }

  function cardEl(id) { return document.querySelector('[data-testid="card-' + id + '"]'); }

  function renderGrid(opts) {
    var grid = $("grid");
    var hadFocus = grid.contains(document.activeElement);
    grid.textContent = "";
    S.items.forEach(function (item) { grid.appendChild(renderCard(item)); });
    $("grid-empty").hidden = S.items.length > 0;
    var first = S.items.length ? S.offset + 1 : 0;
    $("page-info").textContent = S.items.length
      ? first + "–" + (S.offset + S.items.length) + " of " + plural(S.total, "image")
      : "0 of " + plural(S.total, "image");
    $("page-prev").disabled = S.offset <= 0;
    $("page-next").disabled = S.offset + S.items.length >= S.total;
    var focusId = opts.focus === "last" && S.items.length ? S.items[S.items.length - 1].id
      : opts.focus === "first" && S.items.length ? S.items[0].id
      : S.byId.has(S.focusId) ? S.focusId : (S.items.length ? S.items[0].id : null);
    setFocusCard(focusId, hadFocus || opts.focus === "first" || opts.focus === "last");
    updateSelectionUi();
  }

  function flagLabel(f) { return f.replace(/-/g, " "); }

  function thumbUrl(id) { return withToken("/api/image/" + id + "/thumb"); }

  function renderCard(item) {
    var id = item.id;
    var checked = S.allMatching || S.selected.has(id);
    var badges = h("div", { class: "badges" });
    item.flags.forEach(function (f) { badges.appendChild(h("span", { class: "badge flag", title: f }, flagLabel(f))); });
    if (item.clip !== null && item.clip !== undefined) {
      badges.appendChild(h("span", { class: "badge clip" + (item.clip < LOW_CLIP ? " bad" : ""), title: "CLIP score (100·cos)",
        testid: "clip-" + id }, "CLIP " + item.clip.toFixed(1)));
    }
    if (item.tokens !== null && item.tokens !== undefined) {
      var max = S.info ? S.info.max_tokens : 77;
      badges.appendChild(h("span", { class: "badge tok" + (item.tokens > max ? " bad" : ""), title: "CLIP tokens" },
        item.tokens + " / " + max));
    }
    if (item.proposal) {
      badges.appendChild(h("button", { type: "button", class: "badge proposal", title: "a re-caption waits for you: see Proposals",
        onclick: function () { openPanel("panel-proposals"); } }, "proposal"));
    }
    var card = h("li", { class: "card", testid: "card-" + id, dataset: { id: String(id) }, tabindex: "-1",
      "aria-label": item.path },
      h("div", { class: "thumb" },
        h("a", { href: withToken("/api/image/" + id + "/file"), target: "_blank", rel: "noopener", tabindex: "-1",
          title: "open the original" },
          h("img", { src: thumbUrl(id), alt: "", loading: "lazy", decoding: "async", testid: "thumb-" + id })),
        h("label", { class: "select", title: "select (Space)" },
          h("input", { type: "checkbox", testid: "select-" + id, checked: checked, disabled: S.allMatching,
            "aria-label": "select " + item.path,
            onchange: function (ev) { toggleSelected(id, ev.target.checked); } }))),
      h("div", { class: "meta" },
        h("span", { class: "path", testid: "path-" + id, title: item.path }, item.path),
        badges),
      h("div", { class: "capbox" }, renderCaptionView(item)),
      h("div", { class: "card-state", testid: "card-state-" + id, "aria-live": "polite" }));
    card.addEventListener("focusin", function () { setFocusCard(id, false); });
    card.addEventListener("mousedown", function (ev) {
      if (!isField(ev.target) && ev.target.tagName !== "BUTTON" && ev.target.tagName !== "A") setFocusCard(id, false);
    });
    if (S.drafts.has(id) && !S.cardState.has(id)) S.cardState.set(id, "unsaved");
    paintCardState(card, id);
    return card;
  }

  function renderCaptionView(item) {
    var draft = S.drafts.get(item.id);
    var text = draft ? draft.text : item.caption;
    var view = h("div", { class: "caption" + (draft ? " draft" : ""), testid: "caption-" + item.id, role: "button",
      tabindex: "-1", title: "click to edit (Enter)", "aria-label": "caption of " + item.path + ": " + (text || "none") + ". Edit." });
    if (!text || !text.trim()) {
      view.appendChild(h("span", { class: "muted" }, "no caption: click to write one"));
    } else if (item.tag_caption) {
      splitTags(text).forEach(function (t) { view.appendChild(h("span", { class: "chip ro" }, t)); });
    } else {
      view.appendChild(document.createTextNode(text));
    }
    view.addEventListener("click", function () { startEdit(item.id); });
    return view;
  }

  function updateCard(id) {
    var item = S.byId.get(id), old = cardEl(id);
    if (!item || !old) return;
    var isFocused = old.contains(document.activeElement);
    var fresh = renderCard(item);
    old.replaceWith(fresh);
    if (S.focusId === id) fresh.tabIndex = 0;
    if (isFocused) fresh.focus();
  }

  function setFocusCard(id, moveFocus) {
    if (S.focusId !== null && S.focusId !== id) {
      var old = cardEl(S.focusId);
      if (old) old.tabIndex = -1;
    }
    S.focusId = id;
    var card = id === null ? null : cardEl(id);
    if (!card) return;
    card.tabIndex = 0;
    if (moveFocus) {
      card.focus();
      card.scrollIntoView({ block: "nearest" });
    }
  }

  function columns() {
    var cards = $("grid").children;
    if (!cards.length) return 1;
    var top = cards[0].getBoundingClientRect().top, n = 0;
    while (n < cards.length && Math.abs(cards[n].getBoundingClientRect().top - top) < 2) n++;
    return Math.max(1, n);
  }

  function moveFocus(delta) {
    if (!S.items.length || S.paging) return; // a key held down waits for the next page

    var i = S.items.findIndex(function (it) { return it.id === S.focusId; });
    if (i < 0) i = 0;
    var j = i + delta;
    if (j >= S.items.length) {
      if (S.offset + S.items.length < S.total) { goPage(1, "first"); return; }
      j = S.items.length - 1;
    } else if (j < 0) {
      if (S.offset > 0) { goPage(-1, "last"); return; }
      j = 0;
    }
    setFocusCard(S.items[j].id, true);
  }

  function goPage(direction, focus) {
    var next = Math.max(0, S.offset + direction * S.limit);
    if (next >= S.total && direction > 0) return;
    stashEditor();
    S.offset = next;
    writeHash();
    S.paging = true;
    loadGrid({ focus: focus || "first" }).then(function () { S.paging = false; });
  }

  // ---- editing in place -----------------------------------------------------------------------------

  function editorText(E) {
    if (E.mode === "text") return E.textarea.value;
    return E.tags.join(", ");
  }

  function editorDirty(E) {
    if (E.mode === "text") return E.textarea.value !== (E.base || "");
    if (E.input.value.trim()) return true;
    return E.tags.join(", ") !== splitTags(E.base || "").join(", ");
  }

  function startEdit(id) {
    var item = S.byId.get(id);
    if (!item) return;
    if (S.editor && S.editor.id === id) { focusEditor(S.editor); return; }
    stashEditor();
    var card = cardEl(id);
    if (!card) return;
    setFocusCard(id, false);
    var draft = S.drafts.get(id);
    var base = draft ? draft.base : item.caption;
    var text = draft ? draft.text : (item.caption || "");
    var E = { id: id, item: item, base: base, mode: item.tag_caption ? "tags" : "text", history: [], saving: false };
    var box = card.querySelector(".capbox");
    box.textContent = "";
    var counter = h("span", { class: "tokens", testid: "tokens-" + id, title: "CLIP tokens of this caption; the text encoder reads 77" }, "… / " + maxTokens());
    E.counter = counter;
    E.countTokens = tokenCounter(E);
    var editorEl;
    if (E.mode === "text") {
      E.textarea = h("textarea", { class: "editor", testid: "editor-" + id, rows: "4", spellcheck: "true",
        "aria-label": "caption of " + item.path + " (Ctrl+S saves, Esc cancels)" });
      E.textarea.value = text;
      E.textarea.addEventListener("input", function () { autosize(E.textarea); editorChanged(E); });
      editorEl = E.textarea;
    } else {
      editorEl = buildChipEditor(E, splitTags(text));
    }
    E.el = h("div", { class: "edit", testid: "edit-" + id },
      editorEl,
      h("div", { class: "editbar" },
        counter,
        h("span", { class: "spacer" }),
        h("button", { type: "button", class: "primary", testid: "save-" + id, title: "Ctrl+S",
          onclick: function () { saveEditor(E); } }, "Save"),
        h("button", { type: "button", testid: "cancel-" + id, title: "Esc",
          onclick: function () { cancelEdit(E); } }, "Cancel")));
    E.el.addEventListener("keydown", function (ev) { editorKey(E, ev); });
    box.appendChild(E.el);
    card.classList.add("editing");
    S.editor = E;
    if (E.mode === "text") autosize(E.textarea);
    if (item.tokens !== null && item.tokens !== undefined && text === (item.caption || "")) showTokens(E, item.tokens, maxTokens());
    else E.countTokens(editorText(E), true);
    focusEditor(E);
    if (draft) setCardState(id, "unsaved");
  }

  function focusEditor(E) {
    var target = E.mode === "text" ? E.textarea : E.input;
    target.focus();
    if (E.mode === "text") {
      var n = target.value.length;
      target.setSelectionRange(n, n);
    }
  }

  function autosize(ta) {
    ta.style.height = "auto";
    ta.style.height = Math.min(400, ta.scrollHeight + 2) + "px";
  }

  function maxTokens() { return S.info ? S.info.max_tokens : 77; }

  function editorChanged(E) {
    E.countTokens(editorText(E));
    setCardState(E.id, editorDirty(E) ? "unsaved" : "");
    refreshSaveState();
  }

  // "N / 77", from POST /api/tokens a moment after the typing stops; red over the window.
  function tokenCounter(E) {
    var seq = 0;
    function fire(text) {
      var mine = ++seq;
      api("POST", "/api/tokens", { text: text }).then(function (r) {
        if (mine === seq && S.editor === E) showTokens(E, r.tokens, r.max_tokens);
      }).catch(function () {
        if (mine === seq) E.counter.classList.remove("pending");
      });
    }
    var later = debounce(fire, 250);
    return function (text, now) {
      E.counter.classList.add("pending");
      if (now) { later.cancel(); fire(text); } else later(text);
    };
  }

  function showTokens(E, tokens, max) {
    var c = E.counter;
    c.classList.remove("pending");
    if (tokens === null || tokens === undefined) {
      c.textContent = "– / " + max;
      c.title = "no CLIP tokenizer is loaded (start with --tokenizer, or cache openai/clip-vit-large-patch14)";
      c.classList.remove("over");
      return;
    }
    c.textContent = tokens + " / " + max;
    c.classList.toggle("over", tokens > max);
    c.title = tokens > max ? "over the text encoder's window: the end of this caption is cut off in training"
      : "CLIP tokens of this caption";
    c.dataset.tokens = String(tokens);
  }

  function stashEditor() {
    // The open editor's text, kept as a draft (shown on its card as unsaved), and the editor closed.
    var E = S.editor;
    if (!E) return;
    if (editorDirty(E)) {
      commitPendingTag(E);
      S.drafts.set(E.id, { text: editorText(E), base: E.base });
    }
    closeEditor(E, false);
  }

  function closeEditor(E, refocus) {
    if (S.editor !== E) return;
    S.editor = null;
    var state = S.drafts.has(E.id) ? "unsaved" : S.cardState.get(E.id) === "saved" ? "saved" : "";
    if (state) S.cardState.set(E.id, state); else S.cardState.delete(E.id);
    if (!S.byId.has(E.id)) S.byId.set(E.id, E.item);
    var card = cardEl(E.id);
    if (card) {
      updateCard(E.id);
      if (refocus) setFocusCard(E.id, true);
    }
    refreshSaveState();
    if (S.pendingReload) {
      S.pendingReload = false;
      loadGrid({ keepFocus: true });
    }
  }

  function cancelEdit(E) {
    S.drafts.delete(E.id);
    S.cardState.delete(E.id);
    closeEditor(E, true);
  }

  function editorKey(E, ev) {
    var mod = ev.ctrlKey || ev.metaKey;
    if (ev.key === "Escape") {
      if (E.mode === "tags" && E.suggest && !E.suggest.hidden) return; // the chip input closes its list
      ev.preventDefault();
      ev.stopPropagation();
      cancelEdit(E);
    } else if (mod && !ev.altKey && (ev.key === "s" || ev.key === "S" || ev.key === "Enter")) {
      ev.preventDefault();
      ev.stopPropagation();
      saveEditor(E);
    } else if (mod && !ev.shiftKey && (ev.key === "z" || ev.key === "Z") && E.mode === "tags" && !E.input.value) {
      ev.preventDefault();
      ev.stopPropagation();
      undoChip(E);
    }
    // In the textarea Ctrl+Z is the browser's own undo of the last change.
  }

  // -- tag captions: chips, with autocomplete from /api/tags

  function buildChipEditor(E, tags) {
    E.tags = tags;
    E.chips = h("div", { class: "chips", testid: "chips-" + E.id });
    var listId = "suggest-" + E.id;
    E.input = h("input", { class: "chip-input", testid: "tag-input-" + E.id, role: "combobox", "aria-autocomplete": "list",
      "aria-expanded": "false", "aria-controls": listId, "aria-label": "add a tag to " + E.item.path + " (Enter or comma adds, Backspace removes the last)",
      placeholder: "add a tag…", spellcheck: "false" });
    E.suggest = h("ul", { class: "suggest", id: listId, role: "listbox", testid: "suggest-" + E.id, hidden: true });
    E.active = -1;
    E.input.addEventListener("input", function () {
      if (E.input.value.indexOf(",") >= 0) {
        var parts = E.input.value.split(",");
        E.input.value = parts.pop();
        parts.forEach(function (p) { addChip(E, p); });
      }
      showSuggestions(E);
      editorChanged(E);
    });
    E.input.addEventListener("keydown", function (ev) { chipKey(E, ev); });
    E.input.addEventListener("blur", function () { setTimeout(function () { hideSuggestions(E); }, 150); });
    renderChips(E);
    return h("div", { class: "chip-editor", onclick: function (ev) { if (ev.target === ev.currentTarget || ev.target === E.chips) E.input.focus(); } },
      E.chips, h("div", { class: "combo" }, E.input, E.suggest));
  }

  function renderChips(E) {
    E.chips.textContent = "";
    E.tags.forEach(function (t, i) {
      E.chips.appendChild(h("span", { class: "chip", testid: "chip-" + E.id + "-" + t },
        t, h("button", { type: "button", class: "x", testid: "chip-remove-" + E.id + "-" + t,
          "aria-label": "remove tag " + t, onclick: function () { removeChip(E, i); E.input.focus(); } }, "×")));
    });
  }

  function pushHistory(E) { E.history.push(E.tags.slice()); }

  function addChip(E, raw) {
    var tag = splitTags(raw).join(" ");
    if (!tag || E.tags.indexOf(tag) >= 0) return false;
    pushHistory(E);
    E.tags.push(tag);
    renderChips(E);
    editorChanged(E);
    return true;
  }

  function removeChip(E, i) {
    pushHistory(E);
    E.tags.splice(i, 1);
    renderChips(E);
    editorChanged(E);
  }

  function undoChip(E) {
    if (!E.history.length) return;
    E.tags = E.history.pop();
    renderChips(E);
    editorChanged(E);
  }

  function commitPendingTag(E) {
    if (E.mode === "tags" && E.input.value.trim()) {
      addChip(E, E.input.value);
      E.input.value = "";
    }
  }

  function suggestionsFor(text, exclude) {
    var p = text.trim().toLowerCase();
    if (!p) return [];
    var starts = [], contains = [];
    for (var i = 0; i < S.tagsByCount.length && starts.length < 8; i++) {
      var t = S.tagsByCount[i];
      if (exclude.indexOf(t.tag) >= 0) continue;
      var l = t.tag.toLowerCase();
      if (l.indexOf(p) === 0) starts.push(t);
      else if (contains.length < 8 && l.indexOf(p) > 0) contains.push(t);
    }
    return starts.concat(contains).slice(0, 8);
  }

  function showSuggestions(E) {
    var list = suggestionsFor(E.input.value, E.tags);
    E.options = list;
    E.active = -1;
    E.suggest.textContent = "";
    list.forEach(function (t, i) {
      E.suggest.appendChild(h("li", { role: "option", id: "suggest-" + E.id + "-" + i, "aria-selected": "false",
        testid: "suggestion-" + t.tag,
        onmousedown: function (ev) { ev.preventDefault(); pickSuggestion(E, i); } },
        h("span", {}, t.tag), h("span", { class: "count" }, String(t.count))));
    });
    E.suggest.hidden = !list.length;
    E.input.setAttribute("aria-expanded", list.length ? "true" : "false");
    E.input.removeAttribute("aria-activedescendant");
  }

  function hideSuggestions(E) {
    if (!E.suggest) return;
    E.suggest.hidden = true;
    E.input.setAttribute("aria-expanded", "false");
    E.input.removeAttribute("aria-activedescendant");
    E.active = -1;
  }

  function highlight(E, i) {
    var items = E.suggest.children;
    for (var k = 0; k < items.length; k++) items[k].setAttribute("aria-selected", k === i ? "true" : "false");
    E.active = i;
    if (i >= 0) E.input.setAttribute("aria-activedescendant", items[i].id);
    else E.input.removeAttribute("aria-activedescendant");
  }

  function pickSuggestion(E, i) {
    var t = E.options[i];
    if (!t) return;
    E.input.value = "";
    addChip(E, t.tag);
    hideSuggestions(E);
    E.input.focus();
  }

  function chipKey(E, ev) {
    var open = !E.suggest.hidden && E.options && E.options.length;
    if (ev.key === "ArrowDown" && open) {
      ev.preventDefault();
      highlight(E, (E.active + 1) % E.options.length);
    } else if (ev.key === "ArrowUp" && open) {
      ev.preventDefault();
      highlight(E, E.active <= 0 ? E.options.length - 1 : E.active - 1);
    } else if ((ev.key === "Enter" || ev.key === "Tab") && open && E.active >= 0 && !ev.ctrlKey && !ev.metaKey) {
      ev.preventDefault();
      pickSuggestion(E, E.active);
    } else if (ev.key === "Enter" && !ev.ctrlKey && !ev.metaKey) {
      ev.preventDefault();
      if (E.input.value.trim()) { addChip(E, E.input.value); E.input.value = ""; hideSuggestions(E); }
    } else if (ev.key === "Escape" && open) {
      ev.preventDefault();
      ev.stopPropagation();
      hideSuggestions(E);
    } else if (ev.key === "Backspace" && !E.input.value && E.tags.length) {
      ev.preventDefault();
      removeChip(E, E.tags.length - 1);
    }
  }

  // -- saving

  function saveEditor(E) {
    if (E.saving || S.editor !== E) return Promise.resolve();
    commitPendingTag(E);
    if (!editorDirty(E)) {
      S.drafts.delete(E.id);
      S.cardState.delete(E.id);
      closeEditor(E, true);
      refreshSaveState("No changes to save");
      return Promise.resolve();
    }
    S.drafts.set(E.id, { text: editorText(E), base: E.base });
    E.saving = true;
    return saveCaption(E.id, E.base, editorText(E)).then(function (result) {
      E.saving = false;
      if (result === "saved" || result === "disk") closeEditor(E, true);
      else if (S.editor === E) focusEditor(E); // back to editing: the next save asks again
    });
  }

  function saveCaption(id, base, text) {
    var item = S.byId.get(id);
    var path = item ? item.path : "#" + id;
    setCardState(id, "saving");
    setSaveState("saving", "Saving " + path + "…");
    return api("PUT", "/api/image/" + id + "/caption", { base: base, text: text }).then(function (r) {
      S.drafts.delete(id);
      if (item) {
        item.caption = r.caption;
        item.tokens = r.tokens;
        item.flags = item.flags.filter(function (f) { return f !== "no-caption" && f !== "truncated"; });
        if (!r.caption) item.flags.push("no-caption");
        if (r.tokens !== null && r.tokens > maxTokens()) item.flags.push("truncated");
      }
      S.cardState.set(id, "saved");
      if (!S.editor || S.editor.id !== id) updateCard(id);
      setCardState(id, "saved");
      refreshSaveState("Saved " + path);
      tagsSoon();
      return "saved";
    }, function (e) {
      if (e.status === 409 && e.data) {
        setCardState(id, "conflict", "the caption on disk changed since the page loaded it");
        setSaveState("conflict", "Not saved: " + path + " changed on disk");
        return resolveConflict(id, path, e.data.disk, text);
      }
      setCardState(id, "error", e.message);
      setSaveState("error", "Not saved: " + path + ": " + e.message);
      return "error";
    });
  }

  function resolveConflict(id, path, disk, yours) {
    return conflictDialog(path, disk, yours).then(function (choice) {
      if (choice === "mine") return saveCaption(id, disk, yours);
      if (choice === "disk") {
        var item = S.byId.get(id);
        S.drafts.delete(id);
        if (item) { item.caption = disk; item.tokens = null; }
        S.cardState.delete(id);
        if (S.editor && S.editor.id === id) {
          S.editor.base = disk;
          var E = S.editor;
          // the editor closes on the disk's caption
          E.saving = false;
          closeEditor(E, true);
        } else updateCard(id);
        refreshSaveState("Kept the version on disk of " + path);
        tagsSoon();
        return "disk";
      }
      // back to editing: the draft stays, the next save asks again
      setCardState(id, "conflict", "the caption on disk changed since the page loaded it");
      setSaveState("conflict", "Not saved: " + path + " changed on disk");
      return "conflict";
    });
  }

  var conflictResolve = null;

  function conflictDialog(path, disk, yours) {
    var dlg = $("conflict-dialog");
    $("conflict-path").textContent = path;
    renderDiffInto($("conflict-disk"), $("conflict-yours"), disk, yours, "(no caption on disk)");
    return new Promise(function (resolve) {
      conflictResolve = resolve;
      if (dlg.open) dlg.close();
      dlg.showModal();
      $("conflict-cancel").focus(); // Enter by habit must not overwrite a file: the safe choice has the focus
    });
  }

  function closeConflict(choice) {
    var dlg = $("conflict-dialog");
    var resolve = conflictResolve;
    conflictResolve = null;
    if (dlg.open) dlg.close();
    if (resolve) resolve(choice);
  }

  function saveAllDrafts() {
    var ids = Array.from(S.drafts.keys());
    if (!ids.length) { refreshSaveState(); return; }
    var chain = Promise.resolve("saved");
    ids.forEach(function (id) {
      chain = chain.then(function (prev) {
        if (prev === "conflict") return prev; // stop at a conflict the user left open
        var d = S.drafts.get(id);
        return d ? saveCaption(id, d.base, d.text) : prev;
      });
    });
    return chain;
  }

  // ---- word diffs ---------------------------------------------------------------------------------------

  function words(text) { return (text || "").split(/(\s+|,)/).filter(function (w) { return w !== ""; }); }

  // [[op, text]] with op "=", "-" or "+", by the longest common subsequence of words
  function diff(a, b) {
    var x = words(a), y = words(b), n = x.length, m = y.length;
    if (n * m > MAX_DIFF_CELLS) return [["-", a || ""], ["+", b || ""]];
    var L = [];
    for (var i = 0; i <= n; i++) L.push(new Uint16Array(m + 1));
    for (i = n - 1; i >= 0; i--) {
      for (var j = m - 1; j >= 0; j--) {
        L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
      }
    }
    var out = [];
    function push(op, w) {
      if (out.length && out[out.length - 1][0] === op) out[out.length - 1][1] += w;
      else out.push([op, w]);
    }
    i = 0; j = 0;
    while (i < n && j < m) {
      if (x[i] === y[j]) { push("=", x[i]); i++; j++; }
      else if (L[i + 1][j] >= L[i][j + 1]) push("-", x[i++]);
      else push("+", y[j++]);
    }
    while (i < n) push("-", x[i++]);
    while (j < m) push("+", y[j++]);
    return out;
  }

  function renderDiffInto(beforeEl, afterEl, before, after, emptyText) {
    beforeEl.textContent = "";
    afterEl.textContent = "";
    var parts = diff(before, after);
    parts.forEach(function (p) {
      if (p[0] !== "+") beforeEl.appendChild(p[0] === "-" ? h("del", {}, p[1]) : document.createTextNode(p[1]));
      if (p[0] !== "-") afterEl.appendChild(p[0] === "+" ? h("ins", {}, p[1]) : document.createTextNode(p[1]));
    });
    if (!before) beforeEl.appendChild(h("span", { class: "muted" }, emptyText || "(none)"));
    if (!after) afterEl.appendChild(h("span", { class: "muted" }, "(empty)"));
  }

  function diffRow(testid, path, before, after, extra) {
    var b = h("div", { class: "before", "aria-label": "before" }), a = h("div", { class: "after", "aria-label": "after" });
    renderDiffInto(b, a, before, after, "(no caption)");
    return h("li", { testid: testid }, h("div", { class: "path" }, path), b, a, extra || null);
  }

  // ---- selection ------------------------------------------------------------------------------------

  function toggleSelected(id, on) {
    if (S.allMatching) return;
    if (on) S.selected.add(id); else S.selected.delete(id);
    updateSelectionUi();
  }

  function updateSelectionUi() {
    var count = $("selection-count"), target = $("bulk-target");
    var any = S.allMatching || S.selected.size > 0;
    if (S.allMatching) {
      count.textContent = "all " + plural(S.total, "image") + " matching the filter";
      target.textContent = "Applies to all " + plural(S.total, "image") + " matching the filter.";
    } else if (S.selected.size) {
      count.textContent = S.selected.size + " selected";
      target.textContent = "Applies to the " + plural(S.selected.size, "selected image") + ".";
    } else {
      count.textContent = "none selected";
      target.textContent = "Select images first (or all matching the filter).";
    }
    $("select-all-matching").setAttribute("aria-pressed", S.allMatching ? "true" : "false");
    $("select-none").disabled = !any;
    $("recaption-start").disabled = !any || S.jobRunning;
    $("recaption-start").textContent = any ? "Re-caption " + (S.allMatching ? plural(S.total, "image") : plural(S.selected.size, "image")) : "Re-caption the selection";
    document.querySelectorAll('#grid input[type="checkbox"]').forEach(function (box) {
      var id = Number(box.closest(".card").dataset.id);
      box.checked = S.allMatching || S.selected.has(id);
      box.disabled = S.allMatching;
    });
    if (S.previewKey && S.previewKey !== JSON.stringify(bulkBody())) invalidatePreview();
  }

  function selectionBody() {
    if (S.allMatching) return { query: queryBody() };
    return { ids: Array.from(S.selected) };
  }

  function selectedIds() {
    if (!S.allMatching) return Promise.resolve(Array.from(S.selected));
    // every id the filter matches, a page at a time
    var ids = [], limit = 500;
    function page(offset) {
      var p = new URLSearchParams({ offset: String(offset), limit: String(limit), sort: "path", order: "asc" });
      if (S.query.q) p.set("q", S.query.q);
      if (S.query.tags.length) p.set("tags", S.query.tags.join(","));
      if (S.query.without.length) p.set("without", S.query.without.join(","));
      if (S.query.flag) p.set("flag", S.query.flag);
      return api("GET", "/api/images?" + p.toString()).then(function (data) {
        data.items.forEach(function (it) { ids.push(it.id); });
        if (data.items.length && offset + data.items.length < data.total) return page(offset + limit);
        return ids;
      });
    }
    return page(0);
  }

  // ---- bulk edits -----------------------------------------------------------------------------------

  function bulkOp() {
    var kind = $("bulk-op").value;
    var op = { kind: kind };
    ({ add_tag: ["tag"], remove_tag: ["tag"], replace_tag: ["old", "new"], regex: ["pattern", "replacement"],
      prepend: ["text"], append: ["text"], set_trigger: ["trigger"] })[kind].forEach(function (f) {
      op[f] = $("bulk-" + f).value;
    });
    return op;
  }

  function showOpFields() {
    var kind = $("bulk-op").value;
    document.querySelectorAll("#panel-bulk [data-ops]").forEach(function (label) {
      label.hidden = label.dataset.ops.split(" ").indexOf(kind) < 0;
    });
    invalidatePreview();
  }

  function invalidatePreview() {
    S.previewKey = null;
    $("bulk-apply").disabled = true;
  }

  function bulkBody() { return { selection: selectionBody(), op: bulkOp() }; }

  function preview() {
    if (!S.allMatching && !S.selected.size) {
      $("bulk-result").textContent = "Select images first (or all matching the filter).";
      return Promise.resolve();
    }
    var body = bulkBody(), key = JSON.stringify(body);
    $("bulk-result").textContent = "Previewing…";
    $("bulk-changes").textContent = "";
    return api("POST", "/api/bulk/preview", body).then(function (r) {
      $("bulk-result").textContent = r.count
        ? plural(r.count, "caption") + " would change" + (r.count > r.changes.length ? " (the first " + r.changes.length + " shown)" : "") + "."
        : "No caption would change.";
      r.changes.forEach(function (c) {
        $("bulk-changes").appendChild(diffRow("change-" + c.id, c.path, c.before, c.after));
      });
      S.previewKey = r.count ? key : null;
      $("bulk-apply").disabled = !r.count;
    }, function (e) {
      $("bulk-result").textContent = "Cannot preview: " + e.message;
    });
  }

  function applyBulk() {
    var body = bulkBody();
    if (S.previewKey !== JSON.stringify(body)) { invalidatePreview(); return preview(); }
    $("bulk-apply").disabled = true;
    $("bulk-result").textContent = "Applying…";
    stashEditor();
    return api("POST", "/api/bulk/apply", body).then(function (r) {
      var text = "Changed " + plural(r.changed, "caption") + ".";
      if (r.conflicts.length) text += " Skipped " + r.conflicts.length + ", changed on disk meanwhile: " + r.conflicts.join(", ");
      $("bulk-result").textContent = text;
      $("bulk-changes").textContent = "";
      S.previewKey = null;
      afterWrite();
    }, function (e) {
      $("bulk-result").textContent = "Not applied: " + e.message;
    });
  }

  function afterWrite() {
    reloadSoon();
    loadTags();
    loadUndo();
    loadProposals();
  }

  // ---- undo -----------------------------------------------------------------------------------------

  function loadUndo() {
    return api("GET", "/api/undo").then(function (r) {
      var list = $("undo-log");
      list.textContent = "";
      S.undoOpen = null;
      r.entries.forEach(function (e) {
        if (!e.undone && !S.undoOpen) S.undoOpen = e;
        list.appendChild(h("li", { class: e.undone ? "undone" : "", testid: "undo-entry-" + e.id },
          h("span", { class: "what" }, e.what), " ",
          h("span", { class: "muted" }, plural(e.count, "caption") + " · " + e.when + (e.undone ? " · undone" : ""))));
      });
      if (!r.entries.length) list.appendChild(h("li", { class: "muted" }, "No bulk edit yet."));
      var btn = $("undo");
      btn.disabled = !S.undoOpen;
      btn.title = S.undoOpen ? "Undo: " + S.undoOpen.what + " (" + plural(S.undoOpen.count, "caption") + ")" : "nothing to undo";
    }).catch(function (e) { $("undo-result").textContent = "Cannot read the undo log: " + e.message; });
  }

  function undo() {
    $("undo").disabled = true;
    stashEditor();
    return api("POST", "/api/undo").then(function (r) {
      var text = "Reverted " + plural(r.reverted, "caption") + ".";
      if (r.conflicts.length) text += " Left " + r.conflicts.length + " changed since: " + r.conflicts.join(", ");
      $("undo-result").textContent = text;
      afterWrite();
    }, function (e) {
      $("undo-result").textContent = "Cannot undo: " + e.message;
      loadUndo();
    });
  }

  // ---- the tag panel --------------------------------------------------------------------------------

  var tagsSoon = debounce(function () { loadTags(); }, 600);

  function loadTags() {
    return api("GET", "/api/tags?sort=" + S.tagSort).then(function (r) {
      S.tags = r;
      S.tagCount = new Map(r.tags.map(function (t) { return [t.tag, t.count]; }));
      S.tagsByCount = r.tags.slice().sort(function (a, b) { return b.count - a.count || (a.tag < b.tag ? -1 : a.tag > b.tag ? 1 : 0); });
      var options = $("tag-options");
      options.textContent = "";
      S.tagsByCount.slice(0, 2000).forEach(function (t) {
        options.appendChild(h("option", { value: t.tag, label: t.tag + " (" + t.count + ")" }));
      });
      renderTagPanel();
    }).catch(function () {});
  }

  function tagButton(tag, count, prefix) {
    var inc = S.query.tags.indexOf(tag) >= 0, exc = S.query.without.indexOf(tag) >= 0;
    var btn = h("button", { type: "button", class: "tagbtn" + (inc ? " inc" : "") + (exc ? " exc" : ""),
      testid: prefix + tag, "aria-pressed": inc ? "true" : exc ? "mixed" : "false",
      title: inc ? "filtering: only images with it (click to remove)" : exc ? "filtering: only images without it (shift-click to remove)"
        : "click: only images with it · shift-click: only images without it" },
      h("span", { class: "name" }, tag), count === undefined ? null : h("span", { class: "count" }, String(count)));
    btn.addEventListener("click", function (ev) {
      if (ev.shiftKey) excludeTag(tag); else includeTag(tag);
    });
    btn.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && ev.shiftKey) { ev.preventDefault(); excludeTag(tag); }
    });
    return btn;
  }

  function renderTagPanel() {
    var find = $("tag-find").value.trim().toLowerCase();
    var list = $("tag-list");
    var focused = document.activeElement && document.activeElement.closest && document.activeElement.closest(".tagbtn");
    var focusTestid = focused ? focused.getAttribute("data-testid") : null;
    list.textContent = "";
    var shown = 0, matching = 0, LIMIT = 300;
    S.tags.tags.forEach(function (t) {
      if (find && t.tag.toLowerCase().indexOf(find) < 0) return;
      matching++;
      if (shown >= LIMIT) return;
      shown++;
      list.appendChild(h("li", {}, tagButton(t.tag, t.count, "tag-")));
    });
    $("tag-total").textContent = "(" + S.tags.tags.length + ")";
    var more = $("tag-more");
    more.hidden = matching <= shown;
    more.textContent = (matching - shown) + " more: type in Find to reach them.";
    if (!S.tags.tags.length) list.appendChild(h("li", { class: "muted" }, "No tags."));
    function inline(box, tags, prefix) {
      box.textContent = "";
      tags.forEach(function (t) { box.appendChild(tagButton(t, S.tagCount.get(t), prefix)); });
      if (!tags.length) box.appendChild(h("span", { class: "muted" }, "none"));
    }
    inline($("tags-common"), S.tags.common, "common-");
    inline($("tags-once"), S.tags.once.slice(0, 200), "once-");
    if (focusTestid) {
      var again = document.querySelector('[data-testid="' + CSS.escape(focusTestid) + '"]');
      if (again) again.focus();
    }
  }

  // ---- jobs: re-captioning, CLIP scores -------------------------------------------------------------

  function setJobRunning(on) {
    S.jobRunning = on;
    $("clip-start").disabled = on;
    updateSelectionUi();
  }

  function watchJob(jobId, label, onDone) {
    var box = $("job"), bar = $("job-progress"), status = $("job-status");
    box.hidden = false;
    bar.value = 0;
    bar.max = 1;
    status.textContent = label + ": starting…";
    status.dataset.state = "running";
    setJobRunning(true);
    var es = new EventSource(withToken("/api/jobs/" + encodeURIComponent(jobId) + "/events"));
    var errors = 0;
    es.onmessage = function (m) {
      errors = 0;
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      bar.max = Math.max(1, ev.total);
      bar.value = ev.done;
      var text = label + ": " + ev.done + " / " + ev.total;
      if (ev.state === "running") {
        if (ev.rate) text += " · " + ev.rate + " images/s";
        if (ev.eta !== null && ev.eta !== undefined) text += " · about " + seconds(ev.eta) + " left";
      }
      if (ev.state === "done") text += " · done";
      if (ev.state === "failed") text += " · failed: " + (ev.error || "unknown error");
      status.textContent = text;
      status.dataset.state = ev.state;
      if (ev.state !== "running") {
        es.close();
        setJobRunning(false);
        if (ev.state === "done" && onDone) onDone();
      }
    };
    es.onerror = function () {
      errors++;
      if (es.readyState === EventSource.CLOSED || errors > 5) {
        es.close();
        setJobRunning(false);
        status.textContent = label + ": lost the job's progress (is the editor still running?)";
        status.dataset.state = "failed";
      }
    };
  }

  function startRecaption() {
    var model = $("recaption-model").value.trim();
    var style = $("recaption-style").value;
    var status = $("job-status");
    $("recaption-start").disabled = true;
    return selectedIds().then(function (ids) {
      if (!ids.length) throw new ApiError(0, "nothing selected");
      var body = { ids: ids };
      if (model) body.model = model;
      if (style) body.style = style;
      return api("POST", "/api/recaption", body);
    }).then(function (r) {
      watchJob(r.job, "Re-captioning", function () {
        loadProposals().then(function () { openPanel("panel-proposals"); });
        reloadSoon();
      });
    }).catch(function (e) {
      $("job").hidden = false;
      status.textContent = "Cannot re-caption: " + e.message;
      status.dataset.state = "failed";
      updateSelectionUi();
    });
  }

  function startClip() {
    $("clip-start").disabled = true;
    return api("POST", "/api/clip", {}).then(function (r) {
      openPanel("panel-recaption");
      watchJob(r.job, "CLIP scores", function () { reloadSoon(); });
    }).catch(function (e) {
      $("job").hidden = false;
      $("job-status").textContent = "Cannot score: " + e.message;
      $("job-status").dataset.state = "failed";
      $("clip-start").disabled = S.jobRunning;
    });
  }

  // ---- proposals ------------------------------------------------------------------------------------

  function loadProposals() {
    return api("GET", "/api/proposals").then(function (r) {
      var list = $("proposals");
      list.textContent = "";
      r.items.forEach(function (p) {
        var actions = h("div", { class: "actions" },
          h("button", { type: "button", class: "primary", testid: "proposal-accept-" + p.id,
            "aria-label": "accept the new caption of " + p.path, onclick: function () { decide("accept", { ids: [p.id] }); } }, "Accept"),
          h("button", { type: "button", testid: "proposal-reject-" + p.id,
            "aria-label": "reject the new caption of " + p.path, onclick: function () { decide("reject", { ids: [p.id] }); } }, "Reject"));
        var row = diffRow("proposal-" + p.id, p.path, p.caption, p.proposal, actions);
        row.insertBefore(h("img", { src: thumbUrl(p.id), alt: "", loading: "lazy", class: "mini" }), row.firstChild);
        list.appendChild(row);
      });
      $("proposal-count").textContent = r.items.length ? "(" + r.items.length + ")" : "";
      $("proposals-accept-all").disabled = !r.items.length;
      $("proposals-reject-all").disabled = !r.items.length;
      if (!r.items.length) list.appendChild(h("li", { class: "muted" }, "None: re-caption a selection to get some."));
    }).catch(function (e) { $("proposal-result").textContent = "Cannot list proposals: " + e.message; });
  }

  function decide(what, body) {
    stashEditor();
    return api("POST", "/api/proposals/" + what, body).then(function (r) {
      var text = what === "accept" ? "Accepted " + plural(r.accepted, "caption") + "." : "Rejected " + plural(r.rejected, "proposal") + ".";
      if (r.conflicts && r.conflicts.length) text += " Not written, changed on disk since: " + r.conflicts.join(", ");
      $("proposal-result").textContent = text;
      if (what === "accept") afterWrite(); else { loadProposals(); reloadSoon(); }
    }, function (e) { $("proposal-result").textContent = "Cannot " + what + ": " + e.message; });
  }

  function openPanel(id) {
    var p = $(id);
    if (p && !p.open) p.open = true;
    if (p) p.scrollIntoView({ block: "nearest" });
  }

  // ---- where the model looked (loracap edit --explain-model) -----------------------------------------

  var explainUrl = null;

  function explainTarget() {
    // The focused card; else the one ticked image.
    if (S.focusId !== null) return S.focusId;
    if (!S.allMatching && S.selected.size === 1) return S.selected.values().next().value;
    return null;
  }

  function explainFocused() {
    var id = explainTarget();
    var status = $("explain-status");
    if (id === null) { status.textContent = "Click an image first."; return; }
    var item = S.byId.get(id);
    var name = item ? item.path : "image " + id;
    status.textContent = "Explaining " + name + "… (the first one loads the model)";
    $("explain-start").disabled = true;
    var headers = {};
    if (TOKEN) headers["X-Loracap-Token"] = TOKEN;
    // Not api(): the answer is a PNG, read as a blob; an error is still JSON with a detail.
    fetch("/api/explain/" + id, { headers: headers }).then(function (res) {
      if (res.ok) return res.blob();
      return res.json().catch(function () { return null; }).then(function (data) {
        throw new ApiError(res.status, data && data.detail !== undefined ? detailText(data.detail)
          : res.status + " " + res.statusText, data);
      });
    }).then(function (blob) {
      if (explainUrl) URL.revokeObjectURL(explainUrl);
      explainUrl = URL.createObjectURL(blob);
      $("explain-image").src = explainUrl;
      $("explain-image").alt = "where the model looked, word by word: " + name;
      $("explain-link").href = explainUrl;
      $("explain-link").hidden = false;
      status.textContent = name + " (click the picture to open it full size)";
    }, function (e) {
      status.textContent = "Cannot explain " + name + ": " + (e.message || "the editor's server does not answer");
    }).then(function () { $("explain-start").disabled = false; });
  }

  // ---- the keyboard ---------------------------------------------------------------------------------

  document.addEventListener("keydown", function (ev) {
    var mod = ev.ctrlKey || ev.metaKey;
    var key = ev.key;
    if (mod && !ev.altKey && (key === "s" || key === "S")) {
      ev.preventDefault(); // never the browser's "save page"
      if ($("conflict-dialog").open) return;
      if (S.editor) saveEditor(S.editor); else saveAllDrafts();
      return;
    }
    if ($("conflict-dialog").open || ev.defaultPrevented) return;
    var t = ev.target;
    if (S.editor && S.editor.el.contains(t)) return; // the editor's own keys
    var onCard = t === document.body || t === document.documentElement || (t.classList && t.classList.contains("card"));
    var inCard = onCard || (t.closest && t.closest("#grid .card") && !isField(t)) || (t.type === "checkbox" && t.closest && t.closest("#grid"));
    if (isField(t) && !(t.type === "checkbox")) {
      if (key === "Escape" && t.id === "search" && !t.value) t.blur();
      return;
    }
    if (mod && !ev.altKey && !ev.shiftKey && (key === "z" || key === "Z") && inCard && S.drafts.has(S.focusId)) {
      // undo the unsaved edit of the focused card
      ev.preventDefault();
      var id = S.focusId;
      S.drafts.delete(id);
      S.cardState.delete(id);
      updateCard(id);
      refreshSaveState("Discarded the unsaved edit");
      return;
    }
    if (mod || ev.altKey) return;
    if (key === "/" && !isField(t)) { ev.preventDefault(); $("search").focus(); $("search").select(); return; }
    if (!inCard) return;
    var navKeys = ["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp", "j", "k"];
    if (navKeys.indexOf(key) >= 0 && !$("grid").contains(t) && S.focusId !== null) {
      ev.preventDefault(); // the first press only shows where the keyboard is
      setFocusCard(S.focusId, true);
      return;
    }
    if (key === "ArrowRight" || key === "j") { ev.preventDefault(); moveFocus(1); }
    else if (key === "ArrowLeft" || key === "k") { ev.preventDefault(); moveFocus(-1); }
    else if (key === "ArrowDown") { ev.preventDefault(); moveFocus(columns()); }
    else if (key === "ArrowUp") { ev.preventDefault(); moveFocus(-columns()); }
    else if (key === "Home" && onCard) { ev.preventDefault(); if (S.items.length) setFocusCard(S.items[0].id, true); }
    else if (key === "End" && onCard) { ev.preventDefault(); if (S.items.length) setFocusCard(S.items[S.items.length - 1].id, true); }
    else if ((key === "Enter" || key === "e") && onCard) {
      ev.preventDefault();
      if (S.focusId === null && S.items.length) setFocusCard(S.items[0].id, true);
      if (S.focusId !== null) startEdit(S.focusId);
    } else if ((key === " " || key === "x") && onCard && S.focusId !== null && !S.allMatching) {
      ev.preventDefault();
      toggleSelected(S.focusId, !S.selected.has(S.focusId));
    }
  });

  window.addEventListener("beforeunload", function (ev) {
    if (unsavedCount()) { ev.preventDefault(); ev.returnValue = ""; }
  });

  // ---- wiring ---------------------------------------------------------------------------------------

  $("filters").addEventListener("submit", function (ev) { ev.preventDefault(); });
  var searchSoon = debounce(function () {
    if (S.query.q === $("search").value) return;
    S.query.q = $("search").value;
    filtersChanged();
  }, 250);
  $("search").addEventListener("input", searchSoon);
  $("search").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") { ev.preventDefault(); searchSoon.cancel(); S.query.q = $("search").value; filtersChanged(); }
  });
  $("filter-tag-input").addEventListener("keydown", function (ev) {
    if (ev.key !== "Enter") return;
    ev.preventDefault();
    var raw = ev.target.value.trim();
    ev.target.value = "";
    if (!raw) return;
    if (raw.charAt(0) === "-") { var tag = splitTags(raw.slice(1)).join(" "); if (tag && S.query.without.indexOf(tag) < 0) excludeTag(tag); }
    else { var inc = splitTags(raw).join(" "); if (inc && S.query.tags.indexOf(inc) < 0) includeTag(inc); }
  });
  $("flag").addEventListener("change", function (ev) { S.query.flag = ev.target.value; filtersChanged(); });
  $("sort").addEventListener("change", function (ev) {
    var v = ev.target.value.split(":");
    S.sort = v[0];
    S.order = v[1];
    filtersChanged();
  });
  $("page-size").addEventListener("change", function (ev) {
    S.limit = parseInt(ev.target.value, 10) || 100;
    filtersChanged();
  });
  $("page-prev").addEventListener("click", function () { goPage(-1); });
  $("page-next").addEventListener("click", function () { goPage(1); });
  $("select-page").addEventListener("click", function () {
    S.allMatching = false;
    S.items.forEach(function (it) { S.selected.add(it.id); });
    updateSelectionUi();
  });
  $("select-all-matching").addEventListener("click", function () {
    S.allMatching = !S.allMatching;
    updateSelectionUi();
  });
  $("select-none").addEventListener("click", function () {
    S.allMatching = false;
    S.selected.clear();
    updateSelectionUi();
  });
  $("bulk-op").addEventListener("change", showOpFields);
  document.querySelectorAll("#panel-bulk input").forEach(function (input) {
    input.addEventListener("input", invalidatePreview);
    input.addEventListener("keydown", function (ev) { if (ev.key === "Enter") { ev.preventDefault(); preview(); } });
  });
  $("bulk-preview").addEventListener("click", preview);
  $("bulk-apply").addEventListener("click", applyBulk);
  $("undo").addEventListener("click", undo);
  $("tag-sort").addEventListener("change", function (ev) { S.tagSort = ev.target.value; loadTags(); });
  $("tag-find").addEventListener("input", debounce(renderTagPanel, 150));
  $("recaption-start").addEventListener("click", startRecaption);
  $("explain-start").addEventListener("click", explainFocused);
  $("clip-start").addEventListener("click", startClip);
  $("proposals-accept-all").addEventListener("click", function () { decide("accept", { all: true }); });
  $("proposals-reject-all").addEventListener("click", function () { decide("reject", { all: true }); });
  $("conflict-keep-mine").addEventListener("click", function () { closeConflict("mine"); });
  $("conflict-take-disk").addEventListener("click", function () { closeConflict("disk"); });
  $("conflict-cancel").addEventListener("click", function () { closeConflict("cancel"); });
  $("conflict-dialog").addEventListener("cancel", function (ev) { ev.preventDefault(); closeConflict("cancel"); });
  window.addEventListener("hashchange", function () {
    readHash();
    syncFilterControls();
    renderTagPanel();
    loadGrid({});
  });

  // ---- start ----------------------------------------------------------------------------------------

  readHash();
  syncFilterControls();
  showOpFields();
  updateSelectionUi();
  loadInfo().catch(function (e) { showBanner("Cannot reach the editor: " + e.message); });
  loadGrid({});
  loadTags();
  loadUndo();
  loadProposals().then(function () {
    if ($("proposals").querySelector("[data-testid^='proposal-']")) openPanel("panel-proposals");
  });
})();
