// The pages that read: runs, one run (curves, checkpoints), sessions, server. Each page function fills `main` and
// may return a cleanup function (stops its polling when the page is left).
"use strict";

const POLL_MS = 1500;
// Curves drawn first when a run has them; any other metric gets a chart after these.
const CURVES = [
  ["loss_per_token", "Loss per token", "forward_backward"],
  ["learning_rate", "Learning rate", "optim_step"],
  ["grad_norm", "Gradient norm", "optim_step"],
  // Recorded by a loss given the sampler's logprobs: how far the trainer's logprobs of the same tokens are.
  ["sampler_logprob_abs_diff:mean", "Sampler vs trainer: mean |Δ logprob|", "forward_backward"],
  ["sampler_logprob_abs_diff:max", "Sampler vs trainer: max |Δ logprob|", "forward_backward"],
];
const NOT_CURVES = new Set(["id", "step", "kind", "seq_id", "recorded_at", "update_skipped"]);

async function runsPage(main) {
  const data = await call("GET", "/console/api/runs?limit=500");
  const filter = h("input", { type: "search", placeholder: "Filter by id, model, metadata…", id: "run-filter" });
  const stateFilter = h(
    "select",
    { id: "state-filter" },
    ["all states", "training", "idle", "closed", "corrupted"].map((s) => h("option", { value: s }, s)),
  );
  const body = h("tbody");
  const count = h("span", { class: "muted" });
  const render = () => {
    const needle = filter.value.trim().toLowerCase();
    const state = stateFilter.value;
    const shown = data.runs.filter((run) => {
      if (state !== "all states" && run.state !== state) return false;
      if (!needle) return true;
      const hay = [run.id, run.base_model, run.owner, JSON.stringify(run.user_metadata)].join(" ").toLowerCase();
      return hay.includes(needle);
    });
    body.replaceChildren(
      ...shown.map((run) =>
        h(
          "tr",
          { class: "run-row" },
          h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.id)}` }, run.id)),
          h("td", {}, run.base_model),
          h("td", { class: "num" }, run.lora_rank),
          h("td", {}, run.owner),
          h("td", {}, stateBadge(run.state)),
          h("td", { class: "num" }, fmtNum(run.last_step)),
          h("td", { class: "num" }, fmtNum(run.last_loss)),
          h("td", {}, fmtTime(run.created_at)),
          h("td", { class: "meta" }, Object.keys(run.user_metadata).length ? JSON.stringify(run.user_metadata) : ""),
        ),
      ),
    );
    count.textContent = `${shown.length} of ${data.total_count} runs`;
  };
  filter.addEventListener("input", render);
  stateFilter.addEventListener("change", render);
  const head = ["Run", "Base model", "Rank", "Owner", "State", "Last step", "Last loss/token", "Created", "Metadata"];
  main.replaceChildren(
    h("h1", {}, "Training runs"),
    h("div", { class: "toolbar" }, filter, stateFilter, count),
    h("table", { id: "runs" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), body),
  );
  render();
}

function makeChart(container, title, width) {
  const holder = h("div", { class: "chart", "data-metric": title }, h("h3", {}, title));
  container.append(holder);
  const opts = {
    width: width,
    height: 220,
    // A curve of one point still gets a value range around it (uPlot's default spans 0..100 for a lone 0).
    scales: {
      x: { time: false },
      y: { range: (_u, lo, hi) => (lo === hi ? [lo - (Math.abs(lo) || 1) / 2, hi + (Math.abs(hi) || 1) / 2] : uPlot.rangeNum(lo, hi, 0.1, true)) },
    },
    axes: [{ label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }, {}],
    series: [{ label: "step" }, { label: title, stroke: "#2f6fde", width: 1.5, points: { show: true, size: 4 } }],
    legend: { show: true },
  };
  return { holder, plot: new uPlot(opts, [[], []], holder), xs: [], ys: [] };
}

async function runPage(main, runId) {
  const detail = await call("GET", `/console/api/runs/${encodeURIComponent(runId)}`);
  const run = detail.run;
  const lora = run.lora;
  const facts = h(
    "dl",
    { class: "facts" },
    [
      ["Base model", run.base_model],
      ["State", stateBadge(run.state)],
      ["Owner", run.owner],
      ["Session", run.session_id],
      ["LoRA rank", lora.rank],
      ["LoRA alpha", lora.alpha],
      ["Seed", lora.seed === null ? "–" : lora.seed],
      ["Trains", ["attention", "MLP", "unembedding"].filter((_, i) => [lora.train_attn, lora.train_mlp, lora.train_unembed][i]).join(", ")],
      ["Created", fmtTime(run.created_at)],
      ["Last request", fmtTime(run.last_request_at)],
      ["Queued requests", String(detail.queued)],
    ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
  const charts = h("div", { class: "charts", id: "charts" });
  const status = h("p", { class: "muted", id: "curve-status" }, "No steps recorded yet.");
  const checkpoints = h("div", { id: "checkpoints" });
  main.replaceChildren(
    h("h1", { id: "run-title" }, run.id),
    h("div", { class: "card" }, facts),
    h("h2", {}, "User metadata"),
    jsonBlock(run.user_metadata),
    h("h2", {}, "Curves"),
    status,
    charts,
    h("h2", {}, "Checkpoints"),
    checkpoints,
    h("p", {}, h("a", { href: `/api/v1/training_runs/${encodeURIComponent(run.id)}/metrics?format=csv`, id: "csv-link", onclick: downloadCsv(run.id) }, "Download metrics as CSV")),
  );
  renderCheckpoints(checkpoints, run.id, detail.checkpoints);

  const byMetric = new Map();
  let lastId = 0;
  let stopped = false;
  const width = Math.max(420, Math.min(560, charts.clientWidth || 560));
  const poll = async () => {
    if (stopped) return;
    try {
      const data = await call("GET", `/api/v1/training_runs/${encodeURIComponent(run.id)}/metrics?after=${lastId}`);
      if (data.rows.length) {
        lastId = data.last_id;
        const names = CURVES.map((c) => c[0]).concat(data.columns.filter((c) => !NOT_CURVES.has(c) && !CURVES.some((k) => k[0] === c)));
        for (const name of names) {
          const points = data.rows.filter((r) => typeof r[name] === "number");
          if (!points.length) continue;
          if (!byMetric.has(name)) {
            const known = CURVES.find((c) => c[0] === name);
            byMetric.set(name, makeChart(charts, known ? known[1] : name, width));
          }
          const chart = byMetric.get(name);
          for (const row of points) {
            chart.xs.push(row.step);
            chart.ys.push(row[name]);
          }
          chart.plot.setData([chart.xs, chart.ys]);
          chart.holder.dataset.points = String(chart.xs.length);
        }
        const last = data.rows[data.rows.length - 1];
        status.textContent = `${lastId} records, last at step ${last.step} (${fmtTime(last.recorded_at)}); updating live.`;
      }
    } catch (error) {
      status.textContent = `Could not load metrics: ${error.message}`;
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  };
  let timer = setTimeout(poll, 0);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function downloadCsv(runId) {
  // The endpoint needs the key header, which a plain link cannot send: fetch it and hand the browser a blob.
  return async (event) => {
    event.preventDefault();
    const response = await fetch(`/api/v1/training_runs/${encodeURIComponent(runId)}/metrics?format=csv`, {
      headers: { "X-API-Key": apiKey() || "" },
      credentials: "omit",
    });
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: `${runId.replaceAll(":", "_")}-metrics.csv` });
    link.click();
    URL.revokeObjectURL(url);
  };
}

function checkpointUrl(c) {
  return `/api/v1/training_runs/${encodeURIComponent(c.run_id)}/checkpoints/${encodeURIComponent(c.kind)}/${encodeURIComponent(c.name)}`;
}

// Downloading from anywhere with the key: the SDK's CLI takes training (weights/) and external_weights/ checkpoints;
// a sampler checkpoint comes as one tar from the archive endpoint (a redirect to a signed URL).
function downloadCommand(c) {
  if (c.kind !== "sampler_weights") return `tinker checkpoint download ${c.tinker_path}`;
  const url = `${location.origin}${checkpointUrl(c)}/archive`;
  return `curl -fL -H "X-API-Key: $TINKER_API_KEY" -o ${c.name}.tar ${url}`;
}

// Exporting on the server's host, from its data directory (add --data-dir when it is not the default).
function exportCommand(c) {
  return `tinkerd checkpoints export ${c.tinker_path} --format peft --out ./${c.name} --owner ${c.owner}`;
}

function renderCheckpoints(container, runId, items) {
  if (!items.length) {
    container.replaceChildren(h("p", { class: "muted" }, "No checkpoints yet."));
    return;
  }
  const refresh = async () => {
    const detail = await call("GET", `/console/api/runs/${encodeURIComponent(runId)}`);
    renderCheckpoints(container, runId, detail.checkpoints);
  };
  const act = (fn) => async () => {
    try {
      await fn();
      await refresh();
    } catch (error) {
      toast(error.message, true);
    }
  };
  const rows = items.map((c) => {
    const ttl = h("input", { type: "number", min: 1, placeholder: "TTL s", class: "ttl", size: 7 });
    return h(
      "tr",
      { class: "checkpoint", "data-path": c.tinker_path },
      h("td", {}, c.tinker_path),
      h("td", { class: "num" }, fmtBytes(c.size_bytes)),
      h("td", {}, fmtTime(c.created_at)),
      h("td", { class: "expires" }, c.expires_at ? fmtTime(c.expires_at) : "never"),
      h("td", { class: "published" }, c.public ? "published" : "private"),
      h(
        "td",
        { class: "actions" },
        c.public
          ? h("button", { type: "button", class: "unpublish", onclick: act(() => call("DELETE", `${checkpointUrl(c)}/publish`)) }, "Unpublish")
          : h("button", { type: "button", class: "publish", onclick: act(() => call("POST", `${checkpointUrl(c)}/publish`)) }, "Publish"),
        ttl,
        h("button", { type: "button", class: "set-ttl", onclick: act(() => call("PUT", `${checkpointUrl(c)}/ttl`, { ttl_seconds: ttl.value ? Number(ttl.value) : null })) }, "Set TTL"),
        h("button", { type: "button", class: "copy-download", onclick: () => copyText(downloadCommand(c)) }, "Copy download command"),
        h("button", { type: "button", class: "copy-export", onclick: () => copyText(exportCommand(c)) }, "Copy export command"),
        h("button", {
          type: "button",
          class: "delete danger",
          onclick: act(async () => {
            if (confirm(`Delete ${c.tinker_path}? This cannot be undone.`)) await call("DELETE", checkpointUrl(c));
          }),
        }, "Delete"),
      ),
    );
  });
  const head = ["Path", "Size", "Saved", "Expires", "Visibility", "Actions"];
  container.replaceChildren(h("table", { id: "checkpoint-table" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), h("tbody", {}, rows)));
}

async function sessionsPage(main) {
  const data = await call("GET", "/console/api/sessions");
  const rows = data.sessions.map((s) =>
    h(
      "tr",
      { class: "session" },
      h("td", {}, s.id, s.display_name ? h("div", { class: "muted" }, s.display_name) : null),
      h("td", {}, h("span", { class: s.status === "active" ? "state" : "state closed" }, s.status)),
      h("td", {}, s.sdk_version || "–"),
      h("td", {}, fmtTime(s.created_at)),
      h("td", {}, fmtTime(s.last_heartbeat_at)),
      h("td", {}, s.runs.map((id) => h("div", {}, h("a", { href: `#/runs/${encodeURIComponent(id)}` }, id)))),
      h("td", {}, s.samplers.map((x) => h("div", {}, x.id, h("span", { class: "muted" }, ` ${x.model_path || x.base_model}`)))),
      h("td", { class: "meta" }, Object.keys(s.user_metadata).length ? JSON.stringify(s.user_metadata) : ""),
    ),
  );
  const head = ["Session", "Status", "SDK", "Created", "Last heartbeat", "Training runs", "Samplers", "Metadata"];
  main.replaceChildren(
    h("h1", {}, "Sessions and samplers"),
    h("p", { class: "muted" }, `${data.total_count} sessions, newest first.`),
    h("table", { id: "sessions" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), h("tbody", {}, rows)),
  );
}

