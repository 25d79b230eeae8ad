// The console's connection to xapid: JSON-RPC calls, the event.from loop and the hardware feed.
//
// Reconnection follows Xen Orchestra's xen-api client (packages/xen-api/index.mjs): a call that
// fails with SESSION_INVALID logs in again once and is retried; the event loop restarts from a
// full fetch after SESSION_INVALID or EVENTS_LOST (the daemon restarted: every session and token
// is gone), and waits before retrying after any other error. Unlike XO's fixed one-minute wait,
// the wait here grows (0.5 s, 1 s, 2 s ... 8 s) so a restarted daemon is found within seconds.
//
// The session ref and the credentials live in this object only: never in a URL, a cookie or
// storage.

export class XapiError extends Error {
  constructor(code, params = []) {
    super(params.length ? `${code}: ${params.join(", ")}` : code);
    this.code = code;
    this.params = params;
  }
}

export class NetworkError extends Error {}

const EVENT_TIMEOUT = 30; // seconds one event.from or hardware long-poll may block
const BACKOFF = [500, 1000, 2000, 4000, 8000];

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Connection {
  constructor({ onStatus = () => {}, classes = [] } = {}) {
    this.onStatus = onStatus;
    this.classes = classes;
    this.session = null;
    this.credentials = null;
    this.stopped = true;
    this.nextId = 1;
    this.loggingIn = null;
    this.controllers = new Set();
  }

  // One JSON-RPC v2 call; the result, or XapiError with the daemon's ErrorDescription.
  async rpc(method, params, { timeoutMs = 600000 } = {}) {
    const controller = new AbortController();
    this.controllers.add(controller);
    const timer = setTimeout(() => controller.abort(), timeoutMs);
    let response;
    try {
      response = await fetch("/jsonrpc", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", method, params, id: this.nextId++ }),
        signal: controller.signal,
        cache: "no-store",
      });
    } catch (error) {
      throw new NetworkError(`cannot reach xapid (${error.message})`);
    } finally {
      clearTimeout(timer);
      this.controllers.delete(controller);
    }
    if (!response.ok) throw new NetworkError(`xapid answered HTTP ${response.status}`);
    let doc;
    try {
      doc = await response.json();
    } catch (error) {
      throw new NetworkError(`unreadable answer (${error.message})`);
    }
    if (doc.error) {
      const error = new XapiError(doc.error.message, doc.error.data || []);
      error.session = params[0];
      throw error;
    }
    return doc.result;
  }

  async login(user, password) {
    this.credentials = { user, password };
    this.stopped = false;
    await this.relogin();
  }

  // Log in again with the remembered credentials, unless `stale` is given and another caller has
  // already replaced it (concurrent callers share one login).
  relogin(stale = undefined) {
    if (stale !== undefined && this.session !== stale && this.session !== null) return Promise.resolve();
    if (!this.loggingIn) {
      this.loggingIn = (async () => {
        try {
          const { user, password } = this.credentials;
          this.session = await this.rpc("session.login_with_password", [user, password, "2.21", "xapid console"]);
        } finally {
          this.loggingIn = null;
        }
      })();
    }
    return this.loggingIn;
  }

  // A call with the session prepended; SESSION_INVALID logs in again and retries once (as XO does).
  async call(method, ...args) {
    try {
      return await this.rpc(method, [this.session, ...args]);
    } catch (error) {
      if (!(error instanceof XapiError) || error.code !== "SESSION_INVALID" || !this.credentials) throw error;
      await this.relogin(error.session);
      return this.rpc(method, [this.session, ...args]);
    }
  }

  async logout() {
    this.stopped = true;
    const session = this.session;
    this.session = null;
    this.credentials = null;
    for (const controller of this.controllers) controller.abort();
    if (session) {
      try {
        await this.rpc("session.logout", [session]);
      } catch {
        // the daemon may be gone; the session dies with it
      }
    }
  }

  // The hardware feed: GET /console/api/hardware, the session in a header (never in the URL).
  async hardware(since, timeout) {
    const controller = new AbortController();
    this.controllers.add(controller);
    const query = new URLSearchParams({ since, timeout: String(timeout) });
    const session = this.session;
    let response;
    try {
      response = await fetch(`/console/api/hardware?${query}`, {
        headers: { "X-Session-Id": session || "" },
        signal: controller.signal,
        cache: "no-store",
      });
    } catch (error) {
      throw new NetworkError(`cannot reach xapid (${error.message})`);
    } finally {
      this.controllers.delete(controller);
    }
    const doc = await response.json().catch(() => null);
    if (doc === null) throw new NetworkError(`xapid answered HTTP ${response.status}`);
    if (!doc.ok) {
      const error = new XapiError(doc.code || "ERROR", [doc.error || ""]);
      error.session = session;
      throw error;
    }
    return doc;
  }

  // POST /xapid/fault: the same request `xapid fault` sends over the local socket.
  async fault(request, retried = false) {
    const session = this.session;
    let response;
    try {
      response = await fetch("/xapid/fault", {
        method: "POST",
        headers: { "content-type": "application/json", "X-Session-Id": session || "" },
        body: JSON.stringify(request),
        cache: "no-store",
      });
    } catch (error) {
      throw new NetworkError(`cannot reach xapid (${error.message})`);
    }
    const doc = await response.json().catch(() => ({ ok: false, error: `HTTP ${response.status}` }));
    if (!doc.ok) {
      if (doc.code === "SESSION_INVALID" && this.credentials && !retried) {
        await this.relogin(session);
        return this.fault(request, true);
      }
      throw new Error(doc.error || "the fault was refused");
    }
    return doc.lines;
  }

  // Run `loop(attempt)` until stopped; on an error wait with backoff and call it again.
  // `loop` returns normally only to ask for an immediate restart.
  async supervise(name, loop) {
    let failures = 0;
    while (!this.stopped) {
      try {
        await loop(() => {
          failures = 0;
        });
      } catch (error) {
        if (this.stopped) return;
        if (error instanceof XapiError && (error.code === "SESSION_INVALID" || error.code === "EVENTS_LOST")) {
          // The daemon restarted (sessions and tokens are memory-only): log in again, fetch everything.
          try {
            await this.relogin(error.session);
            failures = 0;
            continue;
          } catch (loginError) {
            error = loginError;
          }
        }
        const wait = BACKOFF[Math.min(failures, BACKOFF.length - 1)];
        failures += 1;
        this.onStatus({ state: "reconnecting", name, error, wait });
        await sleep(wait);
      }
    }
  }

  // event.from forever: onReset(events) with a full replay after every (re)connection, then
  // onEvents(events) for each batch of changes.
  watchEvents(onReset, onEvents) {
    return this.supervise("events", async (healthy) => {
      let batch = await this.rpc("event.from", [this.session, this.classes, "", 0]);
      healthy();
      this.onStatus({ state: "connected" });
      onReset(batch.events);
      let token = batch.token;
      while (!this.stopped) {
        batch = await this.rpc("event.from", [this.session, this.classes, token, EVENT_TIMEOUT],
          { timeoutMs: (EVENT_TIMEOUT + 15) * 1000 });
        healthy();
        this.onStatus({ state: "connected" });
        token = batch.token;
        if (batch.events.length) onEvents(batch.events);
      }
    });
  }

  // The hardware feed forever: onHardware(doc) for the first answer and each change.
  watchHardware(onHardware) {
    return this.supervise("hardware", async (healthy) => {
      let token = "";
      while (!this.stopped) {
        const doc = await this.hardware(token, token === "" ? 0 : EVENT_TIMEOUT);
        healthy();
        token = doc.token;
        onHardware(doc);
      }
    });
  }
}
