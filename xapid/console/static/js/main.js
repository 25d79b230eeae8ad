// The pool console: login, the live view of pool, hosts, network, VMs and timeline, and the
// pool-admin actions. Kept current by event.from and the hardware feed only (no polling).

import { Connection, NetworkError, XapiError } from "./xapi.js";
import { Model } from "./model.js";
import { Timeline, entriesForChanges, entriesForHardware, formatClock } from "./timeline.js";

const CLASSES = ["pool", "host", "host_metrics", "VM", "SR", "VDI", "message"];
const GIB = 1024 ** 3;
const NULL = "OpaqueRef:NULL";
const ANCHOR_WINDOW = 600; // seconds after a fault in which entries are timed from it
const PRIORITIES = [["", "unprotected"], ["restart", "restart (protected)"], ["best-effort", "best-effort"]];

const state = {
  conn: null,
  model: new Model(),
  timeline: new Timeline(),
  hw: null,
  role: "",
  user: "",
  pending: new Map(), // host uuid -> network group the user has dragged it to, not yet applied
  memory: new Map(), // host uuid -> [[t, used bytes], ...] from host_metrics events
  rendered: new Map(), // section id -> last rendered markup
  timer: null,
};

const $ = (id) => document.getElementById(id);
const admin = () => state.role === "pool-admin";

// -- DOM helpers ------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.setAttribute("class", value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

// Replace a section's content only when its markup changed, keeping focus and typed-in values.
function update(container, children) {
  const fresh = h("div", {}, children);
  const markup = fresh.innerHTML;
  if (state.rendered.get(container.id) === markup) return;
  state.rendered.set(container.id, markup);
  const focused = document.activeElement && container.contains(document.activeElement) ? document.activeElement.id : "";
  const kept = new Map();
  for (const input of container.querySelectorAll("[data-keep]")) if (input.id) kept.set(input.id, input.value);
  container.replaceChildren(...fresh.childNodes);
  for (const [id, value] of kept) {
    const input = $(id);
    if (input && container.contains(input)) input.value = value;
  }
  if (focused) $(focused)?.focus();
}

function gib(bytes) {
  return `${(Number(bytes) / GIB).toFixed(1)} GiB`;
}

// -- actions ----------------------------------------------------------------------------------------

function describe(error) {
  if (error instanceof XapiError) {
    if (error.code === "SESSION_AUTHENTICATION_FAILED") return "wrong user name or password";
    if (error.code === "RBAC_PERMISSION_DENIED") return "your role may not do this";
    // The console may only talk to its own origin (CSP connect-src 'self'): say where the master went.
    if (error.code === "HOST_IS_SLAVE") {
      return `this address is no longer the pool master; open the console at ${error.params[0]}`;
    }
    return error.message;
  }
  if (error instanceof NetworkError) return error.message;
  return error && error.message ? error.message : String(error);
}

async function act(label, fn) {
  const status = $("action-status");
  status.className = "action-status busy";
  status.textContent = `${label}…`;
  try {
    const result = await fn();
    status.className = "action-status ok";
    status.textContent = Array.isArray(result) && result.length ? `${label}: ${result.join("; ")}` : `${label}: done`;
  } catch (error) {
    status.className = "action-status failed";
    status.textContent = `${label} failed: ${describe(error)}`;
  }
}

const fault = (verb, hosts, extra = {}) => state.conn.fault({ verb, hosts, ...extra });

function vmRecord(name, memoryGib) {
  const memory = Math.round(memoryGib * GIB);
  return {
    name_label: name, name_description: "created in the console", user_version: 1, is_a_template: false,
    affinity: NULL, memory_static_max: memory, memory_dynamic_max: memory, memory_dynamic_min: memory,
    memory_static_min: Math.min(memory, GIB / 2), VCPUs_params: {}, VCPUs_max: 1, VCPUs_at_startup: 1,
    actions_after_shutdown: "destroy", actions_after_reboot: "restart", actions_after_crash: "restart",
    PV_bootloader: "", PV_kernel: "", PV_ramdisk: "", PV_args: "", PV_bootloader_args: "", PV_legacy_args: "",
    HVM_boot_policy: "BIOS order", HVM_boot_params: {}, platform: {}, PCI_bus: "", other_config: {},
    recommendations: "",
  };
}