async function serverPage(main) {
  let stopped = false;
  let timer = null;
  const render = async () => {
    const s = await call("GET", "/console/api/server");
    const mem = s.memory;
    main.replaceChildren(
      h("h1", {}, "Server"),
      h(
        "div",
        { class: "card" },
        h(
          "dl",
          { class: "facts" },
          [
            ["Version", `tinkerd ${s.version}`],
            ["Up for", `${Math.round(s.uptime_s)} s`],
            ["Process memory", `${fmtBytes(mem.rss_bytes)} (peak ${fmtBytes(mem.peak_rss_bytes)})`],
            ["Machine memory", `${fmtBytes(mem.available_bytes)} available of ${fmtBytes(mem.total_bytes)}`],
            ["Queued, all users", `${s.queue_total.pending} pending, ${s.queue_total.running} running`],
            ["Limits per user", `${s.limits.max_queued_per_user || "no"} queued requests, ${s.limits.max_runs_per_user || "no"} open runs`],
          ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
        ),
      ),
      h("h2", {}, "Served models"),
      h(
        "table",
        { id: "models" },
        h("thead", {}, h("tr", {}, ["Model", "Architecture", "Vocabulary", "Context", "Trains", "Samples"].map((t) => h("th", {}, t)))),
        h("tbody", {}, s.models.map((m) => h("tr", {}, h("td", {}, m.name), h("td", {}, m.arch), h("td", { class: "num" }, m.vocab_size), h("td", { class: "num" }, m.max_context_length), h("td", {}, m.trainable ? "yes" : "no"), h("td", {}, m.sampleable ? "yes" : "no")))),
      ),
      h("h2", {}, "Your queued work"),
      s.queue.length
        ? h(
            "table",
            { id: "queue" },
            h("thead", {}, h("tr", {}, ["Run or model", "Pending", "Running"].map((t) => h("th", {}, t)))),
            h("tbody", {}, s.queue.map((q) => h("tr", {}, h("td", {}, q.model_id), h("td", { class: "num" }, q.pending), h("td", { class: "num" }, q.running)))),
          )
        : h("p", { class: "muted", id: "queue" }, "Nothing queued."),
      h("h2", {}, "Roles and workers"),
      rolesTable(s.roles),
    );
  };
  await render();
  const tick = async () => {
    if (stopped) return;
    try {
      await render();
    } catch (_) {
      /* keep the last view */
    }
    timer = setTimeout(tick, 3000);
  };
  timer = setTimeout(tick, 3000);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// The processes serving this deployment: for `tinkerd serve`, roles inside this one process; for a split deployment,
// every process the ledger knows, with its lease (seconds left), its last heartbeat and the memory it reported.
function rolesTable(roles) {
  const head = ["Role", "Id", "Host / PID", "State", "Models", "Runs held", "Started", "Last heartbeat", "Lease left", "Memory (RSS)"];
  const seconds = (s) => `${Number(s).toFixed(1)} s`;
  const ago = (s) => (s === null || s === undefined ? "–" : `${seconds(s)} ago`);
  const rows = roles.map((r) =>
    h(
      "tr",
      { class: "role", "data-role": r.role, "data-id": r.id, "data-state": r.state },
      h("td", {}, r.role, r.detail ? h("div", { class: "muted" }, r.detail) : null),
      h("td", {}, r.id),
      h("td", {}, `${r.host || "–"} / ${r.pid ?? "–"}`),
      h("td", { class: "role-state" }, h("span", { class: r.state === "gone" ? "state closed" : "state" }, r.state)),
      h("td", {}, (r.models || []).join(", ")),
      h("td", { class: "num" }, r.runs === null || r.runs === undefined ? "–" : `${r.runs}${r.capacity ? ` of ${r.capacity}` : ""}`),
      h("td", {}, fmtTime(r.started_at)),
      h("td", { class: "heartbeat" }, r.heartbeat_at ? ago(r.heartbeat_age_s) : "in process"),
      h("td", { class: "num lease" }, r.lease_left_s === null || r.lease_left_s === undefined ? "–" : seconds(r.lease_left_s)),
      h("td", { class: "num memory" }, r.rss_bytes ? fmtBytes(r.rss_bytes) : "–"),
    ),
  );
  return h("table", { id: "roles" }, h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), h("tbody", {}, rows));
}
