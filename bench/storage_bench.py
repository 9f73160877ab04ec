"""Benchmarks of django_resto_gevent against real nginx hosts on loopback.

Measures, for HybridStorage and DistributedStorage:

1. peak RSS growth while saving one 256 MiB file to 3 nginx hosts, each in a
   fresh process (patched by gevent, as under ``gunicorn -k gevent``), over
   the same process after a warm-up save; the bytes on every host are then
   checked against the source;
2. save() of 1 KiB to 3 nginx hosts: median and p95 over ``--reps``
   repetitions of ``--saves`` saves, the two classes alternating run by run,
   with the spread of the per-repetition medians.

nginx roots, MEDIA_ROOT and the source file live on tmpfs (/dev/shm): on
ext4, deleting many files between runs makes later creates slower and the
figures drift. Run from the repository root, by hand, never in CI::

    .venv-py311-dj52/bin/python bench/storage_bench.py [--quick]
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIG_SIZE = 256 * 1024 * 1024
CLASSES = ["HybridStorage", "DistributedStorage"]


def _status_kib(field):
    """Return a VmRSS/VmHWM field of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/self/status" % field)


def _child_setup(media_root):
    """Patch and configure Django in a child process, like a gevent worker."""
    from gevent import monkey

    monkey.patch_all()
    import django
    from django.conf import settings

    settings.configure(MEDIA_ROOT=media_root, MEDIA_URL="/media/", USE_TZ=True)
    django.setup()
    sys.path.insert(0, ROOT)
    import django_resto_gevent

    return django_resto_gevent


def child_rss(class_name, hosts, source, media_root):
    """Save ``source`` once; print the RSS before and the peak after, in KiB."""
    resto = _child_setup(media_root)
    from django.core.files import File
    from django.core.files.base import ContentFile

    storage_class = getattr(resto, class_name)
    options = {"hosts": hosts.split(",")}
    if class_name != "DistributedStorage":
        options["location"] = media_root
    storage = storage_class(**options)
    storage.save("warmup.txt", ContentFile(b"warm"))  # imports, pools, connections
    # Reset the peak to the current RSS, so that VmHWM afterwards is the
    # peak of the save alone.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = _status_kib("VmRSS")
    started = time.perf_counter()
    with open(source, "rb") as handle:
        name = storage.save("big.bin", File(handle))
    seconds = time.perf_counter() - started
    print(json.dumps({"name": name, "baseline_kib": baseline,
                      "peak_kib": _status_kib("VmHWM"), "seconds": seconds}))


def child_latency(hosts, media_root, saves, reps):
    """Time 1 KiB saves, the classes alternating; print the samples in ms."""
    resto = _child_setup(media_root)
    from django.core.files.base import ContentFile

    host_list = hosts.split(",")
    storages = {
        "HybridStorage": resto.HybridStorage(location=media_root, hosts=host_list),
        "DistributedStorage": resto.DistributedStorage(hosts=host_list),
    }
    payload = os.urandom(1024)
    for storage in storages.values():  # warm-up: connections to every host
        for index in range(20):
            storage.save("warm/%d.bin" % index, ContentFile(payload))
    samples = {name: [] for name in storages}
    for rep in range(reps):
        order = CLASSES if rep % 2 == 0 else CLASSES[::-1]
        for class_name in order:
            storage = storages[class_name]
            run = []
            for index in range(saves):
                content = ContentFile(payload)
                started = time.perf_counter()
                storage.save("lat/%s/%d/%d.bin" % (class_name, rep, index), content)
                run.append((time.perf_counter() - started) * 1000)
            samples[class_name].append(run)
    print(json.dumps(samples))


def _run_child(*args, timeout=300):
    """Run this script as a child with ``args``; return its JSON output."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if result.returncode:
        raise RuntimeError("child %s failed:\n%s" % (args[0], result.stderr))
    return json.loads(result.stdout)


def _sha256(path):
    """Return the SHA-256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _machine():
    """Describe the machine and the versions in use."""
    import django
    import gevent
    import urllib3

    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return "%s, %d cores; Python %s, Django %s, gevent %s, urllib3 %s, %s" % (
        cpu, os.cpu_count(), platform.python_version(), django.__version__,
        gevent.__version__, urllib3.__version__, nginx.replace("nginx version: ", ""))


def main():
    """Start nginx on tmpfs, run the measurements, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--saves", type=int, default=None, help="1 KiB saves per repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (>= 5)")
    args = parser.parse_args()
    saves = args.saves or (50 if args.quick else 200)
    reps = args.reps or (3 if args.quick else 7)

    sys.path.insert(0, ROOT)
    from conftest import NginxHosts, find_nginx  # patches gevent, configures Django

    nginx = find_nginx()
    if nginx is None:
        sys.exit("nginx is not installed: apt-get install nginx-light")
    scratch = tempfile.mkdtemp(prefix="resto-bench-", dir="/dev/shm")
    hosts = NginxHosts(os.path.join(scratch, "nginx"), count=3)
    rows = []
    try:
        hosts.start(nginx)
        host_list = ",".join(hosts.hosts)
        source = os.path.join(scratch, "source.bin")
        with open(source, "wb") as output:
            for _ in range(BIG_SIZE // (1 << 20)):
                output.write(os.urandom(1 << 20))
        expected = _sha256(source)
        for class_name in CLASSES:
            hosts.clear()
            media_root = os.path.join(scratch, "media-" + class_name)
            result = _run_child("_rss", class_name, host_list, source, media_root)
            for index in range(hosts.count):
                copy = hosts.path(index, result["name"])
                if os.path.getsize(copy) != BIG_SIZE or _sha256(copy) != expected:
                    raise RuntimeError("%s: host %d holds wrong bytes" % (class_name, index))
            growth = (result["peak_kib"] - result["baseline_kib"]) / 1024
            rows.append("| 256 MiB -> 3 hosts | %s | peak RSS +%.1f MiB over %.0f MiB | %.2f s |"
                        % (class_name, growth, result["baseline_kib"] / 1024, result["seconds"]))
            shutil.rmtree(media_root, ignore_errors=True)
        hosts.clear()
        samples = _run_child("_latency", host_list, os.path.join(scratch, "latency"),
                             str(saves), str(reps))
        for class_name in CLASSES:
            runs = samples[class_name]
            flat = sorted(value for run in runs for value in run)
            medians = [statistics.median(run) for run in runs]
            rows.append("| 1 KiB save() -> 3 hosts | %s | median %.3f ms, p95 %.3f ms | "
                        "run medians %.3f-%.3f ms (%d x %d) |" % (
                            class_name, statistics.median(flat),
                            flat[int(len(flat) * 0.95) - 1], min(medians), max(medians),
                            reps, saves))
    finally:
        hosts.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print("Machine: %s" % _machine())
    print("Date: %s" % time.strftime("%Y-%m-%d"))
    print("Command: python bench/storage_bench.py%s" % (" --quick" if args.quick else ""))
    print()
    print("| measurement | storage | result | detail |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rss":
        child_rss(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "_latency":
        child_latency(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
