"""The xapid benchmark: ``python -m bench.run [--smoke] [--out FILE]`` (``make bench``).

Starts its own daemons and baseline server on loopback, warms up, measures over several
rounds and prints a table; the median figures go to ``--out`` (``bench/results.json``):

1. read throughput of ``pool.get_record``, ``host.get_record`` and ``VM.get_record`` with 1 and
   8 keep-alive clients, as a ratio to the baseline (:mod:`bench.baseline`) answering the same
   struct, measured in interleaved rounds;
2. durable write throughput of ``VM.set_name_label`` (1 and 8 clients), as a ratio to the
   ``VM.get_record`` throughput at the same concurrency;
3. growth: median latency of ``VM.set_name_label`` and ``VM.get_record`` with 100, 10,000 and
   100,000 VMs (built by :mod:`bench.bulk`, untimed), ratio largest / smallest; the three
   daemons run at once and their rounds are interleaved;
4. ``VM.get_all_records_where`` with a one-field filter over 10,000 VMs: latency;
5. start-up (``xapid serve`` to the URL file) with 100 and 100,000 persisted objects, and the
   daemon's resident memory with 100,000 VMs;
6. HA: ``pool.enable_ha`` + ``pool.disable_ha`` with the shipped xhad stack for pools of 3, 16
   and 64 hosts, ratio 64 / 3;
7. one ``ha_query_liveset`` through ``xapid.ha.scripts.ClusterStackRunner`` versus the same
   script run directly;
8. HA planning: ``pool.ha_compute_max_host_failures_to_tolerate`` with 64 hosts and 1,000 running
   protected VMs (created and started through the SDK, untimed), each call after a write so that
   it plans afresh: latency;
9. failover with the xhad emulation (a crashed host until the pool counts it dead, until its
   protected VM runs elsewhere; a crashed master until a new master), and the same figures with
   the real-corosync stack (OCFS2 heartbeat SR, same pool and VMs), HA enable + disable with
   corosync for 3 and 16 hosts, and the detection floor corosync's token settings imply.  The
   corosync figures need root and the corosync package; without them they are reported as
   unavailable (``meta.unavailable``).
10. disk transfers: ``PUT /import_raw_vdi`` and ``GET /export_raw_vdi`` of a 1 GiB disk full of
    data, in MiB/s as a ratio to ``cp`` of the same file on the same disk (plus fsync, as the
    import does), and the daemon's peak resident memory during them.

Timed calls use a minimal keep-alive HTTP/1.1 client over a raw socket with pre-encoded
bodies, so the figure is the server's, not the client library's; logins, set-up and the HA
calls go through the official XenAPI SDK.  Targets are reported, never enforced: the exit
status is 0 whenever every measurement ran.  Every process the harness starts (daemons,
baseline, heartbeat processes left by an HA run) is stopped before it exits.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xmlrpc.client
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import XenAPI

REPO = Path(__file__).resolve().parents[1]
STACK_ROOT = REPO / "scripts" / "cluster-stack"
SM_DIR = REPO / "etc" / "sm.d"
READ_METHODS = ("pool.get_record", "host.get_record", "VM.get_record")
WRITE_METHOD = "VM.set_name_label"
QUERY_FILTER = 'field "power_state" = "Running"'
SEED_HOSTS = 3
GROWTH_WORKING_SET = 100  # distinct VMs the growth rounds read and rename, at every size

# Every figure results.json carries, in table order (the smoke test checks this list).
FIGURES: tuple[str, ...] = (
    "read.pool.get_record.c1",
    "read.pool.get_record.c8",
    "read.host.get_record.c1",
    "read.host.get_record.c8",
    "read.VM.get_record.c1",
    "read.VM.get_record.c8",
    "write.VM.set_name_label.c1",
    "write.VM.set_name_label.c8",
    "write.floor",
    "read.scaling",
    "write.scaling",
    "growth.VM.get_record",
    "growth.VM.set_name_label",
    "query.VM.get_all_records_where",
    "all_records.VM",
    "startup.small",
    "startup.large",
    "startup.large.crash",
    "rss.large",
    "ha.small",
    "ha.medium",
    "ha.large",
    "ha.ratio",
    "adapter.ha_query_liveset",
    "failover.vm.default",
    "failover.vm.fast",
    "failover.master",
    "failover.detect",
    "planner.max_failures",
    "corosync.ha.small",
    "corosync.ha.medium",
    "corosync.floor",
    "corosync.detect",
    "corosync.failover.vm",
    "corosync.failover.master",
    "transfer.import_raw",
    "transfer.export_raw",
    "transfer.rss",
)
COROSYNC_FIGURES = tuple(n for n in FIGURES if n.startswith("corosync."))


@dataclass(frozen=True)
class Params:
    """How much to measure; :data:`FULL` is ``make bench``, :data:`SMOKE` the tiny mode."""

    mode: str
    rounds: int  # rounds of every throughput and latency measurement
    duration: float  # seconds per throughput measurement
    warmup: float  # seconds of untimed calls per server/method/concurrency before the rounds
    clients: tuple[int, int]
    growth_vms: tuple[int, int, int]  # VM records in the store at the three growth points
    latency_calls: int  # sequential calls per growth latency round
    growth_warmup: float  # seconds of untimed reads and writes on every growth daemon first
    query_calls: int  # get_all_records_where calls (at growth_vms[1])
    startup_objects: tuple[int, int]  # persisted objects for the two start-up figures
    startup_rounds: int
    ha_hosts: tuple[int, int, int]
    corosync_hosts: tuple[int, int]
    ha_rounds: int
    adapter_calls: int
    failover_intervals: tuple[float, float]  # ha-monitor-interval of the "default" and "fast" failover runs
    planner_hosts: int
    planner_vms: int  # running protected VMs, spread over the hosts
    planner_calls: int
    budget: float  # seconds; the largest HA pool runs fewer rounds rather than overrun this
    transfer_size: int  # bytes of the disk imported and exported


FULL = Params(mode="full", rounds=5, duration=1.0, warmup=0.3, clients=(1, 8),
              growth_vms=(100, 10_000, 100_000), latency_calls=200, growth_warmup=3.0, query_calls=5,
              startup_objects=(100, 100_000), startup_rounds=3, ha_hosts=(3, 16, 64), corosync_hosts=(3, 16),
              ha_rounds=3, adapter_calls=20, planner_hosts=64, planner_vms=1000, planner_calls=7,
              failover_intervals=(20.0, 1.0), budget=540.0, transfer_size=1024**3)
SMOKE = Params(mode="smoke", rounds=1, duration=0.15, warmup=0.05, clients=(1, 8),
               growth_vms=(40, 150, 400), latency_calls=20, growth_warmup=0.0, query_calls=2,
               startup_objects=(100, 600), startup_rounds=1, ha_hosts=(1, 2, 3), corosync_hosts=(2, 3), ha_rounds=1,
               adapter_calls=2, planner_hosts=3, planner_vms=30, planner_calls=2,
               failover_intervals=(0.5, 0.5), budget=120.0, transfer_size=16 * 1024**2)


# The VM constructor fields without a datamodel default (the rest come from the schema).
VM_MANDATORY: dict[str, Any] = {
    "user_version": "1", "is_a_template": False, "affinity": "OpaqueRef:NULL", "VCPUs_params": {},
    "VCPUs_max": "1", "VCPUs_at_startup": "1", "actions_after_shutdown": "destroy",
    "actions_after_reboot": "restart", "actions_after_crash": "restart", "PV_bootloader": "", "PV_kernel": "",
    "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "", "PV_legacy_args": "",
    "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cdn"}, "platform": {}, "PCI_bus": "",
    "other_config": {}, "recommendations": "", "memory_static_max": "0", "memory_dynamic_max": "0",
    "memory_dynamic_min": "0", "memory_static_min": "0",
}


@functools.cache
def _vm_fields() -> tuple[tuple[str, Any], ...]:
    from xapid import schema as schema_mod
    from xapid.generic import constructor_fields

    out = []
    for f in constructor_fields(schema_mod.load().classes["VM"]):
        value = f.default if f.has_default else VM_MANDATORY[f.name]
        out.append((f.name, str(value) if isinstance(value, int) and not isinstance(value, bool) else value))
    return tuple(out)


def vm_struct(name: str, memory: int, priority: str) -> dict[str, Any]:
    """A full ``VM.create`` struct (every constructor field, as xe sends it) of ``memory`` bytes."""
    args = copy.deepcopy(dict(_vm_fields()))
    size = str(memory)
    args.update(name_label=name, memory_static_max=size, memory_dynamic_max=size, memory_dynamic_min=size,
                memory_static_min=size, ha_restart_priority=priority)
    return args


class BenchError(Exception):
    """A measurement could not be taken (a daemon died, a call failed...)."""


# -- processes ---------------------------------------------------------------------------------


def corosync_missing() -> str | None:
    """Why the corosync figures cannot be measured here, or None."""
    if os.geteuid() != 0:
        return "they need root (network namespaces)"
    for tool in ("corosync", "ip"):
        if shutil.which(tool) is None:
            return f"they need {tool} (apt-get install corosync iproute2)"
    return None


def ocfs2_sr(x: Any) -> str:
    """A shared OCFS2 SR: its driver requires the corosync stack."""
    master = x.pool.get_master(x.pool.get_all()[0])
    return str(x.SR.create(master, {}, str(2 * 1024**4), "OCFS2", "", "ocfs2", "user", True, {}))


def live_heartbeats(state_dir: Path) -> list[int]:
    """Pids in ``<state>/hosts/*/xhad.pid`` that are running heartbeat processes of this state dir."""
    pids = []
    for pid_file in state_dir.glob("hosts/*/xhad.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # An exited process (or a zombie) has no command line; a reused pid has another one.
        if b"--heartbeat" in cmdline and os.fsencode(str(state_dir)) in cmdline:
            pids.append(pid)
    return pids


