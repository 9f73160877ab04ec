"""Replicated media storage for Django, on gevent.

django_resto_gevent keeps a Django site's uploaded media files replicated on
several media servers over plain HTTP (PUT, DELETE, HEAD and GET, as nginx
serves them with ``dav_methods PUT DELETE``), WebDAV or S3; ``python -m
django_resto_gevent sync`` repairs them from directory listings. It is the
successor of django-resto: switching is a matter of changing the import path.

Three storage backends:

- ``HybridStorage`` saves to ``MEDIA_ROOT`` (the master copy), then uploads the
  file to every media host before ``save()`` returns.
- ``AsyncStorage`` does the same, but uploads in the background.
- ``DistributedStorage`` stores on the media hosts only, with no local copy.

Configure with ``RESTO_*`` settings or the constructor keywords of the same
meaning (``STORAGES[alias]["OPTIONS"]``)::

    STORAGES = {
        "default": {
            "BACKEND": "django_resto_gevent.HybridStorage",
            "OPTIONS": {"hosts": ["media1:80", "media2:80"]},
        },
        "staticfiles": {...},
    }

Requests to the hosts fan out in parallel: on greenlets of a gevent pool in a
process whose sockets gevent patched (``gunicorn -k gevent``), and on threads
elsewhere (``manage.py``, ``runserver``, Celery). Patching is the
application's job; importing this module changes nothing.

Runtime dependencies: Django, gevent, urllib3 and the standard library.
Licence: BSD-3-Clause.
"""

__version__ = "0.1.0"

if __name__ == "__main__":
    # "python -m django_resto_gevent": the command runs in the module imported
    # by its name, so that its body runs once and storages named by dotted
    # path share its state; this copy, named __main__, stops here. What is
    # done here is for a process that runs one command and ends (measured on
    # a sync --dry-run of 10,000 files, which takes a quarter of a second):
    # - The collector is paused while the command starts: loading Django and
    #   urllib3 and django.setup() make nothing to collect, yet a third of
    #   that time went to collecting. _started_up() freezes what was loaded
    #   and starts the collector again.
    # - Once main() has returned, the exit is the usual one (non-daemon
    #   threads joined, then what is registered with atexit: logging's
    #   flush, the background queues') up to the interpreter's teardown,
    #   which frees every loaded module one by one (10 ms) and is skipped:
    #   registered first, leave() runs last. Only where nothing registered
    #   an exit function before it (a coverage or profiling hook started by
    #   site), which would run after it, and so never. An exception, or an
    #   exit from within main(), tears down as usual.
    import atexit
    import gc
    import os
    import sys

    returned = []  # main()'s status, once it has returned

    def leave():
        if not returned:
            return
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            return  # the usual teardown reports it
        os._exit(returned[0])

    # (CPython's count of exit functions: no public way to ask.)
    if getattr(atexit, "_ncallbacks", lambda: 1)() == 0:
        atexit.register(leave)
    gc.disable()
    import django_resto_gevent

    django_resto_gevent._process.command_line = True
    django_resto_gevent._process.collector_paused = True
    returned.append(django_resto_gevent.main())
    sys.exit(returned[0])

__all__ = [
    "AsyncStorage",
    "BacklogError",
    "DefaultTransport",
    "DistributedStorage",
    "HostResult",
    "HybridStorage",
    "MediaServer",
    "ReplicationError",
    "RestoError",
    "TransportError",
    "UnexpectedStatusCode",
    "get_setting",
    "main",
    "replication_failed",
]

import argparse
import atexit
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import contextvars
import datetime
import email.utils
import errno
import fnmatch
import functools
import gc
import hashlib
import hmac
import inspect
import io
import json
import logging
import mimetypes
import mmap
import os
import pathlib
import queue
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
import weakref
import xml.etree.ElementTree
import zlib
from collections import namedtuple
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit, urlunsplit

import urllib3
import urllib3.connection
import urllib3.connectionpool
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage
from django.core.signals import setting_changed
from django.dispatch import Signal
from django.utils.deconstruct import deconstructible
from django.utils.encoding import filepath_to_uri

logger = logging.getLogger("django_resto_gevent")


###############################################################################
# Process state
###############################################################################

# Everything this module keeps across storages and transports in one
# process, in one object, so that a reader sees at a glance what a process
# holds. What holds sockets or threads (the pool manager, the thread pools)
# is keyed by process id and rebuilt in a child after fork().


class _ProcessState:
    """What this process holds: settings generation, pools, threads, memories."""

    def __init__(self):
        # Bumped on every setting_changed: storages check their options again.
        self.settings_generation = 0
        # (process id and whether sockets are patched, PoolManager, its pools).
        self.pools = (None, None, 0)
        # ("purpose", process id) -> _DaemonThreads.
        self.executors = {}
        # The AsyncStorage background queues, flushed at exit (registered once).
        self.backgrounds = weakref.WeakSet()
        self.exit_flush_registered = False
        # True in "python -m django_resto_gevent": sync may fork() workers.
        self.command_line = False
        # True while that command starts with the collector paused.
        self.collector_paused = False
        self.reset()

    def reset(self):
        """Forget what was learnt about hosts and what was said once (for tests).

        WebDAV collections known to exist and the hosts that need them;
        derived SigV4 keys; the verdict on a late ssl patch; the warning
        about unverified TLS. Pools, threads and queues in flight stay.
        """
        self.known_collections = set()
        self.collection_hosts = set()
        self.sigv4_keys = {}
        # (process id and whether ssl is patched, verdict): replaced whole.
        self.late_ssl = (None, False)
        self.insecure_warned = False


_process = _ProcessState()


###############################################################################
# Settings
###############################################################################

class _Endpoint(namedtuple("_Endpoint", "scheme netloc bucket prefix region")):
    """A parsed host entry: where requests go, and for S3 the bucket and key prefix.

    ``bucket`` is None for a plain HTTP host. ``prefix`` is None when the
    key prefix is the path of MEDIA_URL, as for plain hosts.
    """

    __slots__ = ()


_HOST_FORMS = ("Write each host as 'host:port', 'http://host:port', 'https://host:port' "
               "or 's3+https://endpoint/bucket'.")


def _parse_s3_host(host, source):
    """Return the _Endpoint of an ``s3+http(s)://endpoint/bucket[/prefix]`` entry."""
    parts = urlsplit(host[len("s3+"):])
    segments = [segment for segment in parts.path.split("/") if segment]
    query = parse_qs(parts.query)
    if parts.scheme not in ("http", "https") or not parts.netloc or not segments \
            or parts.fragment or set(query) - {"region"}:
        raise ImproperlyConfigured(
            "%s contains %r, which is not an S3 bucket. Write it as "
            "'s3+https://endpoint[:port]/bucket', optionally followed by a key "
            "prefix ('/bucket/media/') and '?region=eu-west-1'; credentials go in "
            "RESTO_S3_ACCESS_KEY_ID and RESTO_S3_SECRET_ACCESS_KEY, never in the "
            "entry." % (source, host)
        )
    bucket, rest = segments[0], segments[1:]
    prefix = "".join(segment + "/" for segment in rest) if rest else None
    region = query["region"][0] if "region" in query else None
    return _Endpoint(parts.scheme, parts.netloc, bucket, prefix, region)


@functools.lru_cache(maxsize=1024)
def _parse_host_text(host, default_scheme, source):
    """Parse a host entry that is a non-empty string (cached: every request needs it)."""
    if "@" in host.partition("://")[2].partition("/")[0] or "@" in host.partition("/")[0]:
        # Host entries appear in logs and errors: no credentials in them.
        raise ImproperlyConfigured(
            "%s contains an entry with credentials in it (not shown). Write the host "
            "alone and put the credentials in RESTO_HTTP_AUTH (or RESTO_S3_* for S3)."
            % source)
    if host.startswith("s3+"):
        return _parse_s3_host(host, source)
    if "://" in host:
        parts = urlsplit(host)
        scheme, netloc = parts.scheme, parts.netloc
        if scheme not in ("http", "https") or not netloc or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise ImproperlyConfigured(
                "%s contains %r, which is not a media host URL. Write it as "
                "'http://host:port' or 'https://host:port', without a path: "
                "the path comes from MEDIA_URL." % (source, host)
            )
        return _Endpoint(scheme, netloc, None, None, None)
    if "/" in host or " " in host:
        raise ImproperlyConfigured("%s contains %r, which is not a media host. %s"
                                   % (source, host, _HOST_FORMS))
    return _Endpoint(default_scheme, host, None, None, None)


def _parse_host(host, default_scheme, source="RESTO_MEDIA_HOSTS"):
    """Return the _Endpoint of a host entry, or raise a clear error.

    An entry is ``"host:port"``, whose scheme is ``default_scheme``; a full
    ``"http://host:port"`` / ``"https://host:port"`` URL without a path (the
    path comes from MEDIA_URL); or an S3 bucket, path-style:
    ``"s3+https://endpoint[:port]/bucket[/key/prefix][?region=name]"``.
    """
    if not isinstance(host, str) or not host.strip():
        raise ImproperlyConfigured("%s contains %r, which is not a media host. %s"
                                   % (source, host, _HOST_FORMS))
    return _parse_host_text(host, default_scheme, source)


def _check_hosts(value, source):
    """Return the host list ``value`` as a tuple, or raise a clear error."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ImproperlyConfigured(
            "%s must be a list of media hosts such as ['media1:80', "
            "'http://media2:8080'], not %r." % (source, value)
        )
    if not value:
        raise ImproperlyConfigured(
            "%s is empty: django_resto_gevent has no media host to replicate "
            "to. List your media servers, e.g. RESTO_MEDIA_HOSTS = "
            "['media1:80', 'media2:80']." % source
        )
    for host in value:
        _parse_host(host, "http", source)
    return tuple(value)


def _check_timeout(value, source):
    """Return the timeout ``value`` in seconds, or raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ImproperlyConfigured(
            "%s must be a positive number of seconds, not %r. Set e.g. "
            "RESTO_TIMEOUT = 2." % (source, value)
        )
    return value


def _check_count(value, source):
    """Return the whole number ``value`` (0 or more), or raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(
            "%s must be a whole number, 0 or more, not %r." % (source, value)
        )
    return value


def _check_positive_count(value, source):
    """Return the whole number ``value`` (1 or more), or raise a clear error."""
    if _check_count(value, source) == 0:
        raise ImproperlyConfigured("%s must be 1 or more, not 0." % source)
    return value


def _check_optional_count(value, source):
    """Return None or a whole number (0 or more), or raise a clear error."""
    return None if value is None else _check_count(value, source)


# What an HTTP header name may be (RFC 9110 "token"), and what its value may not hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_HEADER_VALUE = re.compile("[\\r\\n\\x00]|[^\\x00-\\xff]")


def _check_http_auth(value, source):
    """Return the credentials ``value`` as a dict of headers, or raise a clear error.

    The message shows the type of a bad value, never the value: it may hold
    a password.
    """
    if value is None:
        return {}
    if isinstance(value, (list, tuple)) and len(value) == 2 \
            and all(isinstance(part, str) for part in value):
        # UTF-8, as RFC 7617's charset parameter and curl's -u send it.
        token = base64.b64encode(("%s:%s" % tuple(value)).encode("utf-8")).decode("ascii")
        return {"Authorization": "Basic " + token}
    if isinstance(value, dict) and all(
            isinstance(key, str) and isinstance(text, str) for key, text in value.items()):
        for key, text in value.items():
            # Requests are written by hand (see _request_head()): a line
            # break in a header would end it and start another.
            if not _HEADER_NAME.fullmatch(key) or _BAD_HEADER_VALUE.search(text):
                raise ImproperlyConfigured(
                    "%s has a header %r whose name is not an HTTP token or whose value "
                    "holds a line break, a NUL or a character outside Latin-1 (the value "
                    "is not shown: it may be a secret)." % (source, key[:100]))
        return dict(value)
    raise ImproperlyConfigured(
        "%s must be ('user', 'password') for Basic auth or a dict of headers such "
        "as {'Authorization': 'Bearer <token>'}, not a %s (its value is not shown: "
        "it may be a secret)." % (source, type(value).__name__)
    )


def _check_ca_bundle(value, source):
    """Return None or the path of an existing CA file, or raise a clear error."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
        raise ImproperlyConfigured(
            "%s is %r, which is not a file: point it at the PEM file of the CA "
            "that signed your media hosts' certificates, or leave it unset to "
            "use the system's CAs." % (source, value)
        )
    return os.fspath(value)


def _check_optional_text(value, source, secret=False):
    """Return None or a non-empty string, or raise a clear error.

    A ``secret`` value is described by its type, never shown.
    """
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    shown = ("a %s (its value is not shown: it may be a secret)" % type(value).__name__
             if secret else repr(value))
    raise ImproperlyConfigured("%s must be a non-empty string, not %s." % (source, shown))


def _check_secret(value, source):
    """Return None or a non-empty string; a bad value is described, never shown."""
    return _check_optional_text(value, source, secret=True)


def _check_flag(value, source):
    """Return the boolean ``value``, or raise a clear error."""
    if not isinstance(value, bool):
        raise ImproperlyConfigured("%s must be True or False, not %r." % (source, value))
    return value


# What S3 allows a multipart upload: parts of 5 MiB to 5 GiB (the last one
# may be smaller), at most 10,000 of them. A single PUT is capped at 5 GiB.
_S3_MIN_PART = 5 * 1024 * 1024
_S3_MAX_PART = 5 * 1024 * 1024 * 1024
_S3_MAX_PARTS = 10000


def _check_s3_size(value, source, setting, example):
    """Return a byte count within the part sizes S3 allows, or raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not _S3_MIN_PART <= value <= _S3_MAX_PART:
        raise ImproperlyConfigured(
            "%s must be a whole number of bytes from 5 MiB (%d) to 5 GiB (%d), the "
            "sizes S3 allows, not %r. Set e.g. %s = %s." % (
                source, _S3_MIN_PART, _S3_MAX_PART, value, setting, example))
    return value


def _check_multipart_threshold(value, source):
    """Return the size above which uploads to S3 go in parts, or raise a clear error."""
    return _check_s3_size(value, source, "RESTO_S3_MULTIPART_THRESHOLD", "64 * 1024 * 1024")


def _check_part_size(value, source):
    """Return the size of the parts of a multipart upload, or raise a clear error."""
    return _check_s3_size(value, source, "RESTO_S3_PART_SIZE", "16 * 1024 * 1024")


# Each part in flight holds one part in memory: more than this many per
# upload buys nothing but memory.
_MAX_PARTS_IN_FLIGHT = 64


def _check_parts_in_flight(value, source):
    """Return how many parts of one upload may be in flight, or raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= _MAX_PARTS_IN_FLIGHT:
        raise ImproperlyConfigured(
            "%s must be a whole number from 1 to %d, not %r: each part in flight holds "
            "RESTO_S3_PART_SIZE bytes in memory. Set e.g. RESTO_S3_PARTS_IN_FLIGHT = 4."
            % (source, _MAX_PARTS_IN_FLIGHT, value))
    return value


# Headers that the transport writes itself, or that would change how a
# request is framed, signed, checked or what it does (a copy instead of an
# upload): object parameters may not set them.
_RESERVED_HEADERS = frozenset((
    "accept-encoding", "authorization", "connection", "content-length", "content-md5",
    "expect", "host", "keep-alive", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "user-agent", "x-amz-content-sha256", "x-amz-date",
    "x-amz-decoded-content-length", "x-amz-security-token", "x-amz-trailer",
))
_RESERVED_HEADER_PREFIXES = ("x-amz-checksum-", "x-amz-copy-source", "x-amz-sdk-checksum-")

_OBJECT_PARAMETERS_EXAMPLE = (
    "{'*.css': {'Cache-Control': 'max-age=86400'}, "
    "'downloads/*': {'Content-Disposition': 'attachment'}}")


def _check_object_headers(value, source):
    """Return the object headers ``value`` (a dict of strings) checked, or raise a clear error.

    Requests are written by hand (see _request_head()): a header that holds
    a line break would end the request's head early.
    """
    if not isinstance(value, dict) or not all(
            isinstance(key, str) and isinstance(text, str) for key, text in value.items()):
        raise ImproperlyConfigured(
            "%s must be a dict of header names to strings, such as {'Cache-Control': "
            "'max-age=86400'}, not %r." % (source, value))
    seen = set()
    for key, text in value.items():
        lower = key.lower()
        if not _HEADER_NAME.fullmatch(key) or _BAD_HEADER_VALUE.search(text):
            raise ImproperlyConfigured(
                "%s has the header %r: %r, whose name is not an HTTP token or whose value "
                "holds a line break, a NUL or a character outside Latin-1. Fix it; encode "
                "a non-Latin-1 file name as RFC 6266 says (filename*=UTF-8''...)."
                % (source, key[:100], text[:200]))
        if lower in _RESERVED_HEADERS or lower.startswith(_RESERVED_HEADER_PREFIXES):
            raise ImproperlyConfigured(
                "%s has the header %r, which django_resto_gevent writes or refuses itself "
                "(framing, signing, checksums, copies): remove it." % (source, key[:100]))
        if lower in seen:
            raise ImproperlyConfigured(
                "%s has the header %r twice (header names ignore case): keep one."
                % (source, key[:100]))
        seen.add(lower)
    return dict(value)


def _check_object_parameters(value, source):
    """Return None, a callable, or the dict of name patterns to headers, checked."""
    if value is None or callable(value):
        return value
    if not isinstance(value, dict) or not all(
            isinstance(pattern, str) and pattern for pattern in value):
        raise ImproperlyConfigured(
            "%s must be a dict of file name patterns to headers, such as %s, or a function "
            "that takes a file name and returns its headers; not %r."
            % (source, _OBJECT_PARAMETERS_EXAMPLE, value))
    return {pattern: _check_object_headers(headers, "%s, for the pattern %r," % (source, pattern))
            for pattern, headers in value.items()}


def _object_headers(parameters, name):
    """Return the headers RESTO_OBJECT_PARAMETERS gives the file ``name``, checked.

    With a dict, the headers of every pattern that matches the name
    (``fnmatch``, where ``*`` also matches ``/``), in the dict's order, a
    later pattern's header replacing an earlier one's; with a callable,
    what it returns for the name.
    """
    if parameters is None:
        return {}
    if callable(parameters):
        return _check_object_headers(
            parameters(name), "The headers that the RESTO_OBJECT_PARAMETERS / "
            "object_parameters function %s returned for %r"
            % (getattr(parameters, "__qualname__", repr(parameters)), name))
    merged = {}
    for pattern, headers in parameters.items():
        if fnmatch.fnmatchcase(name, pattern):
            for key, text in headers.items():
                for known in [known for known in merged if known.lower() == key.lower()]:
                    del merged[known]
                merged[key] = text
    return merged


# Every setting: the constructor keyword of the same meaning, then the
# setting, its default and the function that checks a value of it. Values
# are looked up when used, never at import or class-definition time, so that
# override_settings() and late settings.configure() work.
_SETTINGS = {
    "hosts": ("RESTO_MEDIA_HOSTS", (), _check_hosts),
    "fatal_exceptions": ("RESTO_FATAL_EXCEPTIONS", True, _check_flag),
    "show_traceback": ("RESTO_SHOW_TRACEBACK", False, _check_flag),
    "timeout": ("RESTO_TIMEOUT", 2, _check_timeout),
    "retries": ("RESTO_RETRIES", 1, _check_count),
    # None: every host when RESTO_FATAL_EXCEPTIONS, else 0 (see min_replicas).
    "min_replicas": ("RESTO_MIN_REPLICAS", None, _check_optional_count),
    "async_max_pending": ("RESTO_ASYNC_MAX_PENDING", 10000, _check_positive_count),
    # Save under the name asked for, replacing any file there (Django 5.1's
    # FileSystemStorage keyword), instead of finding a free variant.
    "allow_overwrite": ("RESTO_ALLOW_OVERWRITE", False, _check_flag),
    # ("user", "password") for Basic auth, or a dict of headers to send.
    "http_auth": ("RESTO_HTTP_AUTH", None, _check_http_auth),
    # A PEM file of the CAs that sign the hosts' certificates (None: the
    # system's CAs).
    "ca_bundle": ("RESTO_CA_BUNDLE", None, _check_ca_bundle),
    "tls_verify": ("RESTO_TLS_VERIFY", True, _check_flag),
    # Credentials and default region of the "s3+https://endpoint/bucket" hosts.
    "s3_access_key_id": ("RESTO_S3_ACCESS_KEY_ID", None, _check_optional_text),
    "s3_secret_access_key": ("RESTO_S3_SECRET_ACCESS_KEY", None, _check_secret),
    "s3_region": ("RESTO_S3_REGION", "us-east-1", _check_optional_text),
    # Files larger than this go to S3 hosts as a multipart upload, in parts
    # of RESTO_S3_PART_SIZE bytes, at most RESTO_S3_PARTS_IN_FLIGHT of them
    # in flight (and in memory) per host at once.
    "s3_multipart_threshold": ("RESTO_S3_MULTIPART_THRESHOLD", 64 * 1024 * 1024,
                               _check_multipart_threshold),
    "s3_part_size": ("RESTO_S3_PART_SIZE", 16 * 1024 * 1024, _check_part_size),
    "s3_parts_in_flight": ("RESTO_S3_PARTS_IN_FLIGHT", 4, _check_parts_in_flight),
    # Headers sent with every upload of a file (Cache-Control, ...): a dict
    # of name patterns to headers, or a callable name -> headers.
    "object_parameters": ("RESTO_OBJECT_PARAMETERS", None, _check_object_parameters),
}

# Keywords whose values are secrets: never logged, never in repr(), never
# written by deconstruct() into a migration.
_SECRET_KEYWORDS = frozenset(("http_auth", "s3_secret_access_key"))

# Settings of the whole process, with no keyword: the exit flush covers every
# AsyncStorage at once.
_PROCESS_SETTINGS = {
    "RESTO_ASYNC_EXIT_TIMEOUT": 30,
}

_DEFAULTS = dict(((setting, default) for setting, default, _check in _SETTINGS.values()),
                 **_PROCESS_SETTINGS)


def get_setting(name):
    """Return the value of a ``RESTO_*`` setting, or its default.

    ``name`` may be given with or without its ``RESTO_`` prefix.
    """
    if not name.startswith("RESTO_"):
        name = "RESTO_" + name
    if name not in _DEFAULTS:
        raise ImproperlyConfigured(
            "Unknown django_resto_gevent setting %r. Known settings: %s."
            % (name, ", ".join(sorted(_DEFAULTS)))
        )
    return getattr(settings, name, _DEFAULTS[name])


# A storage checks each option once and keeps the value until a setting
# changes: override_settings() sends setting_changed, which FileSystemStorage
# relies on too. Checking every option on every save cost more CPU than a
# small request.
def _count_settings_change(**kwargs):
    """Make every storage read and check its options again on next use."""
    _process.settings_generation += 1


setting_changed.connect(_count_settings_change, dispatch_uid="django_resto_gevent")


###############################################################################
# Errors and signals
###############################################################################

def _redact(url):
    """Return ``url`` with any user name and password removed."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


# What usually causes an unexpected status, keyed by (method, status), then
# by status alone. The words are for the sysadmin who reads the error.
_STATUS_HINTS = {
    ("PUT", 403): "403 on PUT: is dav_methods enabled and this address allowed?",
    ("DELETE", 403): "403 on DELETE: is dav_methods enabled and this address allowed?",
    ("MKCOL", 403): "403 on MKCOL: the server refuses to create directories; "
                    "allow MKCOL or let PUT create them (nginx: create_full_put_path on).",
    ("PUT", 404): "404 on PUT: the directory does not exist and the server does not "
                  "create it; check MEDIA_URL and the server's root.",
    ("PUT", 405): "405 on PUT: the server does not accept uploads here; enable them "
                  "(nginx: dav_methods PUT DELETE).",
    ("DELETE", 405): "405 on DELETE: enable it (nginx: dav_methods PUT DELETE).",
    ("PUT", 409): "409: the server needs parent collections; allow MKCOL "
                  "(nginx: dav_methods PUT DELETE MKCOL, or create_full_put_path on).",
    401: "401: the host wants credentials; check RESTO_HTTP_AUTH.",
    403: "403: the host refuses this client; check its allow/deny rules and "
         "RESTO_HTTP_AUTH.",
    202: "202: the host queued the request instead of doing it; a media host must "
         "store the file before it answers.",
    413: "413: the file is over the server's body limit; raise client_max_body_size "
         "(nginx) or its equivalent.",
    507: "507: the host's disk is full.",
}


def _status_hint(method, status):
    """Return what usually causes ``status`` on ``method``, or None."""
    return _STATUS_HINTS.get((method, status)) or _STATUS_HINTS.get(status)


def _find_cause(reason, types):
    """Return the first exception of ``types`` in ``reason`` or what it wraps, or None."""
    pending, seen = [reason], 0
    # urllib3 wraps the socket's or ssl's error in its own, in args or as the cause.
    while pending and seen < 8:
        error = pending.pop()
        seen += 1
        if isinstance(error, types):
            return error
        if isinstance(error, BaseException):
            pending.extend(arg for arg in error.args if isinstance(arg, BaseException))
            pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return None


def _is_certificate_error(reason):
    """Tell whether ``reason`` is, or wraps, a failed TLS certificate verification."""
    return _find_cause(reason, ssl.SSLCertVerificationError) is not None



class RestoError(OSError):
    """Base class of the errors of django_resto_gevent.

    An ``OSError`` subclass, so that code catching ``OSError`` around storage
    calls keeps working. Every subclass pickles.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (self.__class__.__new__, (self.__class__,), self.__dict__)


class UnexpectedStatusCode(RestoError):
    """A media host answered with a status code the operation does not accept.

    ``hint`` says, in a sysadmin's words, what usually causes that status.
    """

    def __init__(self, method, url, host, status, expected=(), hint=None):
        self.method = method
        self.url = _redact(url)
        self.host = host
        self.status = status
        self.expected = tuple(expected)
        self.hint = hint or _status_hint(method, status)
        super().__init__(
            "%s %s answered %s, expected %s.%s"
            % (method, self.url, status, " or ".join(str(code) for code in self.expected),
               " " + self.hint if self.hint else "")
        )


class _UnusableAnswer(UnexpectedStatusCode):
    """An answer whose status was accepted but whose body says the operation failed.

    S3's CompleteMultipartUpload may answer 200 with an error in its body;
    an answer may also lack what the next request needs (an upload id, an
    ETag). ``problem`` says what was wrong with it.
    """

    def __init__(self, method, url, host, status, problem, hint=None):
        self.method = method
        self.url = _redact(url)
        self.host = host
        self.status = status
        self.expected = (status,)
        self.problem = problem
        self.hint = hint
        RestoError.__init__(self, "%s %s answered %d %s.%s" % (
            method, self.url, status, problem, " " + hint if hint else ""))


class _WireError(Exception):
    """A request could not be written, or its answer could not be read."""


class _UnwritableRequest(_WireError):
    """A request that must not be sent as it is (trying again cannot help)."""


class _AnswerError(_WireError):
    """An answer that breaks HTTP/1.1's rules, or ends before its end."""


class _NotHTTP(_AnswerError):
    """What answered does not speak HTTP/1.x."""


class _NoAnswer(_AnswerError):
    """The host closed the connection before sending a byte of an answer."""


class _StaleConnection(_NoAnswer):
    """A kept-alive connection the host closed as the request went out on it."""


# What to do about a request that got no answer, by the cause found first.
_REASON_HINTS = (
    (ssl.SSLCertVerificationError,
     "The host's TLS certificate could not be verified: set RESTO_CA_BUNDLE to the "
     "PEM file of the CA that signed it."),
    (ConnectionRefusedError, "Is the media server running and listening there?"),
    (socket.gaierror, "The host name does not resolve: check RESTO_MEDIA_HOSTS and DNS."),
    ((TimeoutError, urllib3.exceptions.TimeoutError),
     "No complete answer within RESTO_TIMEOUT: the host is down, overloaded or far."),
    # A subclass of _NotHTTP's parent, so first: the host said nothing at all.
    (_NoAnswer,
     "The host closed the connection without answering: see its error log."),
    (_NotHTTP,
     "What answered is not an HTTP/1.x server: check the host, the port and http:// "
     "against https:// in RESTO_MEDIA_HOSTS."),
)


def _reason_hint(reason):
    """Return what to do about a request that got no answer, or None."""
    for types, hint in _REASON_HINTS:
        if _find_cause(reason, types) is not None:
            return hint
    return None


# Where urllib3 puts the repr of a connection in front of the reason.
_OBJECT_REPR = re.compile(r"(?:<[\w.]+ object at 0x[0-9a-fA-F]+>|\b\w*Connection\("
                          r"host=[^()]*\)): ?")


def _with_hint(reason):
    """Return ``reason`` as a sentence, followed by what to do about it if known."""
    text = _OBJECT_REPR.sub("", str(reason)).rstrip() or type(reason).__name__
    if not text.endswith((".", "!", "?")):
        text += "."
    hint = _reason_hint(reason)
    return text + " " + hint if hint else text


