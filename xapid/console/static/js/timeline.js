// The event timeline: what HA and the hardware did, in order, timed from the fault before it.
//
// Entries come from two streams: XenAPI changes (messages, VM power and placement, host
// liveness, pool master and HA state) from event.from, and the hardware feed (faults, power
// changes with their reasons) from /console/api/hardware. Every entry has a time on the
// daemon's clock: hardware entries carry theirs, replayed messages their timestamp, and live
// XenAPI changes the moment they arrived (corrected by the clock offset the feed reveals).

const MAX_ENTRIES = 500;

// "20261124T10:00:00Z" (XenAPI datetime) -> seconds since the epoch, or null.
export function parseXapiTime(text) {
  const m = /^(\d{4})-?(\d{2})-?(\d{2})T(\d{2}):?(\d{2}):?(\d{2})(?:\.\d+)?Z?$/.exec(String(text || ""));
  if (!m) return null;
  return Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]) / 1000;
}

export function formatClock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString(undefined, { hour12: false });
}

export class Timeline {
  constructor() {
    this.entries = [];
    this.keys = new Set();
    this.offset = 0; // daemon clock minus this browser's clock, in seconds
    this.order = 0;
  }

  now() {
    return Date.now() / 1000 + this.offset;
  }

  // Add one entry ({key, t, kind, text, detail?, level?}); an entry whose key was seen is ignored.
  add(entry) {
    if (entry.key && this.keys.has(entry.key)) return false;
    if (entry.key) this.keys.add(entry.key);
    entry.order = this.order++;
    this.entries.push(entry);
    this.entries.sort((a, b) => a.t - b.t || a.order - b.order);
    if (this.entries.length > MAX_ENTRIES) this.entries.splice(0, this.entries.length - MAX_ENTRIES);
    return true;
  }

  // The entries with, for each, the fault it is timed from (null before the first fault).
  withAnchors() {
    let anchor = null;
    return this.entries.map((entry) => {
      if (entry.kind === "fault") anchor = entry;
      return { entry, anchor: entry.kind === "fault" ? null : anchor };
    });
  }
}

// -- describing changes -----------------------------------------------------------------------------

function vmPlace(model, rec) {
  if (!rec) return "gone";
  if (rec.power_state === "Halted" || rec.resident_on === "OpaqueRef:NULL") return rec.power_state;
  return `${rec.power_state} on ${model.hostName(rec.resident_on)}`;
}

// Timeline entries for XenAPI changes. `first` is the initial load: only past messages count.
export function entriesForChanges(model, changes, { first, now }) {
  const out = [];
  for (const change of changes) {
    const { cls, op, old, rec } = change;
    if (cls === "message" && op === "add") {
      const t = (first ? parseXapiTime(rec.timestamp) : null) ?? now;
      const about = model.objectName(rec.cls, rec.obj_uuid);
      out.push({
        key: `message:${rec.uuid}`, t, kind: "message", level: Number(rec.priority) <= 2 ? "alert" : "info",
        text: `${rec.name}: ${about}`, detail: rec.body || "",
      });
    }
    if (first) continue;
    if (cls === "vm") {
      const vm = rec || old;
      if (vm.is_control_domain || vm.is_a_template || vm.is_a_snapshot) continue;
      if (op === "add") out.push({ t: now, kind: "vm", text: `VM ${vm.name_label} created (${vmPlace(model, rec)})` });
      else if (op === "del") out.push({ t: now, kind: "vm", text: `VM ${vm.name_label} destroyed` });
      else if (old.power_state !== rec.power_state || old.resident_on !== rec.resident_on) {
        out.push({ t: now, kind: "vm", text: `VM ${vm.name_label}: ${vmPlace(model, old)} → ${vmPlace(model, rec)}` });
      } else if (old.ha_restart_priority !== rec.ha_restart_priority) {
        out.push({ t: now, kind: "vm", text: `VM ${vm.name_label}: restart priority "${rec.ha_restart_priority}"` });
      }
    } else if (cls === "host_metrics" && op === "mod" && old.live !== rec.live) {
      const host = model.hosts().find((h) => h.metrics === change.ref);
      const name = host ? host.name_label : "a host";
      out.push({ t: now, kind: "host", level: rec.live ? "info" : "alert",
        text: rec.live ? `${name} is live again` : `${name} is no longer live (the pool considers it dead)` });
    } else if (cls === "pool" && op === "mod") {
      if (old.master !== rec.master) {
        out.push({ t: now, kind: "pool", level: "alert",
          text: `master: ${model.hostName(old.master)} → ${model.hostName(rec.master)}` });
      }
      if (old.ha_enabled !== rec.ha_enabled) {
        out.push({ t: now, kind: "pool",
          text: rec.ha_enabled ? `HA enabled (cluster stack ${rec.ha_cluster_stack})` : "HA disabled" });
      }
      if (old.ha_overcommitted !== rec.ha_overcommitted) {
        out.push({ t: now, kind: "pool", level: rec.ha_overcommitted ? "alert" : "info",
          text: rec.ha_overcommitted ? "pool overcommitted" : "pool no longer overcommitted" });
      }
    }
  }
  return out;
}

function hostLabel(model, name) {
  const host = model.hostByName(name);
  return host ? host.name_label : name;
}

// Timeline entries for the hardware feed's log (one boot of the daemon: keys carry its id).
export function entriesForHardware(model, doc) {
  const boot = doc.token.split(":")[0];
  return doc.log.map((e) => {
    const key = `hw:${boot}:${e.seq}`;
    if (e.kind === "fault") {
      const who = e.origin.startsWith("http:") ? `by ${e.origin.slice(5)}` : `by ${e.origin}`;
      let what;
      if (e.verb === "partition") {
        const named = e.groups.map((g) => g.map((h) => hostLabel(model, h)));
        const rest = model.hosts().map((h) => h.name_label).filter((n) => !named.flat().includes(n));
        what = "partition " + [...named, ...(rest.length ? [rest] : [])].map((g) => g.join(" ")).join(" | ");
      } else {
        what = [e.verb, ...e.hosts.map((h) => (h === "all" ? "all hosts" : hostLabel(model, h)))].join(" ");
      }
      return { key, t: e.time, kind: "fault", level: "fault", text: `fault: ${what}`, detail: who };
    }
    const name = hostLabel(model, e.host);
    const reason = e.reason && !["boot", "thaw", "hang"].includes(e.reason) ? ` (${e.reason})` : "";
    const level = e.new === "fenced" || e.new === "off" ? "alert" : "info";
    return { key, t: e.time, kind: e.new === "fenced" ? "fence" : "power", level,
      text: `${name} power: ${e.old} → ${e.new}${reason}` };
  });
}