async function createVm() {
  const name = $("new-vm-name").value.trim() || $("new-vm-name").placeholder;
  const memory = Number($("new-vm-memory").value) || 2;
  const priority = $("new-vm-priority").value;
  const on = $("new-vm-host").value;
  await act(`create VM ${name}`, async () => {
    const ref = await state.conn.call("VM.create", vmRecord(name, memory));
    if (priority) await state.conn.call("VM.set_ha_restart_priority", ref, priority);
    if (on) await state.conn.call("VM.start_on", ref, on, false, false);
    else await state.conn.call("VM.start", ref, false, false);
    $("new-vm-name").value = "";
  });
}

function enableHa() {
  const sr = $("ha-sr").value;
  const stack = $("ha-stack").value;
  const timeout = $("ha-timeout").value.trim();
  const configuration = timeout ? { timeout } : {};
  return act("enable HA", () => state.conn.call("pool.enable_ha", sr ? [sr] : [], configuration, stack));
}

function applyPartition() {
  const layout = networkLayout();
  const groups = new Map();
  for (const [uuid, group] of layout) {
    if (group === "0") continue;
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(uuid);
  }
  state.pending.clear();
  scheduleRender();
  if (!groups.size) return act("heal the network", () => fault("heal", []));
  const list = [...groups.keys()].sort((a, b) => Number(a) - Number(b)).map((g) => groups.get(g));
  return act("partition the network", () => fault("partition", [], { groups: list }));
}

// -- sections ---------------------------------------------------------------------------------------

function fact(label, value, field) {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", { "data-field": field }, value));
}

function renderPool() {
  const { model } = state;
  const pool = model.pool();
  if (!pool) return update($("pool"), h("p", {}, "loading…"));
  $("pool-name").textContent = pool.name_label;
  const timeout = (pool.ha_configuration || {}).timeout;
  const facts = h("dl", { class: "facts" },
    fact("Master", model.hostName(pool.master), "master"),
    fact("HA", pool.ha_enabled ? "on" : "off", "ha"),
    fact("Cluster stack", pool.ha_cluster_stack || "-", "stack"),
    fact("Failures to tolerate", String(pool.ha_host_failures_to_tolerate), "ftt"),
    fact("Plan exists for", pool.ha_enabled ? String(pool.ha_plan_exists_for) : "-", "plan"),
    fact("Overcommitted", pool.ha_overcommitted ? "yes" : "no", "overcommitted"),
    fact("Heartbeat SR", model.heartbeatSrNames(pool).join(", ") || "-", "heartbeat"),
    pool.ha_enabled && timeout ? fact("HA timeout", `${timeout} s`, "timeout") : null);
  const controls = [];
  if (admin()) {
    if (pool.ha_enabled) {
      controls.push(h("div", { class: "ha-form" },
        h("button", { id: "ha-disable", type: "button", onclick: () => act("disable HA", () => state.conn.call("pool.disable_ha")) },
          "Disable HA")));
    } else {
      const srs = model.srs().filter((sr) => sr.shared).sort((a, b) => a.name_label.localeCompare(b.name_label));
      const stacks = (state.hw && state.hw.cluster_stacks) || [];
      controls.push(h("div", { class: "ha-form" },
        h("label", { for: "ha-sr" }, "Heartbeat SR"),
        h("select", { id: "ha-sr", "data-keep": true },
          srs.map((sr) => h("option", { value: sr.ref, selected: sr.ref === pool.default_SR }, sr.name_label)),
          h("option", { value: "" }, "none (stack without a statefile)")),
        h("label", { for: "ha-stack" }, "Cluster stack"),
        h("select", { id: "ha-stack", "data-keep": true },
          h("option", { value: "" }, "automatic (xapi's choice)"),
          stacks.map((s) => h("option", { value: s }, s))),
        h("label", { for: "ha-timeout" }, "Timeout T (s)"),
        h("input", { id: "ha-timeout", type: "number", min: 1, step: 1, value: 30, "data-keep": true, class: "short" }),
        h("button", { id: "ha-enable", type: "button", onclick: enableHa }, "Enable HA")));
    }
  }
  const guide = admin() && (!pool.ha_enabled || !model.vms().length) ? h("ol", { class: "guide" },
    h("li", { class: pool.ha_enabled ? "done" : "" }, "Enable HA (the defaults do)."),
    h("li", { class: model.vms().length ? "done" : "" }, "Create a protected VM under Virtual machines."),
    h("li", {}, "Press Crash on its host and watch the timeline: the pool notices, and the VM restarts elsewhere."),
    h("li", {}, "Boot the host back.")) : null;
  update($("pool"), [h("h2", {}, `Pool ${pool.name_label}`), facts, controls, guide]);
}