class TransportError(RestoError):
    """A request to a media host failed before a status code came back."""

    def __init__(self, method, url, host, reason):
        self.method = method
        self.url = _redact(url)
        self.host = host
        self.reason = reason
        super().__init__("%s %s failed: %s" % (method, self.url, _with_hint(reason)))

    @property
    def retryable(self):
        """False when trying again cannot help: a certificate that fails
        verification, or a request that could not be written."""
        return not (_is_certificate_error(self.reason)
                    or _find_cause(self.reason, _UnwritableRequest) is not None)


class ReplicationError(RestoError):
    """An operation failed on one or more media hosts.

    ``failures`` lists ``(host, exception)`` pairs in host order; ``action``
    and ``name`` say what was attempted.
    """

    def __init__(self, action, name, failures, host_count):
        self.action = action
        self.name = name
        self.failures = list(failures)
        self.host_count = host_count
        causes = "; ".join("%s: %s" % (host, exc) for host, exc in self.failures)
        super().__init__(
            "Failed to %s %s on %d of %d media hosts. %s"
            % (action, name, len(self.failures), host_count, causes)
        )

    @property
    def hosts(self):
        """The failed hosts, in host order."""
        return [host for host, _ in self.failures]


class BacklogError(RestoError):
    """AsyncStorage has too many replications pending and no room came free."""

    def __init__(self, storage_name, pending, waited):
        self.pending = pending
        self.waited = waited
        super().__init__(
            "%s has %d replications pending (RESTO_ASYNC_MAX_PENDING) and none "
            "finished within %.1f seconds: the media hosts are not keeping up or "
            "are down. The file is in the master copy: once the hosts are back, run "
            "python -m django_resto_gevent sync; or raise RESTO_ASYNC_MAX_PENDING."
            % (storage_name, pending, waited)
        )


# Sent once per failed host operation (sync, background, retried out), so that
# a site can queue a repair or page someone. Arguments: storage, action, name,
# host, exception; the sender is the storage class.
replication_failed = Signal()


###############################################################################
# Wire
###############################################################################

# --- Wire: connections -------------------------------------------------------

# Sending in blocks of 256 KiB costs far less CPU per MiB than urllib3's
# 16 KiB default, and still keeps memory constant.
_BLOCK_SIZE = 256 * 1024

# Connections kept per host. A pool may open more under load; the extra ones
# are closed after use rather than blocking the caller.
_CONNECTIONS_PER_HOST = 32

# PoolManager keeps one connection pool per host; with fewer pools than hosts
# it would throw connections away on every save.
_MIN_POOLS = 16

# gevent is imported where a patched process uses it, in the functions below:
# a process that never patches (sync from cron, runserver, a Celery worker)
# does not load it. Patching imports gevent.monkey, which is how these tell.


def _gevent_patched(module_name):
    """Tell whether gevent patched the standard library module ``module_name``."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched(module_name)


def _original(module_name, name):
    """Return ``module_name.name`` as the standard library has it, even if patched."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module_name, name)
    return getattr(sys.modules[module_name], name)


# The poll() of the standard library, even where gevent patched select: the
# check of an idle connection must not wait, so a trip through gevent's hub
# buys nothing and costs more than the rest of the check.
_real_poll = _original("select", "poll") if hasattr(select, "poll") else None


class _ConnectionMixin:
    """Check an idle connection of this module's pools with one real poll()."""

    @property
    def is_connected(self):
        """Tell whether the socket is open and the host has not closed it."""
        if self.sock is None:
            return False
        if _real_poll is None:
            return super().is_connected
        poller = _real_poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        # An idle connection has nothing to read: readable means EOF or junk.
        return not poller.poll(0)


class _HTTPConnection(_ConnectionMixin, urllib3.connection.HTTPConnection):
    """An HTTP connection of this module's pools."""


class _HTTPSConnection(_ConnectionMixin, urllib3.connection.HTTPSConnection):
    """An HTTPS connection of this module's pools."""


class _HTTPConnectionPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}


_pool_lock = threading.Lock()


def _sockets_patched():
    """Tell whether gevent patched the socket module of this process."""
    return _gevent_patched("socket")


def _pool_manager(host_count):
    """Return this process's urllib3 PoolManager, with room for ``host_count`` pools.

    It is rebuilt after fork() (sockets must not be shared with the parent)
    and after gevent patches sockets (a pool made before would hold
    blocking sockets).
    """
    key = (os.getpid(), _sockets_patched())
    known, manager, num_pools = _process.pools
    if known == key and num_pools >= host_count:
        return manager
    with _pool_lock:
        known, manager, num_pools = _process.pools
        if known != key or num_pools < host_count:
            num_pools = max(_MIN_POOLS, host_count)
            manager = urllib3.PoolManager(
                num_pools=num_pools,
                maxsize=_CONNECTIONS_PER_HOST,
                block=False,
                blocksize=_BLOCK_SIZE,
                retries=False,
            )
            manager.pool_classes_by_scheme = _POOL_CLASSES
            _process.pools = (key, manager, num_pools)
        return manager


# Where gevent patched ssl after urllib3 was imported, urllib3 still builds its
# TLS contexts from the original SSLContext class, whose options setter looks
# up SSLContext in the ssl module, finds gevent's subclass and calls itself
# until RecursionError (gevent issue #1016). gunicorn -k gevent --preload does
# this: the master imports the application, the worker patches after fork().
_LATE_SSL_PATCH = (
    "gevent patched the ssl module after urllib3 had imported it, so HTTPS requests "
    "to the media hosts would fail with RecursionError (gevent issue #1016). "
    "gunicorn --preload with gevent workers does this: the application is loaded "
    "before the worker patches. Patch first, at the top of gunicorn.conf.py (from "
    "gevent import monkey; monkey.patch_all()), or do not use --preload. Elsewhere, "
    "patch first thing in the script that starts the process."
)

def _check_ssl_patched_in_time():
    """Raise ImproperlyConfigured where urllib3 holds the SSLContext gevent replaced.

    The verdict is kept per process and patching state: after the first
    call this costs a process id and a comparison.
    """
    key = (os.getpid(), _gevent_patched("ssl"))
    known, late = _process.late_ssl
    if known != key:
        late = key[1] and urllib3.util.ssl_.SSLContext is _original("ssl", "SSLContext")
        _process.late_ssl = (key, late)
    if late:
        raise ImproperlyConfigured(_LATE_SSL_PATCH)


# --- Wire: deadlines ---------------------------------------------------------

# A slow but steady transfer is not cut by the deadline. An upload may take
# RESTO_TIMEOUT plus one second per this many bytes of its (known) size; a
# download earns the same second per this many bytes that actually arrive,
# never for a length the host merely announces.
_MIN_TRANSFER_RATE = 1024 * 1024

# However fast the bytes come, one download attempt ends this many seconds
# after RESTO_TIMEOUT: a host streaming an endless body must not hold a
# greenlet or a thread for ever. An hour moves 3.5 GiB at the minimum rate.
_MAX_DOWNLOAD_EXTRA = 3600

class _Deadline:
    """The moment by which one attempt must end, patched or not.

    Every wait of the wire code (connect, send, receive) is bounded by what
    remains, and the receive loops check it even when bytes keep coming, so
    a host that never stops sending is cut too. ``earn()`` moves the
    deadline for bytes received, up to ``seconds + extra``.
    """

    __slots__ = ("start", "at", "limit")

    def __init__(self, seconds, extra=0):
        self.start = time.monotonic()
        self.at = self.start + seconds
        self.limit = self.at + extra

    def earn(self, count):
        """Give ``count`` bytes just received the time the minimum rate allows them."""
        at = self.at + count / _MIN_TRANSFER_RATE
        self.at = at if at < self.limit else self.limit

    def remaining(self):
        """Return the seconds left; raise TimeoutError when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left

    def passed(self):
        """Return the TimeoutError that says the deadline passed."""
        # Rounded first: start + 0.55 - start is not quite 0.55.
        seconds = round(self.at - self.start, 6)
        return TimeoutError("no complete answer within %.1f seconds" % seconds)

    def explain(self, idle_timeout):
        """Return the TimeoutError to raise for a socket call that timed out."""
        # A socket timeout was cut to what remained: past (or all but at)
        # the deadline, that is what the call hit.
        if self.at - time.monotonic() < 0.01:
            return self.passed()
        return TimeoutError("the connection was idle for %.1f seconds" % idle_timeout)

    @contextlib.contextmanager
    def bounding(self):
        """Bound a block whose waits this module does not arm (DNS, TLS) by the deadline.

        Where sockets are patched, a gevent.Timeout interrupts the greenlet
        wherever it waits, name resolution included. Elsewhere each socket
        call of the block is bounded by its own timeout only.
        """
        if not _sockets_patched():
            yield
            return
        import gevent

        timer = gevent.Timeout(self.remaining())
        timer.start()
        try:
            yield
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            raise self.passed() from None
        finally:
            timer.close()


def _arm(sock, read_timeout, deadline):
    """Set the timeout of the next socket call: ``read_timeout``, cut to the deadline."""
    left = deadline.remaining()
    sock.settimeout(left if left < read_timeout else read_timeout)


# --- Wire: requests ----------------------------------------------------------

# Sent with every request, so that a host's access log says who wrote.
_USER_AGENT = "django-resto-gevent/%s" % __version__

# A Host header leaves out the scheme's default port, as browsers and S3 do.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_header(parts):
    """Return the Host header of the split URL ``parts``, as http.client writes it."""
    host = parts.hostname or ""
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    if ":" in host:
        host = "[%s]" % host  # an IPv6 literal keeps its brackets
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = "%s:%d" % (host, port)
    return host


# What a request path may not hold: it would end the request line or a header.
# (Written as the complement of printable ASCII: the range up to U+10FFFF
# cost 3 ms to compile, at every import.)
_BAD_PATH_CHARACTER = re.compile("[^\\x21-\\x7e]")

# Characters a path keeps as they are when it is encoded (RFC 3986 pchar and
# "/", plus "%" so that escapes already there are not encoded twice).
_PATH_SAFE = "/%!$&'()*+,;=:@~"


def _split_origin(url):
    """Return ``scheme://netloc`` and the rest (``/path?query``) of an absolute URL."""
    end = url.find("/", url.index("//") + 2)
    if end < 0:
        return url, "/"
    return url[:end], url[end:]


def _request_head(method, path, host, headers):
    """Return the request line and header lines of a request, as bytes.

    ``host`` is the Host header, unless ``headers`` has one (S3 signs it).
    ``path`` must be encoded already: a space or a control character in it
    raises _UnwritableRequest, as http.client would refuse it, rather than
    send a request the host would misread.
    """
    if _BAD_PATH_CHARACTER.search(path):
        raise _UnwritableRequest("the request path %r is not encoded" % path[:200])
    lines = ["%s %s HTTP/1.1" % (method, path)]
    if "Host" not in headers:
        lines.append("Host: " + host)
    # HEAD's Content-Length must be the size of the file itself.
    lines.append("Accept-Encoding: identity")
    lines.extend("%s: %s" % item for item in headers.items())
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


# Files up to this size are read once into memory and sent from there, with
# the request's headers.
_SMALL_BODY = 64 * 1024


def _send_request(sock, head, body, size, idle_timeout, deadline):
    """Send ``head``, then ``size`` bytes of ``body`` (bytes, a binary file or None).

    A small body leaves with its headers in one send. A file is read from
    its current position in blocks; one that ends early raises
    _UnwritableRequest instead of leaving the host waiting. Returns False
    when the host closed the connection before taking the whole request:
    it may have answered why (a 413 over its size limit, a 401).
    """
    try:
        _arm(sock, idle_timeout, deadline)
        if body is None:
            sock.sendall(head)
            return True
        if isinstance(body, (bytes, bytearray, memoryview)):
            if len(body) <= _SMALL_BODY:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                _arm(sock, idle_timeout, deadline)
                sock.sendall(body)
            return True
        sock.sendall(head)
        remaining = size
        while remaining > 0:
            block = body.read(min(_BLOCK_SIZE, remaining))
            if not block:
                raise _UnwritableRequest(
                    "the file ended %d bytes short of its size (%d)" % (remaining, size))
            _arm(sock, idle_timeout, deadline)
            sock.sendall(block)
            remaining -= len(block)
        return True
    except OSError as exc:
        if not isinstance(exc, BrokenPipeError) and exc.errno != errno.ECONNRESET:
            raise
        return False


# --- Wire: answers -----------------------------------------------------------

# Bounds on an answer: its head (status line and headers), and the part of
# its body kept when it is not streamed to a file (an error page; a longer
# one is cut and its connection dropped). A host sending more is broken, not
# a reason to use more memory.
_MAX_ANSWER_HEAD = 64 * 1024
_MAX_ANSWER_BODY = 1024 * 1024

# Interim (1xx) answers skipped before the final one, and trailer lines read
# after a chunked body: real servers send one or two; a host sending them
# without end must not hold the request.
_MAX_INTERIM_ANSWERS = 8
_MAX_TRAILER_LINES = 32

# Bytes asked of the socket per receive while reading an answer's head.
_RECEIVE_SIZE = 16 * 1024

# Receives in a row after which a patched process lets other greenlets run: a
# host whose bytes are always ready would otherwise never let this one yield.
_YIELD_EVERY = 16

# The grammar of an answer (RFC 9112 section 4, RFC 9110 section 5), as
# regular expressions over the head decoded as Latin-1. Strict where the end
# of a message is decided; a field value may hold any character but NUL and
# ASCII white space, with runs of SP or HTAB inside, as h11 accepts, and is
# trimmed of SP and HTAB only.
_OWS = r"[ \t]*"
_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = r"[^\x00\t\n\v\f\r ]"
_FIELD_CONTENT = _FIELD_VCHAR + r"+(?:[ \t]+" + _FIELD_VCHAR + r"+)*"
# status-line = HTTP-version SP status-code SP [ reason-phrase ]; servers
# that leave out "SP reason-phrase" are common enough to accept.
_STATUS_LINE = re.compile(
    r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: (?:[ \t]|" + _FIELD_VCHAR + r")*)?")
# field-line = field-name ":" OWS field-value OWS; a head's field lines are
# checked in one match, joined by CRLF.
_FIELD_LINE = _TOKEN + ":" + _OWS + "(?:" + _FIELD_CONTENT + ")?" + _OWS
_FIELD_LINES = re.compile("(?:%s(?:\r\n%s)*)?" % (_FIELD_LINE, _FIELD_LINE))
_ONE_FIELD_LINE = re.compile(_FIELD_LINE)
# obs-fold: a line that starts with SP or HTAB continues the one above it.
_OBS_FOLD = re.compile(r"[ \t]+")
# Content-Length = 1*DIGIT; more than 20 digits is no file size.
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")
# chunk-size [ chunk-ext ], before its CRLF: the extensions are ignored, and
# blanks before the CRLF tolerated, as some servers send them.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
# The end of a head: an empty line, after CRLF or a bare LF.
_HEAD_END = re.compile(rb"\n\r?\n")


# The answers whose body streams to a sink when the request has one: a file
# (GET) or a listing (GET, PROPFIND's 207 Multi-Status), of any length.
_STREAMED_STATUSES = (200, 207)

# The headers that decide where an answer ends, or whether its connection lives.
_FRAMING_FIELDS = frozenset(("content-length", "transfer-encoding", "connection"))


class _Answer:
    """An answer: its status, headers (lower-case names) and body.

    ``data`` is the body, unless it went to a file; ``length`` the checked
    Content-Length, or None; ``complete`` says the end of the answer was
    read; ``reusable`` that its connection may carry the next request.
    """

    __slots__ = ("status", "headers", "data", "length", "complete", "reusable",
                 "resto_attempts")

    def __init__(self, status, headers, data, length=None, complete=True, reusable=False):
        self.status = status
        self.headers = headers
        self.data = data
        self.length = length
        self.complete = complete
        self.reusable = reusable


class _KeptBody:
    """The body of an answer kept in memory, up to _MAX_ANSWER_BODY bytes."""

    __slots__ = ("parts", "room")

    def __init__(self):
        self.parts = []
        self.room = _MAX_ANSWER_BODY

    def write(self, data):
        """Keep ``data``; return False once the body is over its bound (it is cut there)."""
        if len(data) > self.room:
            self.parts.append(data[:self.room])
            self.room = 0
            return False
        self.parts.append(data)
        self.room -= len(data)
        return True


class _Sink:
    """A binary file a body streams to, counting the bytes written."""

    __slots__ = ("_file", "written")

    def __init__(self, file):
        self._file = file
        self.written = 0

    def write(self, data):
        """Write ``data`` to the file; always room for more."""
        self._file.write(data)
        self.written += len(data)
        return True


class _AnswerReader:
    """Read one answer from a socket, by RFC 9112's rules for a client.

    One reader per framing of the body (no body, Content-Length, chunked,
    to the end of the connection), chosen from the final head. Every
    receive is bounded by the deadline; memory by _MAX_ANSWER_HEAD and,
    for a kept body, _MAX_ANSWER_BODY. ``lenient`` records whether something
    RFC 9112 only tolerates was accepted (a bare LF line end, a folded
    header line): the connection is then not reused.
    """

    __slots__ = ("_sock", "_read_timeout", "_deadline", "_buffer", "_receives", "_patched",
                 "lenient")

    def __init__(self, sock, read_timeout, deadline):
        self._sock = sock
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._buffer = bytearray()
        self._receives = 0
        self._patched = _sockets_patched()
        self.lenient = False

    def _recv(self, size):
        """Return one receive of at most ``size`` bytes, within the deadline; b"" at the end."""
        _arm(self._sock, self._read_timeout, self._deadline)
        data = self._sock.recv(size)
        self._deadline.earn(len(data))
        self._receives += 1
        if self._patched and not self._receives % _YIELD_EVERY:
            import gevent

            gevent.sleep(0)
        return data

    def _receive(self):
        """Append one receive to the buffer; False at the end of the stream."""
        data = self._recv(_RECEIVE_SIZE)
        self._buffer += data
        return bool(data)

    def _next_bytes(self, count):
        """Return 1 to ``count`` bytes, buffered ones first; b"" at the end of the stream."""
        if not self._buffer:
            return self._recv(count)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _lines(self, what, head=False):
        """Return the lines up to the next empty one, decoded, their ends removed.

        An empty line first gives no lines. A bare LF ends a line too
        (RFC 9112 section 2.2 allows a recipient that), leniently. A
        ``head`` whose first byte cannot start a status line (a control
        character or a blank: TLS, a leading space) is refused at once,
        rather than waited for.
        """
        start = 0
        while True:
            if head and self._buffer and self._buffer[0] < 0x21:
                raise _NotHTTP("not an HTTP/1.x answer: it starts with %r"
                               % bytes(self._buffer[:20]))
            if self._buffer[:1] == b"\n" or self._buffer[:2] == b"\r\n":
                bare = self._buffer[:1] == b"\n"
                self.lenient |= bare
                del self._buffer[:1 if bare else 2]
                return []
            found = _HEAD_END.search(self._buffer, start)
            if found is not None:
                text = self._buffer[:found.end()].decode("latin-1")
                del self._buffer[:found.end()]
                if text.count("\n") == text.count("\r\n"):
                    return text[:-4].split("\r\n")  # every line ends with CRLF
                self.lenient = True
                lines = text.split("\n")[:-2]  # the empty line and what follows it
                return [line[:-1] if line.endswith("\r") else line for line in lines]
            if len(self._buffer) > _MAX_ANSWER_HEAD:
                raise _NotHTTP("%s over %d bytes" % (what, _MAX_ANSWER_HEAD))
            start = max(0, len(self._buffer) - 2)
            if not self._receive():
                if self._buffer:
                    raise _AnswerError("the connection ended in the %s, after %r"
                                       % (what, bytes(self._buffer[-60:])))
                raise _NoAnswer("the host closed the connection without an answer")

    def _line(self, what):
        """Return the next line ending with CRLF, without its end."""
        start = 0
        while True:
            end = self._buffer.find(b"\r\n", start)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 2]
                return line
            if len(self._buffer) > _MAX_ANSWER_HEAD:
                raise _AnswerError("%s over %d bytes" % (what, _MAX_ANSWER_HEAD))
            start = max(0, len(self._buffer) - 1)
            if not self._receive():
                raise _AnswerError("the connection ended in a %s" % what)

    def _fields(self, lines):
        """Return (headers, length, chunked, close): the headers of ``lines`` and their framing.

        Obsolete folded lines are joined to the one above with a space, as
        RFC 9112 section 5.2 asks of a user agent. Content-Length must be
        digits (a list or repeats of one value allowed); Transfer-Encoding
        must be "chunked" alone; having both is an error, never a guess.
        """
        block = "\r\n".join(lines)
        if block[:1] in (" ", "\t") or "\r\n " in block or "\r\n\t" in block:
            lines = self._unfold(lines)
            block = "\r\n".join(lines)
        if not _FIELD_LINES.fullmatch(block):
            bad = next(line for line in lines if not _ONE_FIELD_LINE.fullmatch(line))
            raise _AnswerError("malformed header line %r" % bad[:100])
        headers = {}
        length = None
        chunked = close = False
        for line in lines:
            name, _, value = line.partition(":")
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
            if name not in _FRAMING_FIELDS:
                continue
            if name == "content-length":
                values = {part.strip(" \t") for part in value.split(",")}
                if length is not None:
                    values.add(length)
                if len(values) != 1:
                    raise _AnswerError("conflicting Content-Length values %r" % value[:100])
                length = values.pop()
                if not _CONTENT_LENGTH.fullmatch(length):
                    raise _AnswerError("bad Content-Length %r" % value[:100])
            elif name == "transfer-encoding":
                if chunked or value.lower() != "chunked":
                    raise _AnswerError("Transfer-Encoding %r: only one 'chunked' is accepted"
                                       % value[:100])
                chunked = True
            else:
                close |= "close" in [token.strip(" \t").lower() for token in value.split(",")]
        if chunked and length is not None:
            raise _AnswerError("both Content-Length and Transfer-Encoding: the end of the "
                               "answer is ambiguous (RFC 9112 section 6.3)")
        return headers, None if length is None else int(length), chunked, close

    def _unfold(self, lines):
        """Join each obsolete folded line to the one above it, with a space (RFC 9112 5.2)."""
        joined = []
        for line in lines:
            fold = _OBS_FOLD.match(line)
            if fold is None:
                joined.append(line)
                continue
            if not joined:
                raise _AnswerError("a folded line before the first header line: %r"
                                   % line[:100])
            self.lenient = True
            joined[-1] = joined[-1] + " " + line[fold.end():]
        return joined

    def read(self, method, sink=None):
        """Return the _Answer to a request of ``method``, skipping interim (1xx) answers.

        The body of a 200 answer (GET) or a 207 (PROPFIND) goes to ``sink``
        when there is one; any other is kept, up to _MAX_ANSWER_BODY. A sink
        whose ``write()`` returns False cuts the body there.
        """
        for _interim in range(_MAX_INTERIM_ANSWERS + 1):
            lines = self._lines("answer head", head=True)
            status_line = _STATUS_LINE.fullmatch(lines[0])
            if status_line is None or status_line.group(1) != "1":
                raise _NotHTTP("not an HTTP/1.x status line: %r" % lines[0][:100])
            status = int(status_line.group(3))
            if status < 100:
                raise _NotHTTP("status %03d is not an HTTP status" % status)
            headers, length, chunked, close = self._fields(lines[1:])
            if status == 101:
                raise _AnswerError("101 Switching Protocols, to a request that asked for "
                                   "no upgrade")
            if status >= 200:
                break
        else:
            raise _AnswerError("more than %d interim (1xx) answers" % _MAX_INTERIM_ANSWERS)
        keep_alive = status_line.group(2) != "0" and not close
        streamed = sink is not None and status in _STREAMED_STATUSES
        body = (sink if isinstance(sink, _Sink) else _Sink(sink)) if streamed else _KeptBody()
        if method == "HEAD" or status in (204, 304):
            complete = True  # no body, whatever Content-Length says
        elif chunked:
            complete = self._chunked(body)
        elif length is not None:
            complete = self._counted(length, body)
        else:
            complete = self._until_closed(body)
            keep_alive = False
        data = b"" if streamed else b"".join(body.parts)
        reusable = complete and keep_alive and not self.lenient and not self._buffer
        return _Answer(status, headers, data, length, complete, reusable)

    def _counted(self, length, body):
        """Read a body of ``length`` bytes into ``body``; False if it was cut."""
        remaining = length
        while remaining:
            data = self._next_bytes(remaining if remaining < _BLOCK_SIZE else _BLOCK_SIZE)
            if not data:
                raise _AnswerError("the connection ended %d bytes before the end of a "
                                   "%d-byte body" % (remaining, length))
            remaining -= len(data)
            if not body.write(data):
                return False
        return True

    def _chunked(self, body):
        """Read a chunked body into ``body``, its trailers checked and dropped; False if cut."""
        while True:
            line = self._line("chunk-size line")
            size = _CHUNK_LINE.fullmatch(line)
            if size is None:
                raise _AnswerError("bad chunk-size line %r" % line[:100])
            size = int(size.group(1), 16)
            if not size:
                break
            if not self._counted(size, body):
                return False
            # Checked byte by byte: a wrong first byte fails without waiting.
            while (len(self._buffer) < 2 and self._buffer == b"\r\n"[:len(self._buffer)]
                   and self._receive()):
                pass
            if self._buffer[:2] != b"\r\n":
                raise _AnswerError("a chunk's data is followed by %r, not CRLF"
                                   % bytes(self._buffer[:2]))
            del self._buffer[:2]
        trailers = self._lines("trailer section")
        if len(trailers) > _MAX_TRAILER_LINES:
            raise _AnswerError("more than %d trailer lines" % _MAX_TRAILER_LINES)
        self._fields(trailers)  # checked as headers are, then dropped
        return True

    def _until_closed(self, body):
        """Read a body that ends with the connection into ``body``; False if cut."""
        while True:
            data = self._next_bytes(_BLOCK_SIZE)
            if not data:
                return True
            if not body.write(data):
                return False


def _read_answer(sock, method, deadline, read_timeout, sink=None):
    """Read the answer to a request of ``method`` from ``sock``; return an _Answer.

    Raises _AnswerError when the answer breaks the rules or ends early, and
    OSError (TimeoutError past the deadline) when the socket fails.
    """
    return _AnswerReader(sock, read_timeout, deadline).read(method, sink)


# --- Wire: one exchange ------------------------------------------------------

def _connect(connection, idle_timeout, deadline):
    """Open ``connection`` (TLS included) within the deadline.

    urllib3 wraps a refused or timed-out connection in errors whose text
    repeats the connection object: the socket's own error says it plainly.
    """
    connection.timeout = min(idle_timeout, deadline.remaining())
    try:
        with deadline.bounding():
            connection.connect()
    except (urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ConnectTimeoutError) as exc:
        cause = exc.__cause__
        if isinstance(cause, TimeoutError) or isinstance(
                exc, urllib3.exceptions.ConnectTimeoutError):
            raise TimeoutError("no connection within %.1f seconds"
                               % connection.timeout) from exc
        if isinstance(cause, OSError):
            raise cause from None
        raise


def _exchange(pool, host, method, path, body, headers, size, idle_timeout, deadline,
              sink=None):
    """Send one request on a kept-alive connection of ``pool``; return its _Answer.

    urllib3's pool owns the connections: it opens them (TLS and its checks
    included), keeps them and drops those the host closed. The request and
    its answer are written and read here, for every method: for a small
    file, urllib3's and http.client's layers cost more client CPU than the
    rest of the exchange (issue #5), and one reader means one set of rules.
    ``host`` is the Host header. The connection goes back to the pool only
    after an answer whose end was unambiguous and read whole, with nothing
    left over; any other is closed.
    """
    head = _request_head(method, path, host, headers)  # checked before any connection
    connection = pool._get_conn()
    reused = connection.sock is not None
    try:
        if connection.sock is None:
            _connect(connection, idle_timeout, deadline)
        try:
            sent = _send_request(connection.sock, head, body, size, idle_timeout, deadline)
            answer = _read_answer(connection.sock, method, deadline, idle_timeout, sink)
        except TimeoutError as exc:
            raise deadline.explain(idle_timeout) from exc
        if not sent and 200 <= answer.status < 300:
            raise _AnswerError("the host answered %d before it took the whole request"
                               % answer.status)
        if not (sent and answer.reusable):
            connection.close()
    except _NoAnswer as exc:
        connection.close()
        if reused:
            # A server may close an idle kept-alive connection at any time
            # (Apache's event MPM does when its workers are busy): nothing
            # was answered, so the request goes again on a new connection.
            raise _StaleConnection(str(exc)) from exc
        raise
    except BaseException:
        connection.close()  # half a request or answer: never reuse it
        raise
    finally:
        pool._put_conn(connection)
    return answer


###############################################################################
# Host kinds
###############################################################################

# What differs between kinds of media host lives in one small object per host
# entry, built once by each transport: the URL of a file, what authenticates a
# request, and what a status means. The transport sends the requests.

# --- Host kinds: directory listings ------------------------------------------

# sync and DistributedStorage.listdir() read a whole directory of a host in
# one request, or a few pages of one: WebDAV PROPFIND with Depth 1 (Apache,
# lighttpd, nginx with the dav-ext module), a JSON listing (nginx's
# "autoindex_format json", the SeaweedFS filer), or S3 ListObjectsV2. A host
# kind describes the request and gives a parser that reads the answer as it
# streams in (a listing may be far larger than a kept body); the transport
# sends it.


