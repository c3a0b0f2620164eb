// celery-sqlresults monitoring page: polls the JSON API and renders with the DOM API;
// running tasks are followed through their event streams (/api/tasks/{id}/events).
// Task data is only ever put into the page as text (textContent / attributes via
// dataset), so a result holding HTML or a <script> is shown, never run.
"use strict";
(function () {
  var REFRESH_MS = 2000;
  var STATE_ORDER = ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"];
  var READY = ["SUCCESS", "FAILURE", "REVOKED"];
  var FILTERABLE = /^[A-Za-z0-9_.:-]{1,50}$/;  // what the API's state filter takes
  var token = new URLSearchParams(location.search).get("token");
  var shown = 0;          // rows in the list (kept on refresh after "Load more")
  var nextCursor = null;  // cursor of the page after the rows shown
  var generation = 0;     // answers to an older request are dropped
  var rendered = {};      // what each part of the page shows now, to skip identical redraws
  var RUNNING_MAX = 20;   // running tasks followed at once (one event stream each)
  var KEEP_FINISHED_MS = 30000;  // how long a finished task's card stays
  var CELERY_STATES = STATE_ORDER.concat(["REJECTED", "IGNORED"]);
  var customStates = ["PROGRESS"];  // custom states stored, as the counts tell
  var running = {};       // task id -> {card, source, finished}
  var groupStream = null; // {id, source}: the event stream of the group shown

  function $(id) { return document.getElementById(id); }

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function stateBadge(state) {
    var css = "state state-" + String(state).toLowerCase().replace(/[^a-z]/g, "");
    return el("span", state, css);
  }

  function taskLink(id) {
    var a = el("a", id);
    a.href = "#task/" + encodeURIComponent(id);
    return a;
  }

  function when(iso) { return iso ? String(iso).replace("T", " ").slice(0, 19) : "–"; }

  function duration(ms) {
    var s = Math.max(0, Math.floor(ms / 1000));
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + two(Math.floor(s / 60) % 60) + "m";
    return Math.floor(s / 86400) + "d " + two(Math.floor(s / 3600) % 24) + "h";
  }

  // How long a task ran, or has been running (a state that is not final, STARTED or a
  // custom one such as PROGRESS, since date_started): "running …" counts on by itself.
  function runtime(task) {
    if (!task.date_started) return { text: "–" };
    var started = Date.parse(task.date_started);
    if (READY.indexOf(task.state) < 0) {
      return { text: "running " + duration(Date.now() - started), since: task.date_started };
    }
    return { text: task.date_done ? duration(Date.parse(task.date_done) - started) : "–" };
  }

  // Celery writes date_done on every store, progress reports included: a task that is not
  // finished shows no finish time.
  function finished(task) {
    return READY.indexOf(task.state) >= 0 ? when(task.date_done) : "–";
  }

  function runtimeCell(task) {
    var info = runtime(task), td = el("td", info.text, "runtime");
    if (info.since) td.dataset.since = info.since;
    return td;
  }

  function tickRuntimes() {
    document.querySelectorAll("[data-since]").forEach(function (node) {
      node.textContent = "running " + duration(Date.now() - Date.parse(node.dataset.since));
    });
  }

  function asText(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function size(n) {
    var units = ["bytes", "KB", "MB", "GB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  // A value as text: whole, or (too large for the answer) its stored first part.
  function valueText(task, field) {
    var cut = task.truncated && task.truncated[field];
    if (!cut) return field === "traceback" ? (task.traceback || "–") : asText(task[field]);
    return (cut.preview === null ? "(not text)" : cut.preview) + " …";
  }

  function authHeaders() { return token ? { Authorization: "Bearer " + token } : {}; }

  // The whole stored value, fetched with the page's credentials and saved as a file.
  async function download(taskId, field) {
    var url = new URL("api/raw/" + field + "/" + encodeURIComponent(taskId), document.baseURI);
    var response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) throw new Error(field + ": " + response.status + " " + response.statusText);
    var link = el("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = taskId + "-" + field + (field === "traceback" ? ".txt" : ".bin");
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); }, 10000);
  }

  async function api(path, params) {
    var url = new URL(path, document.baseURI);
    Object.keys(params || {}).forEach(function (key) {
      var value = params[key];
      if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
    });
    var response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
    var body = await response.json().catch(function () { return { error: response.statusText }; });
    if (!response.ok) {
      var error = new Error(body.error || response.statusText);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function filters() {
    return {
      state: $("f-state").value,
      name: $("f-name").value.trim(),
      worker: $("f-worker").value.trim(),
      since: $("f-since").value.trim(),
    };
  }

  function setError(message) { $("error").textContent = message || ""; }

  // ---- rendering ----------------------------------------------------------
  function unchanged(part, data) {
    var key = JSON.stringify([data, location.hash, $("f-state").value]);
    if (rendered[part] === key) return true;
    rendered[part] = key;
    return false;
  }

  // The state filter offers Celery's states and every state stored (custom ones too).
  function renderStateOptions(stats) {
    var select = $("f-state"), current = select.value;
    var wanted = STATE_ORDER.concat(Object.keys(stats.states).filter(function (state) {
      return FILTERABLE.test(state) && STATE_ORDER.indexOf(state) < 0;
    }).sort());
    if (current && wanted.indexOf(current) < 0) wanted.push(current);
    var have = Array.prototype.slice.call(select.options, 1).map(function (o) { return o.value; });
    if (have.join(",") === wanted.join(",")) return;
    var options = [el("option", "any")];
    options[0].value = "";
    wanted.forEach(function (state) { options.push(el("option", state)); });
    select.replaceChildren.apply(select, options);
    select.value = current;
  }

  function renderCounts(stats) {
    renderStateOptions(stats);
    if (unchanged("counts", stats)) return;
    var box = $("counts");
    var current = $("f-state").value;
    var names = Object.keys(stats.states).sort(function (a, b) {
      var ia = STATE_ORDER.indexOf(a), ib = STATE_ORDER.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || (a < b ? -1 : 1);
    });
    var nodes = [el("strong", "total " + stats.total)];
    names.forEach(function (state) {
      var button = el("button", state + " " + stats.states[state], stateBadge(state).className);
      button.type = "button";
      button.dataset.state = state;
      if (state === current) button.classList.add("active");
      button.addEventListener("click", function () {
        $("f-state").value = $("f-state").value === state ? "" : state;
        filtersChanged();
      });
      nodes.push(button);
    });
    box.replaceChildren.apply(box, nodes);
  }

  // A table row for one task: its id (a link to its detail) and state badge first.
  function idStateRow(task) {
    var tr = document.createElement("tr");
    tr.dataset.taskId = task.task_id;
    var id = el("td", null, "id");
    id.appendChild(taskLink(task.task_id));
    var state = el("td");
    state.appendChild(stateBadge(task.state));
    tr.append(id, state);
    return tr;
  }

  function taskRow(task) {
    var tr = idStateRow(task);
    var result = el("td", valueText(task, "result").slice(0, 200), "result");
    tr.append(el("td", task.name || "–"), el("td", task.worker || "–"),
      el("td", when(task.date_started)), runtimeCell(task), el("td", finished(task)), result);
    if (location.hash === "#task/" + encodeURIComponent(task.task_id)) tr.classList.add("selected");
    return tr;
  }

  function renderTasks(page, append) {
    if (!append && unchanged("tasks", page)) return;
    if (append) rendered.tasks = null;
    var body = $("tasks").tBodies[0];
    var rows = page.tasks.map(taskRow);
    if (append) body.append.apply(body, rows);
    else body.replaceChildren.apply(body, rows);
    shown = body.rows.length;
    nextCursor = page.next_cursor;
    $("more").hidden = !nextCursor;
    $("empty").hidden = shown > 0;
  }

  function renderDetail(task) {
    if (unchanged("detail", task)) return;
    $("d-id").textContent = task.task_id;
    var fields = [];
    [["state", task.state], ["name", task.name], ["worker", task.worker], ["queue", task.queue],
      ["retries", task.retries], ["created (UTC)", when(task.date_created)],
      ["started (UTC)", when(task.date_started)],
      ["finished (UTC)", finished(task)]].forEach(function (pair) {
      fields.push(el("dt", pair[0]), el("dd", pair[1] === null ? "–" : pair[1]));
    });
    var took = runtime(task), dd = el("dd", took.text);
    dd.id = "d-runtime";
    if (took.since) dd.dataset.since = took.since;
    fields.push(el("dt", "runtime"), dd);
    $("d-fields").replaceChildren.apply($("d-fields"), fields);
    ["args", "kwargs", "result", "traceback"].forEach(function (field) {
      $("d-" + field).textContent = valueText(task, field);
      var note = $("d-" + field + "-cut"), cut = task.truncated && task.truncated[field];
      note.hidden = !cut;
      if (!cut) return;
      var button = el("button", "download whole");
      button.type = "button";
      button.addEventListener("click", function () {
        download(task.task_id, field).catch(function (error) { setError(error.message); });
      });
      note.replaceChildren(el("span", "first part shown; " + size(cut.size) +
        (field === "traceback" ? " (characters)" : "") + " stored "), button);
    });
  }

  function renderGroup(group) {
    if (unchanged("group", group)) return;
    $("g-id").textContent = group.group_id;
    $("g-progress").max = Math.max(group.progress.total, 1);
    $("g-progress").value = group.progress.done;
    var counts = Object.keys(group.states).map(function (s) { return s + " " + group.states[s]; });
    $("g-text").textContent = group.progress.done + " / " + group.progress.total + " done" +
      (counts.length ? " (" + counts.join(", ") + ")" : "");
    var rows = group.members.map(function (member) {
      var tr = idStateRow(member);
      tr.append(el("td", member.name || "–"), el("td", when(member.date_done)));
      return tr;
    });
    var body = $("g-members").tBodies[0];
    body.replaceChildren.apply(body, rows);
  }

  // ---- running tasks, live ------------------------------------------------
  // A progress bar for meta holding current/total or done/total; null for any other meta.
  function progressOf(meta) {
    if (!meta || typeof meta !== "object" || Array.isArray(meta)) return null;
    var total = Number(meta.total);
    var current = Number("current" in meta ? meta.current : meta.done);
    if (!("current" in meta || "done" in meta) || !isFinite(total) || total <= 0 ||
        !isFinite(current)) return null;
    return { value: Math.max(0, Math.min(current, total)), max: total,
      text: meta.current !== undefined ? meta.current + " / " + meta.total
        : meta.done + " / " + meta.total };
  }

  function renderCard(entry, task) {
    var card = entry.card, head = el("div", null, "head");
    card.dataset.state = task.state;
    head.append(stateBadge(task.state), taskLink(task.task_id), el("span", task.name || "", "name"));
    var took = runtime(task), clock = el("span", took.text, "runtime");
    if (took.since) clock.dataset.since = took.since;
    head.append(clock);
    var nodes = [head], bar = progressOf(task.result);
    if (bar) {
      var meter = el("progress");
      meter.max = bar.max;
      meter.value = bar.value;
      var line = el("div", null, "bar");
      line.append(meter, el("span", bar.text, "count"));
      nodes.push(line);
    } else if (task.result !== null && task.result !== undefined) {
      nodes.push(el("pre", valueText(task, "result").slice(0, 500), "meta"));
    }
    card.replaceChildren.apply(card, nodes);
    card.classList.toggle("finished", READY.indexOf(task.state) >= 0);
  }

  function follow(task) {
    var entry = { card: el("div", null, "card"), source: null, finished: 0 };
    entry.card.dataset.taskId = task.task_id;
    running[task.task_id] = entry;
    renderCard(entry, task);
    var url = new URL("api/tasks/" + encodeURIComponent(task.task_id) + "/events", document.baseURI);
    if (token) url.searchParams.set("token", token);
    entry.source = new EventSource(url);
    entry.source.addEventListener("task", function (event) {
      var data = JSON.parse(event.data);
      renderCard(entry, data);
      if (READY.indexOf(data.state) >= 0) entry.finished = entry.finished || Date.now();
    });
    entry.source.addEventListener("end", function () {
      entry.source.close();
      entry.finished = entry.finished || Date.now();
    });
    // On a dropped connection or a timeout the browser reconnects by itself.
  }

  function unfollow(id) {
    var entry = running[id];
    if (entry.source) entry.source.close();
    entry.card.remove();
    delete running[id];
  }

  function renderRunning(page) {
    var listed = page.tasks.map(function (task) { return task.task_id; });
    page.tasks.forEach(function (task) { if (!running[task.task_id]) follow(task); });
    Object.keys(running).forEach(function (id) {
      var entry = running[id], gone = listed.indexOf(id) < 0;
      if (gone && entry.finished && Date.now() - entry.finished > KEEP_FINISHED_MS) unfollow(id);
    });
    var ids = Object.keys(running);
    ids.filter(function (id) { return listed.indexOf(id) < 0 && !running[id].finished; })
      .slice(0, Math.max(0, ids.length - 2 * RUNNING_MAX)).forEach(unfollow);
    var box = $("running-list"), cards = listed.concat(Object.keys(running).filter(function (id) {
      return listed.indexOf(id) < 0;
    })).map(function (id) { return running[id] && running[id].card; }).filter(Boolean);
    box.replaceChildren.apply(box, cards);
    $("running").hidden = cards.length === 0;
    $("running-count").textContent = "(" + listed.length +
      (page.next_cursor ? "+, the newest " + RUNNING_MAX + " followed" : "") + ")";
  }

  // The group shown follows its event stream too (the poll still redraws it).
  function followGroup(id) {
    if (groupStream && groupStream.id === id) return;
    unfollowGroup();
    var url = new URL("api/groups/" + encodeURIComponent(id) + "/events", document.baseURI);
    if (token) url.searchParams.set("token", token);
    var source = new EventSource(url);
    groupStream = { id: id, source: source };
    source.addEventListener("group", function (event) {
      var view = route();
      if (view && view.kind === "group" && view.id === id) renderGroup(JSON.parse(event.data));
    });
    source.addEventListener("end", function () { source.close(); });
  }

  function unfollowGroup() {
    if (groupStream) groupStream.source.close();
    groupStream = null;
  }

  function runningStates() {
    return ["STARTED"].concat(customStates).join(",");
  }

  // ---- loading ------------------------------------------------------------
  function route() {
    var match = /^#(task|group)\/(.+)$/.exec(location.hash);
    return match ? { kind: match[1], id: decodeURIComponent(match[2]) } : null;
  }

  async function loadView() {
    var view = route();
    $("detail").hidden = !view || view.kind !== "task";
    $("group").hidden = !view || view.kind !== "group";
    if (!view || view.kind !== "group") unfollowGroup();
    if (!view) return;
    var path = (view.kind === "task" ? "api/tasks/" : "api/groups/") + encodeURIComponent(view.id);
    try {
      var data = await api(path);
      if (view.kind === "task") renderDetail(data); else renderGroup(data);
      if (view.kind === "group") followGroup(view.id);
    } catch (error) {
      if (error.status !== 404) throw error;
      if (view.kind === "task") {
        renderDetail({ task_id: view.id, state: "PENDING (nothing stored)", name: null,
          worker: null, queue: null, retries: null, date_created: null, date_started: null,
          date_done: null, args: null, kwargs: null,
          result: null, traceback: null, truncated: {} });
      } else {
        renderGroup({ group_id: view.id + " (not stored)", members: [], states: {},
          progress: { done: 0, total: 0 } });
      }
    }
  }

  async function refresh() {
    var mine = ++generation;
    var f = filters();
    try {
      var results = await Promise.all([
        api("api/stats", { name: f.name, worker: f.worker, since: f.since }),
        api("api/tasks", Object.assign({ limit: Math.min(500, Math.max(50, shown)) }, f)),
        api("api/tasks", { state: runningStates(), limit: RUNNING_MAX }),
      ]);
      if (mine !== generation) return;
      var found = Object.keys(results[0].states).filter(function (state) {
        return FILTERABLE.test(state) && CELERY_STATES.indexOf(state) < 0;
      });
      customStates = ["PROGRESS"].concat(found.filter(function (s) { return s !== "PROGRESS"; }))
        .slice(0, 20);
      renderCounts(results[0]);
      renderTasks(results[1], false);
      renderRunning(results[2]);
      await loadView();
      setError("");
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      if (mine === generation) setError(error.message);
    }
  }

  async function loadMore() {
    if (!nextCursor) return;
    try {
      renderTasks(await api("api/tasks", Object.assign({ cursor: nextCursor }, filters())), true);
    } catch (error) {
      setError(error.message);
    }
  }

  function filtersChanged() {
    shown = 0;
    refresh();
  }

  function poll() {
    setTimeout(async function () {
      if ($("f-live").checked && !document.hidden) await refresh();
      poll();
    }, REFRESH_MS);
  }

  var typing = null;
  ["f-name", "f-worker", "f-since"].forEach(function (id) {
    $(id).addEventListener("input", function () {
      clearTimeout(typing);
      typing = setTimeout(filtersChanged, 300);
    });
  });
  $("f-state").addEventListener("change", filtersChanged);
  $("filters").addEventListener("submit", function (event) { event.preventDefault(); });
  $("more").addEventListener("click", loadMore);
  $("open-group").addEventListener("click", function () {
    var id = $("f-group").value.trim();
    if (id) location.hash = "#group/" + encodeURIComponent(id);
  });
  document.querySelectorAll("aside .close").forEach(function (button) {
    button.addEventListener("click", function () {
      history.pushState(null, "", location.pathname + location.search);
      loadView();
    });
  });
  window.addEventListener("hashchange", function () {
    loadView().catch(function (error) { setError(error.message); });
    document.querySelectorAll("#tasks tbody tr").forEach(function (tr) {
      tr.classList.toggle("selected", location.hash === "#task/" + encodeURIComponent(tr.dataset.taskId));
    });
  });
  setInterval(tickRuntimes, 1000);
  refresh();
  poll();
})();