function sparkline(history) {
  let points = history;
  const width = 160;
  const height = 32;
  const chart = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img",
    "aria-label": "memory used over time" });
  if (points.length === 1) points = [points[0], [points[0][0] + 1, points[0][1]]];
  if (points.length > 1) {
    const t0 = points[0][0];
    const span = Math.max(points[points.length - 1][0] - t0, 1);
    const max = Math.max(...points.map((p) => p[1]), 1);
    const xy = points.map(([t, v]) => `${((t - t0) / span * width).toFixed(1)},${(height - 2 - v / max * (height - 4)).toFixed(1)}`);
    chart.append(svg("polyline", { points: xy.join(" "), fill: "none", stroke: "currentColor", "stroke-width": 1.5 }));
  }
  return chart;
}

function hostCard(host) {
  const { model } = state;
  const pool = model.pool();
  const metrics = model.metrics(host);
  const hw = state.hw ? state.hw.hosts[host.uuid] : null;
  const power = hw ? hw.power : "unknown";
  const live = metrics ? metrics.live : false;
  const isMaster = pool && pool.master === host.ref;
  const vms = model.vmsOn(host.ref);
  const total = metrics ? Number(metrics.memory_total) : 0;
  const free = metrics ? Number(metrics.memory_free) : 0;
  const stopReason = hw && power !== "on" && hw.last_stop_reason && power !== "hung" ? hw.last_stop_reason : "";
  const uuid = host.uuid;
  const controls = admin() ? h("div", { class: "controls", role: "group", "aria-label": `faults for ${host.name_label}` },
    h("button", { id: `crash-${uuid}`, type: "button", class: "danger", disabled: !["on", "hung"].includes(power),
      onclick: () => act(`crash ${host.name_label}`, () => fault("crash", [uuid])) }, "Crash"),
    h("button", { id: `hang-${uuid}`, type: "button", disabled: power !== "on",
      onclick: () => act(`hang ${host.name_label}`, () => fault("hang", [uuid])) }, "Hang"),
    h("button", { id: `thaw-${uuid}`, type: "button", disabled: power !== "hung",
      onclick: () => act(`thaw ${host.name_label}`, () => fault("thaw", [uuid])) }, "Thaw"),
    h("button", { id: `boot-${uuid}`, type: "button", disabled: !["off", "fenced"].includes(power),
      onclick: () => act(`boot ${host.name_label}`, () => fault("boot", [uuid])) }, "Boot"),
    pool && pool.ha_enabled && hw ? (hw.statefile === "ok"
      ? h("button", { id: `statefile-loss-${uuid}`, type: "button", disabled: !felt("statefile-loss"),
        onclick: () => act(`${host.name_label} loses the heartbeat SR`, () => fault("statefile-loss", [uuid])) },
        "Lose statefile")
      : h("button", { id: `statefile-restore-${uuid}`, type: "button",
        onclick: () => act(`${host.name_label} gets the heartbeat SR back`, () => fault("statefile-restore", [uuid])) },
        "Restore statefile")) : null) : null;
  const classes = ["host", `power-${power}`, live ? "live" : "dead", isMaster ? "master" : ""].join(" ").trim();
  return h("article", { class: classes, "data-host": host.name_label, "data-uuid": uuid, "data-power": power,
    "data-live": String(live), "data-network": hw ? hw.network : "", "aria-labelledby": `title-${uuid}` },
  h("header", {},
    h("h3", { id: `title-${uuid}` }, host.name_label),
    isMaster ? h("span", { class: "badge master-badge" }, "master") : null,
    h("span", { class: `badge ${live ? "live-badge" : "dead-badge"}`, "data-field": "live" }, live ? "live" : "not live")),
  h("p", { class: "power" }, "power ", h("strong", { "data-field": "power" }, power),
    stopReason ? h("span", { class: "reason", "data-field": "reason" }, ` (${stopReason})`) : null),
  h("dl", { class: "hw" },
    fact("network group", hw ? hw.network : "-", "network"),
    fact("statefile", hw ? (pool && pool.ha_enabled ? hw.statefile : "-") : "-", "statefile"),
    fact("HA", hw ? (hw.armed ? "armed" : "not armed") : "-", "armed")),
  h("div", { class: "memory" },
    h("meter", { min: 0, max: total || 1, value: total - free, "aria-label": `memory used on ${host.name_label}` }),
    h("span", { "data-field": "memory" }, metrics ? `${gib(total - free)} used · ${gib(free)} free` : "-")),
  h("div", { class: "charts" },
    h("figure", {}, sparkline(state.memory.get(uuid) || []), h("figcaption", {}, "memory used")),
    h("figure", { class: "placeholder", "data-field": "cpu-chart" },
      h("div", { class: "empty-chart" }, "no stats yet"),
      h("figcaption", {}, "CPU and memory charts: need the stats handlers (/rrd_updates), not in xapid yet"))),
  h("h4", {}, `Running VMs (${vms.length})`),
  h("ul", { class: "host-vms" }, vms.length ? vms.map((vm) => h("li", { "data-vm": vm.name_label },
    h("span", { class: "vm-name" }, vm.name_label),
    vm.power_state !== "Running" ? h("span", { class: "vm-state" }, ` ${vm.power_state}`) : null,
    vm.ha_restart_priority ? h("span", { class: `prio prio-${vm.ha_restart_priority}` },
      vm.ha_restart_priority === "restart" ? `protected · order ${vm.order}` : vm.ha_restart_priority) : null))
    : h("li", { class: "none" }, "none")),
  controls);
}

