"""One upload of bench/s3.py, in a fresh process: this library, or boto3's upload_file.

Usage (run by bench/s3.py, one JSON object in argv[1], one JSON line out)::

    python bench/s3_worker.py '{"impl": "resto", "patched": true, ...}'

The process warms up with one small upload (imports, connection pool, signing
key), resets its peak RSS (``VmHWM``) to its current RSS, uploads the file
once, and prints the wall time and CPU time (user and system, every thread) of
that upload, with its RSS before and its peak RSS during it. ``impl`` is
``resto`` (``DefaultTransport.put()``, in a gevent-patched process as under
``gunicorn -k gevent``, or unpatched on threads) or ``boto3`` (``upload_file``
with its default ``TransferConfig``).
"""

import json
import sys

COMMAND = json.loads(sys.argv[1])
if COMMAND["impl"] == "resto" and COMMAND["patched"]:
    from gevent import monkey

    monkey.patch_all()

import os  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# bench.py's worker imports only the standard library at module level.
from worker import reset_peak, status_kib  # noqa: E402


def resto_uploader(command):
    """Return upload(key) and warm_up() through this library's transport."""
    import django
    from django.conf import settings

    settings.configure(MEDIA_URL="/media/")
    django.setup()
    import django_resto_gevent as resto

    transport = resto.DefaultTransport(
        base_url="/media/", timeout=30, s3_credentials=(command["key"], command["secret"]),
        s3_part_size=command["part_size"], s3_parts_in_flight=command["in_flight"],
        s3_multipart_threshold=command["threshold"])
    host = "s3+%s/%s" % (command["endpoint"], command["bucket"])

    def upload(key):
        with open(command["source"], "rb") as source:
            transport.put(host, key, source)

    def warm_up():
        transport.put(host, "warm-up.txt", b"warm")

    return upload, warm_up


def boto3_uploader(command):
    """Return upload(key) and warm_up() through boto3 with its defaults."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=command["endpoint"], region_name="us-east-1",
        aws_access_key_id=command["key"], aws_secret_access_key=command["secret"],
        # Path-style, as the gateway on loopback wants; nothing else changed.
        config=Config(s3={"addressing_style": "path"}))

    def upload(key):
        client.upload_file(command["source"], command["bucket"], "media/" + key)

    def warm_up():
        client.put_object(Bucket=command["bucket"], Key="media/warm-up.txt", Body=b"warm")

    return upload, warm_up


def main():
    command = COMMAND
    factory = resto_uploader if command["impl"] == "resto" else boto3_uploader
    upload, warm_up = factory(command)
    warm_up()
    reset_peak()
    baseline = status_kib("VmRSS")
    cpu = os.times()
    started = time.perf_counter()
    upload(command["name"])
    seconds = time.perf_counter() - started
    cpu_seconds = sum(os.times()[:2]) - sum(cpu[:2])
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "baseline_kib": baseline,
                      "peak_kib": status_kib("VmHWM")}))


if __name__ == "__main__":
    main()