class _Entry(namedtuple("_Entry", "name is_dir size mtime md5")):
    """One entry of a directory listing: a file or a directory.

    ``name`` is one path segment, decoded; ``size`` is the file's bytes (None
    for a directory, or when the host did not say); ``mtime`` is seconds since
    the epoch, or None; ``md5`` is the hex MD5 of the content where the host
    gives one (the filer, an S3 object uploaded in one part), else None.
    """

    __slots__ = ()


class _ListRequest(namedtuple("_ListRequest",
                              "method url headers body status missing parser")):
    """The request that lists one page of a directory: the status of a listing, those
    that mean "no such directory", and the parser its body streams to."""

    __slots__ = ()


class _ListingError(RestoError):
    """A listing whose body is not what its kind of host sends."""


class _CannotList(RestoError):
    """A host that answers no kind of listing: sync checks it file by file."""


# A host could send a listing without end: a directory of more entries than
# this is refused (sync and listdir() hold one directory at a time).
_MAX_LISTING_ENTRIES = 2000000

# One entry of a JSON listing, or one page of the SeaweedFS filer's: more is a
# broken host, not a reason to use more memory.
_MAX_JSON_ITEM = 64 * 1024
_MAX_JSON_PAGE = 64 * 1024 * 1024


@functools.lru_cache(maxsize=4096)
def _http_date(text):
    """Return the seconds since the epoch of an HTTP date (RFC 9110 5.6.7), or None.

    Kept for the dates seen last: a listing's files share few seconds, and
    parsing one costs more than the rest of its entry.
    """
    if not text:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)  # "-0000": UTC, RFC 5322 3.3
    return moment.timestamp()


def _iso_date(text):
    """Return the seconds since the epoch of an ISO 8601 date-time (S3, the filer), or None."""
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


# NUL, the other C0 controls and DEL: never part of a file name worth keeping.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def _segment(path, directory):
    """Return the name of ``path`` directly under ``directory`` (both decoded), or None.

    ``directory`` ends with "/". The directory itself, anything outside it
    or deeper in it, and "." or ".." give None: a listing never names a
    file elsewhere.
    """
    if not path.startswith(directory):
        return None
    name = path[len(directory):]
    if name.endswith("/"):
        name = name[:-1]
    if not name or "/" in name or name in (".", "..") or _CONTROL_CHARACTER.search(name):
        return None
    return name


class _ListingParser:
    """Read a listing as its bytes arrive: a sink of _AnswerReader.

    ``close()`` returns ``(entries, next_page)``: the entries of this page
    and what asks for the next one (None on the last page).
    """

    def __init__(self):
        self.written = 0
        self.entries = []
        self.next_page = None
        self.error = None

    def write(self, data):
        """Parse ``data``; return False (stop reading) once the listing is known bad.

        The error is kept for ``close()``, so that the transport tells a bad
        listing from a failed request.
        """
        self.written += len(data)
        if self.error is None:
            try:
                self._feed(data)
                if len(self.entries) > _MAX_LISTING_ENTRIES:
                    raise _ListingError("a directory of more than %d entries"
                                        % _MAX_LISTING_ENTRIES)
            except _ListingError as error:
                self.error = error
        return self.error is None

    def _feed(self, data):
        raise NotImplementedError

    def close(self):
        """Return ``(entries, next_page)`` once the whole body was written; raise
        _ListingError for a listing that is not one."""
        if self.error is None:
            self._finish()
        if self.error is not None:
            raise self.error
        return self.entries, self.next_page

    def _finish(self):
        raise NotImplementedError


def _xml_name(element):
    """Return the tag of ``element`` without its namespace."""
    return element.tag.rpartition("}")[2]


# An XML listing of up to this many bytes is kept and parsed whole once it
# has all arrived: expat and the C tree builder alone, with no event per
# element for Python to read (a quarter less time on Apache's listings,
# measured). A longer one is parsed as it streams, one record at a time.
_XML_LISTING_KEPT = 512 * 1024


class _XMLListingParser(_ListingParser):
    """Parse an XML listing: each element whose local name is in ``records``,
    at any depth below the root, is handed to ``_record()``; then ``_top()``
    reads the root (paging). A root that is itself a record is not a listing.

    A listing longer than _XML_LISTING_KEPT is parsed as it streams: each
    record is emptied once read, so memory holds the entries and an empty
    shell per record, not the tree. Only "end" events are asked for: half
    the events of "start" and "end". Records come in document order when
    kept, in the order they end when streamed; listings are sorted after.

    A document type declaration is refused, as in S3's answers: no listing
    has one, and its entities would let a small listing grow a hundredfold.
    """

    records = ()

    def __init__(self):
        super().__init__()
        self._kept = bytearray()  # the body so far, while it is short
        self._stream = None  # the pull parser, once it is not
        self._root = None
        self._tail = b""  # the end of the last piece: a declaration may straddle two

    def _feed(self, data):
        if b"<!DOCTYPE" in self._tail + data[:16] or b"<!DOCTYPE" in data:
            raise _ListingError("a document type declaration, which no listing has")
        self._tail = (self._tail + data[-8:])[-8:]
        if self._stream is None:
            self._kept += data
            if len(self._kept) <= _XML_LISTING_KEPT:
                return
            self._stream = xml.etree.ElementTree.XMLPullParser(events=("end",))
            data, self._kept = bytes(self._kept), None
        try:
            self._stream.feed(data)
            self._drain()
        except xml.etree.ElementTree.ParseError as error:
            raise _ListingError("not a well-formed XML listing (%s)" % error) from None

    def _drain(self):
        records = self.records
        for _event, element in self._stream.read_events():
            local = element.tag.rpartition("}")[2]  # _xml_name(), inline: per element
            if local in records:
                self._record(local, element)
                element.clear()
            self._root = element  # the root ends last

    def _finish(self):
        try:
            if self._stream is not None:
                self._stream.close()
                self._drain()
                root = self._root
            else:
                parser = xml.etree.ElementTree.XMLParser()
                parser.feed(self._kept)
                self._kept = None
                root = self._root = parser.close()
        except xml.etree.ElementTree.ParseError as error:
            raise _ListingError("not a well-formed XML listing (%s)" % error) from None
        if root is None:
            raise _ListingError("an empty listing")
        local = _xml_name(root)
        if local in self.records:
            raise _ListingError("not a listing: its root is a <%s>" % local)
        if self._stream is None:
            for element in self._records_in(root):
                self._record(_xml_name(element), element)
        self._top(root)

    def _records_in(self, root):
        """Return the records below ``root``, a whole tree, in document order."""
        records = self.records
        return [element for element in root.iter() if _xml_name(element) in records]

    def _record(self, local, element):
        raise NotImplementedError

    def _top(self, root):
        """Read what the root element says once all records are read (paging)."""


def _local_children(element):
    """Return {local name: element} of the direct children of ``element``."""
    return {_xml_name(child): child for child in element}


class _WebDAVListingParser(_XMLListingParser):
    """Parse a 207 Multi-Status answer to PROPFIND with Depth 1 (RFC 4918 14.16).

    Each ``response`` names one resource by its ``href`` (an absolute URL or
    path, percent-encoded); its properties come from the ``propstat`` whose
    status is 200. The listed collection itself, and any href not directly
    under it, are left out.
    """

    records = ("response",)

    def __init__(self, directory):
        super().__init__()
        self._directory = directory  # the decoded path, ending with "/"

    def _records_in(self, root):
        # Only DAV: responses are read (below): found by the C tree walk.
        return root.iter("{DAV:}response")

    def _record(self, local, response):
        if response.tag != "{DAV:}response":
            return
        # The children are walked by hand: find() and findtext() cost more
        # than the rest of an entry.
        href = None
        props = {}
        for child in response:
            if child.tag == "{DAV:}href":
                href = child.text
            elif child.tag == "{DAV:}propstat":
                status = prop = None
                for part in child:
                    if part.tag == "{DAV:}status":
                        status = part.text
                    elif part.tag == "{DAV:}prop":
                        prop = part
                fields = (status or "").split()
                if prop is not None and len(fields) > 1 and fields[1] == "200":
                    for item in prop:
                        props[item.tag] = item
        if not href:
            return
        href = href.strip()
        try:
            path = unquote(href if href[:1] == "/" else urlsplit(href).path, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return  # not a name a storage could have written
        name = _segment(path, self._directory)
        if name is None:
            return
        kind = props.get("{DAV:}resourcetype")
        is_dir = kind is not None and kind.find("{DAV:}collection") is not None
        length = props.get("{DAV:}getcontentlength")
        size = None
        if not is_dir and length is not None and (length.text or "").strip().isdigit():
            size = int(length.text.strip())
        modified = props.get("{DAV:}getlastmodified")
        mtime = _http_date(modified.text) if modified is not None else None
        self.entries.append(_Entry(name, is_dir, size, mtime, None))


# The properties a listing asks for (RFC 4918 section 9.1).
_PROPFIND_LISTING = (b'<?xml version="1.0" encoding="utf-8"?>\n'
                     b'<propfind xmlns="DAV:"><prop><resourcetype/><getcontentlength/>'
                     b'<getlastmodified/></prop></propfind>\n')


class _S3ListingParser(_XMLListingParser):
    """Parse a ListObjectsV2 answer (ListBucketResult), asked with delimiter "/".

    ``Contents`` are the files under ``prefix`` (their key less the
    prefix), ``CommonPrefixes`` its directories; an object whose key is the
    prefix itself (a "directory marker") is left out. The ETag of an object
    uploaded in one part is its MD5; a multipart one ("...-N") is not.
    """

    records = ("Contents", "CommonPrefixes")

    def __init__(self, prefix):
        super().__init__()
        self._prefix = prefix

    def _record(self, local, element):
        fields = _local_children(element)
        if local == "CommonPrefixes":
            prefix = fields.get("Prefix")
            name = _segment("/" + (prefix.text or ""), "/" + self._prefix) \
                if prefix is not None else None
            if name is not None:
                self.entries.append(_Entry(name, True, None, None, None))
            return
        key = fields.get("Key")
        if key is None or key.text is None:
            return
        name = _segment("/" + key.text, "/" + self._prefix)
        if name is None or key.text.endswith("/"):
            return
        size_text = fields["Size"].text if "Size" in fields else None
        size = int(size_text) if size_text and size_text.strip().isdigit() else None
        mtime = _iso_date(fields["LastModified"].text) if "LastModified" in fields else None
        etag = (fields["ETag"].text or "").strip().strip('"').lower() if "ETag" in fields \
            else ""
        md5 = etag if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag) else None
        self.entries.append(_Entry(name, False, size, mtime, md5))

    def _top(self, root):
        fields = _local_children(root)
        truncated = fields.get("IsTruncated")
        token = fields.get("NextContinuationToken")
        if truncated is not None and (truncated.text or "").strip() == "true":
            if token is None or not token.text:
                raise _ListingError("a truncated listing without NextContinuationToken")
            self.next_page = token.text


_JSON_DECODER = json.JSONDecoder()

# The filer marks a directory with Go's os.ModeDir in its Mode.
_FILER_DIRECTORY_MODE = 1 << 31


class _JSONListingParser(_ListingParser):
    """Parse a JSON listing: nginx's autoindex array, or a page of the SeaweedFS filer.

    nginx sends ``[{"name": ..., "type": "file"|"directory", "mtime": HTTP
    date, "size": n}, ...]``: read one object at a time as the bytes come,
    each decoded by the standard library's JSON decoder, so memory holds
    the entries and at most one object's text. The filer sends one object
    per page, ``{"Entries": [...], "LastFileName": ..., "ShouldDisplayLoadMore":
    ...}``, kept whole up to _MAX_JSON_PAGE bytes.
    """

    def __init__(self, directory):
        super().__init__()
        self._directory = directory  # the decoded path, ending with "/"
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._position = 0
        self._shape = None  # "array" (nginx) or "object" (the filer)
        self._ended = False

    def _feed(self, data):
        try:
            self._text += self._decoder.decode(data)
        except UnicodeDecodeError as error:
            raise _ListingError("a JSON listing that is not UTF-8 (%s)" % error) from None
        if self._shape is None:
            start = self._text.lstrip()
            if not start:
                return
            if start[0] not in "[{":
                raise _ListingError("not a JSON listing (it starts with %r)" % start[:40])
            self._shape = "array" if start[0] == "[" else "object"
            self._position = len(self._text) - len(start) + 1
        if self._shape == "array":
            self._items()
        elif len(self._text) > _MAX_JSON_PAGE:
            raise _ListingError("a JSON listing page over %d bytes" % _MAX_JSON_PAGE)

    def _items(self):
        """Decode every whole object of the array the text holds so far."""
        decoder = _JSON_DECODER
        text = self._text
        position = self._position
        while not self._ended:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position == len(text):
                break
            if text[position] == "]":
                self._ended = True
                position += 1
                break
            if text[position] != "{":
                raise _ListingError("a JSON listing item that is not an object, at %r"
                                    % text[position:position + 40])
            try:
                item, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                if len(text) - position > _MAX_JSON_ITEM:
                    raise _ListingError("a JSON listing item over %d bytes, or not JSON "
                                        "(%s)" % (_MAX_JSON_ITEM, error)) from None
                break  # the rest of the object is still to come
            self._nginx_item(item)
            position = end
        self._text = text[position:]
        self._position = 0

    def _nginx_item(self, item):
        name = item.get("name")
        kind = item.get("type")
        if not isinstance(name, str) or kind not in ("file", "directory"):
            return  # "other" (a socket, a device): nothing to sync
        name = _segment(self._directory + name, self._directory)
        if name is None:
            return
        size = item.get("size") if kind == "file" else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            size = None
        mtime = item.get("mtime")
        self.entries.append(_Entry(name, kind == "directory", size,
                                   _http_date(mtime) if isinstance(mtime, str) else None,
                                   None))

    def _finish(self):
        self._feed(b"")
        try:
            self._text += self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise _ListingError("a JSON listing that is not UTF-8 (%s)" % error) from None
        if self._shape == "array":
            self._items()
            if not self._ended or self._text.strip():
                raise _ListingError("a JSON listing that ends before its closing ']'")
            return
        if self._shape is None:
            raise _ListingError("an empty listing")
        try:
            page = json.loads("{" + self._text[self._position:])
        except json.JSONDecodeError as error:
            raise _ListingError("not a JSON listing (%s)" % error) from None
        self._filer_page(page)

    def _filer_page(self, page):
        entries = page.get("Entries") if isinstance(page, dict) else None
        if not isinstance(page, dict) or "Path" not in page:
            raise _ListingError("a JSON object that is not a SeaweedFS filer listing")
        for item in entries or ():
            if not isinstance(item, dict) or not isinstance(item.get("FullPath"), str):
                continue
            name = _segment(item["FullPath"], self._directory)
            if name is None:
                continue
            mode = item.get("Mode")
            is_dir = isinstance(mode, int) and bool(mode & _FILER_DIRECTORY_MODE)
            size = item.get("FileSize")
            if is_dir or not isinstance(size, int) or size < 0:
                size = None
            md5 = item.get("Md5")
            try:
                md5 = base64.b64decode(md5, validate=True).hex() if md5 else None
            except (TypeError, ValueError):
                md5 = None
            if md5 is not None and len(md5) != 32:
                md5 = None
            mtime = item.get("Mtime")
            self.entries.append(_Entry(name, is_dir, size,
                                       _iso_date(mtime) if isinstance(mtime, str) else None,
                                       md5))
        last = page.get("LastFileName")
        if page.get("ShouldDisplayLoadMore") and isinstance(last, str) and last:
            self.next_page = last


# Entries asked for per page of the filer (nginx ignores the query string).
_JSON_PAGE_SIZE = 1000
# Keys asked for per page of ListObjectsV2 (S3's own maximum).
_S3_PAGE_SIZE = 1000


# --- Host kinds: plain HTTP and WebDAV ---------------------------------------

# What a PUT may answer: created, or overwritten.
_PUT_STATUSES = (201, 200, 204)

# What a WebDAV server answers a PUT whose parent collection is missing:
# 409 per RFC 4918 section 9.7.1; some servers say 404 or 403, and nginx
# without create_full_put_path says 500 (its rename() fails).
_MISSING_PARENT_STATUSES = frozenset((409, 404, 403, 500))

# Asks for one property of one resource (RFC 4918 section 9.1): its type.
_PROPFIND_RESOURCETYPE = (b'<?xml version="1.0" encoding="utf-8"?>\n'
                          b'<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>\n')

# Collections known to exist, as URLs ending with "/", and the origins
# ("scheme://netloc") that need them are kept by the process
# (_process.known_collections, _process.collection_hosts), so that later
# saves into a known directory pay nothing; at most this many collections.
_MAX_KNOWN_COLLECTIONS = 100000


def _collection_paths(path):
    """Return the collections above ``path``, top down: "/a/b/c" -> ["/a/", "/a/b/"]."""
    segments = path.split("/")[1:-1]
    return ["/" + "".join(segment + "/" for segment in segments[:depth])
            for depth in range(1, len(segments) + 1)]


class _HTTPHost:
    """A media host that takes PUT and DELETE over HTTP: nginx, Apache, lighttpd.

    A file's URL is the entry's origin, MEDIA_URL's path, then the name. A
    WebDAV server that wants parent collections first says so by refusing
    a PUT (see _MISSING_PARENT_STATUSES): ``collections()`` lists those to
    make, and the process remembers the hosts that needed them.
    """

    put_statuses = _PUT_STATUSES
    # The path's "." and ".." segments are resolved before sending, as urllib3 does.
    normalize_paths = True
    # How a directory may be listed, tried in this order until one works.
    list_dialects = ("webdav", "json")
    # Whether the ETag of a HEAD answer is the MD5 of the content: not here
    # (nginx, Apache and lighttpd make theirs from the size and mtime).
    etag_is_md5 = False
    # No plain host verifies a checksum sent with a body, or takes an upload
    # in parts: integrity there is what check and sync compare afterwards.
    body_checksum = None
    multipart = False

    def __init__(self, entry, endpoint, base_path, auth_headers):
        self.entry = entry
        self.origin = "%s://%s" % (endpoint.scheme, endpoint.netloc)
        self._files = self.origin + base_path
        self._auth_headers = auth_headers
        # The dialect that listed a directory (None: not known yet; False:
        # none works), and why the others were refused.
        self.dialect = None
        self.refused = {}

    def url(self, name):
        """Return the URL of ``name`` on this host."""
        return self._files + quote(name, safe="/")

    def sign(self, method, url, headers):
        """Return ``headers`` with RESTO_HTTP_AUTH's, if any."""
        return dict(headers, **self._auth_headers) if self._auth_headers else headers

    def stored(self, status):
        """Return what a PUT's accepted ``status`` says: 201 created, 200 or 204 overwritten."""
        return status

    def hint(self, method, status, body):
        """Return what usually causes ``status`` on ``method``, or None."""
        return _status_hint(method, status)

    def worth_retrying(self, status, body):
        """Tell whether an answer besides 502, 503 and 504 asks to try again: never."""
        return False

    @property
    def needs_collections(self):
        """Tell whether this host was seen to need parent collections."""
        hosts = _process.collection_hosts
        return bool(hosts) and self.origin in hosts

    def collections(self, url):
        """Return the collection URLs above ``url``, top down, e.g. ``.../media/a/``."""
        return [self.origin + path for path in _collection_paths(urlsplit(url).path)]

    def list_request(self, directory, dialect, page=None):
        """Return the _ListRequest of a page of ``directory`` ("" the top, "a/b" below).

        "webdav": PROPFIND with Depth 1, answered 207. "json": GET of the
        directory's URL with ``Accept: application/json``, answered 200 by
        nginx's JSON autoindex (which ignores the query) and by the filer,
        which pages with ``limit`` and ``lastFileName``.
        """
        url = self._files + (quote(directory, safe="/") + "/" if directory else "")
        path = unquote(urlsplit(url).path)
        if dialect == "webdav":
            headers = {"Depth": "1", "Content-Type": "application/xml; charset=utf-8",
                       "Content-Length": str(len(_PROPFIND_LISTING))}
            return _ListRequest("PROPFIND", url, headers, _PROPFIND_LISTING, 207, (404, 410),
                                _WebDAVListingParser(path))
        query = "?limit=%d" % _JSON_PAGE_SIZE
        if page is not None:
            query += "&lastFileName=" + quote(page, safe="")
        return _ListRequest("GET", url + query, {"Accept": "application/json"}, None, 200,
                            (404, 410), _JSONListingParser(path))


# --- Host kinds: S3 ----------------------------------------------------------

# AWS Signature Version 4, for the S3 hosts: written from AWS's description
# of header-based signing, with the standard library only.

# Sent as the payload hash of every request but the few with a small XML
# body: an upload is streamed without being read twice (its integrity is
# checked by its CRC-32 instead, see _S3_CHECKSUM_HEADER), and GET, HEAD and
# DELETE carry no body to hash.
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

_SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"

# Headers a proxy or the HTTP library may add, drop or rewrite on the way:
# signing them would make a correct request fail verification.
_SIGV4_UNSIGNED_HEADERS = frozenset((
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
))


# Derived signing keys change once a day per region and service: deriving one
# costs four HMACs, so the process keeps the few in use (_process.sigv4_keys,
# cleared when it grows).
_sigv4_key_lock = threading.Lock()
_SIGV4_KEY_CACHE_SIZE = 32


def _sigv4_hmac(key, message):
    """Return the HMAC-SHA256 digest of the text ``message`` under ``key``."""
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def _sigv4_signing_key(secret_key, date, region, service):
    """Return the derived signing key for one day, region and service."""
    cache_key = (secret_key, date, region, service)
    keys = _process.sigv4_keys
    key = keys.get(cache_key)
    if key is None:
        key = _sigv4_hmac(("AWS4%s" % secret_key).encode("utf-8"), date)
        for part in (region, service, "aws4_request"):
            key = _sigv4_hmac(key, part)
        with _sigv4_key_lock:
            if len(keys) >= _SIGV4_KEY_CACHE_SIZE:
                keys.clear()
            keys[cache_key] = key
    return key


def _sigv4_encode(text, safe=""):
    """Percent-encode ``text`` as SigV4 wants: all but A-Z a-z 0-9 - _ . ~, in upper hex."""
    # quote() never encodes those four marks and writes upper-case hex.
    return quote(text, safe=safe)


def _sigv4_canonical_uri(path):
    """Return the canonical URI of an already percent-encoded ``path``.

    S3 encodes the object key once (no double encoding) and does not
    normalise "." or "//" segments. Decoding first means a path encoded
    differently (lower-case hex, a needless %7E) still signs as the server,
    which decodes the path and encodes it again, will check it.
    """
    return _sigv4_encode(unquote(path), safe="/") or "/"


def _sigv4_canonical_query(query):
    """Return the canonical query string: each name and value encoded, sorted."""
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        # "+" stays a plus sign: the transport writes a space as %20.
        pairs.append((_sigv4_encode(unquote(name)), _sigv4_encode(unquote(value))))
    pairs.sort()
    return "&".join("%s=%s" % pair for pair in pairs)


def _sigv4_timestamp(now):
    """Return the X-Amz-Date value (YYYYMMDDTHHMMSSZ, UTC) for ``now``."""
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    elif now.tzinfo is not None:
        now = now.astimezone(datetime.UTC)
    # A naive datetime is taken to be UTC already.
    return now.strftime("%Y%m%dT%H%M%SZ")