function felt(verb) {
  const list = state.hw && state.hw.felt_faults;
  return !Array.isArray(list) || list.includes(verb);
}

function renderHosts() {
  update($("hosts"), state.model.hosts().map(hostCard));
}

function networkLayout() {
  const layout = new Map();
  for (const host of state.model.hosts()) {
    const actual = state.hw && state.hw.hosts[host.uuid] ? state.hw.hosts[host.uuid].network : "0";
    layout.set(host.uuid, state.pending.get(host.uuid) ?? actual);
  }
  return layout;
}

function moveHost(uuid, group) {
  state.pending.set(uuid, group);
  scheduleRender();
}

function renderNetwork() {
  const { model } = state;
  const layout = networkLayout();
  const used = new Set(["0", ...layout.values()]);
  const next = String(Math.max(...[...used].map(Number)) + 1);
  const groups = [...used].sort((a, b) => Number(a) - Number(b));
  if (admin()) groups.push(next);
  const canPartition = felt("partition");
  const choices = groups.map((g) => [g, g === next ? "new group" : `group ${g}`]);
  const zone = (group) => h("div", {
    class: `group${group === next ? " new-group" : ""}`, "data-group": group,
    ondragover: admin() ? (e) => { e.preventDefault(); e.currentTarget.classList.add("over"); } : null,
    ondragleave: admin() ? (e) => e.currentTarget.classList.remove("over") : null,
    ondrop: admin() ? (e) => { e.preventDefault(); moveHost(e.dataTransfer.getData("text/plain"), group); } : null,
  },
  h("h3", {}, group === next ? "new group" : `group ${group}`),
  model.hosts().filter((host) => layout.get(host.uuid) === group).map((host) => h("div", {
    class: `chip${state.pending.has(host.uuid) ? " moved" : ""}`, "data-host": host.name_label,
    draggable: admin() ? "true" : null,
    ondragstart: admin() ? (e) => e.dataTransfer.setData("text/plain", host.uuid) : null,
  },
  h("span", {}, host.name_label),
  admin() ? h("select", { id: `group-of-${host.uuid}`, "aria-label": `network group of ${host.name_label}`,
    onchange: (e) => moveHost(host.uuid, e.target.value) },
  choices.map(([value, label]) => h("option", { value, selected: value === group }, label))) : null)));
  const partitioned = model.hosts().some((host) => (state.hw?.hosts[host.uuid]?.network ?? "0") !== "0");
  const controls = admin() ? h("div", { class: "controls" },
    h("button", { id: "partition-apply", type: "button", disabled: !state.pending.size || !canPartition,
      onclick: applyPartition }, "Apply partition"),
    h("button", { id: "partition-discard", type: "button", disabled: !state.pending.size,
      onclick: () => { state.pending.clear(); scheduleRender(); } }, "Discard changes"),
    h("button", { id: "network-heal", type: "button", disabled: !partitioned,
      onclick: () => act("heal the network", () => fault("heal", [])) }, "Heal network"),
    model.pool()?.ha_enabled ? [
      h("button", { id: "statefile-loss-all", type: "button", disabled: !felt("statefile-loss"),
        onclick: () => act("every host loses the heartbeat SR", () => fault("statefile-loss", ["all"])) },
      "All hosts lose the statefile"),
      h("button", { id: "statefile-restore-all", type: "button",
        onclick: () => act("every host gets the heartbeat SR back", () => fault("statefile-restore", ["all"])) },
      "Restore the statefile")] : null) : null;
  update($("network"), [
    h("h2", { id: "network-title" }, "Heartbeat network"),
    h("p", { class: "hint" }, admin()
      ? "Drag hosts into groups (or choose a group from a host's list), then apply: hosts in different groups cannot exchange heartbeats."
      : "Hosts in different groups cannot exchange heartbeats."),
    !canPartition ? h("p", { class: "hint" }, "The active cluster stack cannot feel network partitions.") : null,
    h("div", { class: "groups" }, groups.map(zone)),
    controls]);
}