def kill_heartbeats(state_dir: Path) -> int:
    """SIGKILL every heartbeat process left under ``state_dir``; return how many."""
    pids = live_heartbeats(state_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


class Processes:
    """Every process the harness started, so that all of them can be stopped at the end."""

    def __init__(self) -> None:
        self.running: list[tuple[subprocess.Popen[bytes], Path | None]] = []
        self.state_dirs: set[Path] = set()

    def spawn(self, argv: list[str], log: Path, state_dir: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO)
        self.running.append((proc, state_dir))
        if state_dir is not None:
            self.state_dirs.add(state_dir)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; forget the process; return its status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running = [(p, s) for p, s in self.running if p is not proc]
        return proc.returncode

    def stop_all(self) -> None:
        for proc, _state in list(self.running):
            self.stop(proc, timeout=30.0)
        for state in self.state_dirs:
            kill_heartbeats(state)


def write_conf(path: Path) -> Path:
    """The daemons' xapi.conf: shipped defaults, absolute paths to the shipped stacks and drivers."""
    path.write_text(f"cluster-stack-root = {STACK_ROOT}\nsm-dir = {SM_DIR}\nnbd-port = 0\n")
    return path


class Daemon:
    """One ``xapid serve`` on 127.0.0.1 in a state dir of its own."""

    def __init__(self, procs: Processes, work: Path, name: str, conf: Path, hosts: int = SEED_HOSTS) -> None:
        self.procs = procs
        self.state_dir = work / name
        self.log = work / f"{name}.log"
        self.conf = conf
        self.hosts = hosts
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def port(self) -> int:
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    def start(self, timeout: float = 300.0) -> float:
        """Start the daemon; return the seconds from the exec of ``xapid serve`` to the URL file."""
        url_file = self.state_dir / "url"
        url_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "xapid.cli.xapid", "serve", "--config", str(self.conf),
                "--state-dir", str(self.state_dir), "--listen", "127.0.0.1:0", "--hosts", str(self.hosts)]
        started = time.perf_counter()
        self.proc = self.procs.spawn(argv, self.log, self.state_dir)
        deadline = started + timeout
        while not url_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"xapid exited with {self.proc.returncode} at start-up:\n{self.tail()}")
            if time.perf_counter() > deadline:
                raise BenchError(f"xapid not ready after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        self.url = url_file.read_text().strip()
        return elapsed

    def stop(self) -> None:
        if self.proc is not None:
            code = self.procs.stop(self.proc)
            self.proc = None
            if code != 0:
                raise BenchError(f"xapid stopped with status {code}:\n{self.tail()}")
        kill_heartbeats(self.state_dir)

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean stop (and no start-up snapshot) is written."""
        if self.proc is not None:
            self.proc.kill()
            self.procs.stop(self.proc)
            self.proc = None
        kill_heartbeats(self.state_dir)

    @property
    def password(self) -> str:
        return (self.state_dir / "root-password").read_text().strip()

    def session(self) -> XenAPI.Session:
        s = XenAPI.Session(self.url)
        s.login_with_password("root", self.password, "2.21", "xapid-bench")
        return s

    def rss_mib(self) -> tuple[float, float]:
        """(resident, peak resident) memory of the daemon process in MiB."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- the timed client ----------------------------------------------------------------------------


class RawClient:
    """A minimal keep-alive HTTP/1.1 XML-RPC client: pre-encoded body in, raw reply body out."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self.head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/xml\r\nContent-Length: "

    def call(self, body: bytes) -> bytes:
        self.sock.sendall(f"{self.head}{len(body)}\r\n\r\n".encode() + body)
        status = self.rfile.readline()
        if not status.startswith(b"HTTP/1.") or status.split()[1:2] != [b"200"]:
            raise BenchError(f"HTTP reply {status!r} from port {self.port}")
        length = -1
        while True:
            line = self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length < 0:
            raise BenchError(f"reply without content-length from port {self.port}")
        reply = self.rfile.read(length)
        if b">Success<" not in reply[:400]:
            raise BenchError(f"call failed on port {self.port}: {reply[:600]!r}")
        return reply

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def fsync_seconds(directory: Path, appends: int = 100) -> float:
    """The median time of ``fsync`` after a 4 KiB append to a file in ``directory`` (what a
    durable commit must wait for at least once)."""
    path = directory / "bench-fsync.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block, times = b"\0" * 4096, []
        for _ in range(appends):
            os.write(fd, block)
            start = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - start)
        return median(times)
    finally:
        os.close(fd)
        path.unlink()


def encode(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method).encode("utf-8")


BodyMaker = Callable[[int, int], bytes]  # (client index, call index) -> request body


def throughput(port: int, make_body: BodyMaker, clients: int, duration: float) -> float:
    """Calls per second completed by ``clients`` keep-alive connections calling back to back."""
    conns = [RawClient(port) for _ in range(clients)]
    try:
        for i, conn in enumerate(conns):
            conn.call(make_body(i, -1))  # connected, and the server's thread for it is running
        counts = [0] * clients
        finished = [0.0] * clients
        errors: list[BaseException] = []
        barrier = threading.Barrier(clients + 1)
        window: dict[str, float] = {}

        def worker(i: int) -> None:
            conn, n, now = conns[i], 0, 0.0
            try:
                barrier.wait()
                end = window["end"]
                while True:
                    conn.call(make_body(i, n))
                    n += 1
                    now = time.perf_counter()
                    if now >= end:
                        break
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
            counts[i], finished[i] = n, now

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + duration
        barrier.wait()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return sum(counts) / (max(finished) - window["start"])
    finally:
        for conn in conns:
            conn.close()


def latencies(port: int, bodies: list[bytes]) -> list[float]:
    """Seconds per call of ``bodies`` sent one after the other on one keep-alive connection."""
    conn = RawClient(port)
    try:
        out = []
        for body in bodies:
            t0 = time.perf_counter()
            conn.call(body)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        conn.close()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- results -------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    label: str  # what was measured, for the table
    value: float
    unit: str
    measured: str  # the raw figures behind ``value``, for the table
    target: str | None = None  # e.g. ">= 0.8"
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def meets(value: float, target: str) -> bool:
    op, threshold = target.split()
    return value >= float(threshold) if op == ">=" else value <= float(threshold)


class Results:
    def __init__(self, params: Params) -> None:
        self.params = params
        self.figures: dict[str, Figure] = {}
        self.started = time.time()
        self.t0 = time.perf_counter()
        self.notes: list[str] = []
        self.unavailable: list[str] = []  # figures this machine cannot measure (see the notes)
        self.load_start = os.getloadavg()

    def add(self, name: str, label: str, value: float, unit: str, measured: str, target: str | None = None,
            **detail: Any) -> None:
        assert name in FIGURES, name
        self.figures[name] = Figure(name, label, value, unit, measured, target,
                                    meets(value, target) if target else None, detail)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def document(self) -> dict[str, Any]:
        return {
            "meta": {
                "mode": self.params.mode,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "runtime_s": round(self.elapsed(), 1),
                "complete": all(n in self.figures or n in self.unavailable for n in FIGURES),
                "unavailable": self.unavailable,
                "machine": machine(),
                # Other work on the machine shows here: the figures are ratios for that reason.
                "loadavg_1_5_15": {"start": [round(v, 2) for v in self.load_start],
                                   "end": [round(v, 2) for v in os.getloadavg()]},
                "params": asdict(self.params),
                "notes": self.notes,
            },
            "figures": {n: asdict(self.figures[n]) for n in FIGURES if n in self.figures},
        }

    def table(self) -> str:
        rows = [("figure", "measured", "value", "target", "")]
        for n in FIGURES:
            f = self.figures.get(n)
            if f is None:
                rows.append((n, "(not measured)", "", "", ""))
                continue
            status = "" if f.met is None else ("ok" if f.met else "MISSED")
            rows.append((f.label, f.measured, f"{fmt(f.value)} {f.unit}", f.target or "", status))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def fmt(x: float) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"cores": usable, "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "system": platform.platform()}


# -- the measurements ----------------------------------------------------------------------------


class Bench:
    def __init__(self, params: Params, work: Path, results: Results) -> None:
        self.p = params
        self.work = work
        self.results = results
        self.procs = Processes()
        self.conf = write_conf(work / "xapi.conf")
        self.sample: list[str] = []  # refs of bulk-created VMs, oldest first
        self.rng = random.Random(6)
        self.names = 0
        self.large_started = float("nan")
        self.last_detect = float("nan")  # seconds from the last failover round's crash until the host was dead

    def log(self, text: str) -> None:
        print(f"[{self.results.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)

    def bulk(self, daemon: Daemon, *, vms: int | None = None, objects: int | None = None) -> dict[str, Any]:
        argv = [sys.executable, "-m", "bench.bulk", "--state-dir", str(daemon.state_dir)]
        argv += ["--vms", str(vms)] if vms is not None else ["--objects", str(objects)]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"bulk path failed: {done.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(done.stdout)
        self.sample += out["sample"]
        self.log(f"bulk: {out['vms']} VMs, {out['objects']} objects (+{out['added']} VMs in {out['seconds']} s)")
        return out

    def new_name(self) -> str:
        self.names += 1
        return f"bench-name-{self.names}"

    # 5. start-up -------------------------------------------------------------------------------

    def startup(self, daemon: Daemon, name: str, objects: int, target: str | None) -> None:
        times = []
        for _ in range(self.p.startup_rounds):
            times.append(daemon.start())
            daemon.stop()
        value = median(times)
        self.results.add(name, f"start-up, {objects:,} objects", value, "s",
                         f"{', '.join(f'{t:.2f}' for t in times)} s", target, objects=objects,
                         rounds=[round(t, 3) for t in times])
        self.log(f"start-up with {objects} objects: {value:.2f} s")
        if name == "startup.large":
            # After a crash the snapshot a clean stop writes is gone: the start loads every row.
            daemon.start()
            daemon.kill()
            crash = daemon.start()
            daemon.stop()
            self.results.add("startup.large.crash", f"start-up after SIGKILL, {objects:,} objects (every row loaded)",
                             crash, "s", f"{crash:.2f} s", None, objects=objects)
            self.log(f"start-up after SIGKILL with {objects} objects: {crash:.2f} s")

    # 1 and 2. throughput against the baseline --------------------------------------------------

    def throughput_phase(self, daemon: Daemon, session: str, x: Any) -> None:
        pool = x.pool.get_all()[0]
        refs = {"pool.get_record": pool, "host.get_record": x.pool.get_master(pool),
                "VM.get_record": self.sample[0]}
        bodies = {m: encode(m, session, ref) for m, ref in refs.items()}
        probe = RawClient(daemon.port)
        replies = {m: probe.call(b).decode("utf-8") for m, b in bodies.items()}
        probe.close()
        baseline = self.start_baseline(replies)
        try:
            sizes = {m: {"xapid": len(replies[m].encode())} for m in READ_METHODS}
            probe = RawClient(baseline[1])
            for m in READ_METHODS:
                sizes[m]["baseline"] = len(probe.call(bodies[m]))
            probe.close()
            writers = self.sample[: max(self.p.clients)]

            def write_body(i: int, _n: int) -> bytes:
                return encode(WRITE_METHOD, session, writers[i % len(writers)], self.new_name())

            servers = {"baseline": baseline[1], "xapid": daemon.port}
            reads: dict[tuple[str, str, int], list[float]] = {}
            writes: dict[int, list[float]] = {c: [] for c in self.p.clients}
            syncs: list[float] = []  # per round: the median fsync of a 4 KiB append in the state dir
            for m in READ_METHODS:  # warm-up
                for c in self.p.clients:
                    for port in servers.values():
                        throughput(port, lambda _i, _n, b=bodies[m]: b, c, self.p.warmup)
            for c in self.p.clients:
                throughput(daemon.port, write_body, c, self.p.warmup)
            for r in range(self.p.rounds):
                for m in READ_METHODS:
                    for c in self.p.clients:
                        for server, port in servers.items():
                            cps = throughput(port, lambda _i, _n, b=bodies[m]: b, c, self.p.duration)
                            reads.setdefault((server, m, c), []).append(cps)
                for c in self.p.clients:
                    writes[c].append(throughput(daemon.port, write_body, c, self.p.duration))
                syncs.append(fsync_seconds(daemon.state_dir))
                self.log(f"throughput round {r + 1}/{self.p.rounds} done")
        finally:
            self.procs.stop(baseline[0])
        for m in READ_METHODS:
            for c in self.p.clients:
                xs, bs = median(reads[("xapid", m, c)]), median(reads[("baseline", m, c)])
                # Each round measures both servers back to back: the median of the per-round ratios
                # is steadier than the ratio of the medians on a machine whose speed drifts.
                ratio = median([a / b for a, b in zip(reads[("xapid", m, c)], reads[("baseline", m, c)],
                                                      strict=True)])
                self.results.add(
                    f"read.{m}.c{c}", f"read {m}, {c} client{'s' if c > 1 else ''}: xapid / baseline", ratio,
                    "x", f"{xs:,.0f} vs {bs:,.0f} calls/s", ">= 1.25", xapid_calls_per_s=round(xs, 1),
                    baseline_calls_per_s=round(bs, 1), reply_bytes=sizes[m],
                    rounds={"xapid": [round(v, 1) for v in reads[("xapid", m, c)]],
                            "baseline": [round(v, 1) for v in reads[("baseline", m, c)]]})
        for c in self.p.clients:
            ws, rs = median(writes[c]), median(reads[("xapid", "VM.get_record", c)])
            ratio = median([a / b for a, b in zip(writes[c], reads[("xapid", "VM.get_record", c)], strict=True)])
            self.results.add(
                f"write.{WRITE_METHOD}.c{c}", f"durable write {WRITE_METHOD}, {c} client{'s' if c > 1 else ''}: "
                f"writes / reads", ratio, "x", f"{ws:,.0f} vs {rs:,.0f} calls/s",
                ">= 0.5" if c == min(self.p.clients) else None,
                write_calls_per_s=round(ws, 1), read_calls_per_s=round(rs, 1),
                rounds=[round(v, 1) for v in writes[c]])
        self.write_floor(reads, writes, syncs)
        self.scaling_figures(reads, writes)

    def write_floor(self, reads: dict[tuple[str, str, int], list[float]], writes: dict[int, list[float]],
                    syncs: list[float]) -> None:
        """What 1-client writes / reads would be if a durable write cost exactly a read plus one
        fsync (a commit free of CPU): the ceiling the disk sets on that figure."""
        c = min(self.p.clients)
        read_rtts = [1.0 / r for r in reads[("xapid", "VM.get_record", c)]]
        ceilings = [rtt / (rtt + f) for rtt, f in zip(read_rtts, syncs, strict=True)]
        measured = [w / r for w, r in zip(writes[c], reads[("xapid", "VM.get_record", c)], strict=True)]
        self.results.add(
            "write.floor", "1-client writes / reads if a write cost a read plus one fsync (the disk's ceiling)",
            median(ceilings), "x", f"fsync {median(syncs) * 1e6:,.0f} us, read {median(read_rtts) * 1e6:,.0f} us; "
            f"measured {median(measured):.2f}", fsync_us=[round(f * 1e6, 1) for f in syncs],
            read_us=[round(r * 1e6, 1) for r in read_rtts],
            share_of_ceiling=round(median(measured) / median(ceilings), 3))

    def scaling_figures(self, reads: dict[tuple[str, str, int], list[float]], writes: dict[int, list[float]]) -> None:
        """xapid against itself: many clients / one client, for reads (the worst method) and writes."""
        few, many = min(self.p.clients), max(self.p.clients)
        per_method = {m: median([a / b for a, b in zip(reads[("xapid", m, many)], reads[("xapid", m, few)],
                                                       strict=True)]) for m in READ_METHODS}
        worst = min(per_method, key=lambda m: per_method[m])
        self.results.add("read.scaling", f"reads, {many} clients / {few} client (xapid, the worst method)",
                         per_method[worst], "x", ", ".join(f"{m} {v:.2f}" for m, v in per_method.items()), ">= 1.0",
                         per_method={m: round(v, 3) for m, v in per_method.items()})
        ratio = median([a / b for a, b in zip(writes[many], writes[few], strict=True)])
        self.results.add("write.scaling", f"durable writes {WRITE_METHOD}, {many} clients / {few} client", ratio,
                         "x", f"{median(writes[many]):,.0f} vs {median(writes[few]):,.0f} calls/s", ">= 2.0")

    def start_baseline(self, replies: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
        replies_file = self.work / "baseline-replies.json"
        replies_file.write_text(json.dumps(replies))
        url_file = self.work / "baseline.url"
        url_file.unlink(missing_ok=True)
        proc = self.procs.spawn([sys.executable, "-m", "bench.baseline", "--replies", str(replies_file),
                                 "--url-file", str(url_file)], self.work / "baseline.log")
        deadline = time.perf_counter() + 180  # decoding a reply of 10,000 records takes a while
        while not url_file.exists():
            if proc.poll() is not None or time.perf_counter() > deadline:
                self.procs.stop(proc)
                raise BenchError(f"baseline server did not start: {(self.work / 'baseline.log').read_text()}")
            time.sleep(0.01)
        port = int(url_file.read_text().strip().rstrip("/").rsplit(":", 1)[1])
        return proc, port

    # 3. growth ----------------------------------------------------------------------------------

    def growth(self, points: list[tuple[int, Daemon, list[str]]]) -> Daemon:
        """Latency of reads and writes at every size, all daemons up at once and measured in
        interleaved rounds (so that a slow spell of the machine's disk hits every size alike);
        returns the daemon of the largest size, still running."""
        timings: dict[str, dict[int, list[float]]] = {"VM.get_record": {}, WRITE_METHOD: {}}
        sessions: dict[int, str] = {}
        started: dict[int, float] = {}
        for vms, daemon, _pool in points:
            started[vms] = daemon.start()
            sessions[vms] = daemon.session()._session
        # The same number of distinct VMs is read and renamed at every size, so the encoded-record
        # cache hits alike and only the size of the store differs (with every VM of the store in
        # play, the large sizes would measure cache misses against the small one's hits).
        points = [(vms, daemon, self.rng.sample(pool, min(GROWTH_WORKING_SET, len(pool))))
                  for vms, daemon, pool in points]

        def batch(vms: int, daemon: Daemon, pool: list[str], n: int) -> tuple[float, float]:
            session = sessions[vms]
            reads = [encode("VM.get_record", session, self.rng.choice(pool)) for _ in range(n)]
            writes = [encode(WRITE_METHOD, session, self.rng.choice(pool), self.new_name()) for _ in range(n)]
            return median(latencies(daemon.port, reads)), median(latencies(daemon.port, writes))

        # Warm-up: right after a start the first seconds of commits can be slower (a start-up
        # effect, not growth).
        until = time.perf_counter() + self.p.growth_warmup
        while True:
            for vms, daemon, pool in points:
                batch(vms, daemon, pool, 10)
            if time.perf_counter() >= until:
                break
        for _ in range(self.p.rounds):
            for vms, daemon, pool in points:
                read, write = batch(vms, daemon, pool, self.p.latency_calls)
                timings["VM.get_record"].setdefault(vms, []).append(read)
                timings[WRITE_METHOD].setdefault(vms, []).append(write)
        for vms, _daemon, _pool in points:
            self.log(f"growth at {vms} VMs: get_record {median(timings['VM.get_record'][vms]) * 1e3:.3f} ms, "
                     f"set_name_label {median(timings[WRITE_METHOD][vms]) * 1e3:.3f} ms")
        self.growth_figures(timings)
        for _vms, daemon, _pool in points[:-1]:
            daemon.stop()
            shutil.rmtree(daemon.state_dir, ignore_errors=True)
        self.large_started = started[points[-1][0]]
        return points[-1][1]

    def growth_figures(self, points: dict[str, dict[int, list[float]]]) -> None:
        for method, by_size in points.items():
            sizes = sorted(by_size)
            ms = {s: median(by_size[s]) * 1e3 for s in sizes}
            small, large = sizes[0], sizes[-1]
            self.results.add(
                f"growth.{method}", f"growth {method}: latency {large:,} / {small:,} VMs",
                ms[large] / ms[small], "x", " / ".join(f"{ms[s]:.3f}" for s in sizes) + " ms", "<= 1.5",
                latency_ms={str(s): round(v, 4) for s, v in ms.items()},
                rounds_ms={str(s): [round(v * 1e3, 4) for v in by_size[s]] for s in sizes})

    # 4. query -------------------------------------------------------------------------------------

    def query(self, daemon: Daemon, session: str, vms: int) -> None:
        body = encode("VM.get_all_records_where", session, QUERY_FILTER)
        probe = RawClient(daemon.port)
        reply = probe.call(body)
        probe.close()
        matched = len(xmlrpc.client.loads(reply)[0][0]["Value"])
        times = latencies(daemon.port, [body] * self.p.query_calls)
        value = median(times) * 1e3
        self.results.add("query.VM.get_all_records_where",
                         f"VM.get_all_records_where, one-field filter, {vms:,} VMs", value, "ms",
                         f"{matched} matched", None, vms=vms, filter=QUERY_FILTER, matched=matched,
                         per_vm_us=round(value * 1e3 / vms, 2), calls_ms=[round(t * 1e3, 2) for t in times])
        self.log(f"get_all_records_where over {vms} VMs: {value:.1f} ms")

    def all_records(self, daemon: Daemon, session: str, vms: int) -> None:
        """``VM.get_all_records`` over every VM: xapid against the baseline marshalling the same records."""
        body = encode("VM.get_all_records", session)
        probe = RawClient(daemon.port)
        reply = probe.call(body)
        baseline = self.start_baseline({"VM.get_all_records": reply.decode("utf-8")})
        try:
            other = RawClient(baseline[1])
            rounds: dict[str, list[float]] = {"xapid": [], "baseline": []}
            for _ in range(self.p.query_calls):  # back to back, as the throughput figures
                for server, client in (("xapid", probe), ("baseline", other)):
                    t0 = time.perf_counter()
                    client.call(body)
                    rounds[server].append(time.perf_counter() - t0)
            other.close()
        finally:
            probe.close()
            self.procs.stop(baseline[0])
        ratio = median([b / a for a, b in zip(rounds["xapid"], rounds["baseline"], strict=True)])
        xs, bs = median(rounds["xapid"]) * 1e3, median(rounds["baseline"]) * 1e3
        self.results.add("all_records.VM", f"VM.get_all_records, {vms:,} VMs: baseline time / xapid time", ratio,
                         "x", f"{xs:,.0f} vs {bs:,.0f} ms ({len(reply) / 1024**2:,.1f} MiB)", ">= 2.0", vms=vms,
                         reply_bytes=len(reply),
                         rounds_ms={k: [round(v * 1e3, 1) for v in t] for k, t in rounds.items()})
        self.log(f"get_all_records over {vms} VMs: xapid {xs:.0f} ms, baseline {bs:.0f} ms")

    # the store phases: 1-5 -------------------------------------------------------------------------

    def store_phase(self) -> None:
        d = Daemon(self.procs, self.work, "store", self.conf)
        d.start()  # seeds the demo pool
        d.stop()
        out = self.bulk(d, objects=self.p.startup_objects[0])
        self.startup(d, "startup.small", out["objects"], None)
        points: list[tuple[int, Daemon, list[str]]] = []  # (VMs, daemon on a copy of that state, its VMs)
        for i, vms in enumerate(self.p.growth_vms):
            if i == 2:
                out = self.bulk(d, objects=self.p.startup_objects[1])
                self.startup(d, "startup.large", out["objects"], "<= 1.5")
            out = self.bulk(d, vms=vms)
            if i < 2:
                snapshot = Daemon(self.procs, self.work, f"growth-{i}", self.conf)
                shutil.copytree(d.state_dir, snapshot.state_dir)
                points.append((out["vms"], snapshot, list(self.sample)))
                d.start()
                try:
                    s = d.session()
                    if i == 0:
                        self.throughput_phase(d, s._session, s.xenapi)
                    else:
                        self.query(d, s._session, out["vms"])
                        self.all_records(d, s._session, out["vms"])
                    s.xenapi.session.logout()
                finally:
                    d.stop()
            else:
                points.append((out["vms"], d, list(self.sample)))
        large = self.growth(points)
        try:
            rss, peak = large.rss_mib()
            self.results.add("rss.large", f"resident memory, {out['vms']:,} VMs", rss, "MiB",
                             f"peak {peak:,.0f} MiB, start-up {self.large_started:.1f} s", "<= 400",
                             vms=out["vms"], objects=out["objects"], peak_mib=round(peak, 1),
                             startup_s=round(self.large_started, 3))
            self.log(f"RSS with {out['vms']} VMs: {rss:.0f} MiB (peak {peak:.0f})")
        finally:
            large.stop()
        shutil.rmtree(d.state_dir, ignore_errors=True)

    # 6 and 7. HA -----------------------------------------------------------------------------------

    def ha_phase(self) -> None:
        totals: dict[int, float] = {}
        for idx, hosts in enumerate(self.p.ha_hosts):
            name = ("ha.small", "ha.medium", "ha.large")[idx]
            d = Daemon(self.procs, self.work, f"ha-{hosts}", self.conf, hosts=hosts)
            d.start()
            enable: list[float] = []
            disable: list[float] = []
            try:
                s = d.session()
                x = s.xenapi
                rounds = self.p.ha_rounds
                for r in range(rounds):
                    if r and idx == len(self.p.ha_hosts) - 1:
                        last = enable[-1] + disable[-1]
                        if self.results.elapsed() + 1.2 * last + 10 > self.p.budget:
                            self.results.notes.append(
                                f"ha.large: {r} of {rounds} rounds (time budget of {self.p.budget:g} s)")
                            break
                    e, dis = self.ha_round(d, x, adapter=idx == 0 and r == 0)
                    enable.append(e)
                    disable.append(dis)
                    self.log(f"HA {hosts} hosts round {r + 1}: enable {e:.2f} s, disable {dis:.2f} s")
                s.xenapi.session.logout()
            finally:
                d.stop()
                shutil.rmtree(d.state_dir, ignore_errors=True)
            totals[hosts] = median([a + b for a, b in zip(enable, disable, strict=True)])
            self.results.add(name, f"HA enable + disable, {hosts} host{'s' if hosts > 1 else ''}", totals[hosts], "s",
                             f"enable {median(enable):.2f} + disable {median(disable):.2f} s", None, hosts=hosts,
                             enable_s=round(median(enable), 3), disable_s=round(median(disable), 3),
                             rounds=len(enable), enable_rounds=[round(v, 3) for v in enable],
                             disable_rounds=[round(v, 3) for v in disable])
        small, large = self.p.ha_hosts[0], self.p.ha_hosts[-1]
        self.results.add("ha.ratio", f"HA enable + disable: {large} / {small} hosts", totals[large] / totals[small],
                         "x", f"{totals[large]:.2f} / {totals[small]:.2f} s", "<= 4")

    def ha_round(self, d: Daemon, x: Any, adapter: bool) -> tuple[float, float]:
        pool = x.pool.get_all()[0]
        enabled = False
        try:
            t0 = time.perf_counter()
            x.pool.enable_ha([], {})
            t1 = time.perf_counter()
            enabled = True
            if adapter:
                self.adapter(d, x, pool)
            t2 = time.perf_counter()
            x.pool.disable_ha()
            t3 = time.perf_counter()
            enabled = False
        finally:
            if enabled:
                try:
                    x.pool.disable_ha()
                except Exception:  # noqa: BLE001 - the daemon's stop and kill_heartbeats follow
                    pass
        left = live_heartbeats(d.state_dir)
        if left:
            raise BenchError(f"heartbeat processes still running after pool.disable_ha: {left}")
        return t1 - t0, t3 - t2

    def adapter(self, d: Daemon, x: Any, pool: str) -> None:
        from xapid.ha.scripts import ClusterStackRunner
        from xapid.logging import configure

        configure("critical")  # the runner logs every script run; keep the table readable
        uuid = x.host.get_uuid(x.pool.get_master(pool))
        conf = d.state_dir / "hosts" / uuid / "xhad.conf"
        stack_dir = STACK_ROOT / "xhad"
        runner = ClusterStackRunner(STACK_ROOT)
        base_path = os.environ.get("PATH", os.defpath)
        env = {"PATH": f"{base_path}{os.pathsep}{stack_dir}", "XHAD_CONF": str(conf), "XAPI_HOST_UUID": uuid}
        via: list[float] = []
        direct: list[float] = []

        def through_adapter() -> float:
            t0 = time.perf_counter()
            live = runner.query_liveset("xhad", uuid, conf)
            elapsed = time.perf_counter() - t0
            if live.status != "Online":
                raise BenchError(f"ha_query_liveset through the adapter: status {live.status}")
            return elapsed

        def run_directly() -> float:
            t0 = time.perf_counter()
            done = subprocess.run([str(stack_dir / "ha_query_liveset")], cwd=stack_dir, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, check=False)
            elapsed = time.perf_counter() - t0
            if done.returncode != 0 or b"<ha_liveset_info" not in done.stdout:
                raise BenchError(f"ha_query_liveset run directly: exit {done.returncode}")
            return elapsed

        for i in range(self.p.adapter_calls + 1):  # the first pair warms the page cache
            if i % 2:
                a, b = through_adapter(), run_directly()
            else:
                b, a = run_directly(), through_adapter()
            if i:
                via.append(a)
                direct.append(b)
        a, b = median(via) * 1e3, median(direct) * 1e3
        self.results.add("adapter.ha_query_liveset", "ha_query_liveset: adapter / direct", a / b, "x",
                         f"{a:.1f} vs {b:.1f} ms", None, adapter_ms=round(a, 3), direct_ms=round(b, 3),
                         overhead_ms=round(a - b, 3), calls=len(via))
        self.log(f"ha_query_liveset: adapter {a:.1f} ms, direct {b:.1f} ms")

    def failover_phase(self) -> None:
        """Crash of a host running a protected VM until that VM runs elsewhere; crash of the master."""
        floor_parts = "HeartbeatTimeout 10 s + one monitor interval + a start"
        default_i, fast_i = self.p.failover_intervals
        fast_vm, master_s = self.failover_round(fast_i, measure_master=True)
        fast_detect = self.last_detect
        default_vm = fast_vm if default_i == fast_i else self.failover_round(default_i, measure_master=False)[0]
        for name, interval, vm_s in (("failover.vm.default", default_i, default_vm),
                                     ("failover.vm.fast", fast_i, fast_vm)):
            self.results.add(name, f"protected VM failover, T = 10, monitor every {interval:g} s", vm_s, "s",
                             f"floor {10 + interval:g} s ({floor_parts})", None, monitor_interval=interval,
                             floor_s=10 + interval)
            self.log(f"failover (monitor {interval:g} s): VM running elsewhere after {vm_s:.2f} s")
        assert master_s is not None
        self.results.add("failover.master", f"master failover, T = 10, monitor every {fast_i:g} s", master_s, "s",
                         "crash of the master until a new pool.master answers", None, monitor_interval=fast_i)
        self.log(f"master failover (monitor {fast_i:g} s): {master_s:.2f} s")
        self.results.add("failover.detect", f"crashed host counted dead, T = 10, monitor every {fast_i:g} s",
                         fast_detect, "s", "crash until host_metrics.live is false", None,
                         monitor_interval=fast_i)
        self.log(f"detection (monitor {fast_i:g} s): {fast_detect:.2f} s")

    def failover_round(self, interval: float, measure_master: bool, stack: str = "xhad",
                       one_crash: bool = False) -> tuple[float, float | None]:
        """(seconds until the protected VM ran elsewhere, seconds until a new master or None).

        Normally a slave crashes, then the master; ``one_crash`` (the smoke mode's corosync round)
        crashes the master with the protected VM on it and times all three figures from that crash.
        """
        from tests.integration.ha.conftest import vm_record
        from xapid.hw.faults import FaultClient

        conf = self.work / f"failover-{stack}-{interval:g}.conf"
        conf.write_text(f"cluster-stack-root = {STACK_ROOT}\nsm-dir = {SM_DIR}\n"
                        f"ha-monitor-interval = {interval}\nfence-reboot-delay = 0\nlogin-failure-delay = 0.2\n")
        d = Daemon(self.procs, self.work, f"failover-{stack}-{interval:g}", conf, hosts=3)
        d.start()
        try:
            x = d.session().xenapi
            pool = x.pool.get_all()[0]
            hosts = {x.host.get_name_label(h): h for h in x.host.get_all()}
            sr = ocfs2_sr(x) if stack == "corosync" else x.pool.get_default_SR(pool)
            x.pool.enable_ha([sr], {"timeout": "10"})
            if x.pool.get_ha_cluster_stack(pool) != stack:
                raise BenchError(f"failover: HA chose {x.pool.get_ha_cluster_stack(pool)}, not {stack}")
            fault = FaultClient(d.state_dir)

            def protected_on(host: str) -> str:
                vm = x.VM.create(vm_record(f"bench-{host}", 2))
                x.VM.set_ha_restart_priority(vm, "restart")
                x.VM.start_on(vm, hosts[host], False, False)
                return str(vm)

            def wait(done: Any, what: str, limit: float = 180.0) -> float:
                t0 = time.perf_counter()
                while not done():
                    if time.perf_counter() - t0 > limit:
                        raise BenchError(f"failover: {what} did not happen within {limit:g} s")
                    time.sleep(0.05)
                return time.perf_counter() - t0

            victim = "host1" if one_crash else "host2"
            vm = protected_on(victim)
            metrics = x.host.get_metrics(hosts[victim])
            detected: list[float] = []
            new_master: list[float] = []
            t0 = time.perf_counter()
            fault.crash(victim)

            def restarted() -> bool:
                if not new_master and x.pool.get_master(pool) != hosts["host1"]:
                    new_master.append(time.perf_counter() - t0)
                if not detected and not x.host_metrics.get_live(metrics):
                    detected.append(time.perf_counter() - t0)
                return bool(detected) and x.VM.get_power_state(vm) == "Running" and (
                    x.VM.get_resident_on(vm) != hosts[victim])

            vm_s = wait(restarted, "the protected VM's restart")
            self.last_detect = detected[0]
            master_s = new_master[0] if one_crash else None
            if measure_master and not one_crash:
                if stack == "corosync":
                    # One survivor of three has no quorum: bring the pool back to three first.
                    fault.boot("host2")
                    wait(lambda: all(x.host_metrics.get_live(x.host.get_metrics(h)) for h in hosts.values()),
                         "host2 to rejoin")
                fault.crash("host1")
                master_s = wait(lambda: x.pool.get_master(pool) != hosts["host1"], "a new master")
            return vm_s, master_s
        finally:
            d.stop()
            kill_heartbeats(d.state_dir)
            shutil.rmtree(d.state_dir, ignore_errors=True)

    # 9. the corosync stack ------------------------------------------------------------------------

    def corosync_phase(self) -> None:
        """The failover figures again with real corosync, HA enable + disable, the token floor."""
        missing = corosync_missing()
        if missing:
            self.results.unavailable.extend(COROSYNC_FIGURES)
            self.results.notes.append(f"corosync figures unavailable: {missing}")
            self.log(f"corosync: skipped ({missing})")
            return
        for name, hosts in zip(("corosync.ha.small", "corosync.ha.medium"), self.p.corosync_hosts, strict=True):
            d = Daemon(self.procs, self.work, f"corosync-ha-{hosts}", self.conf, hosts=hosts)
            d.start()
            enable: list[float] = []
            disable: list[float] = []
            try:
                x = d.session().xenapi
                sr = ocfs2_sr(x)
                for _ in range(self.p.ha_rounds):
                    t0 = time.perf_counter()
                    x.pool.enable_ha([sr], {"timeout": "10"})
                    t1 = time.perf_counter()
                    x.pool.disable_ha()
                    enable.append(t1 - t0)
                    disable.append(time.perf_counter() - t1)
            finally:
                d.stop()
                shutil.rmtree(d.state_dir, ignore_errors=True)
            total = median([a + b for a, b in zip(enable, disable, strict=True)])
            self.results.add(name, f"HA enable + disable with corosync, {hosts} hosts", total, "s",
                             f"enable {median(enable):.2f} + disable {median(disable):.2f} s", None, hosts=hosts,
                             enable_s=round(median(enable), 3), disable_s=round(median(disable), 3),
                             rounds=len(enable))
            self.log(f"corosync HA {hosts} hosts: enable {median(enable):.2f} s, disable {median(disable):.2f} s")
        # corosync_engine.py: token = T * 1000 / 20 ms (T = 10: 500 ms), consensus 1.2 * token.
        token = max(0.2, 10 / 20)
        membership = 2.2 * token
        liveset = membership + 5 + 1.5
        self.results.add("corosync.floor", "corosync: membership floor (token + consensus), T = 10", membership, "s",
                         f"token {token * 1000:.0f} ms + consensus {1.2 * token * 1000:.0f} ms; dead in the liveset "
                         f"after {liveset:g} s (+ watchdog 5 s + 1.5 s)", None, token_ms=token * 1000,
                         liveset_floor_s=liveset)
        _default_i, fast_i = self.p.failover_intervals
        vm_s, master_s = self.failover_round(fast_i, measure_master=True, stack="corosync",
                                             one_crash=self.p.mode == "smoke")
        assert master_s is not None
        self.results.add("corosync.detect", f"corosync: crashed host counted dead, monitor every {fast_i:g} s",
                         self.last_detect, "s", f"floor {liveset:g} s", None, monitor_interval=fast_i)
        self.results.add("corosync.failover.vm", f"corosync: protected VM failover, monitor every {fast_i:g} s",
                         vm_s, "s", "crash until the VM runs elsewhere", None, monitor_interval=fast_i)
        self.results.add("corosync.failover.master", f"corosync: master failover, monitor every {fast_i:g} s",
                         master_s, "s", "crash of the master until a new pool.master answers", None,
                         monitor_interval=fast_i)
        self.log(f"corosync failover: detect {self.last_detect:.2f} s, VM {vm_s:.2f} s, master {master_s:.2f} s")

    # 8. HA planning -----------------------------------------------------------------------------

    def planner_phase(self) -> None:
        hosts, vms = self.p.planner_hosts, self.p.planner_vms
        d = Daemon(self.procs, self.work, "planner", self.conf, hosts=hosts)
        d.start()
        try:
            s = d.session()
            x = s.xenapi
            refs = x.host.get_all()
            for i in range(vms):
                vm = x.VM.create(vm_struct(f"planner-{i}", 1024**3, "restart"))
                x.VM.start_on(vm, refs[i % len(refs)], False, False)
            times: list[float] = []
            answer = ""
            for i in range(self.p.planner_calls):
                # A write first, so that every call plans afresh (an unchanged store reuses its plan).
                x.VM.set_name_label(vm, f"planner-renamed-{i}")
                t0 = time.perf_counter()
                answer = x.pool.ha_compute_max_host_failures_to_tolerate()
                times.append(time.perf_counter() - t0)
            s.xenapi.session.logout()
        finally:
            d.stop()
            shutil.rmtree(d.state_dir, ignore_errors=True)
        value = median(times) * 1e3
        self.results.add("planner.max_failures", f"HA max failures, {hosts} hosts x {vms:,} protected VMs", value,
                         "ms", f"{value:.1f} ms (answer {answer})", "<= 1000", hosts=hosts, vms=vms,
                         answer=int(answer), first_ms=round(times[0] * 1e3, 3),
                         rounds=[round(t * 1e3, 3) for t in times])
        self.log(f"planner: {hosts} hosts x {vms} protected VMs: {value:.1f} ms, max failures {answer}")

    # 9. disk transfers --------------------------------------------------------------------------

    def transfer_phase(self) -> None:
        size = self.p.transfer_size
        mib = size / 1024**2
        source = self.work / "transfer-source.raw"
        with open(source, "wb") as f:  # dense data (a sparse file would flatter cp and xapid alike)
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        d = Daemon(self.procs, self.work, "transfer", self.conf)
        d.start()
        try:
            x = d.session()
            api = x.xenapi
            sr = api.pool.get_default_SR(api.pool.get_all()[0])
            vdi = api.VDI.create({"name_label": "bench", "name_description": "", "SR": sr, "virtual_size": str(size),
                                  "type": "user", "sharable": False, "read_only": False, "other_config": {},
                                  "xenstore_data": {}, "sm_config": {}, "tags": []})
            rss_before = d.rss_mib()[0]
            query = f"session_id={x._session}&vdi={vdi}"
            # Raw sockets and sendfile on the client side, so that the figure is the server's.
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", d.port)) as sock, open(source, "rb") as f:
                sock.sendall(f"PUT /import_raw_vdi?{query} HTTP/1.1\r\nhost: bench\r\n"
                             f"content-length: {size}\r\n\r\n".encode())
                sock.sendfile(f)
                answer = sock.recv(65536)
            import_s = time.perf_counter() - t0
            if not answer.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"import_raw_vdi answered {answer[:300]!r}")
            sink = self.work / "transfer-export.raw"
            t0 = time.perf_counter()
            got = 0
            with socket.create_connection(("127.0.0.1", d.port)) as sock, open(sink, "wb") as out:
                sock.sendall(f"GET /export_raw_vdi?{query} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
                buf = bytearray(4 << 20)
                view = memoryview(buf)
                while n := sock.recv_into(buf):
                    out.write(view[:n])
                    got += n
                out.flush()
                os.fsync(out.fileno())
            export_s = time.perf_counter() - t0
            if got < size:
                raise BenchError(f"export_raw_vdi sent {got} bytes of {size}")
            peak = d.rss_mib()[1]
            x.xenapi.session.logout()
        finally:
            d.stop()
            shutil.rmtree(d.state_dir, ignore_errors=True)
        copy = self.work / "transfer-copy.raw"
        t0 = time.perf_counter()
        subprocess.run(["cp", str(source), str(copy)], check=True)
        fd = os.open(copy, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        cp_s = time.perf_counter() - t0
        for path in (source, copy, self.work / "transfer-export.raw"):
            path.unlink(missing_ok=True)
        cp_rate = mib / cp_s
        for name, what, seconds in (("import", "PUT /import_raw_vdi", import_s), ("export", "GET /export_raw_vdi",
                                                                                 export_s)):
            rate = mib / seconds
            self.results.add(f"transfer.{name}_raw", f"{what}, {mib:,.0f} MiB: xapid / cp", rate / cp_rate, "x",
                             f"{rate:,.0f} vs cp {cp_rate:,.0f} MiB/s", None, mib_per_s=round(rate, 1),
                             cp_mib_per_s=round(cp_rate, 1), seconds=round(seconds, 3))
        self.results.add("transfer.rss", f"daemon peak RSS over {mib:,.0f} MiB in and out", peak, "MiB",
                         f"{peak:.0f} MiB peak ({rss_before:.0f} MiB before)", "<= 256",
                         before_mib=round(rss_before, 1))
        self.log(f"transfer: import {mib / import_s:.0f} MiB/s, export {mib / export_s:.0f} MiB/s, "
                 f"cp {cp_rate:.0f} MiB/s, peak RSS {peak:.0f} MiB")

    def run(self, only: frozenset[str] = frozenset()) -> None:
        """Run every phase, or only those named in ``only`` (see :data:`PHASES`)."""
        try:
            for name in PHASES:
                if not only or name in only:
                    getattr(self, f"{name}_phase")()
        finally:
            self.procs.stop_all()


@dataclass
class Outcome:
    results: Results
    error: str | None = None


# The phases in the order they run; ``--only`` picks some of them.
PHASES = ("store", "ha", "failover", "planner", "corosync", "transfer")


def run(params: Params, workdir: Path | None = None, keep: bool = False,
        only: frozenset[str] = frozenset()) -> Outcome:
    """Run every measurement of ``params``; never leaves a process behind."""
    results = Results(params)
    work = Path(tempfile.mkdtemp(prefix="xapid-bench-", dir=workdir))
    bench = Bench(params, work, results)
    error = None
    try:
        bench.run(only)
    except BenchError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - reported with its traceback; the processes are stopped
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    finally:
        if keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return Outcome(results, error)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: daemons and heartbeats stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny mode (seconds), for make test")
    parser.add_argument("--out", type=Path, help="results file (default bench/results.json; "
                        "build/bench-smoke.json with --smoke, build/bench-only.json with --only)")
    parser.add_argument("--workdir", type=Path, help="parent folder of the temporary state dirs")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs and logs")
    parser.add_argument("--only", default="", help=f"comma-separated phases to run, of {', '.join(PHASES)} "
                        "(default: all); the results file then holds only their figures")
    args = parser.parse_args(argv)
    only = frozenset(p for p in args.only.split(",") if p)
    if unknown := only - set(PHASES):
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    params = SMOKE if args.smoke else FULL
    default_out = "build/bench-smoke.json" if args.smoke else "build/bench-only.json" if only else "bench/results.json"
    out = args.out or REPO / default_out
    signal.signal(signal.SIGTERM, _terminate)
    # As in an activated venv: `python3` (the shebang of the shipped cluster-stack scripts) is this
    # interpreter, not a version-manager shim (pyenv's costs ~80 ms per script run).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    outcome = run(params, args.workdir, args.keep, only)
    doc = outcome.results.document()
    if outcome.error:
        doc["meta"]["error"] = outcome.error
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["meta"]["machine"]
    print(f"xapid benchmark ({params.mode}), {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
          f"{doc['meta']['runtime_s']:.0f} s")
    print(outcome.results.table())
    for note in outcome.results.notes:
        print(f"note: {note}")
    print(f"figures: {out}")
    if outcome.error:
        print(f"bench: error: {outcome.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