def _sigv4_headers(method, url, headers, access_key, secret_key, region, now=None,
                   payload_hash=_UNSIGNED_PAYLOAD, service="s3"):
    """Return the headers that sign the request (Authorization, X-Amz-Date, ...).

    ``url`` is the URL exactly as sent, its path already percent-encoded;
    ``headers`` are the other headers sent with it. The returned Host,
    X-Amz-Date, X-Amz-Content-Sha256 and Authorization must all be added to
    them: Host is given explicitly so that the very value that was signed is
    sent. ``now`` is a datetime (naive means UTC), by default the current time;
    ``payload_hash`` is the hex SHA-256 of the body, or UNSIGNED-PAYLOAD.
    """
    parts = urlsplit(url)
    timestamp = _sigv4_timestamp(now)
    date = timestamp[:8]
    added = {
        "X-Amz-Date": timestamp,
        "X-Amz-Content-Sha256": payload_hash,
    }
    signed = {}
    for name, value in headers.items():
        lower = name.lower()
        if value is None or lower in _SIGV4_UNSIGNED_HEADERS or lower in ("x-amz-date",
                                                                          "x-amz-content-sha256"):
            continue
        # Trim and fold runs of blanks, as the server does before it checks.
        signed[lower] = " ".join(str(value).split())
    if "host" not in signed:
        added["Host"] = _host_header(parts)
        signed["host"] = added["Host"]
    signed["x-amz-date"] = timestamp
    signed["x-amz-content-sha256"] = payload_hash
    names = sorted(signed)
    signed_headers = ";".join(names)
    canonical_request = "\n".join((
        method.upper(),
        _sigv4_canonical_uri(parts.path),
        _sigv4_canonical_query(parts.query),
        "".join("%s:%s\n" % (name, signed[name]) for name in names),
        signed_headers,
        payload_hash,
    ))
    scope = "%s/%s/%s/aws4_request" % (date, region, service)
    string_to_sign = "\n".join((
        _SIGV4_ALGORITHM,
        timestamp,
        scope,
        hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
    ))
    key = _sigv4_signing_key(secret_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    added["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        _SIGV4_ALGORITHM, access_key, scope, signed_headers, signature)
    return added


# The error code of an S3 error body, e.g. <Code>SignatureDoesNotMatch</Code>.
_S3_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


def _s3_error_code(body):
    """Return the ``<Code>`` of the S3 error body ``body`` as text, or None."""
    code = _S3_ERROR_CODE.search(body[:4096]) if body else None
    return code.group(1).decode("ascii") if code else None


# S3 errors after which the same request may succeed (see worth_retrying()).
_S3_RETRY_CODES = frozenset(("BadDigest", "RequestTimeout", "InternalError"))

# What S3 hosts verify of every upload's body (a single PUT, each part of a
# multipart upload): its CRC-32, as zlib computes it, sent base64-encoded in
# this header. AWS S3 and the SeaweedFS gateway refuse a body that does not
# match (400 BadDigest); they verify Content-MD5 and x-amz-checksum-sha256
# too, but CRC-32 costs the least: on the reference machine zlib's runs at
# 6.4 GB/s, SHA-256 at 1.8 GB/s (with SHA-NI), MD5 at 0.8 GB/s. A signed
# payload hash (X-Amz-Content-Sha256) is verified by AWS only.
_S3_CHECKSUM_HEADER = "x-amz-checksum-crc32"
_S3_CHECKSUM_ALGORITHM = "CRC32"


def _crc32_text(crc):
    """Return the CRC-32 ``crc`` as S3 writes it: 4 bytes, big-endian, in base64."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


# What usually causes an S3 error, by its code; then by status alone.
_S3_CODE_HINTS = {
    "BadDigest": "The body arrived damaged (its CRC-32 did not match the one sent with "
                 "it) on every attempt: look for a faulty proxy, NIC or link between this "
                 "server and the object store, or a file that changed while it was sent.",
    "EntityTooSmall": "A part other than the last is under the store's minimum part size: "
                      "raise RESTO_S3_PART_SIZE.",
    "NoSuchUpload": "The multipart upload is gone: it was aborted meanwhile (by a lifecycle "
                    "rule or another client) or it expired.",
    "InvalidPart": "The store does not hold a part as CompleteMultipartUpload listed it "
                   "(a part overwritten meanwhile by another upload of the same name?).",
}
_S3_STATUS_HINTS = {
    301: "301: the bucket is in another region or at another endpoint; set ?region= in "
         "the host entry or RESTO_S3_REGION.",
    400: "400: check the region (RESTO_S3_REGION or ?region= in the host entry).",
    403: "403 from the object store: check RESTO_S3_ACCESS_KEY_ID, "
         "RESTO_S3_SECRET_ACCESS_KEY, the bucket's policy and this server's clock.",
    404: "404: the bucket does not exist; create it first.",
}


class _S3Host:
    """An S3 bucket, path-style: ``s3+https://endpoint/bucket[/prefix]``.

    A file's key is the entry's prefix, else MEDIA_URL's path, then the
    name. Every request is signed (AWS Signature Version 4); keys keep
    their "." segments, since the signature covers the path as sent.
    """

    put_statuses = (200,)
    normalize_paths = False
    needs_collections = False
    list_dialects = ("s3",)
    # The ETag of an object uploaded in one part is its MD5 (a multipart
    # one's ends with "-N" and is not).
    etag_is_md5 = True
    body_checksum = _S3_CHECKSUM_HEADER
    multipart = True

    def __init__(self, entry, endpoint, base_path, credentials, region):
        self.entry = entry
        self.origin = "%s://%s" % (endpoint.scheme, endpoint.netloc)
        prefix = base_path.lstrip("/") if endpoint.prefix is None else endpoint.prefix
        self._files = "%s/%s/%s" % (self.origin, quote(endpoint.bucket, safe=_PATH_SAFE),
                                    quote(prefix, safe=_PATH_SAFE))
        self._bucket_url = "%s/%s" % (self.origin, quote(endpoint.bucket, safe=_PATH_SAFE))
        self._prefix = unquote(prefix)  # keys are listed decoded
        self.dialect = None
        self.refused = {}
        self._credentials = credentials
        self._region = endpoint.region or region

    def url(self, name):
        """Return the URL of ``name``'s object."""
        return self._files + quote(name, safe="/")

    def sign(self, method, url, headers):
        """Return ``headers`` with the SigV4 headers that sign the request."""
        access_key, secret_key = self._credentials
        if not access_key or not secret_key:
            raise ImproperlyConfigured(
                "%s is an S3 host, but RESTO_S3_ACCESS_KEY_ID or "
                "RESTO_S3_SECRET_ACCESS_KEY is not set." % self.entry)
        headers = dict(headers)
        payload_hash = headers.pop("X-Amz-Content-Sha256", _UNSIGNED_PAYLOAD)
        headers.update(_sigv4_headers(method, url, headers, access_key, secret_key,
                                      self._region, payload_hash=payload_hash))
        return headers

    def uploads_url(self, url):
        """Return the URL that starts a multipart upload of the object at ``url``."""
        return url + "?uploads"

    def part_url(self, url, upload_id, number):
        """Return the URL of part ``number`` of the upload ``upload_id`` of ``url``."""
        return "%s?partNumber=%d&uploadId=%s" % (url, number, _sigv4_encode(upload_id))

    def upload_url(self, url, upload_id):
        """Return the URL that completes or aborts the upload ``upload_id`` of ``url``."""
        return "%s?uploadId=%s" % (url, _sigv4_encode(upload_id))

    def stored(self, status):
        """Return 201: S3 answers 200 whether or not the object existed."""
        return 201

    def hint(self, method, status, body):
        """Return what usually causes ``status``, led by the ``<Code>`` of the error body."""
        code = _s3_error_code(body)
        return " ".join(filter(None, (
            "S3 error %s." % code if code else None,
            _S3_CODE_HINTS.get(code) or _S3_STATUS_HINTS.get(status)
            or _status_hint(method, status)))) or None

    def worth_retrying(self, status, body):
        """Tell whether an S3 error asks to send the request again.

        A body damaged on the way (BadDigest) or too slow to arrive
        (RequestTimeout) may pass on the next attempt, and AWS asks clients
        to retry an InternalError.
        """
        return status in (400, 500) and _s3_error_code(body) in _S3_RETRY_CODES

    def collections(self, url):
        """Return no collections: an object store has none."""
        return []

    def list_request(self, directory, dialect, page=None):
        """Return the _ListRequest of a page of ``directory``: ListObjectsV2 with
        delimiter "/" under the directory's key prefix, continued by ``page``."""
        prefix = self._prefix + (directory + "/" if directory else "")
        query = [("list-type", "2"), ("delimiter", "/"), ("max-keys", str(_S3_PAGE_SIZE)),
                 ("prefix", prefix)]
        if page is not None:
            query.append(("continuation-token", page))
        url = "%s?%s" % (self._bucket_url,
                         "&".join("%s=%s" % (key, quote(value, safe="")) for key, value in query))
        # A prefix with no keys is an empty listing: a 404 is a missing bucket.
        return _ListRequest("GET", url, {}, None, 200, (), _S3ListingParser(prefix))


# --- Host kinds: S3 XML documents --------------------------------------------

# Multipart uploads exchange small XML documents: the answer to
# CreateMultipartUpload names the upload, CompleteMultipartUpload lists the
# parts, and its answer says whether the object was assembled (S3 may answer
# 200 and put an error in the body). They are parsed from answers bounded
# to _MAX_ANSWER_BODY, with xml.etree.

# The namespace of S3's documents.
_S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _s3_document(data):
    """Return the root element of the S3 XML document ``data``; ValueError if it is none.

    A document type declaration is refused: S3 never sends one, and its
    entities would let a small answer grow. Blanks before the document are
    skipped: AWS sends some to keep a slow CompleteMultipartUpload alive.
    """
    data = data.lstrip(b" \t\r\n")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError("a document type declaration, which S3 never sends")
    try:
        return xml.etree.ElementTree.fromstring(data)
    except xml.etree.ElementTree.ParseError as error:
        raise ValueError("a body that is not XML (%s): %r" % (error, data[:100])) from None


def _xml_child_text(element, name):
    """Return the text of ``element``'s first child called ``name`` (any namespace), or None."""
    for child in element:
        if _xml_name(child) == name:
            return child.text or ""
    return None


def _s3_upload_id(data):
    """Return the UploadId of an InitiateMultipartUploadResult document; ValueError if none."""
    root = _s3_document(data)
    if _xml_name(root) != "InitiateMultipartUploadResult":
        raise ValueError("a %s document" % _xml_name(root)[:64])
    upload_id = _xml_child_text(root, "UploadId")
    if not upload_id:
        raise ValueError("an InitiateMultipartUploadResult without an UploadId")
    return upload_id


def _s3_complete_body(parts):
    """Return the CompleteMultipartUpload document of ``parts``: (number, ETag, CRC-32) in order."""
    element = xml.etree.ElementTree.SubElement
    root = xml.etree.ElementTree.Element("CompleteMultipartUpload", xmlns=_S3_XMLNS)
    for number, etag, checksum in parts:
        part = element(root, "Part")
        element(part, "ETag").text = etag
        element(part, "PartNumber").text = str(number)
        element(part, "Checksum" + _S3_CHECKSUM_ALGORITHM).text = checksum
    return xml.etree.ElementTree.tostring(root, encoding="utf-8")


def _s3_completion_error(data):
    """Return the error code in an answer to CompleteMultipartUpload, or None if it completed.

    Raises ValueError when the answer is neither a result nor an error.
    """
    root = _s3_document(data)
    if _xml_name(root) == "CompleteMultipartUploadResult":
        return None
    if _xml_name(root) == "Error":
        return _xml_child_text(root, "Code") or "(no code)"
    raise ValueError("a %s document" % _xml_name(root)[:64])


###############################################################################
# Transport
###############################################################################

# Answers that say "try again": the request did not take effect.
_RETRY_STATUSES = frozenset((502, 503, 504))

# First pause before a retry, doubled on each further attempt, with jitter.
_RETRY_BACKOFF = 0.05


def _tls_pool_kwargs(ca_bundle, tls_verify):
    """Return the urllib3 pool keywords for HTTPS hosts (checked values); warn once if
    unverified."""
    if not tls_verify:
        if not _process.insecure_warned:
            _process.insecure_warned = True
            logger.warning(
                "RESTO_TLS_VERIFY is False: the TLS certificates of the media hosts "
                "are not verified, so anyone on the path can read or change uploads.")
        return {"cert_reqs": "CERT_NONE", "assert_hostname": False}
    return {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_bundle}


class _Discard:
    """A binary sink that keeps nothing (to count the bytes of a GET)."""

    def write(self, data):
        """Drop ``data``; return its length."""
        return len(data)


class _ListingRefused(Exception):
    """A host refused a dialect of listing, or answered it with something else."""


# What a host that does not list in a dialect answers: method not allowed or
# not implemented (no WebDAV), forbidden (nginx with autoindex off), not
# acceptable, a bad request.
_LIST_REFUSALS = frozenset((400, 403, 405, 406, 415, 501))

def _entry_name(entry):
    """Return the name of an _Entry: listings are sorted by it."""
    return entry.name


# An MD5 in hex, as an ETag may be.
_MD5_HEX = re.compile("[0-9a-f]{32}")


def _not_found(name, host):
    """Return the FileNotFoundError for ``name`` missing on ``host``."""
    return FileNotFoundError(errno.ENOENT, "%s not found on %s" % (name, host), name)


def _remaining_size(content):
    """Return how many bytes of ``content`` (bytes or binary file) remain to send."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    try:
        return os.fstat(content.fileno()).st_size - content.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        position = content.tell()
        end = content.seek(0, os.SEEK_END)
        content.seek(position)
        return end - position


# --- Transport: reading uploads by position ----------------------------------

def _regular_file_descriptor(content):
    """Return the descriptor of the regular file behind ``content``, or None."""
    try:
        fd = content.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd if stat.S_ISREG(mode) else None


def _pread(fd, position, length):
    """Return up to ``length`` bytes of ``fd`` from ``position``: fewer only at its end."""
    blocks = []
    got = 0
    while got < length:
        block = os.pread(fd, length - got, position + got)
        if not block:
            break
        blocks.append(block)
        got += len(block)
    return blocks[0] if len(blocks) == 1 else b"".join(blocks)


# Blocks in which a file is read to compute its checksum.
_CHECKSUM_BLOCK = 1024 * 1024


def _content_crc32(content, size):
    """Return the CRC-32 of the ``size`` bytes of ``content`` from its position, kept.

    A payload's reader knows the CRC-32 of its whole file, computed once
    for every host (see _Payload.crc32()); bytes are summed at once; any
    other file is read through once, in blocks, and put back where it was.
    """
    if isinstance(content, (bytes, bytearray, memoryview)):
        return zlib.crc32(content)
    start = content.tell()
    known = getattr(content, "crc32", None)
    if known is not None and start == 0 and size == content.size:
        return known()
    crc = 0
    try:
        remaining = size
        while remaining > 0:
            block = content.read(min(_CHECKSUM_BLOCK, remaining))
            if not block:
                break  # a file shorter than its size: sending it says so
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
    finally:
        content.seek(start)
    return crc


def _part_reader(content):
    """Return ``read(offset, length)``, giving bytes of ``content`` counted from its position.

    Bytes are sliced without a copy. A payload's reader (``read_at``) and a
    regular file are read by position (os.pread), so that the parts in
    flight never share a file position; any other file is read under a lock.
    """
    if isinstance(content, (bytes, bytearray, memoryview)):
        view = memoryview(content)
        return lambda offset, length: view[offset:offset + length]
    start = content.tell()
    read_at = getattr(content, "read_at", None)
    if read_at is None:
        fd = _regular_file_descriptor(content)
        if fd is not None:
            read_at = functools.partial(_pread, fd)
        else:
            lock = threading.Lock()

            def read_at(position, length):
                with lock:
                    content.seek(position)
                    return content.read(length)
    return lambda offset, length: read_at(start + offset, length)


# --- Transport: multipart uploads --------------------------------------------

_MIB = 1024 * 1024


class _MultipartUpload:
    """One file sent to one S3 host as a multipart upload.

    CreateMultipartUpload (with the file's headers), then the parts, at most
    RESTO_S3_PARTS_IN_FLIGHT at once, then CompleteMultipartUpload listing
    them. Each part is read once from the source, by its position, into
    memory, and sent from there with its CRC-32; a retry (RESTO_RETRIES,
    each part on its own) sends the same bytes again. So one upload holds at
    most parts in flight x part size bytes. After any failure, and when the
    caller is cancelled (a gevent.Timeout, a kill, KeyboardInterrupt), no
    part is left in flight and the upload is aborted (AbortMultipartUpload),
    so that the store keeps no part nobody sees. The parts run on greenlets
    where gevent patched sockets, on threads elsewhere.
    """

    def __init__(self, transport, kind, name, url, content, size, headers):
        self.transport = transport
        self.kind = kind
        self.host = kind.entry
        self.name = name
        self.url = url
        self.size = size
        self.headers = headers
        self.read = _part_reader(content)
        # Parts grow, by whole MiB, when 10,000 of them would not hold the file.
        smallest = -(-size // _S3_MAX_PARTS)
        self.part_size = max(transport.s3_part_size, -(-smallest // _MIB) * _MIB)
        self.count = -(-size // self.part_size)
        self.in_flight = min(transport.s3_parts_in_flight, self.count)
        self.upload_id = None
        self.parts = [None] * self.count
        self.failures = []  # (part number, exception)
        self.taken = 0
        self.stopped = False
        self.lock = threading.Lock()

    def run(self):
        """Send the file in parts; on failure abort the upload and raise what failed."""
        self.upload_id = self._create()
        try:
            self._send_parts()
            if self.failures:
                raise min(self.failures, key=lambda failure: failure[0])[1]
            self._complete()
        except BaseException:
            self._abort()
            raise

    def _create(self):
        """Start the upload with the file's headers (CreateMultipartUpload); return its id."""
        url = self.kind.uploads_url(self.url)
        headers = dict(self.headers, **{"Content-Length": "0",
                                        "x-amz-checksum-algorithm": _S3_CHECKSUM_ALGORITHM})
        answer = self.transport._request("POST", url, self.host, headers=headers)
        if answer.status != 200:
            raise self.transport._unexpected("POST", url, self.host, answer.status, (200,),
                                             answer.data)
        try:
            return _s3_upload_id(answer.data)
        except ValueError as error:
            raise _UnusableAnswer("POST", url, self.host, 200,
                                  "with %s, not an upload id" % error) from None

    def _send_parts(self):
        """Run the part senders; return once none is running."""
        if _sockets_patched():
            import gevent

            senders = [gevent.spawn(self._send_until_done) for _ in range(self.in_flight)]
            try:
                gevent.joinall(senders)
            except BaseException:
                self.stopped = True
                gevent.killall(senders)  # each closes its connection on the way out
                raise
            return
        senders = [threading.Thread(target=self._send_until_done, name="resto-part",
                                    daemon=True) for _ in range(self.in_flight)]
        for sender in senders:
            sender.start()
        try:
            for sender in senders:
                sender.join()
        except BaseException:
            # A thread cannot be killed: each ends the part it sends, within
            # that request's deadline, and takes no other.
            self.stopped = True
            for sender in senders:
                sender.join()
            raise

    def _send_until_done(self):
        """Send the next part not yet taken, until none is left or one failed."""
        while True:
            with self.lock:
                if self.stopped or self.failures or self.taken == self.count:
                    return
                self.taken += 1
                number = self.taken
            try:
                self.parts[number - 1] = self._send_part(number)
            except Exception as error:
                with self.lock:
                    self.failures.append((number, error))
                return

    def _send_part(self, number):
        """Read part ``number`` once and send it with its CRC-32; return (number, ETag, CRC)."""
        offset = (number - 1) * self.part_size
        length = min(self.part_size, self.size - offset)
        url = self.kind.part_url(self.url, self.upload_id, number)
        data = self.read(offset, length)
        if len(data) != length:
            raise TransportError("PUT", url, self.host, _UnwritableRequest(
                "the file ended %d bytes short of its size (%d)"
                % (self.size - offset - len(data), self.size)))
        checksum = _crc32_text(zlib.crc32(data))
        headers = {"Content-Length": str(length), self.kind.body_checksum: checksum}
        # The parts in flight share the bandwidth: each attempt is allowed
        # the time that all of them take at the minimum rate.
        answer = self.transport._request("PUT", url, self.host, body=data, headers=headers,
                                         size=length, budget=length * self.in_flight)
        if answer.status != 200:
            raise self.transport._unexpected("PUT", url, self.host, answer.status, (200,),
                                             answer.data)
        etag = answer.headers.get("etag")
        if not etag:
            raise _UnusableAnswer("PUT", url, self.host, 200,
                                  "without the ETag that CompleteMultipartUpload needs")
        return number, etag, checksum

    def _complete(self):
        """List the parts (CompleteMultipartUpload) so that the store assembles the object."""
        url = self.kind.upload_url(self.url, self.upload_id)
        body = _s3_complete_body(self.parts)
        # The document is small: its SHA-256 is signed, which AWS verifies.
        headers = {"Content-Length": str(len(body)), "Content-Type": "application/xml",
                   "X-Amz-Content-Sha256": hashlib.sha256(body).hexdigest()}
        # Assembling may take the store a while: the answer is allowed the
        # time the whole file takes at the minimum rate.
        answer = self.transport._request("POST", url, self.host, body=body, headers=headers,
                                         size=len(body), budget=self.size)
        if answer.status == 404 and answer.resto_attempts > 1 and self._assembled():
            return  # an earlier attempt completed the upload, and its answer was lost
        if answer.status != 200:
            raise self.transport._unexpected("POST", url, self.host, answer.status, (200,),
                                             answer.data)
        try:
            code = _s3_completion_error(answer.data)
        except ValueError as error:
            raise _UnusableAnswer("POST", url, self.host, 200,
                                  "with %s, not CompleteMultipartUploadResult" % error) from None
        if code is not None:
            raise _UnusableAnswer(
                "POST", url, self.host, 200, "with the S3 error %s in its body: the object "
                "was not assembled" % code, hint=_S3_CODE_HINTS.get(code))

    def _assembled(self):
        """Tell whether the object now holds the parts sent, as its multipart ETag says.

        S3 makes the ETag of a multipart object from the MD5s of its parts
        (their ETags): the MD5 of their concatenation, "-", their count.
        Parts whose ETags are no MD5 (encrypted objects) cannot tell: False.
        """
        try:
            digests = b"".join(bytes.fromhex(etag.strip('"')) for _, etag, _ in self.parts)
        except ValueError:
            return False
        expected = "%s-%d" % (hashlib.md5(digests, usedforsecurity=False).hexdigest(),
                              self.count)
        answer = self.transport._request("HEAD", self.url, self.host)
        return (answer.status == 200
                and answer.headers.get("etag", "").strip('"').lower() == expected)

    def _abort(self):
        """Abort the upload (AbortMultipartUpload) so that the store drops its parts.

        Never raises: a failure is logged with the upload id, since the parts
        stay stored (and billed) until a later abort or a lifecycle rule.
        """
        url = self.kind.upload_url(self.url, self.upload_id)
        try:
            status = self.transport._request("DELETE", url, self.host).status
            if status not in (200, 204, 404):
                raise self.transport._unexpected("DELETE", url, self.host, status, (204, 404))
        except Exception as error:
            logger.error(
                "Failed to abort the multipart upload %s of %s on %s. %s Its parts stay "
                "stored until it is aborted or a lifecycle rule "
                "(AbortIncompleteMultipartUpload) removes them.",
                self.upload_id, self.name, self.host, error)


class DefaultTransport:
    """Talk HTTP to media hosts: one method per operation, one verb each.

    ``base_url`` gives the path under which files live on the hosts (the
    path of ``MEDIA_URL``) and the scheme of ``"host:port"`` entries.
    ``timeout`` bounds each attempt: connecting, each wait, and the whole
    exchange, which may take ``timeout`` plus one second per MiB of an
    upload's body or of a download's bytes that arrived.
    ``retries`` failed attempts (no answer, 502, 503, 504) are tried again
    at once, inline, so operations on a name keep their order.
    ``http_auth``, ``ca_bundle`` and ``tls_verify`` have the meaning of the
    settings of the same names; the credentials go to the media hosts only.
    So do the ``s3_*`` keywords, and ``object_parameters``, whose headers go
    with every upload (see ``object_headers()``).
    """

    def __init__(self, base_url=None, timeout=None, host_count=1, retries=None,
                 http_auth=None, ca_bundle=None, tls_verify=None, s3_credentials=None,
                 s3_region=None, s3_multipart_threshold=None, s3_part_size=None,
                 s3_parts_in_flight=None, object_parameters=None):
        self.base_url = settings.MEDIA_URL if base_url is None else base_url
        self.timeout = self._resolve("timeout", timeout)
        self.retries = self._resolve("retries", retries)
        self.host_count = host_count
        self._auth_headers = self._resolve("http_auth", http_auth)
        tls_verify = self._resolve("tls_verify", tls_verify)
        self._tls = _tls_pool_kwargs(
            self._resolve("ca_bundle", ca_bundle) if tls_verify else None, tls_verify)
        if s3_credentials is None:
            s3_credentials = (self._resolve("s3_access_key_id", None),
                              self._resolve("s3_secret_access_key", None))
        self._s3_credentials = s3_credentials
        self.s3_region = self._resolve("s3_region", s3_region)
        self.s3_multipart_threshold = self._resolve("s3_multipart_threshold",
                                                    s3_multipart_threshold)
        self.s3_part_size = self._resolve("s3_part_size", s3_part_size)
        self.s3_parts_in_flight = self._resolve("s3_parts_in_flight", s3_parts_in_flight)
        self._object_parameters = self._resolve("object_parameters", object_parameters)
        parts = urlsplit(self.base_url or "/")
        self._default_scheme = parts.scheme or "http"
        # Encoded once: requests are written by hand, and a space or a control
        # character would break the request line. Escapes already there stay.
        path = quote(parts.path, safe=_PATH_SAFE)
        self._base_path = path if path.endswith("/") else path + "/"
        # origin -> (pool manager, urllib3 pool, Host header): see _route().
        self._routes = {}
        # host entry -> its _HTTPHost or _S3Host: see _host().
        self._hosts = {}

    def _resolve(self, keyword, value):
        """Return ``value`` checked, or, when it is None, the checked value of its setting.

        An error names where the bad value came from: the argument or the setting.
        """
        setting, default, check = _SETTINGS[keyword]
        if value is None:
            return check(getattr(settings, setting, default), "The %s setting" % setting)
        return check(value, "The %r argument of %s" % (keyword, type(self).__name__))

    def __getstate__(self):
        # Pools hold sockets and locks: a copy finds its own routes (and hosts).
        state = self.__dict__.copy()
        state["_routes"] = {}
        state["_hosts"] = {}
        return state

    def __repr__(self):
        # Never the credentials: only whether there are some.
        return "<%s base_url=%r timeout=%r%s>" % (
            type(self).__name__, self.base_url, self.timeout,
            " with credentials" if self._auth_headers else "")

    def url(self, host, name):
        """Return the URL of ``name`` on ``host``."""
        return self._host(host).url(name)

    def object_headers(self, name):
        """Return the headers RESTO_OBJECT_PARAMETERS gives the file ``name``, checked.

        Raises ImproperlyConfigured, naming the header, when one would break
        a request: call it before sending anything.
        """
        return _object_headers(self._object_parameters, name)

    def _host(self, entry):
        """Return the host object of the host entry ``entry``, built on first use."""
        host = self._hosts.get(entry)
        if host is None:
            endpoint = _parse_host(entry, self._default_scheme)
            if endpoint.bucket is None:
                host = _HTTPHost(entry, endpoint, self._base_path, self._auth_headers)
            else:
                host = _S3Host(entry, endpoint, self._base_path, self._s3_credentials,
                               self.s3_region)
            self._hosts[entry] = host
        return host

    def content(self, host, name):
        """GET ``name`` from ``host`` and return its bytes.

        Raises ``FileNotFoundError`` on 404 or 410.
        """
        buffer = io.BytesIO()
        self.fetch(host, name, buffer)
        return buffer.getvalue()

    def fetch(self, host, name, destination):
        """GET ``name`` from ``host`` into the binary file ``destination``.

        Streams in blocks, so memory stays constant. Returns the number of
        bytes written; raises ``FileNotFoundError`` on 404 or 410.
        """
        url = self.url(host, name)
        sink = _Sink(destination)
        answer = self._request("GET", url, host, sink=sink)
        if answer.status == 200:
            return sink.written
        if answer.status in (404, 410):
            raise _not_found(name, host)
        raise self._unexpected("GET", url, host, answer.status, (200,), answer.data)

    def exists(self, host, name):
        """HEAD ``name`` on ``host``: True on 200, False on 404 or 410."""
        url = self.url(host, name)
        status = self._request("HEAD", url, host).status
        if status == 200:
            return True
        if status in (404, 410):
            return False
        raise self._unexpected("HEAD", url, host, status, (200, 404, 410))

    def size(self, host, name):
        """HEAD ``name`` on ``host`` and return its Content-Length.

        A server may leave Content-Length out of a HEAD answer (Apache does
        for an empty file): the size is then counted from a GET, in constant
        memory. Raises ``FileNotFoundError`` on 404 or 410.
        """
        return self.stat(host, name).size

    def stat(self, host, name):
        """HEAD ``name`` on ``host``; return its _Entry: size, Last-Modified and, where
        the host's ETag is one (S3), the MD5.

        The size is counted from a GET when the HEAD answer has no
        Content-Length (see ``size()``). Raises ``FileNotFoundError`` on 404
        or 410.
        """
        kind = self._host(host)
        url = kind.url(name)
        response = self._request("HEAD", url, host)
        if response.status in (404, 410):
            raise _not_found(name, host)
        if response.status != 200:
            raise self._unexpected("HEAD", url, host, response.status, (200,))
        size = response.length
        if size is None:
            size = self.fetch(host, name, _Discard())
        md5 = None
        if kind.etag_is_md5:
            etag = response.headers.get("etag", "").strip('"').lower()
            md5 = etag if _MD5_HEX.fullmatch(etag) else None
        return _Entry(name.rpartition("/")[2], False, size,
                      _http_date(response.headers.get("last-modified")), md5)

    def list(self, host, directory):
        """List ``directory`` ("" for the top, "a/b" below it) on ``host``.

        Returns its _Entry list, sorted by name, all pages read. The first
        listing of a host finds its dialect (the host kind's, in order: a
        refusal such as 405 or 403, or an answer that is not a listing, moves
        on to the next) and keeps it. Raises FileNotFoundError when the host
        has no such directory, _CannotList when it answers no dialect,
        _ListingError for a listing that breaks its format, and
        UnexpectedStatusCode or TransportError as the other operations do.
        """
        kind = self._host(host)
        for dialect in (kind.dialect,) if kind.dialect else kind.list_dialects:
            if dialect is False:
                break
            if dialect in kind.refused:
                continue
            try:
                entries = self._list_pages(kind, directory, dialect)
            except _ListingRefused as refused:
                kind.refused[dialect] = str(refused)
                continue
            kind.dialect = dialect
            return entries
        kind.dialect = False
        raise _CannotList(
            "%s cannot list directories (%s): sync checks it file by file with HEAD and "
            "cannot find orphans there. Allow PROPFIND (Apache: Dav On; lighttpd: "
            "webdav.activate; nginx: the dav-ext module), or give nginx 'autoindex on; "
            "autoindex_format json;' on the media location."
            % (host, "; ".join(kind.refused.values()) or "no way to list is known"))

    def _list_pages(self, kind, directory, dialect):
        """Return the sorted entries of every page of ``directory`` in ``dialect``.

        Raises _ListingRefused when the host answers that dialect with a
        refusal or with something that is not a listing, and has not listed
        in it before.
        """
        known = kind.dialect == dialect
        entries = []
        page = None
        for _page in range(_MAX_LISTING_ENTRIES + 1):  # each page adds an entry or ends
            request = kind.list_request(directory, dialect, page)
            body = request.body
            answer = self._request(request.method, request.url, kind.entry, body=body,
                                   headers=request.headers, size=len(body) if body else 0,
                                   sink=request.parser)
            if answer.status in request.missing and page is None:
                raise _not_found(directory or "/", kind.entry)
            if answer.status != request.status:
                if not known and answer.status in _LIST_REFUSALS:
                    raise _ListingRefused("%s %s answered %d" % (
                        request.method, _redact(request.url), answer.status))
                raise self._unexpected(request.method, request.url, kind.entry,
                                       answer.status, (request.status,), answer.data)
            try:
                found, page = request.parser.close()
            except _ListingError as error:
                if not known:
                    raise _ListingRefused("%s %s answered %d with %s" % (
                        request.method, _redact(request.url), answer.status, error)) from None
                raise _ListingError("%s %s on %s: %s" % (
                    request.method, _redact(request.url), kind.entry, error)) from None
            entries.extend(found)
            if len(entries) > _MAX_LISTING_ENTRIES:
                raise _ListingError("%s has more than %d entries in %s/"
                                    % (kind.entry, _MAX_LISTING_ENTRIES, directory))
            if page is None or not found:
                break
            known = True
        entries.sort(key=_entry_name)
        return entries

    def create(self, host, name, content, size=None, object_headers=None):
        """PUT ``content`` (bytes or a binary file) as ``name`` on ``host``.

        A file is sent from its current position, streamed with an explicit
        Content-Length (``size``, or what remains of the file). Returns True
        on 201 (created) and False on 200 or 204 (an existing file was
        overwritten, which is logged as a warning). On a WebDAV server that
        does not create parent directories, they are made with MKCOL and the
        PUT is sent again. ``object_headers`` are the file's headers from
        ``object_headers(name)``, computed here when None.
        """
        status = self.put(host, name, content, size, object_headers)
        if status == 201:
            return True  # created (or, on S3, stored: it does not say which)
        logger.warning("PUT on existing file %s on %s.", name, host)
        return False

    def put(self, host, name, content, size=None, object_headers=None):
        """PUT ``content`` as ``name`` on ``host``; return the status (201, 200 or 204).

        Like ``create()``, without the warning on overwrite (``sync`` expects it).
        An S3 host answers 200 whether or not the object existed: that is
        returned as 201, since an overwrite cannot be told apart. An S3 host
        gets the body's CRC-32 with it, and a file over
        RESTO_S3_MULTIPART_THRESHOLD in parts (see _MultipartUpload).
        """
        kind = self._host(host)
        url = kind.url(name)
        if size is None:
            size = _remaining_size(content)
        if object_headers is None:
            object_headers = self.object_headers(name)
        # Object stores and filers serve the type they were given.
        headers = {"Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream"}
        for key, value in object_headers.items():
            headers["Content-Type" if key.lower() == "content-type" else key] = value
        if kind.multipart and size > self.s3_multipart_threshold:
            _MultipartUpload(self, kind, name, url, content, size, headers).run()
            return kind.stored(200)
        headers["Content-Length"] = str(size)
        if kind.body_checksum:
            headers[kind.body_checksum] = _crc32_text(_content_crc32(content, size))
        start = content.tell() if hasattr(content, "tell") else None
        if kind.needs_collections:
            # This host needs parent collections: make the missing ones first.
            # Only a shortcut: the host may have been wiped or replaced since,
            # and the answer to the PUT below says what is really missing.
            try:
                self._make_collections(kind, kind.collections(url), trust_cache=True)
            except UnexpectedStatusCode as refused:
                logger.info("%s; sending the PUT anyway.", refused)
        answer = self._request("PUT", url, host, body=content, headers=headers, size=size)
        collections = (kind.collections(url) if answer.status in _MISSING_PARENT_STATUSES
                       else ())
        if collections:
            try:
                self._make_collections(kind, collections, trust_cache=False)
            except UnexpectedStatusCode as refused:
                mkcol = "(Parent collections may be missing, but %s %s answered %d.%s)" % (
                    refused.method, refused.url, refused.status,
                    " " + refused.hint if refused.hint else "")
                hint = " ".join(filter(None, (_status_hint("PUT", answer.status), mkcol)))
                raise UnexpectedStatusCode("PUT", url, host, answer.status, kind.put_statuses,
                                           hint=hint) from refused
            if start is not None:
                content.seek(start)
            answer = self._request("PUT", url, host, body=content, headers=headers, size=size)
        if answer.status not in kind.put_statuses:
            raise self._unexpected("PUT", url, host, answer.status, kind.put_statuses,
                                   answer.data)
        return kind.stored(answer.status)

    def _make_collections(self, kind, collections, trust_cache):
        """MKCOL each missing collection top down; 201 and 405 (exists) are fine.

        Another answer may mean the MKCOL lost a race: Apache answers 403 to
        the MKCOL of a collection that a concurrent one has just made. The
        collection is then looked up, and only one still missing makes the
        refusal an error. Collections made or found are remembered for the
        process, so later saves into them pay nothing; ``trust_cache`` False
        asks again about every one (the server said one is missing after all).
        """
        for collection in collections:
            if trust_cache and collection in _process.known_collections:
                continue
            status = self._request("MKCOL", collection, kind.entry).status
            if status not in (201, 405) and not self._is_collection(kind.entry, collection):
                raise UnexpectedStatusCode("MKCOL", collection, kind.entry, status, (201, 405))
            if len(_process.known_collections) >= _MAX_KNOWN_COLLECTIONS:
                # Dated directories would make it grow for ever; forgetting
                # costs one MKCOL (405) per directory used again.
                _process.known_collections.clear()
            _process.known_collections.add(collection)
        _process.collection_hosts.add(kind.origin)

    def _is_collection(self, host, url):
        """PROPFIND ``url`` (Depth 0): True when the host says it is a collection.

        Apache and lighttpd answer 207 and a resourcetype of collection; 404
        means missing. nginx without dav-ext answers 405 to any PROPFIND:
        False, but nginx answers a lost MKCOL race with 405, never asking.
        """
        headers = {"Depth": "0", "Content-Type": "application/xml; charset=utf-8",
                   "Content-Length": str(len(_PROPFIND_RESOURCETYPE))}
        answer = self._request("PROPFIND", url, host, body=_PROPFIND_RESOURCETYPE,
                               headers=headers, size=len(_PROPFIND_RESOURCETYPE))
        if answer.status != 207:
            return False
        try:
            multistatus = xml.etree.ElementTree.fromstring(answer.data)
        except xml.etree.ElementTree.ParseError:
            return False  # not a WebDAV answer, or one cut at _MAX_ANSWER_BODY
        return multistatus.find(".//{DAV:}resourcetype/{DAV:}collection") is not None

    def delete(self, host, name):
        """DELETE ``name`` on ``host``.

        Returns True on 200 or 204, False on 404 or 410 (the file was already
        gone, which is logged as a warning).
        """
        url = self.url(host, name)
        response = self._request("DELETE", url, host)
        status = response.status
        if status in (200, 204):
            return True
        if status in (404, 410) and response.resto_attempts > 1:
            return True  # an earlier attempt deleted it before failing
        if status in (404, 410):
            logger.warning("DELETE on missing file %s on %s.", name, host)
            return False
        raise self._unexpected("DELETE", url, host, status, (200, 204, 404, 410),
                               response.data)

    def _unexpected(self, method, url, host, status, expected, body=b""):
        """Return the UnexpectedStatusCode for ``status``, with the host kind's hint."""
        hint = self._host(host).hint(method, status, body)
        return UnexpectedStatusCode(method, url, host, status, expected, hint=hint)

    def _request(self, method, url, host, body=None, headers=None, size=0, sink=None,
                 budget=None):
        """Send a request, retrying what may be retried; return its _Answer.

        Every attempt is bounded in time, allowing ``budget`` bytes (by
        default ``size``, the body's) at the minimum transfer rate. The
        answer's ``resto_attempts`` says how many times the request went out
        (attempts, and sends again after a kept-alive connection the host
        had closed): above 1, an earlier one may have taken effect. A GET
        whose 200 body streams to ``sink`` (a _Sink) is not tried again once
        bytes were written there. Raises TransportError when the last
        attempt got no answer.
        """
        attempts = 1 + self.retries
        kind = self._host(host)
        start = body.tell() if hasattr(body, "tell") else None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if start is not None:
                    body.seek(start)  # the body is sent again from its start
                time.sleep(_RETRY_BACKOFF * 2 ** (attempt - 2) * random.uniform(0.5, 1.5))
            try:
                answer = self._attempt(method, url, host, body, headers, size, sink,
                                       size if budget is None else budget)
            except TransportError as error:
                if (attempt == attempts or not error.retryable
                        or (sink is not None and sink.written)):
                    raise
                logger.info("Retrying %s %s on %s.", method, _redact(url), host)
                continue
            if attempt < attempts and (answer.status in _RETRY_STATUSES
                                       or kind.worth_retrying(answer.status, answer.data)):
                logger.info("Retrying %s %s on %s after %d.", method, _redact(url), host,
                            answer.status)
                continue
            answer.resto_attempts += attempt - 1
            return answer
        raise AssertionError("unreachable")  # the loop returns or raises

    def _attempt(self, method, url, host, body, headers, size, sink, budget):
        """Send one request within its deadline; wrap failures in TransportError.

        An upload may take RESTO_TIMEOUT plus a second per MiB of its
        ``budget``; a download earns a second per MiB that arrives, up to
        _MAX_DOWNLOAD_EXTRA. A single wait never exceeds that bound either.
        """
        bound = self.timeout + budget / _MIN_TRANSFER_RATE
        deadline = _Deadline(bound, _MAX_DOWNLOAD_EXTRA if sink is not None else 0)
        kind = self._host(host)
        headers = dict(headers or (), **{"User-Agent": _USER_AGENT})
        headers = kind.sign(method, url, headers)  # afresh: S3 signs the time
        start = body.tell() if hasattr(body, "tell") else None
        try:
            pool, host_header, path = self._route(url, kind.normalize_paths)
            # Each kept-alive connection the host closed is dropped and the
            # request sent on the next: at most the pool's, then a new one.
            for fresh in range(_CONNECTIONS_PER_HOST + 1):
                try:
                    answer = _exchange(pool, host_header, method, path, body, headers, size,
                                       bound, deadline, sink)
                    # A request sent on a connection the host then closed may
                    # have taken effect all the same: it counts as sent.
                    answer.resto_attempts = fresh + 1
                    return answer
                except _StaleConnection:
                    if fresh == _CONNECTIONS_PER_HOST or (sink is not None and sink.written):
                        raise
                    if start is not None:
                        body.seek(start)
            raise AssertionError("unreachable")  # the loop returns or raises
        except (urllib3.exceptions.HTTPError, _WireError, OSError) as exc:
            raise TransportError(method, url, host, exc) from exc

    def _route(self, url, normalize=True):
        """Return the urllib3 pool for ``url``, its Host header and the request path.

        The pool of each origin is kept, as long as the process's pool
        manager and the pool itself live: looking it up through urllib3
        again (URL parsing, pool key) cost a tenth of a small request.
        With ``normalize``, the path's "." and ".." segments are resolved, as
        urllib3 does.
        """
        origin, path = _split_origin(url)
        manager = _pool_manager(self.host_count)
        route = self._routes.get(origin)
        if route is None or route[0] is not manager or route[1].pool is None:
            parts = urllib3.util.parse_url(origin)
            if parts.scheme == "https":
                _check_ssl_patched_in_time()
            pool = manager.connection_from_host(
                parts.host, parts.port, parts.scheme,
                pool_kwargs=self._tls if parts.scheme == "https" else None,
            )
            route = self._routes[origin] = (manager, pool, _host_header(urlsplit(origin)))
        if normalize and "/." in path:
            path = urllib3.util.parse_url(url).request_uri  # dot segments removed
        return route[1], route[2], path


# --- Transport: upload payloads ----------------------------------------------

class _PositionalReader:
    """Read a slice of a file descriptor with its own position (os.pread).

    Several hosts can read the same spooled upload at once without sharing a
    file position.
    """

    def __init__(self, fd, size, crc32=None):
        self._fd = fd
        self._position = 0
        self.size = size
        # A callable that returns the CRC-32 of the whole slice, computed
        # once for every reader of the same payload (see _content_crc32()).
        self.crc32 = crc32

    def tell(self):
        """Return the position of the next read."""
        return self._position

    def seek(self, position, whence=os.SEEK_SET):
        """Move the position of the next read (for a retry)."""
        if whence != os.SEEK_SET:
            raise io.UnsupportedOperation("only absolute positions")
        self._position = position
        return position

    def read(self, amount=-1):
        """Read up to ``amount`` bytes (all that remain if negative)."""
        remaining = self.size - self._position
        if amount is None or amount < 0 or amount > remaining:
            amount = remaining
        data = os.pread(self._fd, amount, self._position) if amount else b""
        self._position += len(data)
        return data

    def read_at(self, position, length):
        """Read up to ``length`` bytes from ``position``, leaving the position as it is."""
        return _pread(self._fd, position, max(0, min(length, self.size - position)))


# Uploads of Distributed storage up to this size are kept in memory and sent
# to every host from one buffer; larger ones are spooled to one temporary file.
_MEMORY_SPOOL_LIMIT = 1024 * 1024


class _Payload:
    """The bytes of one upload, readable by several hosts at once."""

    def __init__(self, content):
        self._spool = None
        self._data = None
        self._crc32 = None
        self._crc32_lock = threading.Lock()
        self._fd = _regular_file_descriptor(content)
        if self._fd is not None:
            # A real file on disk (e.g. Django's TemporaryUploadedFile): every
            # host reads it in place, nothing is copied.
            self.size = os.fstat(self._fd).st_size
            if self.size <= _SMALL_BODY:
                # One read for every host instead of one per host; each
                # request then sends it with its headers in one send.
                self._data = os.pread(self._fd, self.size, 0)
            return
        buffer = bytearray()
        for chunk in content.chunks():
            if isinstance(chunk, str):
                chunk = chunk.encode()
            if self._spool is None:
                buffer += chunk
                if len(buffer) > _MEMORY_SPOOL_LIMIT:
                    # Closed by close(): the payload outlives this method.
                    self._spool = tempfile.TemporaryFile(  # noqa: SIM115
                        dir=getattr(settings, "FILE_UPLOAD_TEMP_DIR", None)
                    )
                    self._spool.write(buffer)
                    buffer = None
            else:
                self._spool.write(chunk)
        if self._spool is None:
            self._data = bytes(buffer)
            self.size = len(self._data)
        else:
            self._spool.flush()
            self._fd = self._spool.fileno()
            self.size = os.fstat(self._fd).st_size

    def reader(self):
        """Return a fresh body for one host: bytes, or a positional reader."""
        if self._data is not None:
            return self._data
        return _PositionalReader(self._fd, self.size, self.crc32)

    def crc32(self):
        """Return the CRC-32 of the payload, read once for every host that asks."""
        with self._crc32_lock:
            if self._crc32 is None:
                self._crc32 = (zlib.crc32(self._data) if self._data is not None
                               else _content_crc32(_PositionalReader(self._fd, self.size),
                                                   self.size))
            return self._crc32

    def close(self):
        """Remove the temporary spool, if any."""
        if self._spool is not None:
            self._spool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()





###############################################################################
# Fan-out
###############################################################################


class HostResult(namedtuple("HostResult", "host value error")):
    """What one operation gave on one host: a ``value`` or an ``error``."""

    __slots__ = ()

    @property
    def ok(self):
        """True when the operation succeeded on this host."""
        return self.error is None


class _DaemonThreads:
    """A pool of daemon threads returning futures.

    Unlike ThreadPoolExecutor, whose exit hook waits for its whole queue
    with no bound, this pool lets the interpreter exit: background work is
    flushed by our own exit hook, within RESTO_ASYNC_EXIT_TIMEOUT.
    """

    def __init__(self, max_workers, name):
        self._max_workers = max_workers
        self._name = name
        self._work = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, func, *args):
        """Run ``func(*args)`` on a thread; return its Future."""
        future = concurrent.futures.Future()
        self._work.put((future, func, args))
        with self._lock:
            if not self._idle.acquire(blocking=False) and self._threads < self._max_workers:
                self._threads += 1
                threading.Thread(target=self._serve, name="%s-%d" % (self._name, self._threads),
                                 daemon=True).start()
        return future

    def _serve(self):
        """Run queued work for ever (the thread is a daemon)."""
        while True:
            future, func, args = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(func(*args))
                except BaseException as exc:
                    future.set_exception(exc)
            self._idle.release()


# Threads used where sockets are not patched: enough for several concurrent
# callers each fanning out to a dozen hosts.
_MAX_THREADS = 64

_executors_lock = threading.Lock()


def _executor(purpose):
    """Return this process's thread pool for ``purpose`` ("fan-out" or "async").

    Separate pools keep background replication from delaying the hosts of a
    synchronous save. A pool is rebuilt after fork(), whose child has none of
    the parent's threads.
    """
    key = (purpose, os.getpid())
    executors = _process.executors
    executor = executors.get(key)
    if executor is None:
        with _executors_lock:
            executor = executors.get(key)
            if executor is None:
                executor = executors[key] = _DaemonThreads(_MAX_THREADS, "resto-%s" % purpose)
    return executor


def _run_on_host(func, host, name, args):
    """Call ``func(host, name, *args)`` and return its HostResult, never raising."""
    try:
        return HostResult(host, func(host, name, *args), None)
    except Exception as exc:
        return HostResult(host, None, exc)


def _fan_out(func, hosts, name, *args):
    """Run ``func(host, name, *args)`` on every host in parallel.

    Greenlets of a gevent pool where sockets are patched, threads elsewhere.
    The last host runs inline in the caller, which would only wait otherwise:
    that saves a hand-over per call, the cost of a small request on a thread.
    Returns a list of HostResult in host order.
    """
    others, last = hosts[:-1], hosts[-1]
    if not others:
        return [_run_on_host(func, last, name, args)]
    if _sockets_patched():
        import gevent.pool

        # The greenlets start as soon as the caller waits for its own host.
        pool = gevent.pool.Pool(len(others))
        greenlets = [pool.spawn(_run_on_host, func, host, name, args) for host in others]
        result = _run_on_host(func, last, name, args)
        pool.join()
        return [greenlet.value for greenlet in greenlets] + [result]
    executor = _executor("fan-out")
    futures = [executor.submit(_run_on_host, func, host, name, args) for host in others]
    result = _run_on_host(func, last, name, args)
    return [future.result() for future in futures] + [result]


def _run_bounded(func, items, concurrency):
    """Call ``func(item)`` for every item, at most ``concurrency`` at a time.

    ``items`` is consumed lazily, so it may be a generator over millions of
    files. ``func`` must not raise: it records its own outcome. Greenlets
    where sockets are patched, threads elsewhere; returns when all are done.
    """
    if _sockets_patched():
        import gevent.pool

        pool = gevent.pool.Pool(concurrency)
        for item in items:
            pool.spawn(func, item)  # waits for a free slot
        pool.join()
        return
    slots = threading.BoundedSemaphore(concurrency)
    with concurrent.futures.ThreadPoolExecutor(concurrency, "resto-bounded") as executor:
        for item in items:
            slots.acquire()
            executor.submit(func, item).add_done_callback(lambda _: slots.release())


###############################################################################
# Background
###############################################################################

# AsyncStorage's replications run here: one queue per storage and process,
# ordered per (host, name), bounded, joined on demand and flushed at exit.



def _is_done(handle):
    """Tell whether a greenlet or future has finished."""
    return handle.done() if isinstance(handle, concurrent.futures.Future) else handle.ready()


def _backgrounds_here():
    """Return this process's background queues (not those inherited through fork())."""
    pid = os.getpid()
    return [background for background in list(_process.backgrounds) if background.pid == pid]


def _pending_here():
    """Return how many background operations of this process are pending."""
    return sum(len(background.pending) for background in _backgrounds_here())


def _join_backgrounds(timeout=None):
    """Wait for every background queue of this process; True if nothing is left."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done = True
    for background in _backgrounds_here():
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        done &= background.join(remaining)
    return done


def _flush_at_exit():
    """Wait, up to RESTO_ASYNC_EXIT_TIMEOUT, for pending background replications."""
    pending = _pending_here()
    if not pending:
        return
    timeout = _check_timeout(get_setting("ASYNC_EXIT_TIMEOUT"),
                             "The RESTO_ASYNC_EXIT_TIMEOUT setting")
    logger.info("Flushing %d pending replications before exit.", pending)
    if not _join_backgrounds(timeout):
        left = _pending_here()
        logger.error(
            "%d replications were still pending after %s seconds at exit "
            "(RESTO_ASYNC_EXIT_TIMEOUT) and are abandoned; repair the hosts "
            "from the master copy with python -m django_resto_gevent sync.", left, timeout,
        )


def _register_exit_flush():
    """Flush background replications at interpreter exit (registered once)."""
    if not _process.exit_flush_registered:
        _process.exit_flush_registered = True
        atexit.register(_flush_at_exit)


class _Background:
    """The pending host operations of one AsyncStorage.

    Each operation runs after the previous one on the same (host, name), so
    a save then a delete never end with the file present. A semaphore caps
    how many wait at once.
    """

    def __init__(self, storage):
        self.pid = os.getpid()
        self.storage_name = type(storage).__name__
        self.patched = _sockets_patched()
        self.max_pending = storage.async_max_pending
        # Waiting longer than one host operation may take means none ends.
        self.room_wait = storage.timeout * (1 + storage.retries) + 1
        self.room = threading.BoundedSemaphore(self.max_pending)
        self.lock = threading.RLock()
        self.last = {}  # (host, name) -> the latest handle for it
        self.pending = set()
        _process.backgrounds.add(self)
        _register_exit_flush()

    def submit(self, key, task):
        """Run ``task`` after the pending one for ``key``; wait for room first."""
        if not self.room.acquire(timeout=self.room_wait):
            raise BacklogError(self.storage_name, self.max_pending, self.room_wait)
        with self.lock:
            previous = self.last.get(key)
            if self.patched:
                import gevent

                handle = gevent.Greenlet(self._run, previous, task)
                handle.link(lambda done: self._finished(key, done))
                handle.start()
            else:
                handle = _executor("async").submit(self._run, previous, task)
                handle.add_done_callback(lambda done: self._finished(key, done))
            if not _is_done(handle):
                self.pending.add(handle)
                self.last[key] = handle
        return handle

    @staticmethod
    def _run(previous, task):
        """Wait for the previous operation on the same host and name, then run."""
        if previous is not None:
            # Each operation is bounded in time, so this wait is too.
            if isinstance(previous, concurrent.futures.Future):
                concurrent.futures.wait([previous])
            else:
                previous.join()  # a greenlet
        return task()

    def _finished(self, key, handle):
        """Forget a finished operation and free its room."""
        with self.lock:
            self.pending.discard(handle)
            if self.last.get(key) is handle:
                del self.last[key]
        self.room.release()

    def join(self, timeout=None):
        """Wait until nothing is pending; return False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                batch = list(self.pending)
            if not batch:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            futures = [item for item in batch if isinstance(item, concurrent.futures.Future)]
            greenlets = [item for item in batch
                         if not isinstance(item, concurrent.futures.Future)]
            if greenlets:
                import gevent

                gevent.joinall(greenlets, timeout=remaining)
            if futures:
                concurrent.futures.wait(futures, timeout=remaining)
            with self.lock:
                # Finished items leave through their callbacks; drop them here
                # too in case a callback has not run yet, so the loop ends.
                for item in batch:
                    if _is_done(item):
                        self.pending.discard(item)


class _BackgroundTask:
    """One background host operation of an AsyncStorage; logs its failure."""

    def __init__(self, storage, func, host, name, args, action):
        self.storage = storage
        self.func = func
        self.host = host
        self.name = name
        self.args = args
        self.action = action

    def __call__(self):
        result = _run_on_host(self.func, self.host, self.name, self.args)
        self.storage._report(self.action, self.name, [result])
        return result


###############################################################################
# Storages
###############################################################################

def _check_name(name):
    """Return ``name`` as a string (a pathlib path is converted), or refuse one
    that could escape the storage, before any request."""
    if isinstance(name, pathlib.PurePath):
        name = name.as_posix()
    if not isinstance(name, str) or not name:
        raise SuspiciousFileOperation("File name %r is not a non-empty string." % (name,))
    if _CONTROL_CHARACTER.search(name):
        raise SuspiciousFileOperation(
            "File name %r contains a NUL or another control character." % name
        )
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        raise SuspiciousFileOperation(
            "File name %r is absolute; storage names are relative paths." % name
        )
    if ".." in name.replace("\\", "/").split("/"):
        raise SuspiciousFileOperation("File name %r contains a '..' component." % name)
    return name


def _check_name_to_delete(name):
    """Refuse to delete no name, with FileSystemStorage's error; else as _check_name()."""
    if not name:
        raise ValueError("The name must be given to delete().")
    return _check_name(name)


# What open() does with each mode: read, write (truncate) or append; "b" or
# "t" may follow. "+" and "x" modes are refused: a file is replicated whole,
# once, when it is closed.
_OPEN_MODES = {"r": "read", "w": "write", "a": "append"}


def _open_mode(storage, mode):
    """Return "read", "write" or "append" for the open() ``mode``, or refuse it."""
    letters = mode if isinstance(mode, str) else ""
    kind = _OPEN_MODES.get(letters.replace("b", "").replace("t", ""))
    if kind is None or len(letters) > 2 or not {"b", "t"} - set(letters):
        raise ValueError(
            "%s.open() takes mode 'r', 'w' or 'a', with 'b' for bytes or 't' for text, "
            "not %r: a file written through the storage is replicated whole, once, when "
            "it is closed, so '+' and 'x' modes are not offered." % (type(storage).__name__,
                                                                     mode))
    return kind


class _WrittenFile(File):
    """A file opened for writing through a storage, replicated when it is closed.

    What is written goes to a temporary spool. ``close()`` hands it to the
    storage once, which writes and replicates it as ``save()`` would
    (errors raise from ``close()``); closing again does nothing. Leaving a
    ``with`` block by an exception, or ``discard()``, drops what was
    written: nothing is stored or replicated. Text modes encode as
    FileSystemStorage's files do (Python's default text encoding).
    """

    def __init__(self, spool, name, mode, commit):
        self._spool = spool
        self._commit = commit
        self._done = False
        super().__init__(spool if "b" in mode else io.TextIOWrapper(spool), name)
        self.mode = mode

    @property
    def closed(self):
        """True once the file was closed or discarded."""
        return self._done

    def close(self):
        """Store and replicate what was written, once."""
        if self._done:
            return
        self._done = True
        try:
            if self.file is not self._spool:
                self.file.flush()
                self.file.detach()  # the spool stays open for the commit
            self._spool.seek(0)
            self._commit(self._spool)
        finally:
            self._spool.close()

    def discard(self):
        """Drop what was written, storing and replicating nothing."""
        if self._done:
            return
        self._done = True
        if self.file is not self._spool:
            self.file.detach()
        self._spool.close()

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _write_spool():
    """Return an empty temporary file for a file opened for writing."""
    # Handed to a _WrittenFile, which closes it.
    return tempfile.TemporaryFile(  # noqa: SIM115
        dir=getattr(settings, "FILE_UPLOAD_TEMP_DIR", None))


def _check_name_length(name, max_length):
    """Refuse a name kept as it is (allow_overwrite) that is over ``max_length``."""
    if max_length and len(name) > max_length:
        raise SuspiciousFileOperation(
            "File name %r is %d characters long, over the field's max_length of %d; with "
            "allow_overwrite the name is kept as it is: shorten it or raise max_length."
            % (name, len(name), max_length))
    return name


class _Checked:
    """What a storage checked and built for one generation of the settings.

    ``options``: keyword -> checked value, filled as they are asked for;
    ``transport``: the transport built from them; ``configuration``: True
    once the whole configuration was checked (before the first save). A
    setting_changed starts a new generation, so all of it is redone.
    """

    __slots__ = ("generation", "options", "transport", "configuration")

    def __init__(self, generation):
        self.generation = generation
        self.options = {}
        self.transport = None
        self.configuration = False


class _ReplicationMixin:
    """What the three storages share: options, hosts, fan-out and outcome."""

    transport_class = DefaultTransport

    def _init_options(self, options, extra_keywords=()):
        """Keep the django_resto_gevent keywords of ``options``; refuse unknown ones."""
        unknown = sorted(set(options) - set(_SETTINGS) - set(extra_keywords))
        if unknown:
            raise ImproperlyConfigured(
                "%s got unknown option%s %s. Valid options: %s."
                % (
                    type(self).__name__,
                    "s" if len(unknown) > 1 else "",
                    ", ".join(repr(key) for key in unknown),
                    ", ".join(sorted(set(_SETTINGS) | set(extra_keywords) | {"base_url"})),
                )
            )
        self._resto_options = {key: options[key] for key in _SETTINGS if key in options}
        # deconstruct() writes the constructor's keywords into migrations:
        # keep secrets out of them (a storage rebuilt from a migration reads
        # them from settings).
        args, kwargs = getattr(self, "_constructor_args", ((), {}))
        if _SECRET_KEYWORDS & set(kwargs):
            self._constructor_args = (args, {key: value for key, value in kwargs.items()
                                             if key not in _SECRET_KEYWORDS})

    def _option(self, keyword):
        """Return the checked value of ``keyword``: constructor keyword, else setting."""
        options = self._checked().options
        try:
            return options[keyword]
        except KeyError:
            value = options[keyword] = self._check_option(keyword)
            return value

    def _checked(self):
        """Return what was checked and built for the current settings (a _Checked)."""
        checked = self.__dict__.get("_checked_cache")
        if checked is None or checked.generation != _process.settings_generation:
            checked = self._checked_cache = _Checked(_process.settings_generation)
        return checked

    def _check_option(self, keyword):
        """Read ``keyword`` from the constructor's keywords, else from settings, and check it."""
        setting, default, check = _SETTINGS[keyword]
        value = self._resto_options.get(keyword)
        if value is None:
            value = getattr(settings, setting, default)
            source = "The %s setting" % setting
        else:
            source = "The %r option of %s" % (keyword, type(self).__name__)
        return check(value, source)

    @property
    def hosts(self):
        """The media hosts, as configured."""
        return self._option("hosts")

    @property
    def fatal_exceptions(self):
        """Whether a failure on any host raises (True) or is only logged."""
        return self._option("fatal_exceptions")

    @property
    def show_traceback(self):
        """Whether failure logs carry a traceback."""
        return self._option("show_traceback")

    @property
    def timeout(self):
        """Seconds allowed per attempt: to connect, for each read, and in all.

        An attempt that moves a body may also take one second per MiB.
        """
        return self._option("timeout")

    @property
    def retries(self):
        """How many times an attempt that got no usable answer is tried again."""
        return self._option("retries")

    @property
    def min_replicas(self):
        """How many hosts must accept a write for it to succeed.

        Defaults to every host with RESTO_FATAL_EXCEPTIONS, else to 0.
        """
        return self._check_min_replicas()

    def _check_min_replicas(self):
        """Return min_replicas, refusing one above the number of hosts."""
        value = self._option("min_replicas")
        host_count = len(self.hosts)
        if value is None:
            return host_count if self.fatal_exceptions else 0
        if value > host_count:
            raise ImproperlyConfigured(
                "%s asks for min_replicas=%d (RESTO_MIN_REPLICAS) but has only %d "
                "media hosts: lower it or add hosts." % (type(self).__name__, value, host_count)
            )
        return value

    @property
    def allow_overwrite(self):
        """Whether a save keeps its name and replaces the file there (else a free variant)."""
        return self._option("allow_overwrite")

    @property
    def transport(self):
        """The transport for the current settings (kept until a setting changes)."""
        checked = self._checked()
        if checked.transport is None:
            checked.transport = self._make_transport()
        return checked.transport

    def _make_transport(self):
        """Build a transport from the current options; connections are pooled per process."""
        return self.transport_class(
            base_url=self.base_url, timeout=self.timeout, host_count=len(self.hosts),
            retries=self.retries, http_auth=self._option("http_auth"),
            ca_bundle=self._option("ca_bundle"), tls_verify=self._option("tls_verify"),
            s3_credentials=(self._option("s3_access_key_id"),
                            self._option("s3_secret_access_key")),
            s3_region=self._option("s3_region"),
            s3_multipart_threshold=self._option("s3_multipart_threshold"),
            s3_part_size=self._option("s3_part_size"),
            s3_parts_in_flight=self._option("s3_parts_in_flight"),
            object_parameters=self._option("object_parameters"),
        )

    def execute(self, func, name, *args, action=None):
        """Run ``func(host, name, *args)`` on all media hosts in parallel.

        Returns the per-host HostResult list in host order, after every host
        has finished. Each failure is logged and signalled; when fewer hosts
        than ``min_replicas`` succeeded, raises one ReplicationError naming
        every failed host.
        """
        action = action or func.__name__
        results = _fan_out(func, self.hosts, name, *args)
        failures = self._report(action, name, results)
        if failures and len(results) - len(failures) < self.min_replicas:
            self._quorum_failed(action, name, results)
            raise ReplicationError(action, name, failures, len(results)) from failures[0][1]
        return results

    def _dispatch(self, func, name, *args, action=None):
        """Hand a write or delete of ``name`` to every media host, as this storage does.

        Here through ``execute()``, before returning; AsyncStorage schedules
        it instead. Saves and deletes call this, never ``execute()`` itself,
        so that ``execute()`` keeps one contract in every storage.
        """
        self.execute(func, name, *args, action=action)

    def _quorum_failed(self, action, name, results):
        """Undo a save of a new file that failed its quorum, so that nothing is left behind.

        Django never learns the name of a save that raised, so nothing could
        refer to its copies: the copies that landed are deleted (best
        effort, logged and signalled), then the master copy, if any. An
        overwrite ("write") keeps what landed: the old file is gone anyway,
        and ``sync`` repairs the rest.
        """
        if action != "create":
            return
        landed = [result.host for result in results if result.ok]
        if landed:
            cleanup = _fan_out(self.transport.delete, landed, name)
            self._report("remove the partial copy of", name, cleanup)
        self._remove_master(name)

    def _remove_master(self, name):
        """Remove the master copy of ``name`` (none here)."""

    def _report(self, action, name, results):
        """Log and signal each failed host; return the ``(host, error)`` failures."""
        failures = [(result.host, result.error) for result in results if not result.ok]
        if not failures:
            return failures
        show_traceback = self.show_traceback
        for host, error in failures:
            logger.error(
                "Failed to %s %s on %s. %s", action, name, host, error,
                exc_info=(type(error), error, error.__traceback__) if show_traceback else None,
            )
            responses = replication_failed.send_robust(
                sender=type(self), storage=self, action=action, name=name, host=host,
                exception=error,
            )
            for receiver, outcome in responses:
                if isinstance(outcome, Exception):
                    logger.error("A replication_failed receiver failed: %r raised %r.",
                                 receiver, outcome)
        return failures

    def _put_payload(self, host, name, payload, overwrite=False, object_headers=None):
        """Upload ``payload`` to ``host`` with a body of its own.

        An overwrite asked for (``overwrite``) is not warned about.
        """
        put = self.transport.put if overwrite else self.transport.create
        return put(host, name, payload.reader(), payload.size, object_headers)

    def _put_local_file(self, host, name, overwrite=False, object_headers=None):
        """Upload the master copy of ``name`` to ``host`` from its own file handle."""
        put = self.transport.put if overwrite else self.transport.create
        with open(self.path(name), "rb") as local_file:
            return put(host, name, local_file, None, object_headers)

    def save(self, name, content, max_length=None):
        """Save ``content`` as ``name`` (or a free variant) and replicate it."""
        if name is None:
            name = getattr(content, "name", None)
        name = _check_name(name)
        checked = self._checked()
        if not checked.configuration:
            self._check_configuration()
            checked.configuration = True
        # The headers of a callable RESTO_OBJECT_PARAMETERS, before even a
        # HEAD asks whether the name is free (_save() asks again for the
        # name it gets).
        self.transport.object_headers(name)
        return super().save(name, content, max_length=max_length)

    def _check_configuration(self):
        """Refuse a bad configuration before anything is written anywhere."""
        for keyword in _SETTINGS:
            self._option(keyword)
        self._check_min_replicas()
        s3_hosts = [host for host in self.hosts if _parse_host(host, "http").bucket is not None]
        if s3_hosts and not (self._option("s3_access_key_id")
                             and self._option("s3_secret_access_key")):
            raise ImproperlyConfigured(
                "%s has S3 hosts (%s) but no credentials: set RESTO_S3_ACCESS_KEY_ID "
                "and RESTO_S3_SECRET_ACCESS_KEY." % (type(self).__name__, ", ".join(s3_hosts)))

    def open(self, name, mode="rb"):
        """Open ``name``: for reading, or for writing, replicated when closed.

        Modes "r" and "rb" read. "w" and "wb" write the file anew, "a" and
        "ab" after its current content (a missing file starts empty); the
        returned file is replicated when it is closed, under exactly this
        name, as ``save()`` with allow_overwrite would (see _WrittenFile).
        """
        name = _check_name(name)
        kind = _open_mode(self, mode)
        if kind == "read":
            return super().open(name, mode)
        spool = _write_spool()
        try:
            if kind == "append":
                self._copy_current(name, spool)
        except BaseException:
            spool.close()
            raise
        return _WrittenFile(spool, name, mode, functools.partial(self._commit_write, name))

    def __getstate__(self):
        # Checked options belong to this process's settings, not the unpickler's.
        state = self.__dict__.copy()
        state.pop("_checked_cache", None)
        return state

    def __eq__(self, other):
        return type(self) is type(other) and self.deconstruct()[1:] == other.deconstruct()[1:]

    def __hash__(self):
        return hash((type(self), repr(self.deconstruct()[1:])))


class _LocalReadsMixin(_ReplicationMixin):
    """Hybrid and Async: a master copy in the local location, where reads come from."""

    def __init__(self, location=None, base_url=None, **options):
        extra = set(inspect.signature(FileSystemStorage.__init__).parameters) - {"self"}
        self._init_options(options, extra)
        # allow_overwrite is this module's option (it has a setting, and works
        # on every Django), not handed to FileSystemStorage.
        local = {key: value for key, value in options.items()
                 if key in extra and key not in _SETTINGS}
        super().__init__(location=location, base_url=base_url, **local)

    def delete(self, name):
        """Delete ``name`` locally, then on every media host."""
        name = _check_name_to_delete(name)
        super().delete(name)
        self._dispatch(self.transport.delete, name)

    def exists(self, name):
        """Tell whether ``name`` exists in the master copy."""
        return super().exists(_check_name(name))

    def size(self, name):
        """Return the size of ``name`` in the master copy."""
        return super().size(_check_name(name))

    def get_available_name(self, name, max_length=None):
        """Return ``name`` itself with allow_overwrite, else a free variant, as Django does."""
        if self.allow_overwrite:
            return _check_name_length(_check_name(name), max_length)
        return super().get_available_name(name, max_length=max_length)

    def _save(self, name, content):
        # Checked before anything is written: a callable's headers may be bad.
        object_headers = self.transport.object_headers(name)
        overwrite = self.allow_overwrite
        if overwrite:
            self._write_master(name, content)
            saved = name
        else:
            saved = super()._save(name, content)
            if saved != name:
                object_headers = self.transport.object_headers(saved)
        self._replicate(saved, overwrite, object_headers)
        return saved

    def _replicate(self, name, overwrite, object_headers):
        """Replicate the master copy of ``name`` to every media host."""
        raise NotImplementedError

    def _write_master(self, name, content):
        """Write ``content`` (a File or a binary file) as the master copy of ``name``.

        It is written to a temporary file beside the master copy, then
        renamed over it: a reader never sees half a file, and an old file
        is replaced whole (a shorter one leaves none of the old bytes).
        """
        path = self.path(name)
        directory = os.path.dirname(path)
        mode = self.directory_permissions_mode
        if mode is None:
            os.makedirs(directory, exist_ok=True)
        else:
            old_umask = os.umask(0o777 & ~mode)
            try:
                os.makedirs(directory, mode, exist_ok=True)
            finally:
                os.umask(old_umask)
        partial = os.path.join(directory, ".%s.%s.resto-part"
                               % (os.path.basename(path), os.urandom(6).hex()))
        try:
            # Created as FileSystemStorage creates files: 0o666 less the umask.
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666),
                      "wb") as target:
                chunks = (content.chunks() if hasattr(content, "chunks")
                          else iter(functools.partial(content.read, _BLOCK_SIZE), b""))
                for chunk in chunks:
                    target.write(chunk.encode() if isinstance(chunk, str) else chunk)
            if self.file_permissions_mode is not None:
                os.chmod(partial, self.file_permissions_mode)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            raise

    def _copy_current(self, name, spool):
        """Copy the master copy of ``name``, if any, into ``spool`` (to append to it)."""
        with contextlib.suppress(FileNotFoundError), open(self.path(name), "rb") as current:
            shutil.copyfileobj(current, spool, _BLOCK_SIZE)

    def _commit_write(self, name, spool):
        """Store what was written through open() as the master copy, then replicate it."""
        object_headers = self.transport.object_headers(name)  # checked before any write
        self._write_master(name, spool)
        self._replicate(name, True, object_headers)

    def _remove_master(self, name):
        """Remove the master copy of ``name``, if it is there."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(name))


@deconstructible(path="django_resto_gevent.HybridStorage")
class HybridStorage(_LocalReadsMixin, FileSystemStorage):
    """Save to the local location (master copy), then to every media host.

    ``save()`` returns once every host answered. With RESTO_FATAL_EXCEPTIONS
    a failure on any host raises ReplicationError; a new file that failed
    its quorum is removed from the master copy and the hosts that took it.
    """

    def _replicate(self, name, overwrite, object_headers):
        # The master copy is opened once; the hosts read it in place with
        # their own positions (a small one once, into memory).
        with open(self.path(name), "rb") as local_file, \
                _Payload(File(local_file)) as payload:
            self._dispatch(self._put_payload, name, payload, overwrite, object_headers,
                           action="write" if overwrite else "create")


@deconstructible(path="django_resto_gevent.AsyncStorage")
class AsyncStorage(_LocalReadsMixin, FileSystemStorage):
    """Save to the local location, then replicate in the background.

    Failures are logged and signalled, never raised. Operations on one name
    reach each host in the order they were issued. At most
    RESTO_ASYNC_MAX_PENDING host operations wait at once; beyond that,
    ``save()`` and ``delete()`` wait for room, then raise BacklogError.
    ``join()`` waits for pending replications; they are also flushed at
    exit. Override ``execute_one`` to hand replication to a task queue.
    ``execute()`` runs in the foreground and returns the per-host results,
    as in the other storages; saves and deletes do not call it.
    """

    def _replicate(self, name, overwrite, object_headers):
        self._dispatch(self._put_local_file, name, overwrite, object_headers,
                       action="write" if overwrite else "create")

    @property
    def async_max_pending(self):
        """How many host operations may wait in the background at once."""
        return self._option("async_max_pending")

    def _dispatch(self, func, name, *args, action=None):
        """Schedule ``func(host, name, *args)`` on every host (execute_one); return at once."""
        for host in self.hosts:
            self.execute_one(func, host, name, *args, action=action)

    def execute_one(self, func, host, name, *args, action=None):
        """Run ``func(host, name, *args)`` in the background; log a failure.

        Runs after the operations already pending for ``name`` on ``host``.
        Greenlets where sockets are patched, threads elsewhere.
        """
        task = _BackgroundTask(self, func, host, name, args, action or func.__name__)
        self._background().submit((host, name), task)

    def join(self, timeout=None):
        """Wait for every pending replication; return True if none is left."""
        return self._background().join(timeout)

    @classmethod
    def join_all(cls, timeout=None):
        """Wait for the pending replications of every AsyncStorage of this process.

        Call it from gunicorn's ``worker_exit`` hook. Returns True if none is
        left. Queues inherited through fork() belong to the parent.
        """
        return _join_backgrounds(timeout)

    def _background(self):
        """Return this storage's background queue, made on first use."""
        background = self.__dict__.get("_background_queue")
        if background is None or background.pid != os.getpid():
            background = _Background(self)
            self._background_queue = background
        return background

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_background_queue", None)
        return state


