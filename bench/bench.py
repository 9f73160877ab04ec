"""Benchmarks of django_resto_gevent against django-resto 1.3 and curl, on real nginx hosts.

One run measures, against the same nginx media hosts on loopback and in the
same conditions, this library (``new``), the original django-resto 1.3
(``original``) and plain parallel ``curl -T`` uploads, and prints one
markdown table with the ratios and whether each target is met:

1. save() of 1 KiB, one after the other, to 1, 3 and 12 hosts, Hybrid and
   Distributed: median and p95;
2. the same with 50 ms of one-way latency in front of every host;
3. throughput: 500 saves of 10 KiB to 3 hosts from 1 and from 20 concurrent
   callers (greenlets in a gevent-patched process for this library, threads
   for the original, which has no gevent support);
4. one 256 MiB file to 3 hosts: wall time of the save and of its uploads,
   and peak RSS growth over the same process idle, next to 3 parallel
   ``curl -T`` of the same file;
5. 1 KiB saves to 3 HTTPS hosts (nginx with TLS, signed by a CA made with
   ``openssl`` for the run) over kept-alive connections, against plain HTTP;
6. scaling: 50 hosts behind the latency, and the threaded path (a process
   that gevent did not patch) to 3 and 12 hosts;
7. DistributedStorage with ``allow_overwrite`` (no HEAD round before the
   PUTs) against without, 1 KiB to 3 hosts behind the latency.

How. One nginx master serves 50 media hosts (``conftest.NginxHosts``) and a
second one 3 HTTPS hosts; their roots, every ``MEDIA_ROOT`` and the source
files live on tmpfs (``/dev/shm``). The original is installed from PyPI into
a throwaway virtualenv under ``bench/results/`` (ignored by git), with the
same Python and Django as this run when it imports there, else an older
pair. Each implementation runs in a long-lived worker process
(``bench/worker.py``) so that connection pools stay warm, as in a web
worker; the implementations alternate run by run, and each figure is the
median over the repetitions' samples, with the spread of the per-repetition
medians. Latency comes from a proxy in this process that delays every chunk
by the one-way delay in each direction without serialising chunks, and
holds the first bytes of a new connection one round trip more, as a TCP
handshake would. Each 256 MiB save runs in a fresh worker: its peak RSS
(``VmHWM``, reset after a warm-up save) is compared with its RSS before the
save, and the bytes on every host are checked. Run from the repository root,
by hand, never in CI (a full run takes about 3.5 minutes on 2 cores)::

    .venv-py311-dj52/bin/python bench/bench.py            # --quick: about 30 seconds
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# conftest patches the standard library with gevent (the latency proxies run
# on greenlets of this process) and configures Django, unused here.
import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.queue  # noqa: E402

import conftest  # noqa: E402
from conftest import Certificates, LoopbackServer, NginxHosts, find_nginx  # noqa: E402

WORKER = os.path.join(HERE, "worker.py")
RESULTS = os.path.join(HERE, "results")
HYBRID, DISTRIBUTED = "HybridStorage", "DistributedStorage"
CLASSES = [HYBRID, DISTRIBUTED]
SHORT = {HYBRID: "Hybrid", DISTRIBUTED: "Distributed"}
DELAY = 0.050  # one-way latency of sections 2 and 6, in seconds
MIB = 1024 * 1024

# Full and quick runs: repetitions, and the size of each one.
PROFILES = {
    "full": {"reps": 5, "saves": 100, "latency_saves": 5, "tput_saves": 500, "big_mib": 256,
             "big_reps": 5},
    "quick": {"reps": 2, "saves": 20, "latency_saves": 2, "tput_saves": 100, "big_mib": 32,
              "big_reps": 1},
}


###############################################################################
# Helpers: statistics, processes, the original's virtualenv, TLS
###############################################################################


def percentile(values, fraction):
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(runs):
    """Median, p95 and the range of per-run medians of a list of runs of samples."""
    flat = [value for run in runs for value in run]
    medians = [statistics.median(run) for run in runs]
    return {"median": statistics.median(flat), "p95": percentile(flat, 0.95),
            "low": min(medians), "high": max(medians), "runs": len(runs)}


def ms_cell(stats):
    """Format a latency summary as a table cell."""
    return "%s ms (p95 %s; runs %s-%s)" % tuple(
        _number(stats[key]) for key in ("median", "p95", "low", "high"))


def _number(value):
    """Three significant figures, without a trailing exponent."""
    if value >= 100:
        return "%.0f" % value
    if value >= 10:
        return "%.1f" % value
    return "%.2f" % value


def verdict(value, limit, at_least=False):
    """Return 'met' or 'missed' for ``value`` against ``limit``."""
    ok = value >= limit if at_least else value <= limit
    return "met" if ok else "**missed**"


class Worker:
    """A bench/worker.py process: one implementation, driven line by line over pipes."""

    def __init__(self, python, impl, patched, media_root, log_path, env=None):
        self.label = "%s%s" % (impl, "" if patched else "-threads")
        self.log = open(log_path, "w")  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            [python, WORKER, impl, "1" if patched else "0", media_root],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            cwd=ROOT, env=dict(os.environ, **(env or {})),
        )
        self.log_path = log_path
        self.info = self.call({"op": "hello"}, timeout=60)

    def call(self, command, timeout=300):
        """Send one command; return its answer, or raise with the worker's log."""
        try:
            with gevent.Timeout(timeout):
                self.process.stdin.write(json.dumps(command) + "\n")
                self.process.stdin.flush()
                line = self.process.stdout.readline()
        except gevent.Timeout:
            raise RuntimeError("%s: no answer to %s within %d s" % (
                self.label, command["op"], timeout)) from None
        if not line:
            raise RuntimeError("%s exited: see %s" % (self.label, self.log_path))
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError("%s failed on %s:\n%s" % (self.label, command, answer["error"]))
        return answer

    def stop(self):
        """Close its stdin and wait; terminate it by PID if it lingers."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                conftest.stop_process(self.process)
        self.log.close()


def _run(command, log, timeout=600, **kwargs):
    """Run ``command``, its output appended to ``log``; raise with the log on failure."""
    with open(log, "a") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT,
                                timeout=timeout, check=False, **kwargs)
    if result.returncode:
        with open(log) as output:
            raise RuntimeError("%s failed:\n%s" % (" ".join(command), output.read()[-3000:]))


_IMPORT_CHECK = (
    "import django; from django.conf import settings; settings.configure(); django.setup(); "
    "import django_resto.storage; print(django.__version__)"
)


def original_python():
    """Return (python, description) of a virtualenv with django-resto 1.3, made on first use.

    The same Python and Django as this run come first, so that the comparison
    is between the libraries alone; then an older pair the original was
    written for.
    """
    import django

    pyenv = os.path.expanduser("~/.pyenv/versions")
    old = sorted(name for name in os.listdir(pyenv) if name.startswith("3.9.")) \
        if os.path.isdir(pyenv) else []
    candidates = [(sys._base_executable, "Django==%s" % django.__version__)]
    candidates += [(os.path.join(pyenv, name, "bin", "python3"), "Django>=2.2,<2.3")
                   for name in old[-1:]]
    os.makedirs(RESULTS, exist_ok=True)
    log = os.path.join(RESULTS, "original-venv.log")
    for base, requirement in candidates:
        version = subprocess.run([base, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60, check=True)
        venv = os.path.join(RESULTS, "venv-django-resto-1.3-py%s-%s" % (
            version.stdout.strip(), requirement.replace("Django", "dj").replace("=", "")
            .replace(">", "").replace("<", "").replace(",", "")))
        python = os.path.join(venv, "bin", "python")
        if not os.path.exists(python):
            _run([base, "-m", "venv", venv], log)
            _run([python, "-m", "pip", "install", "-q", "django-resto==1.3", requirement], log)
        check = subprocess.run([python, "-c", _IMPORT_CHECK], capture_output=True, text=True,
                               timeout=60, check=False)
        if check.returncode == 0:
            return python, venv
        with open(log, "a") as output:
            output.write("django-resto 1.3 does not import in %s:\n%s\n" % (venv, check.stderr))
    raise RuntimeError("django-resto 1.3 imports in none of the candidates: see %s" % log)


class LatencyProxy(LoopbackServer):
    """Forward TCP to a loopback port, each chunk ``delay`` seconds late in each direction.

    Unlike conftest.DelayProxy, chunks are not serialised: one that arrives
    while another waits leaves ``delay`` after its own arrival, as on a long
    link, so a request sent in two writes still takes one round trip. The
    first bytes of a new connection wait one round trip more, the cost of a
    TCP handshake on such a link.
    """

    def __init__(self, port, delay):
        super().__init__()
        self.port = port
        self.delay = delay
        self.greenlets = set()

    def stop(self):
        """Stop accepting and end every connection."""
        super().stop()
        gevent.killall(list(self.greenlets), timeout=2)

    def _handle(self, client, _address):
        """Pipe one connection both ways until either side closes."""
        opened = time.monotonic()
        upstream = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        client.settimeout(60)  # an idle kept-alive connection ends within a bound
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [gevent.spawn(self._pipe, client, upstream, opened + 2 * self.delay),
                 gevent.spawn(self._pipe, upstream, client, 0)]
        self.greenlets.update(pipes)
        try:
            gevent.joinall(pipes, count=1)
        finally:
            gevent.killall(pipes)
            self.greenlets.difference_update(pipes)
            upstream.close()
            client.close()

    def _pipe(self, source, destination, not_before):
        """Read chunks from ``source``; a writer sends each one ``delay`` after it came."""
        chunks = gevent.queue.Queue()
        writer = gevent.spawn(self._write, chunks, destination)
        self.greenlets.add(writer)
        try:
            while True:  # ends when the source closes, fails or idles past its timeout
                try:
                    chunk = source.recv(256 * 1024)
                except OSError:
                    chunk = b""
                chunks.put((max(time.monotonic(), not_before) + self.delay, chunk))
                if not chunk:
                    writer.join(timeout=60)
                    return
        finally:
            writer.kill()
            self.greenlets.discard(writer)

    @staticmethod
    def _write(chunks, destination):
        """Send each queued chunk at its due time; an empty chunk ends the direction."""
        while True:  # ends on the empty chunk that follows every source's end
            due, chunk = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            if not chunk:
                try:
                    destination.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                destination.sendall(chunk)
            except OSError:
                return


def sha256(path):
    """Return the SHA-256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def alternate(reps, labels, combos, measure):
    """Call ``measure(label, combo, rep)`` for every rep, combo and label.

    The order of the labels is reversed every other repetition, so that
    neither implementation always runs first. Returns {(label, combo): [results]}.
    """
    results = {}
    for rep in range(reps):
        order = labels if rep % 2 == 0 else labels[::-1]
        for combo in combos:
            for label in order:
                results.setdefault((label, combo), []).append(measure(label, combo, rep))
    return results