function renderVms() {
  const { model } = state;
  const vms = model.vms();
  const rows = vms.map((vm) => h("tr", { "data-vm": vm.name_label },
    h("th", { scope: "row" }, vm.name_label),
    h("td", { "data-field": "state" }, vm.power_state),
    h("td", { "data-field": "host" }, vm.resident_on === NULL ? "-" : model.hostName(vm.resident_on)),
    h("td", {}, admin()
      ? h("select", { id: `prio-${vm.uuid}`, "aria-label": `HA restart priority of ${vm.name_label}`,
        onchange: (e) => act(`restart priority of ${vm.name_label}`,
          () => state.conn.call("VM.set_ha_restart_priority", vm.ref, e.target.value)) },
      PRIORITIES.map(([value, label]) => h("option", { value, selected: value === vm.ha_restart_priority }, label)))
      : (PRIORITIES.find(([value]) => value === vm.ha_restart_priority) || ["", vm.ha_restart_priority])[1]),
    h("td", {}, String(vm.order)),
    admin() ? h("td", { class: "controls" },
      vm.power_state === "Halted"
        ? h("button", { id: `start-${vm.uuid}`, type: "button",
          onclick: () => act(`start ${vm.name_label}`, () => state.conn.call("VM.start", vm.ref, false, false)) }, "Start")
        : [h("button", { id: `shutdown-${vm.uuid}`, type: "button", disabled: vm.power_state !== "Running",
          onclick: () => act(`shut down ${vm.name_label}`, () => state.conn.call("VM.clean_shutdown", vm.ref)) }, "Shut down"),
        h("button", { id: `hard-shutdown-${vm.uuid}`, type: "button", class: "danger",
          onclick: () => act(`force shutdown of ${vm.name_label}`, () => state.conn.call("VM.hard_shutdown", vm.ref)) },
        "Force off")]) : null));
  const table = vms.length ? h("table", { class: "vm-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "VM"), h("th", { scope: "col" }, "state"),
      h("th", { scope: "col" }, "host"), h("th", { scope: "col" }, "HA restart priority"),
      h("th", { scope: "col" }, "order"), admin() ? h("th", { scope: "col" }, "actions") : null)),
    h("tbody", {}, rows)) : h("p", { class: "hint" }, "No VMs yet.");
  const form = admin() ? h("div", { class: "new-vm", role: "group", "aria-label": "new VM" },
    h("label", { for: "new-vm-name" }, "New VM"),
    h("input", { id: "new-vm-name", placeholder: `vm${vms.length + 1}`, "data-keep": true }),
    h("label", { for: "new-vm-memory" }, "memory (GiB)"),
    h("input", { id: "new-vm-memory", type: "number", min: 1, value: 2, "data-keep": true, class: "short" }),
    h("label", { for: "new-vm-priority" }, "priority"),
    h("select", { id: "new-vm-priority", "data-keep": true },
      PRIORITIES.map(([value, label]) => h("option", { value, selected: value === "restart" }, label))),
    h("label", { for: "new-vm-host" }, "on"),
    h("select", { id: "new-vm-host", "data-keep": true }, h("option", { value: "" }, "any host"),
      model.hosts().map((host) => h("option", { value: host.ref }, host.name_label))),
    h("button", { id: "new-vm-create", type: "button", onclick: createVm }, "Create and start")) : null;
  update($("vms"), [h("h2", { id: "vms-title" }, "Virtual machines"), table, form]);
}