# Names DistributedStorage.get_available_name() may try before it gives up,
# and how many it tried, per greenlet or thread (contextvars follow both).
_MAX_NAME_ATTEMPTS = 100
_name_attempts = contextvars.ContextVar("resto_name_attempts", default=None)


def _count_name_attempt(name):
    """Count one name tried by get_available_name(); raise past the bound."""
    attempt = _name_attempts.get()
    if attempt is None:
        return  # a plain exists() call
    wanted, tried = attempt
    if tried >= _MAX_NAME_ATTEMPTS:
        raise RestoError(
            "Gave up looking for a free name near %r: the media hosts said %d names "
            "in a row exist, the last %r. A host that answers 200 to HEAD for files "
            "it does not hold does this (lighttpd: set static-file.disable-pathinfo)."
            % (wanted, tried, name))
    _name_attempts.set((wanted, tried + 1))


@deconstructible(path="django_resto_gevent.DistributedStorage")
class DistributedStorage(_ReplicationMixin, Storage):
    """Store files on the media hosts only, with no local copy.

    Writes go to every host in parallel; reads go to one host at a time, in
    random order, moving on when a host fails or lacks the file.
    """

    def __init__(self, hosts=None, base_url=None, **options):
        if hosts is not None:
            options["hosts"] = hosts
        self._init_options(options)
        self._base_url = base_url

    def _check_configuration(self):
        """Refuse a bad configuration; warn of one that loses files silently.

        Run before the first save after each settings change, so that the
        setting is read when used, not when the storage is built.
        """
        super()._check_configuration()
        if not self.fatal_exceptions:
            warnings.warn(
                "DistributedStorage with RESTO_FATAL_EXCEPTIONS = False loses "
                "files silently when a media host fails: there is no master "
                "copy to repair it from.",
                RuntimeWarning,
                stacklevel=3,  # the caller of save()
            )

    @property
    def base_url(self):
        """The URL files are served from: ``base_url`` or MEDIA_URL, ending with '/'."""
        base_url = settings.MEDIA_URL if self._base_url is None else self._base_url
        if base_url and not base_url.endswith("/"):
            base_url += "/"
        return base_url

    def _save(self, name, content):
        overwrite = self.allow_overwrite
        object_headers = self.transport.object_headers(name)  # checked before any request
        with _Payload(content) as payload:
            self._dispatch(self._put_payload, name, payload, overwrite, object_headers,
                           action="write" if overwrite else "create")
        return name

    def _commit_write(self, name, spool):
        """PUT what was written through open() to every host, as an overwrite."""
        object_headers = self.transport.object_headers(name)  # checked before any request
        with _Payload(File(spool)) as payload:
            self._dispatch(self._put_payload, name, payload, True, object_headers,
                           action="write")

    def _copy_current(self, name, spool):
        """Copy ``name`` from the first host that has it into ``spool`` (to append to it)."""
        def fetch(host, name):
            spool.seek(0)
            spool.truncate()
            return self.transport.fetch(host, name, spool)

        with contextlib.suppress(FileNotFoundError):
            self._read_with_failover(fetch, name, "open")

    def _open(self, name, mode="rb"):
        # Handed to the caller inside the returned File, which closes it.
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=_MEMORY_SPOOL_LIMIT, dir=getattr(settings, "FILE_UPLOAD_TEMP_DIR", None)
        )

        def fetch(host, name):
            spool.seek(0)
            spool.truncate()
            return self.transport.fetch(host, name, spool)

        try:
            self._read_with_failover(fetch, name, "open")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return File(spool if "b" in mode else io.TextIOWrapper(spool), name)

    def delete(self, name):
        """Delete ``name`` on every media host."""
        self._dispatch(self.transport.delete, _check_name_to_delete(name))

    def exists(self, name):
        """Tell whether any media host has ``name`` (all are asked at once).

        False when none has it and at least one answered; raises
        ReplicationError when none answered.
        """
        name = _check_name(name)
        _count_name_attempt(name)
        results = _fan_out(self.transport.exists, self.hosts, name)
        if any(result.ok and result.value for result in results):
            return True
        if any(result.ok for result in results):
            return False
        failures = self._report("check", name, results)
        raise ReplicationError("check", name, failures, len(results)) from failures[0][1]

    def get_available_name(self, name, max_length=None):
        """Return a name no media host holds, trying at most _MAX_NAME_ATTEMPTS.

        A host that says every name exists (lighttpd without
        ``static-file.disable-pathinfo``, for names under a file's name)
        would otherwise keep Django's loop asking for ever. With
        allow_overwrite, ``name`` itself, without asking the hosts: the
        save then costs one round trip instead of two.
        """
        if self.allow_overwrite:
            return _check_name_length(_check_name(name), max_length)
        token = _name_attempts.set((name, 0))
        try:
            return super().get_available_name(name, max_length=max_length)
        finally:
            _name_attempts.reset(token)

    def size(self, name):
        """Return the size of ``name``, as the first media host that has it says."""
        return self._read_with_failover(self.transport.size, _check_name(name), "size")

    def url(self, name):
        """Return the URL of ``name`` under ``base_url``, as FileSystemStorage does."""
        if self.base_url is None:
            raise ValueError("This file is not accessible via a URL.")
        if isinstance(name, pathlib.PurePath):
            name = name.as_posix()
        url = filepath_to_uri(name)
        if url is not None:
            url = url.lstrip("/")
        return urljoin(self.base_url, url)

    def _read_with_failover(self, func, name, action):
        """Return ``func(host, name)`` from the first host that succeeds.

        Hosts are tried in random order, so reads spread over them, moving
        on after an error or a 404. Raises FileNotFoundError when every host
        that answered said 404, else ReplicationError naming the failures.
        """
        hosts = list(self.hosts)
        random.shuffle(hosts)
        results = []
        for host in hosts:
            result = _run_on_host(func, host, name, ())
            if result.ok:
                return result.value
            results.append(result)
        missing = [r.host for r in results if isinstance(r.error, FileNotFoundError)]
        failed = [r for r in results if not isinstance(r.error, FileNotFoundError)]
        failures = self._report(action, name, failed)
        if missing and all(isinstance(error, TransportError) for _, error in failures):
            unreachable = ", ".join(host for host, _ in failures)
            raise FileNotFoundError(
                errno.ENOENT,
                "%s not found on %s%s" % (name, ", ".join(missing),
                                          " (unreachable: %s)" % unreachable if failures else ""),
                name,
            )
        error = ReplicationError(action, name, failures, len(results))
        raise error from failures[0][1]

    def listdir(self, path):
        """Return ``(directories, files)`` in ``path``, as the media hosts list it.

        Every host is asked at once and the union of their listings is
        returned, as ``exists()`` takes any host's word. Raises
        FileNotFoundError when no host that answered has the directory, and
        ReplicationError when none could list it.
        """
        directory = path.strip("/")
        if directory:
            _check_name(directory)
        results = _fan_out(self.transport.list, self.hosts, directory)
        listed = [result for result in results if result.ok]
        failed = [result for result in results
                  if not result.ok and not isinstance(result.error, FileNotFoundError)]
        failures = self._report("list", directory + "/", failed)
        if not listed:
            if len(failed) == len(results):
                raise ReplicationError("list", directory + "/", failures,
                                       len(results)) from failures[0][1]
            raise FileNotFoundError(errno.ENOENT, "%s/ not found on any media host that "
                                    "lists" % directory, path)
        directories, files = set(), set()
        for result in listed:
            for entry in result.value:
                (directories if entry.is_dir else files).add(entry.name)
        return sorted(directories), sorted(files)

    def get_modified_time(self, name):
        """Return when ``name`` was last written, from a media host's ``Last-Modified``.

        An aware datetime (UTC) with ``USE_TZ``, else naive local time, as
        FileSystemStorage returns.
        """
        name = _check_name(name)
        entry = self._read_with_failover(self.transport.stat, name, "stat")
        if entry.mtime is None:
            raise RestoError("The media hosts sent no Last-Modified for %s: its modification "
                             "time is unknown." % name)
        zone = datetime.UTC if settings.USE_TZ else None
        return datetime.datetime.fromtimestamp(entry.mtime, tz=zone)

    def get_accessed_time(self, name):
        """Refuse: HTTP media hosts report no access time."""
        raise NotImplementedError(
            "DistributedStorage cannot tell when %r was last read: HTTP media hosts "
            "report no access time. get_modified_time() gives when it was written." % (name,))

    def get_created_time(self, name):
        """Refuse: HTTP media hosts report no creation time."""
        raise NotImplementedError(
            "DistributedStorage cannot tell when %r was created: HTTP media hosts report "
            "only when a file was last written, which get_modified_time() gives." % (name,))

    def path(self, name):
        """Refuse: there is no local copy."""
        raise NotImplementedError(
            "DistributedStorage keeps no local copy, so %r has no path on this server: "
            "read it with open(), or serve it from url()." % (name,))


