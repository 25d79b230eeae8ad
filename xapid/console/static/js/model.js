// The console's copy of the pool: every object of the watched classes, kept current by event.from.

export class Model {
  constructor() {
    this.byClass = new Map(); // lower-case class -> Map(ref -> record)
    this.loaded = false;
  }

  table(cls) {
    let table = this.byClass.get(cls);
    if (!table) {
      table = new Map();
      this.byClass.set(cls, table);
    }
    return table;
  }

  get(cls, ref) {
    return this.table(cls).get(ref);
  }

  all(cls) {
    return [...this.table(cls).entries()];
  }

  // Replace everything with a full replay (event.from with token ""); the changes it amounts to.
  reset(events) {
    const old = this.byClass;
    this.byClass = new Map();
    for (const ev of events) {
      if (ev.operation !== "del") this.table(ev.class).set(ev.ref, ev.snapshot);
    }
    const changes = [];
    const classes = new Set([...old.keys(), ...this.byClass.keys()]);
    for (const cls of classes) {
      const before = old.get(cls) || new Map();
      const after = this.table(cls);
      for (const [ref, rec] of after) {
        const prev = before.get(ref);
        if (prev === undefined) changes.push({ cls, ref, op: "add", old: null, rec });
        else if (JSON.stringify(prev) !== JSON.stringify(rec)) changes.push({ cls, ref, op: "mod", old: prev, rec });
      }
      for (const [ref, prev] of before) {
        if (!after.has(ref)) changes.push({ cls, ref, op: "del", old: prev, rec: null });
      }
    }
    const first = !this.loaded;
    this.loaded = true;
    return { changes, first };
  }

  // Apply one batch of events; the changes, each with the record before and after.
  apply(events) {
    const changes = [];
    for (const ev of events) {
      const table = this.table(ev.class);
      const old = table.get(ev.ref) || null;
      if (ev.operation === "del") {
        table.delete(ev.ref);
        changes.push({ cls: ev.class, ref: ev.ref, op: "del", old, rec: null });
      } else {
        table.set(ev.ref, ev.snapshot);
        changes.push({ cls: ev.class, ref: ev.ref, op: old ? "mod" : "add", old, rec: ev.snapshot });
      }
    }
    return changes;
  }

  // -- derived views ---------------------------------------------------------------------------

  pool() {
    const [entry] = this.all("pool");
    return entry ? { ref: entry[0], ...entry[1] } : null;
  }

  hosts() {
    return this.all("host")
      .map(([ref, rec]) => ({ ref, ...rec }))
      .sort((a, b) => a.name_label.localeCompare(b.name_label, undefined, { numeric: true }));
  }

  hostName(ref) {
    const rec = this.get("host", ref);
    return rec ? rec.name_label : "-";
  }

  hostByUuid(uuid) {
    for (const [ref, rec] of this.table("host")) if (rec.uuid === uuid) return { ref, ...rec };
    return null;
  }

  // A host named by uuid or name-label (as `xapid fault` accepts), or null.
  hostByName(name) {
    for (const [ref, rec] of this.table("host")) {
      if (rec.uuid === name || rec.name_label === name) return { ref, ...rec };
    }
    return null;
  }

  metrics(host) {
    return this.get("host_metrics", host.metrics) || null;
  }

  // Guest VMs (no control domains, templates or snapshots), by name.
  vms() {
    return this.all("vm")
      .filter(([, rec]) => !rec.is_control_domain && !rec.is_a_template && !rec.is_a_snapshot)
      .map(([ref, rec]) => ({ ref, ...rec }))
      .sort((a, b) => a.name_label.localeCompare(b.name_label, undefined, { numeric: true }));
  }

  vmsOn(hostRef) {
    return this.vms().filter((vm) => vm.resident_on === hostRef && vm.power_state !== "Halted");
  }

  objectName(cls, uuid) {
    const table = { Host: "host", VM: "vm", SR: "sr", Pool: "pool" }[cls];
    if (!table) return uuid;
    for (const [, rec] of this.table(table)) if (rec.uuid === uuid) return rec.name_label;
    return uuid.slice(0, 8);
  }

  srs() {
    return this.all("sr").map(([ref, rec]) => ({ ref, ...rec }));
  }

  heartbeatSrNames(pool) {
    const names = [];
    for (const vdi of pool.ha_statefiles || []) {
      const rec = this.get("vdi", vdi);
      const sr = rec && this.get("sr", rec.SR);
      if (sr && !names.includes(sr.name_label)) names.push(sr.name_label);
    }
    return names;
  }
}