###############################################################################
# The sections
###############################################################################


class Bench:
    """The hosts, workers and settings of one run, and the rows of its table."""

    def __init__(self, profile, scratch):
        self.profile = profile
        self.scratch = scratch
        self.rows = []
        self.targets = []
        self.workers = {}
        self.s1 = {}  # section 1's figures, the reference of the threaded path
        self.ca_mode = None

    def row(self, section, measurement, storage, new, reference, ratio, target=""):
        """Add a table row."""
        self.rows.append([section, measurement, storage, new, reference, ratio, target])

    def sequential(self, label, class_name, hosts, saves, prefix, warm=3, ca_file=None,
                   options=None):
        """Run ``saves`` 1 KiB saves on worker ``label``; return their milliseconds."""
        command = {"op": "sequential", "class": class_name, "hosts": hosts, "size": 1024,
                   "saves": saves, "prefix": prefix, "warm": warm, "options": options or {}}
        if ca_file:
            command["ca_file"] = ca_file
        answer = self.workers[label].call(command)
        if answer.get("ca_mode"):
            self.ca_mode = answer["ca_mode"]
        return answer["ms"]

    def small_saves(self, hosts):
        """Section 1: 1 KiB saves to 1, 3 and 12 hosts, new against original."""
        saves = self.profile["saves"]
        combos = [(class_name, count) for count in (1, 3, 12) for class_name in CLASSES]
        runs = alternate(self.profile["reps"], ["new", "original"], combos, lambda label, combo,
                         rep: self.sequential(label, combo[0], hosts[:combo[1]], saves,
                                              "s1/%s/%s/%d/r%d" % (label, combo[0], combo[1],
                                                                   rep)))
        limits = {1: 1.0, 3: 0.5, 12: 0.4}
        for class_name, count in combos:
            new = summarise(runs[("new", (class_name, count))])
            old = summarise(runs[("original", (class_name, count))])
            self.s1[(class_name, count)] = new
            ratio = new["median"] / old["median"]
            self.row(1, "1 KiB save() -> %d host%s" % (count, "s" if count > 1 else ""),
                     SHORT[class_name], ms_cell(new), ms_cell(old), "%.2f x" % ratio,
                     "<= %.1f x: %s" % (limits[count], verdict(ratio, limits[count])))

    def latency_saves(self, proxies, counts, section):
        """Sections 2 and 6: 1 KiB saves behind the latency proxies, new against original."""
        saves = self.profile["latency_saves"]
        combos = [(class_name, count) for count in counts for class_name in CLASSES]
        runs = alternate(self.profile["reps"], ["new", "original"], combos, lambda label, combo,
                         rep: self.sequential(label, combo[0], proxies[:combo[1]], saves,
                                              "s%d/%s/%s/%d/r%d" % (section, label, combo[0],
                                                                    combo[1], rep), warm=1))
        round_trip = 2 * DELAY * 1000
        for class_name, count in combos:
            new = summarise(runs[("new", (class_name, count))])
            old = summarise(runs[("original", (class_name, count))])
            # Distributed asks every host (HEAD) before the PUTs: two round trips.
            trips = 2 if class_name == DISTRIBUTED else 1
            to_rtt = new["median"] / (trips * round_trip)
            target = ""
            if class_name == HYBRID and count == 12:
                target = "<= 1.1 x RTT: %s" % verdict(to_rtt, 1.1)
            self.row(section, "1 KiB save() -> %d host%s, %d ms one-way latency" % (
                count, "s" if count > 1 else "", DELAY * 1000), SHORT[class_name],
                ms_cell(new), ms_cell(old), "%.2f x; %.2f x %s" % (
                    new["median"] / old["median"], to_rtt,
                    "RTT" if trips == 1 else "2 RTT"), target)

    def overwrite(self, proxies):
        """Section 7: Distributed 1 KiB saves to 3 hosts behind the latency, with and
        without allow_overwrite (which asks no host whether the name is taken)."""
        saves = self.profile["latency_saves"]
        combos = [(False,), (True,)]
        runs = alternate(self.profile["reps"], ["new"], combos, lambda label, combo, rep:
                         self.sequential(label, DISTRIBUTED, proxies[:3], saves,
                                         "s7/%s/%d" % (combo[0], rep), warm=1,
                                         options={"allow_overwrite": combo[0]}))
        asking = summarise(runs[("new", (False,))])
        kept = summarise(runs[("new", (True,))])
        round_trip = 2 * DELAY * 1000
        ratio = kept["median"] / asking["median"]
        self.row(7, "1 KiB save() -> 3 hosts, %d ms one-way latency, allow_overwrite=True "
                 "against False (reference)" % (DELAY * 1000), SHORT[DISTRIBUTED],
                 ms_cell(kept), ms_cell(asking), "%.2f x; %.2f x RTT" % (
                     ratio, kept["median"] / round_trip),
                 "<= 0.55 x (one round trip, not two): %s" % verdict(ratio, 0.55))

    def throughput(self, hosts):
        """Section 3: 10 KiB saves to 3 hosts from 1 and 20 callers, ops/s."""
        saves = self.profile["tput_saves"]
        combos = [(class_name, callers) for callers in (1, 20) for class_name in CLASSES]

        def measure(label, combo, rep):
            return self.workers[label].call({
                "op": "throughput", "class": combo[0], "hosts": hosts[:3], "size": 10240,
                "saves": saves, "callers": combo[1],
                "prefix": "s3/%s/%s/%d/r%d" % (label, combo[0], combo[1], rep)})

        runs = alternate(self.profile["reps"], ["new", "original"], combos, measure)
        for class_name, callers in combos:
            cells = []
            rates = {}
            for label in ("new", "original"):
                results = runs[(label, (class_name, callers))]
                per_run = [saves / result["seconds"] for result in results]
                rates[label] = statistics.median(per_run)
                p95 = percentile([ms for result in results for ms in result["ms"]], 0.95)
                cells.append("%.0f ops/s (p95 %s ms; runs %.0f-%.0f)" % (
                    rates[label], _number(p95), min(per_run), max(per_run)))
            ratio = rates["new"] / rates["original"]
            target = ">= 2.5 x: %s" % verdict(ratio, 2.5, at_least=True) if callers == 20 else ""
            self.row(3, "%d x 10 KiB -> 3 hosts, %d caller%s" % (
                saves, callers, "s" if callers > 1 else ""), SHORT[class_name],
                cells[0], cells[1], "%.2f x ops/s" % ratio, target)

    def big_file(self, hosts, nginx_hosts, pythons):
        """Section 4: one large file to 3 hosts, fresh worker per save, next to curl."""
        size = self.profile["big_mib"] * MIB
        source = os.path.join(self.scratch, "big.bin")
        with open(source, "wb") as output:
            for _ in range(size // MIB):
                output.write(os.urandom(MIB))
        expected = sha256(source)
        # This VM backs guest memory on first touch, which made whichever
        # implementation ran first pay for it: touch once, untimed, the
        # tmpfs pages of the copies that are coming (local, hosts, the
        # original's buffers), and free them for reuse.
        touched = os.path.join(self.scratch, "pretouch.bin")
        with open(touched, "wb") as output:
            block = bytes(MIB)
            for _ in range(8 * size // MIB):
                output.write(block)
        os.remove(touched)
        hosts = hosts[:3]
        combos = [(label, class_name) for class_name in CLASSES
                  for label in ("new", "original")] + [("curl", None)]

        def check(name, full):
            # Every host must hold the whole file; the digest once per combination.
            for index in range(3):
                copy = nginx_hosts.path(index, name)
                if os.path.getsize(copy) != size or (full and sha256(copy) != expected):
                    raise RuntimeError("host %d holds wrong bytes for %s" % (index, name))

        def measure(_label, combo, rep):
            label, class_name = combo
            prefix = "s4/%s/%s/r%d" % (label, class_name, rep)
            try:
                if label == "curl":
                    result = self._curl(hosts, source, prefix + "/big.bin")
                    check(prefix + "/big.bin", rep == 0)
                    return result
                media_root = os.path.join(self.scratch, "media-big")
                worker = Worker(pythons[label], label, label == "new", media_root,
                                os.path.join(self.scratch, "worker-big.log"))
                try:
                    result = worker.call({"op": "big", "class": class_name, "hosts": hosts,
                                          "source": source, "prefix": prefix}, timeout=600)
                finally:
                    worker.stop()
                    shutil.rmtree(media_root, ignore_errors=True)
                check(result["name"], rep == 0)
                return result
            finally:
                nginx_hosts.clear()

        # The three kinds take turns: rotate the order of the combinations.
        runs = {}
        for rep in range(self.profile["big_reps"]):
            shift = rep % len(combos)
            for combo in combos[shift:] + combos[:shift]:
                runs.setdefault(combo, []).append(measure(None, combo, rep))
        curl = statistics.median(runs[("curl", None)])
        curl_runs = runs[("curl", None)]
        for class_name in CLASSES:
            cells = {}
            for label in ("new", "original"):
                results = runs[(label, class_name)]
                growth = [(r["peak_kib"] - r["baseline_kib"]) / 1024 for r in results]
                seconds = statistics.median(r["seconds"] for r in results)
                uploads = statistics.median(r["upload_seconds"] for r in results)
                cells[label] = (seconds, uploads, max(growth))
            seconds, uploads, growth = cells["new"]
            old = cells["original"]
            met = [verdict(uploads / curl, 1.0), verdict(seconds / curl, 1.2),
                   verdict(growth, 8)]
            self.row(4, "%d MiB -> 3 hosts: save (uploads), peak RSS growth" % (size // MIB),
                     SHORT[class_name],
                     "%.2f s (%.2f s), +%.1f MiB" % (seconds, uploads, growth),
                     "%.2f s (%.2f s), +%.0f MiB" % old,
                     "uploads %.2f x curl; save %.2f x curl; save %.2f x original" % (
                         uploads / curl, seconds / curl, seconds / old[0]),
                     "uploads <= 1.0 x: %s; save <= 1.2 x: %s; RSS <= 8 MiB: %s" % tuple(met))
        self.row(4, "%d MiB -> 3 hosts: 3 parallel `curl -T`" % (size // MIB), "-",
                 "-", "%.2f s (runs %.2f-%.2f)" % (curl, min(curl_runs), max(curl_runs)),
                 "1.00 x", "")

    def _curl(self, hosts, source, name):
        """Upload ``source`` with one ``curl -T`` per host, all at once; return the seconds."""
        commands = [["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:",
                     "-T", source, "http://%s/media/%s" % (host, name)] for host in hosts]
        started = time.perf_counter()
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                     for command in commands]
        codes = [process.communicate(timeout=300)[0] for process in processes]
        seconds = time.perf_counter() - started
        if codes != ["201"] * len(hosts):
            raise RuntimeError("curl answered %s" % codes)
        return seconds

    def https(self, plain, tls, ca_file):
        """Section 5: 1 KiB saves to 3 HTTPS hosts against 3 plain ones, kept alive."""
        saves = self.profile["saves"]

        def measure(_label, combo, rep):
            class_name, scheme = combo
            hosts = tls if scheme == "https" else plain[:3]
            return self.sequential("new", class_name, hosts, saves, "s5/%s/%s/r%d" % (
                scheme, class_name, rep), ca_file=ca_file if scheme == "https" else None)

        # One implementation: alternate the schemes instead, repetition by repetition.
        runs = {}
        for rep in range(self.profile["reps"]):
            for class_name in CLASSES:
                schemes = ("https", "http") if rep % 2 == 0 else ("http", "https")
                for scheme in schemes:
                    runs.setdefault((class_name, scheme), []).append(
                        measure(None, (class_name, scheme), rep))
        for class_name in CLASSES:
            secure = summarise(runs[(class_name, "https")])
            clear = summarise(runs[(class_name, "http")])
            ratio = secure["median"] / clear["median"]
            self.row(5, "1 KiB save() -> 3 HTTPS hosts, kept alive (CA via %s); reference: "
                     "the same over HTTP" % self.ca_mode, SHORT[class_name], ms_cell(secure),
                     "HTTP: %s; original: n/a" % ms_cell(clear), "%.2f x HTTP" % ratio,
                     "<= 1.15 x: %s" % verdict(ratio, 1.15))

    def threaded(self, hosts):
        """Section 6b: the threaded path (no gevent patching) to 3 and 12 hosts."""
        saves = self.profile["saves"]
        combos = [(class_name, count) for count in (3, 12) for class_name in CLASSES]
        runs = alternate(self.profile["reps"], ["new-threads", "original"], combos,
                         lambda label, combo, rep: self.sequential(
                             label, combo[0], hosts[:combo[1]], saves,
                             "s6t/%s/%s/%d/r%d" % (label, combo[0], combo[1], rep)))
        for class_name, count in combos:
            new = summarise(runs[("new-threads", (class_name, count))])
            old = summarise(runs[("original", (class_name, count))])
            patched = self.s1.get((class_name, count))
            self.row(6, "1 KiB save() -> %d hosts, unpatched process (threads)" % count,
                     SHORT[class_name], ms_cell(new), ms_cell(old), "%.2f x%s" % (
                         new["median"] / old["median"],
                         "; %.2f x gevent" % (new["median"] / patched["median"])
                         if patched else ""))


###############################################################################
# The run
###############################################################################


def cpu_model():
    """Return the model name of this machine's CPU, as /proc/cpuinfo gives it."""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine(workers):
    """Describe the machine and the versions in use."""
    cpu = cpu_model()
    nginx = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, check=False)
    new, old = workers["new"].info, workers["original"].info
    return ("%s, %d cores, %s; Python %s, Django %s, gevent %s, urllib3 %s, %s, %s; "
            "django-resto 1.3 on Python %s, Django %s" % (
                cpu, os.cpu_count(), platform.platform(terse=True), new["python"],
                new["django"], new["gevent"], new["urllib3"],
                nginx.stderr.strip().replace("nginx version: ", ""),
                subprocess.run(["curl", "--version"], capture_output=True, text=True,
                               check=False).stdout.split(" (")[0],
                old["python"], old["django"]))


def main():
    """Start the hosts and workers on tmpfs, run the sections, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--reps", type=int, help="repetitions of each measurement")
    parser.add_argument("--sections", default="1,2,3,4,5,6,7",
                        help="comma-separated sections to run (default: all)")
    args = parser.parse_args()
    profile = dict(PROFILES["quick" if args.quick else "full"])
    if args.reps:
        profile["reps"] = profile["big_reps"] = args.reps
    sections = {int(part) for part in args.sections.split(",")}
    nginx = find_nginx()
    if nginx is None or shutil.which("curl") is None or shutil.which("openssl") is None:
        sys.exit("the benchmark needs nginx, curl and openssl: "
                 "apt-get install nginx-light curl openssl")
    started = time.monotonic()
    original, original_venv = original_python()
    scratch = tempfile.mkdtemp(prefix="resto-bench-", dir="/dev/shm")
    bench = Bench(profile, scratch)
    plain = NginxHosts(os.path.join(scratch, "nginx"), count=50)
    tls = None
    proxies = []
    try:
        os.makedirs(os.path.join(scratch, "tls"))
        certificates = Certificates(os.path.join(scratch, "tls")).make(shutil.which("openssl"))
        ca = certificates.ca
        plain.start(nginx)
        tls = NginxHosts(os.path.join(scratch, "nginx-tls"), 3,
                         tls=(certificates.server, certificates.key)).start(nginx)
        pythons = {"new": sys.executable, "original": original}
        for label, python, impl, patched in [("new", sys.executable, "new", True),
                                             ("original", original, "original", False),
                                             ("new-threads", sys.executable, "new", False)]:
            bench.workers[label] = Worker(
                python, impl, patched, os.path.join(scratch, "media-" + label),
                os.path.join(scratch, "worker-%s.log" % label), env={"SSL_CERT_FILE": ca})
        hosts = plain.hosts
        if 1 in sections:
            bench.small_saves(hosts)
        if sections & {2, 6, 7}:
            proxies = [LatencyProxy(port, DELAY).start() for port in plain.ports]
        if 2 in sections:
            bench.latency_saves([proxy.address for proxy in proxies], (1, 3, 12), 2)
        plain.clear()
        if 3 in sections:
            bench.throughput(hosts)
        plain.clear()
        if 4 in sections:
            bench.big_file(hosts, plain, pythons)
        if 5 in sections:
            bench.https(hosts, tls.hosts, ca)
        if 6 in sections:
            bench.latency_saves([proxy.address for proxy in proxies], (50,), 6)
            bench.threaded(hosts)
        if 7 in sections:
            bench.overwrite([proxy.address for proxy in proxies])
        description = machine(bench.workers)
    finally:
        for proxy in proxies:
            proxy.stop()
        for worker in bench.workers.values():
            worker.stop()
        plain.stop()
        if tls is not None:
            tls.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        # conftest made an empty MEDIA_ROOT for its tests on import.
        shutil.rmtree(conftest.TEST_DJANGO_SETTINGS["MEDIA_ROOT"], ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    print("Machine: %s" % description)
    print("Date: %s; run time %.1f min; %d repetitions (%s); original in %s" % (
        time.strftime("%Y-%m-%d %H:%M"), minutes, profile["reps"],
        "quick" if args.quick else "full", os.path.relpath(original_venv, ROOT)))
    print("Command: %s bench/bench.py%s" % (os.path.relpath(sys.executable, ROOT),
                                            " ".join([""] + sys.argv[1:])))
    print()
    print("| # | measurement | storage | django_resto_gevent | django-resto 1.3 (or reference) "
          "| ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for cells in sorted(bench.rows, key=lambda cells: cells[0]):
        print("| %s |" % " | ".join(str(cell) for cell in cells))


if __name__ == "__main__":
    main()