###############################################################################
# Test media server
###############################################################################


def _multistatus(resources):
    """Return the 207 body that describes ``resources`` (path, is_dir, size, mtime)."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">\n']
    for path, is_dir, size, mtime in resources:
        props = ["<D:resourcetype>%s</D:resourcetype>" % ("<D:collection/>" if is_dir else "")]
        if size is not None:
            props.append("<D:getcontentlength>%d</D:getcontentlength>" % size)
        if mtime is not None:
            props.append("<D:getlastmodified>%s</D:getlastmodified>"
                         % email.utils.formatdate(mtime, usegmt=True))
        parts.append("<D:response><D:href>%s</D:href><D:propstat><D:prop>%s</D:prop>"
                     "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>\n"
                     % (quote(path).replace("&", "&amp;"), "".join(props)))
    parts.append("</D:multistatus>\n")
    return "".join(parts).encode("utf-8")


@functools.cache
def _media_request_handler():
    """Return the WSGI handler class of MediaServer (made once: it loads gevent)."""
    import gevent.pywsgi

    class MediaRequestHandler(gevent.pywsgi.WSGIHandler):
        """gevent's WSGI handler, handing the connection's socket to the application.

        One handler serves one connection: it counts them in the MediaServer.
        """

        def handle(self):
            self.server.media_server.connections += 1
            return super().handle()

        def get_environ(self):
            environ = super().get_environ()
            environ["resto.socket"] = self.socket  # for the reset_after knob
            return environ

    return MediaRequestHandler


def _reset(sock):
    """Close ``sock`` with a TCP reset rather than an orderly shutdown."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 207: "Multi-Status",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 410: "Gone", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


# A MediaServer keeps its files in one of two stores with the same small
# interface; the WebDAV rules are written once, in MediaServer._act.
class _MemoryStore:
    """Where a MediaServer without ``root`` keeps files: in memory.

    In the server's ``files``, ``collections`` and ``mtimes``, read from the
    server at each call (a test may replace them).
    """

    def __init__(self, server):
        self.server = server

    def confines(self, path):
        """Tell whether ``path`` may be served (any path may: there is nothing else)."""
        return True

    def is_file(self, path):
        """Tell whether a file is at ``path``."""
        return path in self.server.files

    def holds(self, path):
        """Tell whether anything, file or collection, is at ``path``."""
        return (path.rstrip("/") + "/" in self.server.collections
                or path.rstrip("/") in self.server.files)

    def has_parent(self, path):
        """Tell whether the collection that would hold ``path`` exists."""
        return path.rstrip("/").rpartition("/")[0] + "/" in self.server.collections

    def make_collection(self, path):
        """Create the collection ``path``."""
        self.server.collections.add(path.rstrip("/") + "/")

    def make_parents(self, path):
        """Create every collection above ``path``."""
        self.server.collections.update(_collection_paths(path))

    def write(self, path, body):
        """Store ``body`` as the file at ``path``."""
        self.server.files[path] = body
        self.server.mtimes[path] = time.time()

    def remove(self, path):
        """Remove the file at ``path``."""
        del self.server.files[path]
        self.server.mtimes.pop(path, None)

    def read(self, path):
        """Return the bytes of the file at ``path``."""
        return self.server.files[path]

    def mtime(self, path):
        """Return when the file at ``path`` was last written, or None."""
        return self.server.mtimes.get(path)

    def resources(self, path, children):
        """MediaServer._resources() of the ``files`` dict and its collections."""
        files, mtimes = self.server.files, self.server.mtimes
        if path in files:
            return [(path, False, len(files[path]), mtimes.get(path))]
        directory = path if path.endswith("/") else path + "/"
        held = {}
        for name in list(files) + list(self.server.collections):
            if name.startswith(directory) and name != directory:
                child, slash, _ = name[len(directory):].partition("/")
                held[child] = held.get(child, False) or bool(slash)
        if directory not in self.server.collections and not held:
            return None
        found = [(directory, True, None, None)]
        if children:
            for child, is_dir in sorted(held.items()):
                name = directory + child
                found.append((name + "/", True, None, None) if is_dir
                             else (name, False, len(files[name]), mtimes.get(name)))
        return found


class _DirectoryStore:
    """Where a MediaServer with ``root`` keeps files: that directory, and nothing outside it."""

    def __init__(self, root):
        self.root = root

    def _target(self, path):
        """Return the real path on disk of the request path ``path``."""
        return os.path.realpath(os.path.join(self.root, path.lstrip("/")))

    def confines(self, path):
        """Tell whether ``path`` stays inside the root (else it gets 403)."""
        return "\x00" not in path and self._target(path).startswith(self.root + os.sep)

    def is_file(self, path):
        """Tell whether a file is at ``path``."""
        return os.path.isfile(self._target(path))

    def holds(self, path):
        """Tell whether anything, file or directory, is at ``path``."""
        return os.path.exists(self._target(path))

    def has_parent(self, path):
        """Tell whether the directory that would hold ``path`` exists."""
        return os.path.isdir(os.path.dirname(self._target(path)))

    def make_collection(self, path):
        """Create the directory ``path``."""
        os.mkdir(self._target(path))

    def make_parents(self, path):
        """Create every directory above ``path``."""
        os.makedirs(os.path.dirname(self._target(path)), exist_ok=True)

    def write(self, path, body):
        """Store ``body`` at ``path``: written beside it, then renamed over it."""
        target = self._target(path)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".put-")
        with os.fdopen(handle, "wb") as output:
            output.write(body)
        os.replace(temporary, target)

    def remove(self, path):
        """Remove the file at ``path``."""
        os.remove(self._target(path))

    def read(self, path):
        """Return the bytes of the file at ``path``."""
        with open(self._target(path), "rb") as stored:
            return stored.read()

    def mtime(self, path):
        """Return when the file at ``path`` was last written, or None."""
        try:
            return os.stat(os.path.join(self.root, path.lstrip("/"))).st_mtime
        except (OSError, ValueError):
            return None

    def resources(self, path, children):
        """MediaServer._resources() of the directory (None outside the root)."""
        target = self._target(path)
        if "\x00" in path or not (target + os.sep).startswith(self.root + os.sep):
            return None
        try:
            info = os.stat(target)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode):
            return [(path, False, info.st_size, info.st_mtime)]
        directory = path if path.endswith("/") else path + "/"
        found = [(directory, True, None, info.st_mtime)]
        if children:
            with os.scandir(target) as scan:
                for entry in scan:
                    if entry.name.startswith(".put-"):
                        continue  # an upload on its way
                    held = entry.stat()
                    is_dir = stat.S_ISDIR(held.st_mode)
                    found.append((directory + entry.name + ("/" if is_dir else ""), is_dir,
                                  None if is_dir else held.st_size, held.st_mtime))
        return found


