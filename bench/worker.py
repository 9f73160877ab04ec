"""The measuring process of bench/bench.py: one storage implementation, driven over a pipe.

bench.py starts one of these per implementation and keeps it alive for the
whole run, so that connection pools stay warm as in a web worker:

    python bench/worker.py IMPL PATCHED MEDIA_ROOT

``IMPL`` is ``new`` (django_resto_gevent from this repository) or ``original``
(django-resto 1.3, run by the interpreter of its throwaway virtualenv);
``PATCHED`` is 1 to call ``gevent.monkey.patch_all()`` first, as
``gunicorn -k gevent`` does, or 0 for a plain threaded process. The worker
reads one JSON command a line on stdin and answers one JSON line on stdout;
it ends when stdin closes. It imports only the standard library at module
level, because the original's virtualenv has neither gevent nor urllib3.
"""

import json
import os
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
    """Storages of one implementation, cached so that their connections stay warm."""

    def __init__(self, impl, patched, media_root):
        self.impl = impl
        self.patched = patched
        self.media_root = media_root
        self.storages = {}
        if patched:
            from gevent import monkey

            monkey.patch_all()
        import django
        from django.conf import settings

        # The original's default timeout (2 s) bounds its one sendall() of a
        # whole file: on a VM that backs memory on first touch, its 256 MiB
        # save could overrun it. Both get 30 s, which no figure here nears.
        settings.configure(MEDIA_ROOT=media_root, MEDIA_URL="/media/", USE_TZ=True,
                           SECRET_KEY="bench", INSTALLED_APPS=[], RESTO_TIMEOUT=30)
        django.setup()
        if impl == "new":
            # The working tree's module, even where another copy is installed.
            sys.path.insert(0, ROOT)
            import django_resto_gevent as module
        else:
            import django_resto.storage as module
        self.module = module
        self.ca_mode = None

    def hello(self, _command):
        """Say which versions this process runs."""
        import django

        info = {"python": "%d.%d.%d" % sys.version_info[:3], "django": django.__version__,
                "module": self.module.__file__, "patched": self.patched}
        if self.impl == "new":
            import gevent
            import urllib3

            info.update(gevent=gevent.__version__, urllib3=urllib3.__version__,
                        version=self.module.__version__)
        return info

    def _storage(self, class_name, hosts, ca_file=None, extra=None):
        """Return the cached storage of ``class_name`` over ``hosts``, with ``extra`` options."""
        extra = extra or {}
        key = (class_name, tuple(hosts), tuple(sorted(extra.items())))
        storage = self.storages.get(key)
        if storage is not None:
            return storage
        storage_class = getattr(self.module, class_name)
        options = dict(extra, hosts=list(hosts))
        if class_name != "DistributedStorage":
            options["location"] = os.path.join(self.media_root, "s%d" % len(self.storages))
        if self.impl == "original":
            options["base_url"] = "/media/"
        if ca_file:
            storage = self._tls_storage(storage_class, options, ca_file)
        else:
            storage = storage_class(**options)
        self.storages[key] = storage
        return storage

    def _tls_storage(self, storage_class, options, ca_file):
        """Build a storage trusting ``ca_file``: the ca_bundle keyword, else SSL_CERT_FILE."""
        from django.core.exceptions import ImproperlyConfigured

        try:
            storage = storage_class(ca_bundle=ca_file, **options)
            self.ca_mode = "ca_bundle"
        except ImproperlyConfigured as exc:
            if "unknown option" not in str(exc):
                raise
            # bench.py started this process with SSL_CERT_FILE, which the
            # default SSL context of urllib3 loads.
            if os.environ.get("SSL_CERT_FILE") != ca_file:
                raise RuntimeError("no ca_bundle option and SSL_CERT_FILE is not set") from exc
            storage = storage_class(**options)
            self.ca_mode = "SSL_CERT_FILE"
        return storage

    def _save_one(self, storage, name, payload, timings=None):
        """Save ``payload`` as ``name``; append the milliseconds it took to ``timings``."""
        from django.core.files.base import ContentFile

        content = ContentFile(payload)
        started = time.perf_counter()
        saved = storage.save(name, content)
        if timings is not None:
            timings.append((time.perf_counter() - started) * 1000)
        if saved != name:
            raise RuntimeError("%s was saved as %s: the name was taken" % (name, saved))

    def sequential(self, command):
        """Time ``saves`` saves one after the other; return the milliseconds of each."""
        storage = self._storage(command["class"], command["hosts"], command.get("ca_file"),
                                command.get("options"))
        payload = os.urandom(command["size"])
        prefix = command["prefix"]
        # Not timed: reconnects what the server or pool eviction closed since.
        for index in range(command.get("warm", 3)):
            self._save_one(storage, "%s/warm%d.bin" % (prefix, index), payload)
        timings = []
        for index in range(command["saves"]):
            self._save_one(storage, "%s/%d.bin" % (prefix, index), payload, timings)
        return {"ms": timings, "ca_mode": self.ca_mode}

    def throughput(self, command):
        """Run ``saves`` saves from ``callers`` concurrent callers; time the whole."""
        storage = self._storage(command["class"], command["hosts"])
        payload = os.urandom(command["size"])
        prefix = command["prefix"]
        for index in range(3):
            self._save_one(storage, "%s/warm%d.bin" % (prefix, index), payload)
        todo = list(range(command["saves"]))
        timings = []
        errors = []

        def caller():
            # Each caller takes the next save until none is left: bounded by ``saves``.
            while True:
                try:
                    index = todo.pop()
                except IndexError:
                    return
                try:
                    self._save_one(storage, "%s/%d.bin" % (prefix, index), payload, timings)
                except Exception:
                    errors.append(traceback.format_exc())
                    return

        started = time.perf_counter()
        if self.patched:
            import gevent

            gevent.joinall([gevent.spawn(caller) for _ in range(command["callers"])])
        else:
            threads = [threading.Thread(target=caller) for _ in range(command["callers"])]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        seconds = time.perf_counter() - started
        if errors:
            raise RuntimeError(errors[0])
        return {"seconds": seconds, "ms": timings}

    def big(self, command):
        """Save one large file from disk; return peak RSS growth and times."""
        from django.core.files import File
        from django.core.files.base import ContentFile

        storage = self._storage(command["class"], command["hosts"])
        # Warm-up: imports, pools and connections, so that the baseline is
        # the RSS of a process that has served requests.
        storage.save("%s/warm.bin" % command["prefix"], ContentFile(b"warm"))
        upload_seconds = []
        execute = storage.execute

        def timed_execute(*args, **kwargs):
            # The host uploads alone, without the local copy.
            started = time.perf_counter()
            try:
                return execute(*args, **kwargs)
            finally:
                upload_seconds.append(time.perf_counter() - started)

        storage.execute = timed_execute
        reset_peak()  # VmHWM is then the save's peak
        baseline = status_kib("VmRSS")
        started = time.perf_counter()
        with open(command["source"], "rb") as handle:
            name = storage.save("%s/big.bin" % command["prefix"], File(handle))
        seconds = time.perf_counter() - started
        del storage.execute
        return {"name": name, "baseline_kib": baseline, "peak_kib": status_kib("VmHWM"),
                "seconds": seconds, "upload_seconds": sum(upload_seconds)}


def status_kib(field):
    """Return a VmRSS/VmHWM field of /proc/self/status, in KiB (s3_worker.py uses it too)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/self/status" % field)


def reset_peak():
    """Make VmHWM the current RSS, so that it then measures what follows."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def main():
    """Answer the commands of bench.py, one JSON line each, until stdin closes."""
    impl, patched, media_root = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    # Only answers go to the real stdout; stray prints and logs go to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    worker = Worker(impl, patched, media_root)
    operations = {"hello": worker.hello, "sequential": worker.sequential,
                  "throughput": worker.throughput, "big": worker.big}
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = operations[command["op"]](command)
        except Exception:
            answer = {"error": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