function renderTimeline() {
  const list = $("timeline");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const items = state.timeline.withAnchors().map(({ entry, anchor }) => {
    const near = anchor && entry.t - anchor.t <= ANCHOR_WINDOW;
    const when = near ? `+${(entry.t - anchor.t).toFixed(1)} s` : formatClock(entry.t);
    return h("li", { class: `entry kind-${entry.kind} level-${entry.level || "info"}`, "data-kind": entry.kind,
      "data-sig": `${entry.order}|${when}` },
    h("time", { title: new Date(entry.t * 1000).toISOString() }, when),
    h("span", { class: "what" }, entry.text),
    entry.detail ? h("span", { class: "detail" }, entry.detail) : null);
  });
  // Append what is new, so the live region announces only that; anything else (an entry that
  // arrived late and sorts earlier, a label that changed) redraws the list.
  const shown = [...list.children].map((li) => li.dataset.sig);
  const wanted = items.map((li) => li.dataset.sig);
  if (shown.length <= wanted.length && shown.every((sig, i) => sig === wanted[i])) {
    list.append(...items.slice(shown.length));
  } else {
    list.replaceChildren(...items);
  }
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function render() {
  state.timer = null;
  if (!state.model.loaded) return;
  renderPool();
  renderHosts();
  renderNetwork();
  renderVms();
  renderTimeline();
}

function scheduleRender() {
  if (state.timer === null) state.timer = setTimeout(render, 16);
}

// -- feeds --------------------------------------------------------------------------------------------

function recordMemory(now) {
  for (const host of state.model.hosts()) {
    const metrics = state.model.metrics(host);
    if (!metrics) continue;
    const points = state.memory.get(host.uuid) || [];
    const used = Number(metrics.memory_total) - Number(metrics.memory_free);
    if (!points.length || points[points.length - 1][1] !== used) points.push([now, used]);
    if (points.length > 120) points.shift();
    state.memory.set(host.uuid, points);
  }
}

function onChanges(changes, first) {
  const now = state.timeline.now();
  for (const entry of entriesForChanges(state.model, changes, { first, now })) state.timeline.add(entry);
  recordMemory(now);
  // The hardware view depends on HA state too (statefile, armed, the faults a stack feels).
  if (changes.some((c) => c.cls === "pool" || c.cls === "host_metrics")) refreshHardware();
  scheduleRender();
}

let refreshing = false;
async function refreshHardware() {
  if (refreshing || !state.conn) return;
  refreshing = true;
  try {
    onHardware(await state.conn.hardware("", 0));
  } catch {
    // the long-poll loop reports connection trouble
  } finally {
    refreshing = false;
  }
}

function onHardware(doc) {
  state.hw = doc;
  state.role = doc.role;
  state.user = doc.user;
  state.timeline.offset = doc.now - Date.now() / 1000;
  for (const entry of entriesForHardware(state.model, doc)) state.timeline.add(entry);
  scheduleRender();
}

function onStatus(status) {
  const el = $("connection");
  if (status.state === "connected") {
    el.className = "connection connected";
    el.textContent = "connected · live";
  } else {
    el.className = "connection reconnecting";
    el.textContent = `reconnecting in ${(status.wait / 1000).toFixed(1)} s (${describe(status.error)})`;
  }
}

// -- login --------------------------------------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  const user = $("login-user").value.trim();
  const password = $("login-password").value;
  const error = $("login-error");
  const button = $("login-submit");
  error.textContent = "";
  button.disabled = true;
  button.textContent = "Logging in…";
  const conn = new Connection({ onStatus, classes: CLASSES });
  try {
    await conn.login(user, password);
    const doc = await conn.hardware("", 0);
    state.conn = conn;
    state.role = doc.role;
    state.user = doc.user;
    state.hw = doc;
  } catch (e) {
    error.textContent = `Login failed: ${describe(e)}`;
    conn.stopped = true;
    return;
  } finally {
    button.disabled = false;
    button.textContent = "Log in";
    $("login-password").value = "";
  }
  document.body.classList.toggle("read-only", !admin());
  $("who").textContent = `${state.user} · ${state.role}${admin() ? "" : " (read-only console)"}`;
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  onStatus({ state: "connected" });
  conn.watchEvents((events) => {
    const { changes, first } = state.model.reset(events);
    onChanges(changes, first);
  }, (events) => onChanges(state.model.apply(events), false));
  conn.watchHardware(onHardware);
}

async function logout() {
  const conn = state.conn;
  state.conn = null;
  if (conn) await conn.logout();
  state.model = new Model();
  state.timeline = new Timeline();
  state.hw = null;
  state.role = "";
  state.pending.clear();
  state.memory.clear();
  state.rendered.clear();
  for (const id of ["pool", "hosts", "network", "vms", "timeline"]) $(id).replaceChildren();
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("who").textContent = "";
  $("pool-name").textContent = "";
  $("connection").className = "connection";
  $("connection").textContent = "not connected";
  $("login-password").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("login-password").focus();
});