class MediaServer:
    """An HTTP media server for tests: GET, HEAD, PUT and DELETE, in process.

    A stable API for your own tests. It binds ``host`` on ``port`` (0: a free
    port) and keeps files in memory (``files``, path -> bytes) or, given
    ``root``, in that directory, refusing with 403 any path that escapes it.
    Paths are the decoded request paths, e.g. ``"/media/a b.txt"``.

    Every request is recorded in ``log`` as ``(method, path, status)``; the
    status is None when no answer was sent. ``connections`` counts the
    connections accepted (kept-alive ones carry several requests). Fault knobs, which may be changed
    at any time:

    - ``read_only``: PUT and DELETE get 403.
    - ``status``: answer this code, or ``{method: code}``, without acting.
    - ``latency``: seconds to wait before answering.
    - ``fail_first``: answer 503 to this many requests (or ``{method:
      count}``), then act normally.
    - ``hang``: read the request, then never answer (until ``stop()``).
    - ``lose_answers``: act on this many requests (or ``{method: count}``),
      then never answer them (until ``stop()``): the request took effect,
      its answer is lost. Logged with the status None.
    - ``read_pause``: seconds between the 256 KiB blocks in which a request
      body is read (a host that reads slowly).
    - ``trickle``: seconds between the bytes of the answer's body (answers
      that have none get a short text body).
    - ``reset_after``: read this many bytes of a PUT body, then reset the
      connection without answering.
    - ``require_collections``: behave like a WebDAV server (RFC 4918): a PUT
      whose parent collection is missing gets 409; MKCOL creates one (201),
      or answers 405 if it exists, 409 if its own parent is missing.
    - ``require_headers``: a dict of headers (e.g. ``Authorization``) that
      every request must carry, else 401.
    - ``listing``: answer ``PROPFIND`` with ``Depth: 0`` or ``1`` as a WebDAV
      server does (207, each resource's type, length and last modification);
      False answers it 405, as nginx without the dav-ext module does.

    ``mtimes`` (path -> seconds since the epoch) holds when each file was
    last written; ``HEAD`` and ``GET`` send it as ``Last-Modified``.

    It runs on a greenlet where sockets are patched and on a thread of its
    own elsewhere, so it serves while the caller blocks.
    """

    def __init__(self, root=None, host="127.0.0.1", port=0, read_only=False,
                 status=None, latency=0.0, fail_first=0, hang=False, trickle=0.0,
                 reset_after=None, require_collections=False, require_headers=None,
                 listing=True, lose_answers=0, read_pause=0.0):
        self.root = None if root is None else os.path.realpath(root)
        self.files = {} if root is None else None
        self.bind_host = host
        self.port = port
        self.read_only = read_only
        self.status = status
        self.latency = latency
        self.fail_first = fail_first
        self.hang = hang
        self.trickle = trickle
        self.reset_after = reset_after
        self.require_collections = require_collections
        self.require_headers = require_headers
        self.listing = listing
        self.lose_answers = lose_answers
        self.read_pause = read_pause
        # Collections (paths ending with "/") of the in-memory mode.
        self.collections = {"/"}
        self.mtimes = {}
        self._store = _MemoryStore(self) if root is None else _DirectoryStore(self.root)
        self.log = []
        self.connections = 0
        self._server = None
        self._thread = None
        self._hub = None
        self._released = None

    @property
    def address(self):
        """The ``"host:port"`` entry to put in RESTO_MEDIA_HOSTS."""
        return "%s:%d" % (self.bind_host, self.port)

    @property
    def url(self):
        """The server's base URL, ``http://host:port``."""
        return "http://" + self.address

    def start(self):
        """Start serving; return self once the port is bound."""
        if _sockets_patched():
            self._bind()
            self._server.start()
            return self
        ready = threading.Event()
        failure = []

        def serve():
            import gevent

            try:
                self._bind()
                self._hub = gevent.get_hub()
                self._server.start()
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                ready.set()
            self._server.serve_forever()

        self._thread = threading.Thread(target=serve, name="media-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("MediaServer did not start within 10 seconds.")
        if failure:
            raise failure[0]
        return self

    def serve_forever(self, ready=None):
        """Serve in the current thread until stop(), SIGINT or SIGTERM (the command line).

        ``ready``, if given, is called once the port is bound (to say where).
        """
        import gevent

        self._bind()
        handlers = [gevent.signal_handler(signum, self._server.stop)
                    for signum in (signal.SIGINT, signal.SIGTERM)]
        try:
            if ready is not None:
                ready()
            self._server.serve_forever()
        finally:
            for handler in handlers:
                handler.cancel()

    def stop(self):
        """Stop serving and close the port."""
        if self._server is None:
            return
        if self._thread is not None:
            self._hub.loop.run_callback_threadsafe(self._shutdown)
            self._thread.join(10)
            self._thread = None
        else:
            self._shutdown()
        self._server = None

    def _shutdown(self):
        """Release hanging requests and stop the server (in the server's hub)."""
        self._released.set()
        self._server.stop(timeout=1)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def requests(self, method=None):
        """Return the logged ``(method, path, status)`` tuples, optionally of one method."""
        return [entry for entry in self.log if method is None or entry[0] == method]

    def _bind(self):
        """Create the WSGI server on the configured address."""
        import gevent.event
        import gevent.pywsgi

        self._server = gevent.pywsgi.WSGIServer(
            (self.bind_host, self.port), self._application, log=None,
            handler_class=_media_request_handler(),
            error_log=logging.getLogger("django_resto_gevent.server"),
        )
        self._server.media_server = self  # for its request handler
        self._server.init_socket()
        self.port = self._server.server_port
        self._released = gevent.event.Event()

    def _application(self, environ, start_response):
        """Serve one request and record it."""
        method = environ["REQUEST_METHOD"]
        path = environ["PATH_INFO"].encode("latin-1").decode("utf-8", "replace")
        body = b""
        if method == "PUT" and self.reset_after is not None:
            environ["wsgi.input"].read(self.reset_after)
            self.log.append((method, path, None))
            _reset(environ["resto.socket"])
            return []
        if method in ("PUT", "PROPFIND"):
            body = self._read_body(environ["wsgi.input"])
        if self.hang:
            self.log.append((method, path, None))
            self._released.wait()
            return []
        if self.latency:
            import gevent

            gevent.sleep(self.latency)
        if self._take("fail_first", method):
            status, payload = 503, b""
        elif self.require_headers and any(
                environ.get("HTTP_" + key.upper().replace("-", "_")) != value
                for key, value in self.require_headers.items()):
            status, payload = 401, b""
        else:
            depth = (environ.get("HTTP_DEPTH"),) if method == "PROPFIND" else ()
            status, payload = self._respond(method, path, body, *depth)
        if self._take("lose_answers", method):
            self.log.append((method, path, None))
            self._released.wait()  # acted, but never answers (until stop)
            return []
        self.log.append((method, path, status))
        reason = _REASONS.get(status, "Status")
        if self.trickle and not payload:
            payload = ("%d %s\n" % (status, reason)).encode() * 4
        headers = [("Content-Length", str(len(payload)))]
        if status == 207:
            headers.append(("Content-Type", 'application/xml; charset="utf-8"'))
        elif status == 200 and self._mtime(path) is not None:
            headers.append(("Last-Modified",
                            email.utils.formatdate(self._mtime(path), usegmt=True)))
        start_response("%d %s" % (status, reason), headers)
        if method == "HEAD":
            return [b""]
        if self.trickle:
            return self._trickled(payload)
        return [payload]

    def _take(self, knob, method):
        """Tell whether the counting knob ``knob`` (fail_first, lose_answers) takes this
        request, and count it."""
        count = getattr(self, knob)
        if isinstance(count, dict):
            if count.get(method, 0) > 0:
                count[method] -= 1
                return True
            return False
        if count > 0:
            setattr(self, knob, count - 1)
            return True
        return False

    def _read_body(self, stream):
        """Read a request body whole, ``read_pause`` seconds between its blocks if set."""
        if not self.read_pause:
            return stream.read()
        blocks = []
        while True:
            block = stream.read(256 * 1024)
            if not block:
                return b"".join(blocks)
            blocks.append(block)
            if self.read_pause:
                import gevent

                gevent.sleep(self.read_pause)  # the knob: a host that reads slowly

    def _trickled(self, payload):
        """Yield ``payload`` one byte at a time, ``trickle`` seconds apart."""
        import gevent

        for index in range(len(payload)):
            gevent.sleep(self.trickle)
            yield payload[index:index + 1]

    def _respond(self, method, path, body, depth=None):
        """Return (status, body) for a request, applying the fault knobs."""
        forced = self.status.get(method) if isinstance(self.status, dict) else self.status
        if forced:
            return forced, b""
        if self.read_only and method in ("PUT", "DELETE", "MKCOL"):
            return 403, b""
        if method == "PROPFIND" and self.listing:
            if depth not in ("0", "1"):
                return 403, b""  # Depth infinity, as most servers refuse it
            resources = self._resources(path, depth == "1")
            return (404, b"") if resources is None else (207, _multistatus(resources))
        if method not in ("GET", "HEAD", "PUT", "DELETE", "MKCOL"):
            return 405, b""
        if method in ("GET", "HEAD") and path.endswith("/"):
            return 403, b""  # no directory listing here, as nginx without autoindex
        return self._act(method, path, body)

    def _mtime(self, path):
        """Return when the file at ``path`` was last written, or None."""
        return self._store.mtime(path)

    def _resources(self, path, children):
        """Return (path, is_dir, size, mtime) of ``path`` and, with ``children``, of
        what it holds; None when nothing is there."""
        return self._store.resources(path, children)

    def _act(self, method, path, body):
        """Answer GET, HEAD, PUT, DELETE or MKCOL as a WebDAV server does; return (status, body).

        Where the files are kept (memory or a directory) is the store's
        business; the rules are the same for both.
        """
        store = self._store
        if not store.confines(path):
            return 403, b""
        if method == "MKCOL":
            if store.holds(path):
                return 405, b""
            if not store.has_parent(path):
                return 409, b""
            store.make_collection(path)
            return 201, b""
        exists = store.is_file(path)
        if method == "PUT":
            if not store.has_parent(path):
                if self.require_collections:
                    return 409, b""
                store.make_parents(path)  # like nginx's create_full_put_path
            store.write(path, body)
            return (204 if exists else 201), b""
        if not exists:
            return 404, b""
        if method == "DELETE":
            store.remove(path)
            return 204, b""
        return 200, store.read(path)


###############################################################################
# Command line
###############################################################################


class _UsageError(Exception):
    """A bad command line or configuration: the command exits with status 2."""


def _started_up():
    """End the start-up of "python -m django_resto_gevent", run with the collector
    paused: what was loaded stays until exit, so it is frozen (never walked, during
    the run or at exit), and the collector runs again for what the command does."""
    if _process.collector_paused:
        _process.collector_paused = False
        gc.freeze()
        gc.enable()


def _load_storage(args):
    """Set Django up from ``--settings`` and return the storage named ``--storage``."""
    if args.settings:
        os.environ["DJANGO_SETTINGS_MODULE"] = args.settings
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise _UsageError("No Django settings: pass --settings mysite.settings or set "
                          "DJANGO_SETTINGS_MODULE.")
    import django
    from django.core.files.storage import InvalidStorageError, storages

    try:
        django.setup()
        _started_up()
        storage = storages[args.storage]
    except InvalidStorageError as error:
        raise _UsageError("No storage %r: %s Choose one of %s with --storage." % (
            args.storage, error, ", ".join(storages.backends))) from error
    except ImproperlyConfigured as error:
        raise _UsageError(str(error)) from error
    except ImportError as error:
        raise _UsageError("Cannot import the settings or the storage: %s" % error) from error
    if not isinstance(storage, _ReplicationMixin):
        raise _UsageError(
            "The storage %r is a %s, not a django_resto_gevent storage: choose another "
            "with --storage." % (args.storage, type(storage).__name__))
    return storage


def _selected_hosts(storage, wanted):
    """Return the storage's hosts, or the subset ``wanted`` of them."""
    try:
        hosts = storage.hosts
    except ImproperlyConfigured as error:
        raise _UsageError(str(error)) from error
    if not wanted:
        return list(hosts)
    unknown = [host for host in wanted if host not in hosts]
    if unknown:
        raise _UsageError("--hosts names %s, which %s not among the storage's hosts: %s."
                          % (", ".join(unknown), "is" if len(unknown) == 1 else "are",
                             ", ".join(hosts)))
    return [host for host in hosts if host in wanted]


def _master_directory(root, directory, files_too=True):
    """Return the files (_Entry, sorted) and subdirectory names (sorted) of a master
    directory ("" the top); without ``files_too``, the subdirectories only (no file
    is stat()ed). Raises OSError when it cannot be read."""
    files, subdirectories = [], []
    with os.scandir(os.path.join(root, directory) if directory else root) as scan:
        for entry in scan:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            elif files_too and entry.is_file():
                info = entry.stat()
                files.append(_Entry(entry.name, False, info.st_size, info.st_mtime, None))
    files.sort(key=_entry_name)
    subdirectories.sort()
    return files, subdirectories


def _join(directory, name):
    """Return the storage name of ``name`` in ``directory`` ("" the top)."""
    return directory + "/" + name if directory else name


def _share_of(directory, processes):
    """Return which of ``processes`` compares ``directory``: the same in each of them.

    BLAKE2b, not CRC-32: a CRC is linear, so names that differ in one
    character ("d0" to "d3") can all fall to the same process.
    """
    digest = hashlib.blake2b(directory.encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % processes


# A host that failed this many requests in a row, with no answer at all, is
# taken as down for the rest of the sync instead of costing a timeout per file.
_SYNC_DOWN_AFTER = 3

# Failures listed per host at the end; the rest are counted.
_SYNC_LISTED_FAILURES = 20

# A master sync shares the directories among this many processes at the most
# (by default, one per CPU it may use): parsing listings and comparing are
# CPU work, which one Python process does on one core.
_SYNC_MAX_PROCESSES = 4

# Directories whose listings are asked for ahead of the one being compared:
# the round trips overlap, and memory holds at most this many directories
# (and the one being compared).
_SYNC_LOOKAHEAD = 8

# The progress line starts after this many seconds of work (a short run shows
# none) and is redrawn at most this often.
_PROGRESS_AFTER = 1.0
_PROGRESS_EVERY = 0.2

# A host's modification times are HTTP dates, whole seconds: its copy is
# older than the master file only when it is older by at least this much.
_MTIME_RESOLUTION = 1.0

# What sync says it compared, word for word in the summary.
_COMPARED = "compared by size and modification time; content not compared: use --checksum"
_COMPARED_CONTENT = ("compared by size, modification time and content (MD5 from the host's "
                     "listing where it gives one, else downloaded)")


def _sentence(parts):
    """Join ``parts`` with semicolons, the first capitalised."""
    text = "; ".join(parts)
    return text[:1].upper() + text[1:]


def _one_line(error):
    """Return ``error`` as one clean line: no object reprs, no line breaks."""
    return " ".join(_OBJECT_REPR.sub("", str(error)).split()) or type(error).__name__


class _SyncTally:
    """What sync found and did on one host; updated from greenlets or threads."""

    # Counters, in the order of the summary's columns.
    counters = ("dirs", "files", "same", "missing", "size", "stale", "content", "orphans",
                "uploaded", "deleted", "failed")

    def __init__(self):
        for counter in self.counters:
            setattr(self, counter, 0)
        self.refused = 0  # deletions the guards refused
        self.refusals = []  # why, once per reason
        self.failures = []
        self.no_answer_in_a_row = 0
        self.down = None  # the error that took the host as down
        self.cannot_list = None  # why the host is checked file by file

    def fail(self, name, error):
        """Count a file or directory that could not be checked or repaired."""
        self.failed += 1
        if len(self.failures) < _SYNC_LISTED_FAILURES:
            self.failures.append((name, error))

    def refuse(self, count, reason):
        """Count ``count`` deletions not made, and say why once."""
        self.refused += count
        if reason not in self.refusals:
            self.refusals.append(reason)

    def report(self):
        """Return this tally as JSON-ready data: a worker process sends it home."""
        report = {counter: getattr(self, counter) for counter in self.counters}
        report.update(
            refused=self.refused, refusals=self.refusals,
            failures=[(name, _one_line(error)) for name, error in self.failures],
            down=None if self.down is None else _one_line(self.down),
            cannot_list=None if self.cannot_list is None else _one_line(self.cannot_list))
        return report

    def merge(self, report):
        """Add what another process found on the same host (see report())."""
        for counter in self.counters:
            setattr(self, counter, getattr(self, counter) + report[counter])
        self.refused += report["refused"]
        self.refusals += [reason for reason in report["refusals"]
                          if reason not in self.refusals]
        room = _SYNC_LISTED_FAILURES - len(self.failures)
        self.failures += [(name, RestoError(error)) for name, error in report["failures"][:room]]
        if self.down is None and report["down"] is not None:
            self.down = RestoError(report["down"])
        if self.cannot_list is None and report["cannot_list"] is not None:
            self.cannot_list = RestoError(report["cannot_list"])


class _ProgressBoard:
    """The progress counters of a sync shared among its processes: one row each, in
    memory that fork() leaves shared, read by the process that draws the line."""

    fields = ("dirs", "files", "uploaded", "deleted", "failed")

    def __init__(self, processes):
        self.row = struct.Struct("<%dq" % len(self.fields))
        self.processes = processes
        self.memory = mmap.mmap(-1, self.row.size * processes)

    def post(self, index, totals):
        """Write the totals of process ``index``."""
        self.row.pack_into(self.memory, index * self.row.size,
                           *[totals[field] for field in self.fields])

    def totals(self):
        """Return the sums over every process's latest row."""
        rows = [self.row.unpack_from(self.memory, index * self.row.size)
                for index in range(self.processes)]
        return dict(zip(self.fields, map(sum, zip(*rows, strict=True)), strict=True))


class _MD5Sink:
    """A binary sink that hashes what it is given (MD5: what hosts report)."""

    def __init__(self):
        self.digest = hashlib.md5(usedforsecurity=False)

    def write(self, data):
        """Hash ``data``."""
        self.digest.update(data)
        return len(data)


def _file_md5(path):
    """Return the hex MD5 of the file at ``path``, read in blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source:
        for block in iter(functools.partial(source.read, _BLOCK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def _stop_workers(workers):
    """Stop and reap the sync workers still running (an interrupted run)."""
    for _, pid, stream in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        stream.close()


def _spawn(func, *args):
    """Start ``func(*args)`` at once: a greenlet where sockets are patched, a thread
    elsewhere. Returns what ``_result()`` waits for."""
    if _sockets_patched():
        import gevent

        return gevent.spawn(func, *args)
    return _executor("fan-out").submit(func, *args)


def _result(started):
    """Wait for what ``_spawn()`` started and return its value (never raising: the
    functions given to it catch their own errors)."""
    if isinstance(started, concurrent.futures.Future):
        return started.result()
    return started.get()  # a greenlet


class _Sync:
    """Compare media hosts directory by directory, and repair them.

    The work is a stream of jobs (one upload, deletion or content check)
    produced by walking the tree once and run ``concurrency`` at a time:
    the walk lists each directory on every host while the jobs of the
    directories before it run. Subclasses say where the truth is: the master
    copy (_MasterSync), or the newest copy among the hosts (_Heal).

    With ``options.processes`` above 1 (a master sync from the command
    line), the work is shared: forked workers each take the directories
    that _share_of() gives them, and send their tallies home when done.
    """

    def __init__(self, storage, hosts, prefix, options, out, err):
        self.storage = storage
        self.transport = storage.transport
        self.hosts = hosts
        self.prefix = prefix
        self.dry_run = options.dry_run
        self.checksum = options.checksum
        self.concurrency = options.concurrency
        self.out = out
        self.err = err
        self.tallies = {host: _SyncTally() for host in hosts}
        self.lock = threading.Lock()
        self.file_count = 0  # files of the tree, each counted once (not per host)
        self.started = time.monotonic()
        self.shown = 0.0
        self.interactive = err.isatty()
        self.share = (0, options.processes)  # (this process's share, processes)
        self.board = None

    def run(self):
        """Walk, compare and repair; print the summary; return the exit status."""
        workers = self._start_workers() if self.share[1] > 1 else []
        try:
            _run_bounded(self._run_job, self._jobs(), self.concurrency)
            self._gather(workers)
        finally:
            _stop_workers(workers)  # only those an interruption left running
        if self.interactive and self.shown:
            self._progress(final=True)
        self._summary()
        return 1 if self._incomplete() else 0

    def _start_workers(self):
        """Fork a worker for each share but this process's; return ``[(share, pid,
        stream)]``, ``stream`` the worker's pipe, read as text. A worker runs its share
        and exits: it never returns from here."""
        processes = self.share[1]
        if self.interactive:
            self.board = _ProgressBoard(processes)
        self.out.flush()
        self.err.flush()
        # urllib3 checks every host name with the "idna" codec: loaded here, once,
        # rather than in each worker (its import costs a few ms).
        codecs.lookup("idna")
        # What is loaded by now stays until exit: frozen, the collector never
        # walks it, and the workers share its pages instead of copying them.
        gc.freeze()
        workers = []
        try:
            for share in range(1, processes):
                reading, writing = os.pipe()
                try:
                    pid = os.fork()
                except OSError:
                    os.close(reading)
                    os.close(writing)
                    raise
                if pid == 0:
                    os.close(reading)
                    for _, _, stream in workers:
                        stream.close()
                    self._work(share, writing)
                os.close(writing)
                # One owner of the descriptor, closed once however the run ends.
                workers.append((share, pid, open(reading, encoding="utf-8")))  # noqa: SIM115
        except OSError as error:  # out of processes or memory: work alone
            _stop_workers(workers)
            self.share, self.board = (0, 1), None
            self.err.write("Cannot start the sync processes (%s): running in one.\n"
                           % _one_line(error))
            return []
        return workers

    def _work(self, share, pipe):
        """Run ``share`` in a forked worker, send its tallies home as JSON, and exit."""
        status = 1
        try:
            self.share = (share, self.share[1])
            self.interactive = False
            _run_bounded(self._run_job, self._jobs(), self.concurrency)
            report = {"file_count": self.file_count,
                      "tallies": [self.tallies[host].report() for host in self.hosts]}
            with open(pipe, "w", encoding="utf-8") as stream:
                json.dump(report, stream)
            status = 0
        except BaseException:  # noqa: BLE001  nothing may return into the caller's code
            if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                logger.exception("A sync worker process failed.")
        finally:
            os._exit(status)

    def _gather(self, workers):
        """Wait for each worker in turn and add its tallies to this process's."""
        while workers:
            share, pid, stream = workers[0]
            if self.board is not None:
                # The line keeps moving while the workers finish their shares.
                while not select.select([stream], [], [], _PROGRESS_EVERY)[0]:
                    self._maybe_progress()
            text = stream.read()  # until the worker exits
            _, status = os.waitpid(pid, 0)
            workers.pop(0)
            stream.close()
            try:
                report = json.loads(text)
            except ValueError:
                code = os.waitstatus_to_exitcode(status)
                error = RestoError(
                    "the sync process for share %d of %d ended without its report (%s): "
                    "the directories of that share were not compared"
                    % (share + 1, self.share[1], "killed by signal %d" % -code if code < 0
                       else "exit status %d" % code))
                for host in self.hosts:
                    self._failed(host, "(share %d of %d)" % (share + 1, self.share[1]), error)
                continue
            self.file_count += report["file_count"]
            for host, tally in zip(self.hosts, report["tallies"], strict=True):
                self.tallies[host].merge(tally)

    def _run_job(self, job):
        """Run one job ``(func, host, name, *args)``; record a failure on its host."""
        func, host, name = job[:3]
        tally = self.tallies[host]
        try:
            if tally.down is not None:
                raise RestoError("not tried: %s was taken as down (%s)"
                                 % (host, _one_line(tally.down)))
            func(host, name, *job[3:])
        except Exception as error:
            self._failed(host, name, error)
        else:
            with self.lock:
                tally.no_answer_in_a_row = 0
        self._maybe_progress()

    def _failed(self, host, name, error):
        """Count a failure on ``host``; after _SYNC_DOWN_AFTER without answer, it is down."""
        tally = self.tallies[host]
        with self.lock:
            tally.fail(name, error)
            if isinstance(error, TransportError):
                tally.no_answer_in_a_row += 1
                if tally.no_answer_in_a_row >= _SYNC_DOWN_AFTER and tally.down is None:
                    tally.down = error
            elif not isinstance(error, RestoError) or not str(error).startswith("not tried"):
                tally.no_answer_in_a_row = 0

    def _list(self, host, directory):
        """List ``directory`` on ``host``: its entries, [] when missing, or the error."""
        tally = self.tallies[host]
        if tally.down is not None or tally.cannot_list is not None:
            return None
        try:
            entries = self.transport.list(host, directory)
        except FileNotFoundError:
            entries = []
        except _CannotList as error:
            with self.lock:
                tally.cannot_list = error
            return None
        except Exception as error:
            return error
        with self.lock:
            tally.dirs += 1
            tally.no_answer_in_a_row = 0
        return entries

    def _listings(self, directories):
        """Yield ``(directory, item, listings)`` for ``(directory, item)`` pairs, with
        each directory's listings (host -> entries, None or error) asked for up to
        _SYNC_LOOKAHEAD directories ahead."""
        window = collections.deque()
        for directory, item in directories:
            window.append((directory, item, [] if isinstance(item, Exception) else
                           [(host, _spawn(self._list, host, directory)) for host in self.hosts]))
            if len(window) > _SYNC_LOOKAHEAD:
                yield self._listed(window.popleft())
        while window:
            yield self._listed(window.popleft())

    def _listed(self, pending):
        """Wait for one directory's listings; count a failed one on its host."""
        directory, item, started = pending
        listings = {}
        for host, listing in started:
            listing = _result(listing)
            if isinstance(listing, Exception):
                self._failed(host, (directory or ".") + "/", listing)
                listing = None
            listings[host] = listing
        self._maybe_progress()
        return directory, item, listings

    def _maybe_progress(self):
        """Redraw the progress line when it is time (terminals only; a worker posts
        its totals for the process that draws)."""
        if not self.interactive and self.board is None:
            return
        now = time.monotonic()
        if now - self.started >= _PROGRESS_AFTER and now - self.shown >= _PROGRESS_EVERY:
            self._progress()

    def _progress(self, final=False):
        """Show one line of progress on the terminal."""
        self.shown = now = time.monotonic()
        with self.lock:
            totals = {counter: sum(getattr(tally, counter) for tally in self.tallies.values())
                      for counter in _ProgressBoard.fields}
        if self.board is not None and not final:  # the final line has every tally
            self.board.post(self.share[0], totals)
            if self.share[0]:
                return
            totals = self.board.totals()
        rate = totals["files"] / max(now - self.started, 1e-6)
        line = ("%(dirs)d directories listed, %(files)d files compared, %(uploaded)d uploaded, "
                "%(deleted)d deleted, %(failed)d failed" % totals) + ", %.0f files/s" % rate
        self.err.write("\r" + line.ljust(78) + ("\n" if final else ""))
        self.err.flush()

    def _incomplete(self):
        """Tell whether the hosts may still differ from what they should hold."""
        return any(tally.failed or tally.down is not None or tally.refused
                   or (self.dry_run and self._needed(tally)) or self._left(tally)
                   for tally in self.tallies.values())

    def _needed(self, tally):
        """Return how many repairs ``tally`` found (uploads, and deletions when asked)."""
        return tally.missing + tally.size + tally.stale + tally.content

    def _left(self, tally):
        """Return how many differences a real run leaves by design (orphans kept)."""
        return 0

    def _summary(self):
        """Print the per-host table, the notes and failures, and the final line."""
        out = self.out
        width = max([len("host")] + [len(host) for host in self.hosts])
        columns = self._columns()
        out.write("%-*s %s\n" % (width, "host", " ".join("%9s" % title for title, _ in columns)))
        for host, tally in self.tallies.items():
            out.write("%-*s %s\n" % (width, host, " ".join(
                "%9s" % ("HEAD" if counter == "dirs" and tally.cannot_list else
                         getattr(tally, counter) if isinstance(counter, str)
                         else counter(tally)) for _, counter in columns)))
        for host, tally in self.tallies.items():
            for line in self._notes(host, tally):
                out.write(line + "\n")
        for host, tally in self.tallies.items():
            for name, error in tally.failures:
                out.write("FAILED %s on %s: %s\n" % (name, host, _one_line(error)))
            if tally.failed > len(tally.failures):
                out.write("... and %d more failures on %s\n"
                          % (tally.failed - len(tally.failures), host))
        down = ["%s (%s)" % (host, _one_line(tally.down))
                for host, tally in self.tallies.items() if tally.down is not None]
        out.write("%s%d files x %d hosts in %.1f s%s, %s. %s%s\n" % (
            "Dry run: " if self.dry_run else "", self.file_count, len(self.hosts),
            time.monotonic() - self.started,
            " by %d processes" % self.share[1] if self.share[1] > 1 else "",
            _COMPARED_CONTENT if self.checksum else _COMPARED, self._outcome(),
            " Down: %s." % "; ".join(down) if down else ""))

    def _notes(self, host, tally):
        """Return the lines that explain a host's figures."""
        notes = []
        if tally.cannot_list is not None:
            notes.append(_one_line(tally.cannot_list))
        for reason in tally.refusals:
            notes.append("%s: %s" % (host, reason))
        return notes


class _MasterSync(_Sync):
    """Repair media hosts from the master copy of a Hybrid or Async storage.

    Per directory, the master's entries and each host's listing, both sorted
    by name, are merged: a file only in the master copy is missing; in both,
    it differs when the sizes do, when the host's copy is older than the
    master file (an overwrite the host missed), or with ``--checksum`` when
    the content does; a file only on the host is an orphan, reported, and
    deleted with ``--delete``. A host that cannot list is checked file by
    file with HEAD.
    """

    def __init__(self, storage, hosts, prefix, options, out, err):
        super().__init__(storage, hosts, prefix, options, out, err)
        self.root = storage.location
        self.delete = options.delete
        self.max_delete = options.max_delete
        self.deletions = 0  # deletions started (or, dry, counted) against --max-delete

    def _columns(self):
        """Return the summary's (title, counter) columns."""
        return [("dirs", "dirs"), ("files", "files"), ("same", "same"),
                ("missing", "missing"), ("size", "size"), ("stale", "stale"),
                ("content", "content"), ("orphans", "orphans"),
                ("to upload" if self.dry_run else "uploaded",
                 (lambda tally: _Sync._needed(self, tally)) if self.dry_run else "uploaded"),
                ("to delete" if self.dry_run else "deleted",
                 self._deletable if self.dry_run else "deleted"),
                ("failed", "failed")]

    def _deletable(self, tally):
        """Return how many orphans a real run would delete (dry runs)."""
        return tally.orphans - tally.refused if self.delete else 0

    def _left(self, tally):
        return 0 if self.delete else tally.orphans

    def _needed(self, tally):
        return super()._needed(tally) + self._deletable(tally)

    def _directories(self):
        """Yield ``(directory, (files, subdirectories, only))`` of the master copy, walked
        once, depth first, in name order; an unreadable directory yields its error."""
        only = None
        start = self.prefix
        if start and not os.path.isdir(os.path.join(self.root, start)):
            start, _, only = start.rpartition("/")  # --prefix names one file
        share, processes = self.share
        stack = [start]
        while stack:  # each directory of the tree is pushed once
            directory = stack.pop()
            if processes > 1 and _share_of(directory, processes) != share:
                # Another process compares it: only its subdirectories count here.
                with contextlib.suppress(OSError):  # that process reports the error
                    _, below = _master_directory(self.root, directory, files_too=False)
                    stack.extend(_join(directory, name) for name in reversed(below))
                continue
            try:
                files, subdirectories = _master_directory(self.root, directory)
            except OSError as error:
                yield directory, error
                continue
            if only is not None:
                files = [entry for entry in files if entry.name == only]
                subdirectories = []
            yield directory, (files, subdirectories, only)
            stack.extend(_join(directory, name) for name in reversed(subdirectories))

    def _jobs(self):
        """Yield the jobs of the whole tree, directory by directory."""
        for directory, item, listings in self._listings(self._directories()):
            if isinstance(item, OSError):
                for host in self.hosts:
                    self._failed(host, (directory or ".") + "/", RestoError(
                        "the master directory cannot be read (%s): nothing compared "
                        "there, nothing deleted" % _one_line(item)))
                continue
            files, subdirectories, only = item
            with self.lock:
                self.file_count += len(files)
            for host in self.hosts:
                tally = self.tallies[host]
                if tally.down is not None:
                    continue
                entries = listings[host]
                if entries is None:
                    if tally.cannot_list is not None:
                        for entry in files:
                            yield self._check_by_head, host, _join(directory, entry.name), entry
                    continue
                if only is not None:
                    entries = [entry for entry in entries if entry.name == only]
                yield from self._compare(host, directory, files, subdirectories, entries,
                                         only is not None)

    def _compare(self, host, directory, files, subdirectories, entries, one_file):
        """Yield the jobs of one directory on one host: both sides sorted by name."""
        tally = self.tallies[host]
        host_files = [entry for entry in entries if not entry.is_dir]
        host_dirs = {entry.name for entry in entries if entry.is_dir}
        orphans = []
        index = 0
        counts = dict.fromkeys(("same", "size", "stale", "missing"), 0)
        for entry in files:
            while index < len(host_files) and host_files[index].name < entry.name:
                orphans.append(host_files[index])
                index += 1
            if index < len(host_files) and host_files[index].name == entry.name:
                copy = host_files[index]
                index += 1
                verdict = self._verdict(entry, copy)
                if verdict == "same":
                    counts["same"] += 1
                elif verdict == "content":
                    yield (self._check_content, host, _join(directory, entry.name), entry,
                           copy.md5)
                else:
                    counts[verdict] += 1
                    if not self.dry_run:
                        yield self._upload, host, _join(directory, entry.name), entry
            elif entry.name in host_dirs:
                self._failed(host, _join(directory, entry.name), RestoError(
                    "the host has a directory where the master copy has a file: remove "
                    "it by hand"))
            elif entry.name.startswith("."):
                # nginx lists no name that starts with a dot (autoindex and
                # dav-ext alike): ask the host itself before calling it missing.
                yield self._check_by_head, host, _join(directory, entry.name), entry
            else:
                counts["missing"] += 1
                if not self.dry_run:
                    yield self._upload, host, _join(directory, entry.name), entry
        # Counted once per directory: a lock per file costs more than the rest
        # of an up-to-date file's comparison.
        with self.lock:
            tally.files += sum(counts.values())
            for verdict, count in counts.items():
                setattr(tally, verdict, getattr(tally, verdict) + count)
        orphans.extend(host_files[index:])
        if one_file:
            return
        known = set(subdirectories)
        orphans.extend(_Entry(name, True, None, None, None) for name in sorted(host_dirs)
                       if name not in known and name not in {entry.name for entry in files})
        if orphans:
            yield from self._orphans(host, directory, orphans, empty=not files and not known)

    def _verdict(self, entry, copy):
        """Judge a file both sides have: "same", "size", "stale", or "content" (to be
        checked, with --checksum)."""
        if copy.size != entry.size:
            return "size"
        if copy.mtime is not None and copy.mtime + _MTIME_RESOLUTION <= entry.mtime:
            return "stale"
        return "content" if self.checksum else "same"

    def _orphans(self, host, directory, orphans, empty):
        """Count the orphans of a directory (a host-only directory counts what it holds)
        and yield their deletions when asked for and allowed."""
        tally = self.tallies[host]
        stack = [(directory, orphans)]
        while stack:  # each host-only directory is listed once
            parent, entries = stack.pop()
            for entry in entries:
                name = _join(parent, entry.name)
                if entry.is_dir:
                    try:
                        below = self.transport.list(host, name)
                    except FileNotFoundError:
                        continue
                    except Exception as error:
                        self._failed(host, name + "/", error)
                        continue
                    stack.append((name, below))
                    continue
                with self.lock:
                    tally.orphans += 1
                if not self.delete:
                    continue
                refusal = self._refusal(directory, empty)
                if refusal is not None:
                    with self.lock:
                        tally.refuse(1, refusal)
                    continue
                if not self.dry_run:
                    yield self._delete, host, name

    def _refusal(self, directory, empty):
        """Return why an orphan of ``directory`` must not be deleted, or None (and count it)."""
        if empty:
            return ("orphans in %s/ not deleted: that master directory is empty (is it "
                    "mounted?)" % (directory or "."))
        with self.lock:
            if self.max_delete is not None and self.deletions >= self.max_delete:
                return ("deletions stopped at --max-delete %d: orphans are left; raise it "
                        "or delete by hand" % self.max_delete)
            self.deletions += 1
        return None

    def _upload(self, host, name, entry):
        """PUT the master copy of ``name`` to ``host``."""
        with open(os.path.join(self.root, name), "rb") as local_file:
            self.transport.put(host, name, local_file, entry.size)
        with self.lock:
            self.tallies[host].uploaded += 1

    def _delete(self, host, name):
        """DELETE the orphan ``name`` on ``host``, inside the storage's path only."""
        _check_name(name)
        self.transport.delete(host, name)
        with self.lock:
            self.tallies[host].deleted += 1

    def _check_content(self, host, name, entry, md5):
        """Compare the content of ``name`` on ``host`` with the master file (MD5); repair."""
        local = _file_md5(os.path.join(self.root, name))
        if md5 is None:
            sink = _MD5Sink()
            self.transport.fetch(host, name, sink)
            md5 = sink.digest.hexdigest()
        differs = md5 != local
        with self.lock:
            tally = self.tallies[host]
            tally.files += 1
            if differs:
                tally.content += 1
            else:
                tally.same += 1
        if differs and not self.dry_run:
            self._upload(host, name, entry)

    def _outcome(self):
        """Return the last sentence of the summary."""
        tallies = self.tallies.values()
        failed = sum(tally.failed for tally in tallies)
        uploads = sum(_Sync._needed(self, tally) for tally in tallies)
        orphans = sum(tally.orphans for tally in tallies)
        refused = sum(tally.refused for tally in tallies)
        parts = []
        if failed:
            parts.append("%d could not be checked or repaired" % failed)
        blind = [host for host, tally in self.tallies.items() if tally.cannot_list]
        if blind:
            parts.append("orphans not looked for on %s (no listing)" % ", ".join(blind))
        if self.dry_run:
            deletions = sum(self._deletable(tally) for tally in tallies)
            if uploads:
                parts.append("%d uploads needed" % uploads)
            if deletions:
                parts.append("%d deletions needed" % deletions)
            elif orphans:
                parts.append("%d orphans found (--delete removes them)" % orphans)
            if refused:
                parts.append("%d orphans would not be deleted (see above)" % refused)
            if self._clean(parts, blind):
                parts.insert(0, "every host matches the master copy")
            return _sentence(parts) + "; nothing was changed."
        if refused:
            parts.append("%d orphans not deleted (see above)" % refused)
        elif orphans and not self.delete:
            parts.append("%d orphans left: run with --delete to remove them" % orphans)
        if self._clean(parts, blind):
            parts.insert(0, "every host matches the master copy")
        return _sentence(parts) + "."

    def _clean(self, parts, blind):
        """Tell whether ``parts`` found nothing wrong (but the hosts that cannot list)."""
        down = any(tally.down is not None for tally in self.tallies.values())
        return not down and len(parts) == (1 if blind else 0)

    def _check_by_head(self, host, name, entry):
        """Compare ``name`` on a host that cannot list, with HEAD; repair."""
        try:
            copy = self.transport.stat(host, name)
        except FileNotFoundError:
            with self.lock:
                tally = self.tallies[host]
                tally.files += 1
                tally.missing += 1
            if not self.dry_run:
                self._upload(host, name, entry)
            return
        verdict = self._verdict(entry, copy)
        if verdict == "content":
            self._check_content(host, name, entry, copy.md5)
            return
        with self.lock:
            tally = self.tallies[host]
            tally.files += 1
            setattr(tally, verdict, getattr(tally, verdict) + 1)
        if verdict != "same" and not self.dry_run:
            self._upload(host, name, entry)


class _Heal(_Sync):
    """Heal the hosts of a DistributedStorage from each other (no master copy).

    Per directory, every host's listing is merged by name: a file some hosts
    lack is copied to them from one that has it; copies that differ (in
    size, or with ``--checksum`` in content) are replaced by the newest one,
    by modification time, and the choice is logged. A host that cannot list
    is asked about each name the others list, with HEAD.
    """

    def _columns(self):
        return [("dirs", "dirs"), ("files", "files"), ("same", "same"),
                ("missing", "missing"), ("size", "size"), ("content", "content"),
                ("to copy" if self.dry_run else "copied",
                 self._needed if self.dry_run else "uploaded"),
                ("failed", "failed")]

    def _jobs(self):
        """Yield the jobs of the union of the hosts' trees, directory by directory."""
        pending = collections.deque([self.prefix])
        # The tree is discovered from the listings: walk it in waves of
        # _SYNC_LOOKAHEAD directories, each directory listed once.
        while pending:
            wave = [pending.popleft() for _ in range(min(len(pending), _SYNC_LOOKAHEAD))]
            subdirectories = []
            for directory, _item, listings in self._listings((d, None) for d in wave):
                yield from self._merge(directory, listings, subdirectories)
            pending.extendleft(reversed(subdirectories))

    def _merge(self, directory, listings, subdirectories):
        """Yield the copies one directory needs; collect its subdirectories."""
        names = {}
        directories = set()
        for host in self.hosts:
            for entry in listings[host] or ():
                if entry.is_dir:
                    directories.add(entry.name)
                else:
                    names.setdefault(entry.name, {})[host] = entry
        subdirectories.extend(_join(directory, name) for name in sorted(directories))
        blind = [host for host in self.hosts if listings[host] is None
                 and self.tallies[host].cannot_list is not None
                 and self.tallies[host].down is None]
        for base in sorted(names):
            name = _join(directory, base)
            with self.lock:
                self.file_count += 1
            if blind:
                yield (self._heal_by_head, self.hosts[0], name, names[base], blind)
            else:
                job = self._heal(name, names[base], listings)
                if job is not None:
                    yield job

    def _heal_by_head(self, _host, name, copies, blind):
        """Stat ``name`` on the hosts that cannot list, then heal it."""
        copies = dict(copies)
        for host in blind:
            try:
                copies[host] = self.transport.stat(host, name)
            except FileNotFoundError:
                pass
            except Exception as error:
                self._failed(host, name, error)
        job = self._heal(name, copies, None)
        if job is not None:
            job[0](*job[1:])

    def _heal(self, name, copies, listings):
        """Count one name across the hosts; return the job that copies it, or None."""
        present = [host for host in self.hosts if host in copies]
        winner = max(present, key=lambda host: (copies[host].mtime or 0.0,
                                                -self.hosts.index(host)))
        best = copies[winner]
        targets = []
        for host in self.hosts:
            tally = self.tallies[host]
            if tally.down is not None or (listings is not None and listings[host] is None
                                          and host not in copies):
                continue
            copy = copies.get(host)
            verdict = ("missing" if copy is None else "size" if copy.size != best.size
                       else "same")
            if verdict == "same" and self.checksum:
                verdict = None  # decided by the content check
            with self.lock:
                tally.files += 1
                if verdict is not None:
                    setattr(tally, verdict, getattr(tally, verdict) + 1)
            if verdict in ("missing", "size"):
                targets.append(host)
        if self.checksum:
            return self._check_contents, winner, name, copies, targets
        if not targets:
            return None
        self._log_choice(name, winner, best, copies, targets)
        if self.dry_run:
            return None
        return self._copy, winner, name, targets

    def _check_contents(self, winner, name, copies, targets):
        """Compare the MD5 of every copy with the winner's; copy where it differs."""
        digests = {}
        for host, copy in copies.items():
            if copy.md5 is not None:
                digests[host] = copy.md5
                continue
            sink = _MD5Sink()
            try:
                self.transport.fetch(host, name, sink)
            except Exception as error:
                self._failed(host, name, error)
                continue
            digests[host] = sink.digest.hexdigest()
        if winner not in digests:
            return
        for host, digest in digests.items():
            if host in targets or host == winner:
                continue
            differs = digest != digests[winner]
            with self.lock:
                tally = self.tallies[host]
                if differs:
                    tally.content += 1
                else:
                    tally.same += 1
            if differs:
                targets.append(host)
        with self.lock:
            self.tallies[winner].same += 1
        if targets:
            self._log_choice(name, winner, copies[winner], copies, targets)
            if not self.dry_run:
                self._copy(winner, name, targets)

    def _log_choice(self, name, winner, best, copies, targets):
        """Log which copy wins when copies differ (not when some are only missing)."""
        losers = [host for host in targets if host in copies]
        if losers:
            logger.warning(
                "Heal: %s differs between hosts; the copy on %s wins (newest, modified %s, "
                "%s bytes) over %s.", name, winner,
                "at an unknown time" if best.mtime is None else time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(best.mtime)),
                best.size, ", ".join(losers))

    def _copy(self, source, name, targets):
        """GET ``name`` from ``source`` into a spool once; PUT it to every target."""
        with tempfile.SpooledTemporaryFile(max_size=_MEMORY_SPOOL_LIMIT) as spool:
            size = self.transport.fetch(source, name, spool)
            for host in targets:
                spool.seek(0)
                try:
                    self.transport.put(host, name, spool, size)
                except Exception as error:
                    self._failed(host, name, error)
                    continue
                with self.lock:
                    self.tallies[host].uploaded += 1

    def _outcome(self):
        """Return the last sentence of the summary."""
        needed = sum(self._needed(tally) for tally in self.tallies.values())
        failed = sum(tally.failed for tally in self.tallies.values())
        parts = ["%d could not be checked or healed" % failed] if failed else []
        if self.dry_run and needed:
            parts.append("%d copies needed" % needed)
        if not parts:
            parts.append("every host holds the same files")
        return _sentence(parts) + ("; nothing was changed." if self.dry_run else ".")


def _usable_cpus():
    """Return how many CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _sync_processes(args, heal, one_file):
    """Return how many processes sync shares the directories among (``--jobs``)."""
    if args.jobs is not None and args.jobs < 1:
        raise _UsageError("--jobs must be 1 or more, not %d." % args.jobs)
    asked = args.jobs is not None and args.jobs > 1
    if asked and heal:
        raise _UsageError("--jobs %d: a DistributedStorage is healed in one process (its tree "
                          "is found in the hosts' listings as it goes); leave --jobs out."
                          % args.jobs)
    if asked and args.max_delete is not None:
        raise _UsageError("--jobs %d with --max-delete: the bound on deletions holds exactly "
                          "only in one process; give --jobs 1, or leave --jobs out."
                          % args.jobs)
    wanted = args.jobs if args.jobs is not None else min(_usable_cpus(), _SYNC_MAX_PROCESSES)
    if heal or one_file or args.max_delete is not None:
        return 1
    # Workers are forked by the command line only: called as main() from a
    # program, sync stays in its process, whose threads, greenlets and state
    # fork() would copy half-way.
    if (not _process.command_line or not hasattr(os, "fork")
            or threading.active_count() > 1 or _sockets_patched()):
        return 1
    return max(1, min(wanted, args.concurrency))


def _sync_command(args):
    """Bring every media host in line with the master copy, or heal a DistributedStorage."""
    storage = _load_storage(args)
    hosts = _selected_hosts(storage, args.hosts)
    prefix = (args.prefix or "").strip("/")
    if prefix:
        try:
            _check_name(prefix)
        except SuspiciousFileOperation as error:
            raise _UsageError("--prefix %r is not a path inside the storage: %s"
                              % (args.prefix, error)) from error
    if args.concurrency < 1:
        raise _UsageError("--concurrency must be 1 or more, not %d." % args.concurrency)
    if args.max_delete is not None and (args.max_delete < 0 or not args.delete):
        raise _UsageError("--max-delete %d: give a count of 0 or more, with --delete (it "
                          "bounds the deletions --delete makes)." % args.max_delete)
    if not isinstance(storage, FileSystemStorage):
        if args.delete:
            raise _UsageError(
                "--delete: the storage %r is a %s, which keeps no master copy to say what "
                "is an orphan; sync heals its hosts from each other without it."
                % (args.storage, type(storage).__name__))
        args.processes = _sync_processes(args, heal=True, one_file=False)
        return _Heal(storage, hosts, prefix, args, sys.stdout, sys.stderr).run()
    if not os.path.isdir(storage.location):
        raise _UsageError("The master copy %s does not exist: check MEDIA_ROOT or the "
                          "storage's location." % storage.location)
    start = os.path.join(storage.location, prefix) if prefix else storage.location
    if prefix and not os.path.exists(start):
        raise _UsageError("--prefix %r: no such file or directory in the master copy %s."
                          % (args.prefix, storage.location))
    if args.delete and os.path.isdir(start):
        try:
            empty = not os.listdir(start)
        except OSError as error:
            raise _UsageError("--delete refused: the master copy %s cannot be read (%s); "
                              "fix it first, or sync without --delete."
                              % (start, _one_line(error))) from error
        if empty:
            raise _UsageError(
                "--delete refused: the master copy %s is empty, so every file on the hosts "
                "would be deleted. Is it mounted? Check MEDIA_ROOT (or --prefix)." % start)
    args.processes = _sync_processes(args, heal=False, one_file=not os.path.isdir(start))
    # The in-flight bound is the whole run's: shared among the processes.
    args.concurrency = max(1, args.concurrency // args.processes)
    return _MasterSync(storage, hosts, prefix, args, sys.stdout, sys.stderr).run()


def _timed(func):
    """Wrap ``func(host, name)`` to return the seconds it took."""
    def timed(host, name):
        started = time.perf_counter()
        func(host, name)
        return time.perf_counter() - started
    return timed


def _expect(value, expected, what):
    """Raise RestoError unless ``value`` is ``expected``."""
    if value != expected:
        raise RestoError("the %s read back differs from what was written (%r, not %r)"
                         % (what, value if what == "size" else value[:40],
                            expected if what == "size" else expected[:40]))


def _probe(host, name, steps):
    """Run the check's steps on ``name`` on ``host`` in order, timing each, until one fails."""
    report = {"error": None}
    for step, func in steps:
        started = time.perf_counter()
        try:
            func(host, name)
        except Exception as error:
            report[step] = None
            report["error"] = error
            break
        report[step] = time.perf_counter() - started
    return report


def _explain(error):
    """Say what went wrong in words a sysadmin acts on."""
    if isinstance(error, UnexpectedStatusCode):
        return error.hint or "%s answered %d" % (error.method, error.status)
    if isinstance(error, TransportError):
        return "%s got no answer: %s" % (error.method, _with_hint(error.reason))
    return str(error)


# Redirects check follows from the public URL to the file (http to https, a CDN).
_MAX_PUBLIC_REDIRECTS = 3


def _check_public_url(storage, transport, name, data):
    """GET the probe through ``storage.url()``, without credentials; say what came back."""
    url = storage.url(name)
    if not url.startswith(("http://", "https://")):
        return "not fetched (MEDIA_URL is a path; set an absolute base_url to check it)"
    try:
        for _redirect in range(_MAX_PUBLIC_REDIRECTS + 1):
            origin, path = _split_origin(url)
            parts = urlsplit(origin)
            pool = _pool_manager(1).connection_from_host(
                parts.hostname, parts.port, parts.scheme,
                pool_kwargs=transport._tls if parts.scheme == "https" else None)
            answer = _exchange(pool, _host_header(parts), "GET", path, None,
                               {"User-Agent": _USER_AGENT}, 0, transport.timeout,
                               _Deadline(transport.timeout))
            location = answer.headers.get("location")
            if answer.status not in (301, 302, 303, 307, 308) or not location:
                break
            url = urljoin(url, location)
    except (urllib3.exceptions.HTTPError, _WireError, OSError) as error:
        return "not reachable from here (%s)" % _with_hint(error)
    if answer.status != 200:
        return "answered %d (is the public server in front of the media hosts?)" % (
            answer.status)
    return "ok" if answer.data == data else "served different bytes"


# The probe that check writes: small, and its name says who left it there.
_CHECK_DIRECTORY = ".resto-check"


def _check_command(args):
    """Probe every media host with a small file; report status and latency."""
    storage = _load_storage(args)
    hosts = _selected_hosts(storage, args.hosts)
    transport = storage.transport
    name = "%s/%d-%s.txt" % (_CHECK_DIRECTORY, os.getpid(), os.urandom(6).hex())
    data = b"django-resto-gevent check " + os.urandom(16).hex().encode() + b"\n"
    steps = [
        ("PUT", lambda host, name: transport.put(host, name, data)),
        ("HEAD", lambda host, name: _expect(transport.size(host, name), len(data), "size")),
        ("GET", lambda host, name: _expect(transport.content(host, name), data, "content")),
    ]
    reports = [result.value for result in _fan_out(_probe, hosts, name, steps)]
    public = _check_public_url(storage, transport, name, data)
    written = {host: report for host, report in zip(hosts, reports, strict=True)
               if report.get("PUT") is not None}
    if written:
        for result in _fan_out(_timed(transport.delete), list(written), name):
            report = written[result.host]
            report["DELETE"] = result.value if result.ok else None
            if not result.ok and report["error"] is None:
                report["error"] = result.error
    width = max([len("host")] + [len(host) for host in hosts])
    out = sys.stdout
    out.write("%-*s  %9s %9s %9s %9s  %s\n" % (width, "host", "PUT", "HEAD", "GET", "DELETE",
                                              "result"))
    usable = True
    for host, report in zip(hosts, reports, strict=True):
        times = ["%7.1fms" % (report[step] * 1000) if report.get(step) is not None else "-"
                 for step in ("PUT", "HEAD", "GET", "DELETE")]
        error = report["error"]
        usable &= error is None
        out.write("%-*s  %9s %9s %9s %9s  %s\n" % (width, host, *times,
                                                   "ok" if error is None
                                                   else "FAILED: " + _explain(error)))
    out.write("public URL %s: %s\n" % (storage.url(name), public))
    out.write("%s\n" % ("Every media host is usable." if usable
                        else "Some media hosts are unusable: see FAILED above."))
    return 0 if usable else 1


def _serve(args):
    """Run one MediaServer until SIGINT or SIGTERM."""
    if args.root:
        os.makedirs(args.root, exist_ok=True)
    server = MediaServer(root=args.root, host=args.host, port=args.port,
                         read_only=args.read_only, status=args.status, latency=args.latency,
                         fail_first=args.fail_first, hang=args.hang, trickle=args.trickle,
                         reset_after=args.reset_after)
    server.serve_forever(
        lambda: print("Serving %s on %s/" % (args.root or "memory", server.url), flush=True))
    return 0


def _demo_line(storage, verb, name, size, done_on, host_count, started):
    """Print one line of the demo's report: on how many of the hosts it was done."""
    print("%-18s %-7s %-22s %8d bytes  %d/%d hosts  %7.1f ms" % (
        type(storage).__name__, verb, name, size, done_on, host_count,
        (time.perf_counter() - started) * 1000))


def _demo(args):
    """Save and delete files through the three storages on three embedded servers."""
    from django.core.files.base import ContentFile

    files = {
        "demo/hello.txt": b"Hello, media hosts!\n",
        "demo/caf\u00e9 menu.txt": "Caf\u00e9 cr\u00e8me 2\u20ac\n".encode(),
        "demo/one-mebibyte.bin": os.urandom(1024 * 1024),
    }
    complete = True
    with tempfile.TemporaryDirectory(prefix="resto-demo-") as media_root:
        if not settings.configured:
            settings.configure(MEDIA_ROOT=media_root, MEDIA_URL="/media/")
        servers = [MediaServer().start() for _ in range(3)]
        try:
            hosts = [server.address for server in servers]
            print("Media hosts: %s (MEDIA_URL /media/)" % ", ".join(hosts))
            for storage_class in (HybridStorage, AsyncStorage, DistributedStorage):
                if storage_class is DistributedStorage:
                    storage = storage_class(hosts=hosts)
                else:
                    location = os.path.join(media_root, storage_class.__name__)
                    storage = storage_class(location=location, hosts=hosts)
                for name, data in files.items():
                    started = time.perf_counter()
                    saved = storage.save(name, ContentFile(data))
                    if isinstance(storage, AsyncStorage):
                        storage.join(timeout=30)
                    copies = sum(s.files.get("/media/" + saved) == data for s in servers)
                    complete &= copies == len(servers)
                    _demo_line(storage, "saved", saved, len(data), copies, len(servers),
                               started)
                name = next(iter(files))
                started = time.perf_counter()
                storage.delete(name)
                if isinstance(storage, AsyncStorage):
                    storage.join(timeout=30)
                gone = sum("/media/" + name not in s.files for s in servers)
                complete &= gone == len(servers)
                _demo_line(storage, "deleted", name, 0, gone, len(servers), started)
                for server in servers:
                    server.files.clear()
            for server in servers:
                counts = {}
                for method, _, status in server.log:
                    key = "%s %d" % (method, status)
                    counts[key] = counts.get(key, 0) + 1
                print("%s answered: %s" % (
                    server.address, ", ".join("%s x%d" % item for item in sorted(counts.items()))))
        finally:
            for server in servers:
                server.stop()
    if not complete:
        print("Demo failed: some host did not get every change.")
        return 1
    print("Demo finished: every change reached every host.")
    return 0


def main(argv=None):
    """Run the command line: ``python -m django_resto_gevent demo|serve|sync|check``.

    Returns the exit status: 0 when all is well, 1 when a media host is
    incomplete or unusable, 2 for a bad command line or configuration.
    """
    parser = argparse.ArgumentParser(
        prog="python -m django_resto_gevent",
        description="Replicated media storage for Django, on gevent.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="replicate files to three embedded media servers")
    serve = commands.add_parser("serve", help="run a test media server")
    serve.add_argument("--root", help="directory to serve (default: in memory)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    serve.add_argument("--read-only", action="store_true", help="refuse PUT and DELETE with 403")
    serve.add_argument("--status", type=int, help="answer every request with this status")
    serve.add_argument("--latency", type=float, default=0.0,
                       help="seconds to wait before answering")
    serve.add_argument("--fail-first", type=int, default=0, metavar="K",
                       help="answer 503 to the first K requests")
    serve.add_argument("--hang", action="store_true", help="read requests, never answer")
    serve.add_argument("--trickle", type=float, default=0.0, metavar="SECONDS",
                       help="send answers one byte every SECONDS")
    serve.add_argument("--reset-after", type=int, metavar="BYTES",
                       help="reset the connection after BYTES of a PUT body")
    for command, about in (("sync", "repair the media hosts from the master copy: upload "
                                     "what they lack or hold different, report orphans "
                                     "(a DistributedStorage heals from its hosts)"),
                           ("check", "probe every media host: PUT, HEAD, GET, DELETE")):
        sub = commands.add_parser(command, help=about)
        sub.add_argument("--settings", help="Django settings module (default: "
                         "DJANGO_SETTINGS_MODULE)")
        sub.add_argument("--storage", default="default", metavar="ALIAS",
                         help="the STORAGES alias to use (default: default)")
        sub.add_argument("--hosts", nargs="+", metavar="HOST",
                         help="only these of the storage's hosts")
        if command == "sync":
            sub.add_argument("--prefix", metavar="PATH",
                             help="only this file or directory of the master copy")
            sub.add_argument("--dry-run", action="store_true",
                             help="compare only: report what would be uploaded or deleted")
            sub.add_argument("--checksum", action="store_true",
                             help="also compare contents (MD5 from the host's listing, "
                             "else downloaded)")
            sub.add_argument("--delete", action="store_true",
                             help="delete orphans: files on a host that the master copy "
                             "does not have")
            sub.add_argument("--max-delete", type=int, metavar="N",
                             help="with --delete, stop deleting after N files")
            sub.add_argument("--concurrency", type=int, default=16, metavar="N",
                             help="uploads, deletions and checks in flight at once "
                             "(default 16)")
            sub.add_argument("--jobs", type=int, metavar="N",
                             help="processes to share the directories among (default: one "
                             "per CPU, at most %d; 1: this process only)"
                             % _SYNC_MAX_PROCESSES)
    args = parser.parse_args(argv)
    handler = {"demo": _demo, "serve": _serve, "sync": _sync_command,
               "check": _check_command}[args.command]
    if handler in (_demo, _serve):
        _started_up()  # sync and check start up with Django: _load_storage()
    try:
        return handler(args)
    except _UsageError as error:
        print("error: %s" % error, file=sys.stderr)
        return 2

