"""Tests of django_resto_gevent, in sections that mirror the module.

The oracles are the media servers' request logs and the bytes they hold:
in memory for the in-process MediaServer, on disk for real nginx hosts.
"""

import base64
import collections
import contextlib
import copy
import datetime
import email.utils
import functools
import gzip
import hashlib
import http.client
import io
import itertools
import json
import logging
import os
import pathlib
import pickle
import pwd
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
import warnings
import xml.etree.ElementTree
import xml.sax.saxutils
import zlib
from urllib.parse import quote

import gevent
import gevent.event
import h11
import pytest
import urllib3
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage
from django.test import override_settings

import django_resto_gevent
from conftest import (
    NGINX_PASSWORD,
    NGINX_USER,
    SETTINGS_MODULE_TEMPLATE,
    STORAGE_CLASSES,
    DelayProxy,
    FaultProxy,
    RawAnswer,
    free_port,
    idle_connections,
    make_storage,
    missing,
    settle,
    start_nginx,
)
from django_resto_gevent import (
    AsyncStorage,
    BacklogError,
    DefaultTransport,
    DistributedStorage,
    HostResult,
    HybridStorage,
    MediaServer,
    ReplicationError,
    RestoError,
    TransportError,
    UnexpectedStatusCode,
    get_setting,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# The names of the quoting rules: each must land at exactly that path.
AWKWARD_NAMES = [
    "caf\u00e9.txt",
    "a b.txt",
    "100%.txt",
    "what?.txt",
    "#1.txt",
    "dir with space/\u00fc.txt",
]

BAD_NAMES = ["/etc/passwd", "../outside.txt", "a/../../outside.txt", "nul\x00.txt",
             "new\nline.txt", "tab\t.txt", ""]


def resto_records(caplog, level=logging.ERROR):
    """Return the messages logged by django_resto_gevent at ``level``."""
    return [
        record.getMessage() for record in caplog.records
        if record.name == "django_resto_gevent" and record.levelno == level
    ]


def storage_kinds():
    """Parametrize a test over the three storage classes."""
    return pytest.mark.parametrize(
        "storage_class", [HybridStorage, AsyncStorage, DistributedStorage],
        ids=lambda cls: cls.__name__,
    )


###############################################################################
# Settings
###############################################################################


def test_get_setting_defaults_match_django_resto():
    assert get_setting("RESTO_MEDIA_HOSTS") == ()
    assert get_setting("RESTO_FATAL_EXCEPTIONS") is True
    assert get_setting("RESTO_SHOW_TRACEBACK") is False
    assert get_setting("RESTO_TIMEOUT") == 2
    assert get_setting("TIMEOUT") == 2


def test_get_setting_reads_settings_lazily():
    with override_settings(RESTO_TIMEOUT=7):
        assert get_setting("TIMEOUT") == 7
    assert get_setting("TIMEOUT") == 2


def test_get_setting_unknown_name():
    with pytest.raises(ImproperlyConfigured, match="RESTO_TIMOUT"):
        get_setting("TIMOUT")


@storage_kinds()
def test_storage_reads_settings_lazily(storage_class, media_servers, tmp_path):
    first, second = media_servers(2)
    options = {} if storage_class is DistributedStorage else {"location": str(tmp_path)}
    with override_settings(RESTO_MEDIA_HOSTS=[first.address]):
        storage = storage_class(**options)
        assert storage.hosts == (first.address,)
    with override_settings(RESTO_MEDIA_HOSTS=[second.address], RESTO_TIMEOUT=5):
        assert storage.hosts == (second.address,)
        assert storage.timeout == 5
        storage.save("lazy.txt", ContentFile(b"lazy"))
        settle(storage)
    assert second.files == {"/media/lazy.txt": b"lazy"}
    assert first.log == []


@storage_kinds()
def test_checked_options_are_kept_until_a_setting_changes(storage_class, media_servers,
                                                          tmp_path):
    server, = media_servers(1)
    options = {} if storage_class is DistributedStorage else {"location": str(tmp_path)}
    with override_settings(RESTO_MEDIA_HOSTS=[server.address], RESTO_TIMEOUT=3):
        storage = storage_class(**options)
        transport = storage.transport
        storage.save("kept.txt", ContentFile(b"kept"))
        settle(storage)
        assert storage.transport is transport
        assert transport.timeout == 3
        # A pickle carries the options, not what this process checked.
        assert "_checked_cache" in vars(storage)
        assert "_checked_cache" not in vars(pickle.loads(pickle.dumps(storage)))
        with override_settings(RESTO_TIMEOUT=4):
            assert storage.transport is not transport
            assert storage.transport.timeout == storage.timeout == 4
        assert storage.transport.timeout == 3
        with override_settings(RESTO_TIMEOUT=-1), \
                pytest.raises(ImproperlyConfigured, match="RESTO_TIMEOUT"):
            storage.save("refused.txt", ContentFile(b"no"))
    assert server.files == {"/media/kept.txt": b"kept"}


@storage_kinds()
def test_keywords_override_settings(storage_class, media_servers, tmp_path):
    configured, chosen = media_servers(2)
    with override_settings(RESTO_MEDIA_HOSTS=[configured.address], RESTO_TIMEOUT=9):
        storage = make_storage(storage_class, [chosen.address], tmp_path, timeout=3)
        assert storage.hosts == (chosen.address,)
        assert storage.timeout == 3


@storage_kinds()
def test_storage_works_without_arguments(storage_class, media_servers, tmp_path):
    server, = media_servers(1)
    with override_settings(RESTO_MEDIA_HOSTS=[server.address], MEDIA_ROOT=str(tmp_path)):
        storage = storage_class()
        name = storage.save("plain.txt", ContentFile(b"plain"))
        settle(storage)
        assert storage.exists(name)
    assert server.files == {"/media/plain.txt": b"plain"}
    if storage_class is not DistributedStorage:
        assert (tmp_path / "plain.txt").read_bytes() == b"plain"


@storage_kinds()
def test_unknown_keyword_is_named(storage_class):
    with pytest.raises(ImproperlyConfigured, match="'hosst'") as info:
        storage_class(hosst=["127.0.0.1:1"])
    assert storage_class.__name__ in str(info.value)
    assert "hosts" in str(info.value)


@storage_kinds()
def test_empty_hosts_refused_before_anything_is_written(storage_class, tmp_path):
    storage = make_storage(storage_class, None, tmp_path)
    with pytest.raises(ImproperlyConfigured, match="RESTO_MEDIA_HOSTS setting is empty"):
        storage.save("never.txt", ContentFile(b"x"))
    assert not (tmp_path / "master" / "never.txt").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("hosts", "127.0.0.1:80", "must be a list of media hosts"),
        ("hosts", ["media1/path"], "is not a media host"),
        ("hosts", ["ftp://media1:21"], "is not a media host URL"),
        ("hosts", ["http://media1:80/media/"], "without a path"),
        ("hosts", [""], "is not a media host"),
        ("timeout", 0, "positive number of seconds"),
        ("timeout", "2", "positive number of seconds"),
        ("fatal_exceptions", "yes", "True or False"),
        ("show_traceback", 1, "True or False"),
    ],
)
def test_bad_option_values_are_explained(option, value, message, tmp_path):
    options = {"hosts": ["127.0.0.1:1"], option: value}
    storage = HybridStorage(location=str(tmp_path), **options)
    with pytest.raises(ImproperlyConfigured, match=message) as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert "'%s' option of HybridStorage" % option in str(info.value)
    offending = value[0] if isinstance(value, list) else value
    assert repr(offending) in str(info.value)
    assert not (tmp_path / "never.txt").exists()


def test_bad_setting_value_names_the_setting(tmp_path):
    with override_settings(RESTO_MEDIA_HOSTS=["127.0.0.1:1"], RESTO_TIMEOUT=-1):
        storage = HybridStorage(location=str(tmp_path))
        with pytest.raises(ImproperlyConfigured, match="The RESTO_TIMEOUT setting .* -1"):
            storage.save("never.txt", ContentFile(b"x"))


###############################################################################
# Errors
###############################################################################


def test_errors_share_one_oserror_base():
    for error_class in (UnexpectedStatusCode, TransportError, ReplicationError):
        assert issubclass(error_class, RestoError)
    assert issubclass(RestoError, OSError)


def test_errors_pickle_with_their_details():
    status = UnexpectedStatusCode("PUT", "http://u:secret@h:1/media/a", "h:1", 202, (201,))
    transport = TransportError("GET", "http://h:1/media/a", "h:1", "refused")
    replication = ReplicationError("create", "a", [("h:1", status), ("h:2", transport)], 3)
    for error in (status, transport, replication):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
    copy = pickle.loads(pickle.dumps(status))
    assert (copy.method, copy.host, copy.status) == ("PUT", "h:1", 202)
    assert "secret" not in str(copy)
    assert "secret" not in copy.url
    assert pickle.loads(pickle.dumps(replication)).hosts == ["h:1", "h:2"]


def test_replication_error_names_every_failed_host_in_order():
    error = ReplicationError(
        "create", "a.txt",
        [("h:1", UnexpectedStatusCode("PUT", "http://h:1/media/a.txt", "h:1", 500, (201,))),
         ("h:3", TransportError("PUT", "http://h:3/media/a.txt", "h:3", "refused"))],
        3,
    )
    assert str(error).startswith("Failed to create a.txt on 2 of 3 media hosts.")
    assert str(error).index("h:1: PUT") < str(error).index("h:3: PUT")
    assert "answered 500" in str(error)
    assert "refused" in str(error)


###############################################################################
# Wire: answers held against h11
###############################################################################

# The answer reader (_read_answer) is held against h11, a well-kept HTTP/1.1
# parser, on generated answers: valid ones of every framing, the same with one
# thing broken at every place a parser can go wrong, and named malformed
# ones. Where h11 takes a whole answer, the reader must return the same
# status, headers and body; where h11 refuses it, or the answer ends before
# its end, the reader must raise _AnswerError. The reader refuses more than
# h11 only by the rules of STRICTER_THAN_H11, and never reuses a connection
# that h11 would not. Seeds are fixed. RESTO_WIRE_CASES (default 8000) sets
# how many answers the in-process tests read, RESTO_WIRE_E2E_CASES (default
# 400) how many go over loopback TCP per mode; raise them by hand for a
# longer run, e.g. RESTO_WIRE_CASES=100000 RESTO_WIRE_E2E_CASES=3000.

WIRE_SEED = 12
WIRE_CASES = int(os.environ.get("RESTO_WIRE_CASES", "8000"))
WIRE_E2E_CASES = int(os.environ.get("RESTO_WIRE_E2E_CASES", "400"))

# The only answers h11 takes that the reader refuses (RFC 9112, client side).
STRICTER_THAN_H11 = {
    "length-and-chunked": "both Content-Length and Transfer-Encoding (h11 lets chunked win)",
    "version": "an HTTP version whose major is not 1 (h11 takes any digit.digit)",
    "interim-flood": "more than 8 interim (1xx) answers",
    "trailer-flood": "more than 32 trailer lines after a chunked body",
}
# Their bounds, stated here rather than read from the module under test.
WIRE_MAX_INTERIM = 8
WIRE_MAX_TRAILERS = 32

# h11 buffers at most this much of an unfinished head, as the reader does.
WIRE_MAX_HEAD = 64 * 1024

# A second answer, smuggled after the first.
EVIL_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"

# A 201 framed two ways: chunked, it ends after "0\r\n\r\n" and EVIL_ANSWER
# follows; by its Content-Length (47), EVIL_ANSWER is the end of its body.
DESYNC_ANSWER = (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Length: 47\r\n\r\n"
                 b"0\r\n\r\n" + EVIL_ANSWER)

# The requests of the valid answers, and their statuses, as often as hosts send them.
WIRE_METHODS = ["GET"] * 6 + ["PUT"] * 4 + ["HEAD"] * 3 + ["DELETE"] * 3 + ["MKCOL"] * 2

WIRE_STATUSES = {
    "GET": [200] * 6 + [404, 500, 304, 206, 403, 503, 301],
    "PUT": [201] * 4 + [200, 204, 409, 500, 413, 403],
    "HEAD": [200] * 4 + [404, 304, 500],
    "DELETE": [204] * 3 + [200, 404, 500, 423],
    "MKCOL": [201] * 3 + [405, 409, 507],
}

# Header lines of the valid answers: usual ones, repeated names, empty
# values, obs-text, controls, blanks inside, every token character.
WIRE_HEADERS = [
    (b"Server", b"nginx/1.24.0"),
    (b"Date", b"Tue, 01 Jul 2025 12:00:00 GMT"),
    (b"Content-Type", b"text/html; charset=utf-8"),
    (b"ETag", b'"5f-1a2b"'),
    (b"Set-Cookie", b"a=1; Path=/"),
    (b"Set-Cookie", b"b=2"),
    (b"Vary", b"Accept-Encoding"),
    (b"Vary", b"Origin"),
    (b"Cache-Control", b"no-cache, no-store"),
    (b"X-Empty", b""),
    (b"X-Obs-Text", b"caf\xe9 \xff\x85\xa0end"),
    (b"X-Controls", b"a\x01b\x1cc\x7fd"),
    (b"X-Inner-Blanks", b"a  \t b"),
    (b"Keep-Alive", b"timeout=5, max=100"),
    (b"Location", b"/media/elsewhere"),
    (b"Content-Encoding", b"gzip"),
    (b"Connection", b"keep-alive"),
    (b"Connection", b"close"),
    (b"Connection", b"Upgrade, Close"),
    (b"Connection", b"closed"),
    (b"!#$%&'*+-.^_`|~09azAZ", b"every token character"),
]

WIRE_TRAILERS = [(b"X-Checksum", b"sha256=abc"), (b"Expires", b"0"), (b"X-Trailer", b"")]

# Interim answers before a final one.
WIRE_INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
    b"HTTP/1.0 100 Continue\r\n\r\n",
    b"HTTP/1.1 199 Whatever\r\nX-A: 1\r\n\r\n",
]


class WireCase(collections.namedtuple("WireCase", "category method answer")):
    """A generated answer: what made it, the method of its request, its bytes."""


def _cased(rng, name):
    """Return ``name`` as it is, in lower or upper case, or in mixed case."""
    choice = rng.randrange(5)
    if choice == 2:
        return name.lower()
    if choice == 3:
        return name.upper()
    if choice == 4:
        return b"".join(rng.choice((name[i:i + 1], name[i:i + 1].swapcase()))
                        for i in range(len(name)))
    return name


def _field(rng, kind, name, value):
    """Return the part (kind, line) of one header line, its blanks varied."""
    separator = rng.choice([b": ", b": ", b":", b":\t", b":  ", b": \t"])
    tail = rng.choice([b"", b"", b"", b" ", b"\t", b" \t "])
    return [kind, _cased(rng, name) + separator + value + tail + b"\r\n"]


def _status_part(rng, kind, version, status):
    """Return the part (kind, line) of a status line, its reason phrase varied."""
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Unknown"
    reason = rng.choice([phrase] * 5 + [b"", None, b"R\xe9ussi \xff", b"OK\tfine", b"Custom!"])
    line = b"%s %d" % (version, status) + (b"" if reason is None else b" " + reason)
    return [kind, line + b"\r\n"]


def _body(rng):
    """Return a random body: often short, sometimes empty or a few KiB."""
    size = rng.choice([0, rng.randint(1, 64), rng.randint(1, 64), rng.randint(64, 2000),
                       rng.randint(64, 2000), rng.randint(2000, 20000)])
    return rng.randbytes(size)


def _chunked_parts(rng, body, trailers):
    """Return the parts of ``body`` in chunks, the last chunk and ``trailers`` lines."""
    parts = []
    offset = 0
    while offset < len(body):
        size = rng.randint(1, len(body) - offset)
        digits = rng.choice(["%x", "%X", "%04x", "%x"]) % size
        extension = rng.choice([b""] * 4 + [b";name", b";name=value", b';q="a;b"', b";a;b=c",
                                            b";"])
        parts += [["chunk-size", digits.encode() + extension + b"\r\n"],
                  ["chunk-data", body[offset:offset + size]],
                  ["chunk-crlf", b"\r\n"]]
        offset += size
    parts.append(["last-chunk", rng.choice([b"0", b"0", b"000"]) + rng.choice(
        [b"", b"", b";end"]) + b"\r\n"])
    parts += [_field(rng, "trailer", name, value) for name, value in trailers]
    parts.append(["trailer-end", b"\r\n"])
    return parts


def _valid_case(rng):
    """Return (category, method, parts): a valid answer, as its parts [kind, bytes]."""
    method = rng.choice(WIRE_METHODS)
    status = rng.choice(WIRE_STATUSES[method])
    parts = []
    for _ in range(rng.choice([0] * 8 + [1, 1, 2, 3])):
        for index, line in enumerate(rng.choice(WIRE_INTERIM).split(b"\r\n")[:-1]):
            kind = "interim-status" if index == 0 else "interim-header"
            parts.append([kind if line else "interim-end", line + b"\r\n"])
    version = b"HTTP/1.1" if rng.random() < 0.9 else b"HTTP/1.0"
    parts.append(_status_part(rng, "status", version, status))
    headers = [_field(rng, "header", *rng.choice(WIRE_HEADERS))
               for _ in range(rng.choice([0, 1, 2, 3, 4, 6]))]
    body = _body(rng)
    if method == "HEAD" or status in (204, 304):
        framing = "bodiless"
        claim = rng.choice(["none", "length", "length", "chunked"])
        if claim == "length":
            headers.append(_field(rng, "length", b"Content-Length", b"%d" % len(body)))
        elif claim == "chunked":
            headers.append(_field(rng, "coding", b"Transfer-Encoding", rng.choice(
                [b"chunked", b"Chunked"])))
        body_parts = []
    else:
        framing = rng.choice(["length"] * 5 + ["chunked"] * 3 + ["close"])
        body_parts = [["body", body]]
        if framing == "length":
            value = b"%d" % len(body)
            value = rng.choice([value] * 6 + [value + b", " + value, value + b"," + value,
                                              b"00" + value])
            headers.append(_field(rng, "length", b"Content-Length", value))
            if rng.random() < 0.1:
                # The same text: h11 refuses "05" and "5" as conflicting.
                headers.append(_field(rng, "length", b"Content-Length", value))
        elif framing == "chunked":
            headers.append(_field(rng, "coding", b"Transfer-Encoding",
                                  rng.choice([b"chunked"] * 4 + [b"Chunked", b"CHUNKED"])))
            trailers = rng.sample(WIRE_TRAILERS, rng.choice([0, 0, 0, 1, 2, 3]))
            body_parts = _chunked_parts(rng, body, trailers)
    rng.shuffle(headers)
    parts += headers + [["end", b"\r\n"]] + body_parts
    return "valid-" + framing, method, parts


# Blanks and controls that are not OWS: each must break a name, and stay in a value.
WIRE_ODD_BLANKS = [b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x85", b"\xa0", b"\x00",
                   b"\r"]
WIRE_FIELD_KINDS = ("header", "length", "coding", "trailer", "interim-header")
WIRE_HEAD_KINDS = ("interim-status", "interim-header", "interim-end", "status", "header",
                   "length", "coding", "end")


def _pick(rng, parts, *kinds):
    """Return the index of a random part of one of ``kinds``, or None."""
    found = [index for index, (kind, _data) in enumerate(parts) if kind in kinds]
    return rng.choice(found) if found else None


def _line_end(line):
    """Return (content, end) of a line: end is its CRLF, LF or nothing."""
    for end in (b"\r\n", b"\n"):
        if line.endswith(end):
            return line[:-len(end)], end
    return line, b""


def _insert(rng, data, piece, start=0, stop=None):
    """Return ``data`` with ``piece`` inserted at a random place between start and stop."""
    at = rng.randint(start, len(data) if stop is None else stop)
    return data[:at] + piece + data[at:]


def _mutate_version(rng, method, parts):
    """The HTTP version of a status line: others, lower case, blanks, odd digits."""
    index = _pick(rng, parts, "status", "status", "status", "interim-status")
    if index is None:
        return None
    _version, _space, rest = parts[index][1].partition(b" ")
    version = rng.choice([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/1.9", b"HTTP/2.0", b"HTTP/0.9",
                          b"HTTP/3.0", b"HTTP/9.9", b"HTTP/1.10", b"HTTP/1", b"HTTP/11",
                          b"http/1.1", b"HTTPS/1.1", b"HTTP/1.1 ", b" HTTP/1.1", b"HTTP/\xb9.1",
                          b"HTTP/1.1\t", b"HTTP/1.x", b"HTTP /1.1", b"HTTP/\xd9\xa1.1"])
    parts[index][1] = version + b" " + rest
    return parts


def _mutate_status(rng, method, parts):
    """The status code: too long, too short, not digits, outside 100-999, 101."""
    index = _pick(rng, parts, "status", "status", "status", "interim-status")
    if index is None:
        return None
    version, _space, rest = parts[index][1].partition(b" ")
    code = rng.choice([b"2000", b"20", b"2x0", b"\xb200", b"\xc2\xb200", b"\xd9\xa200", b" 200",
                       b"+20", b"099", b"000", b"101", b"199", b"100", b"600", b"999", b"-20",
                       b"0x1", b"2O0"])
    parts[index][1] = version + b" " + code + rest[3:]
    return parts


def _mutate_reason(rng, method, parts):
    """The reason phrase: none, empty, controls, obs-text, long, bare CR."""
    index = _pick(rng, parts, "status", "status", "interim-status")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    reason = rng.choice([b"", b" ", b" \x01ctl", b" a\x7fb", b" nul\x00", b" cr\rx", b" tab\tx",
                         b"  two", b" " + b"r" * 2000, b" \xff\xfe", b" vt\x0bx", b" ff\x0cx",
                         b"\tOK", b"OK", b" \x85\xa0"])
    parts[index][1] = line[:12] + reason + end
    return parts


def _mutate_name_blank(rng, method, parts):
    """A blank or control before the colon, at the start of a name, or inside it."""
    index = _pick(rng, parts, *WIRE_FIELD_KINDS, "length", "length", "coding")
    if index is None:
        return None
    name, colon, rest = parts[index][1].partition(b":")
    blank = rng.choice(WIRE_ODD_BLANKS)
    where = rng.choice(["colon", "colon", "start", "inside"])
    if where == "colon":
        name += blank
    elif where == "start":
        name = blank + name
    else:
        name = _insert(rng, name, blank)
    parts[index][1] = name + colon + rest
    return parts


def _mutate_name_character(rng, method, parts):
    """A name with a character that is not a token's, an empty name, no colon."""
    index = _pick(rng, parts, *WIRE_FIELD_KINDS)
    if index is None:
        return None
    name, colon, rest = parts[index][1].partition(b":")
    change = rng.choice(["character"] * 4 + ["empty", "colon"])
    if change == "empty":
        name = b""
    elif change == "colon":
        colon = b""
    else:
        name = _insert(rng, name, rng.choice([b"(", b"@", b"/", b"\x7f", b"\xe9", b"\x01", b'"',
                                               b"{", b"=", b"\\", b",", b";"]))
    parts[index][1] = name + colon + rest
    return parts


def _mutate_value_blank(rng, method, parts):
    """A blank or control before or after a value (only SP and HTAB are trimmed)."""
    index = _pick(rng, parts, *WIRE_FIELD_KINDS, "length")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    name, colon, value = line.partition(b":")
    blank = rng.choice(WIRE_ODD_BLANKS + [b"\xa0\xa0", b" \x0b "])
    value = blank + value if rng.random() < 0.5 else value + blank
    parts[index][1] = name + colon + value + end
    return parts


def _mutate_value_character(rng, method, parts):
    """A control, a line end or a fold inside a value."""
    index = _pick(rng, parts, *WIRE_FIELD_KINDS)
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    name, colon, value = line.partition(b":")
    value = _insert(rng, value, rng.choice([b"\x00", b"\r", b"\n", b"\x01", b"\x7f", b"\x85",
                                            b"\xa0", b"\r\n", b"\r\n ", b"\r\n\t", b" \r\n ",
                                            b"\n ", b"\x0b", b"\x0c"]))
    parts[index][1] = name + colon + value + end
    return parts


def _mutate_fold(rng, method, parts):
    """Obsolete line folding: inside a value, of the first header line, an empty fold."""
    change = rng.choice(["value", "value", "first", "blank"])
    if change == "first":
        index = _pick(rng, parts, "status", "interim-status")
        if index is None:
            return None
        if index + 1 == len(parts) or parts[index + 1][0] not in WIRE_FIELD_KINDS:
            return None
        parts[index + 1][1] = rng.choice([b" ", b"\t", b"  "]) + parts[index + 1][1]
        return parts
    index = _pick(rng, parts, *WIRE_FIELD_KINDS, "length", "coding")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    if change == "blank":
        parts[index][1] = line + end + rng.choice([b" ", b"\t", b" \t"]) + end
        return parts
    fold = rng.choice([b"\r\n ", b"\r\n\t", b"\r\n   ", b"\n "])
    parts[index][1] = _insert(rng, line, fold, line.find(b":") + 1) + end
    return parts


def _length_value(line):
    """Return the Content-Length of a header line, 5 if it has no digits."""
    digits = re.search(rb"[0-9]+", line.partition(b":")[2])
    return int(digits.group()) if digits else 5


def _mutate_length(rng, method, parts):
    """Content-Length: signs, hex, blanks, lists and repeats, 21 digits, off by one."""
    index = _pick(rng, parts, "length")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    name = line.partition(b":")[0]
    size = _length_value(line)
    digits = b"%d" % size
    change = rng.choice(["value"] * 6 + ["conflict", "repeat", "more", "less"])
    if change in ("conflict", "repeat"):
        other = digits if change == "repeat" else b"%d" % (size + 1)
        parts.insert(index + rng.choice([0, 1]), ["length", b"Content-Length: " + other + end])
        return parts
    if change in ("more", "less"):
        value = b"%d" % max(0, size + (1 if change == "more" else -1))
    else:
        value = rng.choice([b"+" + digits, b"0x%x" % size, digits + b" " + digits, b"-1",
                            b"\xb3", b"\xc2\xb3", digits + b",%d" % (size + 1),
                            digits + b", " + digits, digits + b",," + digits, digits + b",",
                            b"," + digits, b"",
                            digits + b".0", digits.rjust(21, b"0"), digits.rjust(20, b"0"),
                            digits + b"\x0b", b"\x0c" + digits, digits + b"\xa0", b"1e3",
                            digits + b";x", b"0" + digits, b" " + digits + b" "])
    parts[index][1] = name + b": " + value + end
    return parts


def _mutate_coding(rng, method, parts):
    """Transfer-Encoding: other codings, lists, two fields, with a Content-Length."""
    index = _pick(rng, parts, "coding")
    if index is None:
        index = _pick(rng, parts, "length")
        if index is None:
            return None
        parts.insert(index + rng.choice([0, 1]), ["coding", b"Transfer-Encoding: chunked\r\n"])
        return parts
    line, end = _line_end(parts[index][1])
    name = line.partition(b":")[0]
    change = rng.choice(["value"] * 4 + ["twice", "length"])
    if change == "twice":
        parts.insert(index + 1, ["coding", b"Transfer-Encoding: chunked" + end])
        return parts
    if change == "length":
        body = b"".join(data for kind, data in parts if kind.startswith(("chunk", "last", "trail")))
        length = rng.choice([0, 47, len(body), len(body) + 3])
        parts.insert(index + rng.choice([0, 1]), ["length", b"Content-Length: %d" % length + end])
        return parts
    value = rng.choice([b"xchunked", b"gzip, chunked", b"identity, chunked", b"chunked, chunked",
                        b"chunked, identity", b"identity", b"gzip", b"", b"chunked;q=1", b"chunk",
                        b"chunked\x0b", b"\x0cchunked", b"chunked\xa0", b"ch\xfcnked", b"cHuNkEd",
                        b"chunked,", b", chunked"])
    parts[index][1] = name + b": " + value + end
    return parts


def _mutate_chunk_size(rng, method, parts):
    """A chunk size: 0x, signs, underscores, empty, 21 digits, blanks, off by one."""
    index = _pick(rng, parts, "chunk-size", "chunk-size", "last-chunk")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    digits, semicolon, extension = line.partition(b";")
    size = int(digits, 16) if re.fullmatch(rb"[0-9a-fA-F]+", digits) else 1
    new = rng.choice([b"0x" + digits, b"+" + digits, b"-" + digits, digits[:1] + b"_" + digits[1:],
                      b"", digits.rjust(21, b"0"), digits.rjust(20, b"0"), b" " + digits,
                      digits + b" ", digits + b"\t", digits + b" ", digits.upper(), digits.lower(),
                      b"%x" % (size + 1), b"%x" % max(0, size - 1), b"g", b"\xb3",
                      digits + b"\x0b", b"\xd9\xa1"])
    parts[index][1] = new + semicolon + extension + end
    return parts


def _mutate_chunk_extension(rng, method, parts):
    """A chunk extension of any bytes but LF (ignored), or a blank before it."""
    index = _pick(rng, parts, "chunk-size", "last-chunk")
    if index is None:
        return None
    line, end = _line_end(parts[index][1])
    digits = line.partition(b";")[0]
    extension = rng.choice([b";a=b", b';a="x;y"', b";\x01", b";", b";a\rb", b"; spaced ext",
                            b";\x00", b";" + b"e" * 1000, b";\xff", b" ;a", b";a\r", b";a \t"])
    parts[index][1] = digits + extension + end
    return parts


def _mutate_chunk_end(rng, method, parts):
    """What follows a chunk's data instead of CRLF."""
    index = _pick(rng, parts, "chunk-crlf")
    if index is None:
        return None
    parts[index][1] = rng.choice([b"", b"\n", b"\r", b"XX", b"\r\r\n", b" \r\n", b"\r\n\r\n",
                                  b"\n\r"])
    return parts


def _mutate_line_ends(rng, method, parts):
    """Bare LF, bare CR or CR CR LF line ends: in the head, one line, chunks, trailers."""
    change = rng.choice(["head", "line", "end", "chunks", "trailers", "cr", "crcr"])
    kinds = {"head": WIRE_HEAD_KINDS, "line": WIRE_HEAD_KINDS, "end": ("end",),
             "chunks": ("chunk-size", "last-chunk"), "trailers": ("trailer", "trailer-end"),
             "cr": WIRE_HEAD_KINDS, "crcr": WIRE_HEAD_KINDS}[change]
    indices = [index for index, (kind, _data) in enumerate(parts) if kind in kinds]
    if not indices:
        return None
    if change in ("line", "cr", "crcr"):
        indices = [rng.choice(indices)]
    new_end = {"cr": b"\r", "crcr": b"\r\r\n"}.get(change, b"\n")
    for index in indices:
        line, end = _line_end(parts[index][1])
        if end:
            parts[index][1] = line + new_end
    return parts


def _mutate_cut(rng, method, parts):
    """The answer ends early: inside or after any part."""
    index = rng.randrange(len(parts))
    data = parts[index][1]
    at = rng.choice([rng.randint(0, len(data)), max(0, len(data) - 1)])
    return parts[:index] + [[parts[index][0], data[:at]]]


def _mutate_interim_flood(rng, method, parts):
    """Many interim answers before the final one."""
    count = rng.choice([7, 8, 9, 10, 20, 50])
    interim = [["interim-status", b"HTTP/1.1 100 Continue\r\n"], ["interim-end", b"\r\n"]]
    for _ in range(count):
        parts[0:0] = copy.deepcopy(interim)
    return parts


def _mutate_trailer_flood(rng, method, parts):
    """Many trailer lines after a chunked body."""
    index = _pick(rng, parts, "trailer-end")
    if index is None:
        return None
    count = rng.choice([31, 32, 33, 40, 100])
    flood = [["trailer", b"X-T%d: %d\r\n" % (number, number)] for number in range(count)]
    parts = [part for part in parts if part[0] != "trailer"]
    index = _pick(rng, parts, "trailer-end")
    if index is None:
        return None
    return parts[:index] + flood + parts[index:]


def _mutate_extra(rng, method, parts):
    """Bytes after the end of the answer."""
    parts.append(["extra", rng.choice([EVIL_ANSWER, b"\r\n", b"\n", b"\x00",
                                       b"HTTP/1.1 100 Continue\r\n\r\n",
                                       rng.randbytes(rng.randint(1, 20))])])
    return parts


def _mutate_blank_line(rng, method, parts):
    """An empty line (or a blank) before a status line."""
    index = _pick(rng, parts, "status", "interim-status")
    if index is None:
        return None
    parts.insert(index, ["blank", rng.choice([b"\r\n", b"\n", b" ", b"\r\n\r\n", b"\t"])])
    return parts


def _mutate_byte(rng, method, parts):
    """One byte of the head replaced, inserted or deleted."""
    index = _pick(rng, parts, *WIRE_HEAD_KINDS)
    if index is None or not parts[index][1]:
        return None
    data = parts[index][1]
    at = rng.randrange(len(data))
    byte = bytes([rng.choice([0x00, 0x09, 0x0A, 0x0D, 0x20, 0x3A, 0x3B, 0x2C, 0x0B, 0x7F, 0x80,
                              0xFF, rng.randrange(256)])])
    change = rng.choice(["replace", "insert", "delete"])
    if change == "replace":
        data = data[:at] + byte + data[at + 1:]
    elif change == "insert":
        data = data[:at] + byte + data[at:]
    else:
        data = data[:at] + data[at + 1:]
    parts[index][1] = data
    return parts


def _mutate_huge(rng, method, parts):
    """A head, reason, chunk line or trailer far over 64 KiB; or 32 KiB, well under it."""
    change = rng.choice(["line", "many", "under", "reason", "extension", "trailer"])
    over = 2 * WIRE_MAX_HEAD + rng.randrange(1000)
    if change == "reason":
        index = _pick(rng, parts, "status")
        if index is None:
            return None
        line, end = _line_end(parts[index][1])
        parts[index][1] = line + b" " + b"r" * over + end
        return parts
    if change in ("extension", "trailer"):
        index = _pick(rng, parts, "last-chunk" if change == "extension" else "trailer-end")
        if index is None:
            return None
        if change == "extension":
            parts[index][1] = b"0;" + b"e" * over + b"\r\n"
        else:
            parts.insert(index, ["trailer", b"X-Huge: " + b"h" * over + b"\r\n"])
        return parts
    index = _pick(rng, parts, "end")
    if index is None:
        return None
    if change == "many":
        lines = [["header", b"X-Many-%05d: %s\r\n" % (number, b"m" * 30)] for number in
                 range(over // 44)]
    else:
        size = WIRE_MAX_HEAD // 2 if change == "under" else over
        lines = [["header", b"X-Huge: " + b"h" * size + b"\r\n"]]
    return parts[:index] + lines + parts[index:]


WIRE_MUTATIONS = {
    "version": _mutate_version,
    "status": _mutate_status,
    "reason": _mutate_reason,
    "name-blank": _mutate_name_blank,
    "name-character": _mutate_name_character,
    "value-blank": _mutate_value_blank,
    "value-character": _mutate_value_character,
    "fold": _mutate_fold,
    "length": _mutate_length,
    "coding": _mutate_coding,
    "chunk-size": _mutate_chunk_size,
    "chunk-extension": _mutate_chunk_extension,
    "chunk-end": _mutate_chunk_end,
    "line-ends": _mutate_line_ends,
    "cut": _mutate_cut,
    "interim-flood": _mutate_interim_flood,
    "trailer-flood": _mutate_trailer_flood,
    "extra": _mutate_extra,
    "blank-line": _mutate_blank_line,
    "byte": _mutate_byte,
    "huge": _mutate_huge,
}

# Rarer than the others: each costs 130 KiB or more to read.
WIRE_RARE_MUTATIONS = {"huge": 0.1}


def _ok(*lines, body=b"hello", status=b"200 OK"):
    """Return an answer with ``status``, the header ``lines`` and ``body``."""
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + (
        b"\r\n" + body)


def _chunked(*lines, chunks=b"5\r\nhello\r\n0\r\n\r\n", status=b"200 OK"):
    """Return a chunked answer with the header ``lines`` and the body ``chunks``."""
    return _ok(b"Transfer-Encoding: chunked", *lines, body=chunks, status=status)


_BIG = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: over _MAX_ANSWER_BODY
_GZIPPED = gzip.compress(b"stored bytes, compressed", mtime=0)

# Malformed and edge answers named in issue 12, each read as it is.
WIRE_NAMED = [
    ("desync", "PUT", DESYNC_ANSWER),
    ("length-then-chunked", "PUT", _ok(b"Content-Length: 5", b"Transfer-Encoding: chunked",
                                       body=b"0\r\n\r\n", status=b"201 Created")),
    ("xchunked", "GET", _ok(b"Transfer-Encoding: xchunked", body=b"5\r\nhello\r\n0\r\n\r\n")),
    ("gzip-chunked", "GET", _ok(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    ("identity-chunked", "GET", _ok(b"Transfer-Encoding: identity, chunked", body=b"0\r\n\r\n")),
    ("chunked-chunked", "GET", _ok(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n")),
    ("two-codings", "GET", _chunked(b"Transfer-Encoding: chunked")),
    ("name-vt", "GET", _ok(b"Content-Length\x0b: 26", body=b"a" * 26)),
    ("name-space", "GET", _ok(b"Content-Length : 5")),
    ("name-ff", "GET", _ok(b"Content-Length\x0c: 5")),
    ("name-fs", "GET", _ok(b"Content-Length\x1c: 5")),
    ("name-nel", "GET", _ok(b"Content-Length\x85: 5")),
    ("name-nbsp", "GET", _ok(b"Content-Length\xa0: 5")),
    ("name-leading-fs", "GET", _ok(b"\x1cContent-Length: 5")),
    ("length-nbsp", "GET", _ok(b"Content-Length: \xa05")),
    ("length-vt", "GET", _ok(b"Content-Length: 5\x0b")),
    ("value-fs", "GET", _ok(b"X-A: \x1cfoo\x1c", b"Content-Length: 5")),
    ("value-nbsp", "GET", _ok(b"X-A: \xa0foo\xa0", b"X-B:\x85", b"Content-Length: 5")),
    ("folded-first-line", "GET", _ok(b" Content-Length: 5")),
    ("folded-first-line-tab", "GET", _ok(b"\tX-A: 1", b"Content-Length: 5")),
    ("folded-value", "GET", _ok(b"X-A: a", b" b", b"\tc", b"Content-Length: 5")),
    ("folded-blank-end", "GET", _ok(b"X-A: a ", b"  b ", b"Content-Length: 5")),
    ("folded-length", "GET", _ok(b"Content-Length:", b" 5")),
    ("length-plus", "GET", _ok(b"Content-Length: +5")),
    ("length-hex", "GET", _ok(b"Content-Length: 0x5")),
    ("length-two-numbers", "GET", _ok(b"Content-Length: 5 5")),
    ("length-negative", "GET", _ok(b"Content-Length: -1")),
    ("length-superscript", "GET", _ok(b"Content-Length: \xb3", body=b"abc")),
    ("length-superscript-utf8", "GET", _ok(b"Content-Length: \xc2\xb3", body=b"abc")),
    ("status-superscript", "GET", _ok(b"Content-Length: 0", status=b"\xb200 OK", body=b"")),
    ("status-superscript-utf8", "GET", _ok(b"Content-Length: 0", status=b"\xc2\xb200 OK",
                                           body=b"")),
    ("length-conflict", "GET", _ok(b"Content-Length: 5", b"Content-Length: 6")),
    ("length-list-conflict", "GET", _ok(b"Content-Length: 5, 6")),
    ("length-list", "GET", _ok(b"Content-Length: 5, 5", b"Content-Length: 5")),
    ("length-21-digits", "GET", _ok(b"Content-Length: 000000000000000000005")),
    ("length-20-digits", "GET", _ok(b"Content-Length: 00000000000000000005")),
    ("chunk-0x0", "GET", _chunked(chunks=b"0x0\r\n\r\n")),
    ("chunk-plus", "GET", _chunked(chunks=b"+a\r\n0123456789\r\n0\r\n\r\n")),
    ("chunk-underscore", "GET", _chunked(chunks=b"1_d\r\n" + b"u" * 29 + b"\r\n0\r\n\r\n")),
    ("chunk-negative", "GET", _chunked(chunks=b"-7\r\nseven77\r\n0\r\n\r\n")),
    ("chunk-empty-size", "GET", _chunked(chunks=b"\r\nhello\r\n0\r\n\r\n")),
    ("chunk-21-digits", "GET", _chunked(chunks=b"000000000000000000005\r\nhello\r\n0\r\n\r\n")),
    ("chunk-20-digits", "GET", _chunked(chunks=b"00000000000000000005\r\nhello\r\n0\r\n\r\n")),
    ("chunk-blank-before-end", "GET", _chunked(chunks=b"5 \r\nhello\r\n0\t\r\n\r\n")),
    ("chunk-extension-cr", "GET", _chunked(chunks=b"5;a\rb\r\nhello\r\n0;x=\"1\"\r\n\r\n")),
    ("chunk-no-crlf", "GET", _chunked(chunks=b"5\r\nhello0\r\n\r\n")),
    ("chunk-lf", "GET", _chunked(chunks=b"5\r\nhello\n0\r\n\r\n")),
    ("chunk-garbled-crlf", "GET", _chunked(chunks=b"5\r\nhelloXX0\r\n\r\n")),
    ("chunk-size-lf", "GET", _chunked(chunks=b"5\nhello\r\n0\r\n\r\n")),
    ("switching", "GET", _ok(b"Upgrade: websocket", b"Connection: Upgrade", body=b"",
                             status=b"101 Switching Protocols")),
    ("switching-then-ok", "GET", b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + _ok(
        b"Content-Length: 5")),
    ("status-2000", "GET", _ok(b"Content-Length: 5", status=b"2000 OK")),
    ("status-099", "GET", _ok(b"Content-Length: 5", status=b"099 Odd")),
    ("status-999", "GET", _ok(b"Content-Length: 5", status=b"999 Odd")),
    ("http2", "GET", b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("http09", "GET", b"HTTP/0.9 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("ssh", "GET", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("tls", "GET", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))),
    ("html", "GET", b"<html><body>hello</body></html>\r\n\r\n"),
    ("icy", "GET", b"ICY 200 OK\r\n\r\n"),
    ("rtsp", "GET", b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n"),
    ("version-alone", "GET", b"HTTP/1.1\r\n\r\n"),
    ("nothing", "GET", b""),
    ("empty-lines", "GET", b"\r\n\r\n"),
    ("bare-lf", "GET", b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"),
    ("bare-lf-end", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\n\r\nhello"),
    ("bare-lf-trailers", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\nX-T: 1\n\n")),
    ("cut-after-cr", "GET", b"HTTP/1.1 200 OK\r"),
    ("cut-mid-status", "GET", b"HTTP/1.1 20"),
    ("cut-mid-headers", "GET", b"HTTP/1.1 200 OK\r\nContent-Len"),
    ("cut-before-end", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"),
    ("cut-mid-chunk", "GET", _chunked(chunks=b"a\r\nhello")),
    ("cut-mid-chunk-size", "GET", _chunked(chunks=b"5\r\nhello\r\n")),
    ("cut-mid-trailers", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\nX-T: 1\r\n")),
    ("cut-mid-body", "GET", _ok(b"Content-Length: 10")),
    ("cut-after-interim", "PUT", b"HTTP/1.1 100 Continue\r\n\r\n"),
    ("continue-8", "PUT", b"HTTP/1.1 100 Continue\r\n\r\n" * 8 + _ok(
        b"Content-Length: 0", body=b"", status=b"201 Created")),
    ("continue-9", "PUT", b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + _ok(
        b"Content-Length: 0", body=b"", status=b"201 Created")),
    ("continue-flood", "PUT", b"HTTP/1.1 100 Continue\r\n\r\n" * 20 + _ok(
        b"Content-Length: 0", body=b"", status=b"201 Created")),
    ("trailers-32", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\n" + b"X-T: 1\r\n" * 32 + b"\r\n")),
    ("trailers-33", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\n" + b"X-T: 1\r\n" * 33 + b"\r\n")),
    ("trailer-flood", "GET", _chunked(chunks=b"0\r\n" + b"X-T: 1\r\n" * 500 + b"\r\n")),
    ("trailer-length-and-chunked", "GET", _chunked(
        chunks=b"5\r\nhello\r\n0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")),
    ("trailer-bad-length", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\nContent-Length: x\r\n\r\n")),
    ("trailer-folded-first", "GET", _chunked(chunks=b"5\r\nhello\r\n0\r\n X-T: 1\r\n\r\n")),
    ("extra-answer", "GET", _ok(b"Content-Length: 5") + EVIL_ANSWER),
    ("extra-crlf", "GET", _ok(b"Content-Length: 5") + b"\r\n"),
    ("head-with-body", "HEAD", _ok(b"Content-Length: 5")),
    ("head-chunked", "HEAD", _chunked(chunks=b"")),
    ("head-length-and-chunked", "HEAD", _chunked(b"Content-Length: 5", chunks=b"")),
    ("no-content-with-body", "DELETE", _ok(b"Content-Length: 5", status=b"204 No Content")),
    ("not-modified-length", "GET", _ok(b"Content-Length: 500", status=b"304 Not Modified",
                                       body=b"")),
    ("interim-length-and-chunked", "PUT", _ok(
        b"Content-Length: 0", b"Transfer-Encoding: chunked", status=b"100 Continue", body=b"")
        + _ok(b"Content-Length: 0", status=b"201 Created", body=b"")),
    ("interim-bad-length", "PUT", _ok(b"Content-Length: x", status=b"100 Continue", body=b"")
        + _ok(b"Content-Length: 0", status=b"201 Created", body=b"")),
    ("interim-with-body", "PUT", _ok(b"Content-Length: 5", status=b"100 Continue")
        + _ok(b"Content-Length: 0", status=b"201 Created", body=b"")),
    ("early-hints", "GET", _ok(b"Link: </a.css>; rel=preload", status=b"103 Early Hints",
                               body=b"") + _ok(b"Content-Length: 5")),
    ("until-close", "GET", _ok(body=b"hello world")),
    ("until-close-http10", "GET", b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello"),
    ("http10-chunked", "GET", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n\r\n"),
    ("http10-keep-alive", "GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                                 b"Content-Length: 5\r\n\r\nhello"),
    ("http12", "GET", b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("connection-close", "GET", _ok(b"Connection: close", b"Content-Length: 5")),
    ("connection-close-list", "GET", _ok(b"Connection: keep-alive, CLOSE ", b"Content-Length: 5")),
    ("gzip-encoded", "GET", _ok(b"Content-Encoding: gzip", b"Content-Length: %d" % len(_GZIPPED),
                                body=_GZIPPED)),
    ("leading-empty-line", "GET", b"\r\n" + _ok(b"Content-Length: 5")),
    ("empty-line-after-interim", "PUT", b"HTTP/1.1 100 Continue\r\n\r\n\r\n" + _ok(
        b"Content-Length: 0", body=b"", status=b"201 Created")),
    ("no-reason", "DELETE", b"HTTP/1.1 204\r\n\r\n"),
    ("empty-reason", "DELETE", b"HTTP/1.1 204 \r\n\r\n"),
    ("reason-obs-text", "GET", _ok(b"Content-Length: 5", status=b"200 R\xe9ussi \xff")),
    ("reason-controls", "GET", _ok(b"Content-Length: 5", status=b"200 \x01\x7f\x1c")),
    ("huge-head", "GET", _ok(b"X-Huge: " + b"h" * (2 * WIRE_MAX_HEAD), b"Content-Length: 5")),
    ("huge-chunk-extension", "GET", _chunked(chunks=b"5;" + b"e" * (2 * WIRE_MAX_HEAD)
                                             + b"\r\nhello\r\n0\r\n\r\n")),
    ("big-error-body", "PUT", _ok(b"Content-Length: %d" % len(_BIG), body=_BIG,
                                  status=b"500 Oops")),
    ("big-download", "GET", _ok(b"Content-Length: %d" % len(_BIG), body=_BIG)),
    ("big-chunked-error-body", "DELETE", _chunked(
        chunks=b"%x\r\n" % len(_BIG) + _BIG + b"\r\n0\r\n\r\n", status=b"500 Oops")),
    ("big-until-close-download", "GET", _ok(body=_BIG)),
    ("big-error-body-cut", "GET", _ok(b"Content-Length: %d" % (2 * len(_BIG)), body=_BIG,
                                      status=b"404 Not Found")),
]


def generate_answers(rng, count):
    """Return ``count`` (at least the named) WireCases: named, valid, and mutated.

    Most mutated answers have one thing broken; some two. Mutations that do
    not apply to an answer (a chunk size where there is no chunk) are drawn
    again.
    """
    cases = [WireCase("named:" + name, method, answer) for name, method, answer in WIRE_NAMED]
    names = list(WIRE_MUTATIONS)
    while len(cases) < count:
        category, method, parts = _valid_case(rng)
        if rng.random() < 0.25:
            cases.append(WireCase(category, method, b"".join(data for _kind, data in parts)))
            continue
        applied = []
        wanted = 2 if rng.random() < 0.15 else 1
        for _attempt in range(50):
            if len(applied) == wanted:
                break
            name = rng.choice(names)
            if rng.random() > WIRE_RARE_MUTATIONS.get(name, 1):
                continue
            mutated = WIRE_MUTATIONS[name](rng, method, copy.deepcopy(parts))
            if mutated is not None:
                parts = mutated
                applied.append(name)
                if name == "cut":
                    break  # nothing after the end
        if applied:
            cases.append(WireCase("mutated:" + "+".join(applied), method,
                                  b"".join(data for _kind, data in parts)))
    return cases


class WireReference(collections.namedtuple(
        "WireReference",
        "outcome error status headers body end needs_eof keep_alive reusable may must")):
    """What h11 made of an answer.

    ``outcome``: "accepted", "rejected" (an error before the end of the
    stream) or "incomplete" (the stream ended first). For an accepted one,
    ``status``, ``headers`` (joined per name with ", ") and ``body``; ``end``
    the bytes up to its end; ``needs_eof`` when its body ends with the
    connection; ``keep_alive`` when h11 would send the next request on the
    connection after those bytes, ``reusable`` when also nothing follows them;
    ``may`` and ``must`` the rules of STRICTER_THAN_H11 that allow
    and that require the reader to refuse it. ``status`` and ``headers`` are
    also kept for a refused answer whose head h11 took.
    """


def _h11_client(method):
    """Return an h11 client connection that has sent a request of ``method``."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=WIRE_MAX_HEAD)
    connection.send(h11.Request(method=method, target="/media/x",
                                headers=[("Host", "127.0.0.1"), ("Content-Length", "0")]))
    connection.send(h11.EndOfMessage())
    return connection


def _joined(fields):
    """Return h11's header list as a dict: names lower case, values joined with ", "."""
    headers = {}
    for name, value in fields:
        name, value = name.decode("latin-1"), value.decode("latin-1")
        headers[name] = headers[name] + ", " + value if name in headers else value
    return headers


def reference(method, answer):
    """Return what h11 makes of ``answer`` (to a request of ``method``): a WireReference.

    The answer is fed 1 KiB at a time, as a socket would deliver it, so
    that h11's bound on an unfinished head applies as the reader's does;
    then, if h11 needs more, the end of the stream.
    """
    connection = _h11_client(method)
    heads, body = [], []
    final = trailers = end = None
    taken = after_event = 0
    raw_trailers = 0
    needs_eof = False
    pieces = [answer[start:start + 1024] for start in range(0, len(answer), 1024)]
    try:
        for piece in pieces + [b""]:
            if end is not None:
                if piece:
                    connection.receive_data(piece)  # after the end: trailing data
                continue
            needs_eof = not piece
            connection.receive_data(piece)
            taken += len(piece)
            for _event in range(len(answer) + 3):
                event = connection.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                before, after_event = after_event, taken - len(connection.trailing_data[0])
                if isinstance(event, (h11.InformationalResponse, h11.Response)):
                    heads.append(event)
                    final = event if isinstance(event, h11.Response) else final
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    end, trailers = after_event, event.headers
                    # The lines h11 took with the end: those of the last chunk
                    # (and the CRLF after the data before it), the trailers, the empty one.
                    lines = answer[before:end].count(b"\n")
                    raw_trailers = lines - 2 - (1 if body else 0)
                    break
    except h11.ProtocolError as exc:
        return WireReference("incomplete" if needs_eof else "rejected", str(exc),
                             final and final.status_code, final and _joined(final.headers),
                             b"".join(body), None, False, False, False, (), ())
    rules = _stricter_rules(method, heads, final, trailers, raw_trailers)
    keep_alive = not needs_eof and connection.their_state is h11.DONE
    return WireReference("accepted", None, final.status_code, _joined(final.headers),
                         b"".join(body), end, needs_eof, keep_alive,
                         keep_alive and not connection.trailing_data[0], *rules)


def _stricter_rules(method, heads, final, trailers, raw_trailers):
    """Return (may, must): the STRICTER_THAN_H11 rules that allow, and that require, a refusal."""
    may, must = set(), set()
    framed = method != "HEAD" and final.status_code not in (204, 304)
    for head in heads:
        if head.http_version[:1] != b"1":
            must.add("version")
        names = {name for name, _value in head.headers}
        if {b"content-length", b"transfer-encoding"} <= names:
            (must if head is final and framed else may).add("length-and-chunked")
    if {b"content-length", b"transfer-encoding"} <= {name for name, _value in trailers}:
        may.add("length-and-chunked")
    if len(heads) - 1 > WIRE_MAX_INTERIM:
        must.add("interim-flood")
    if raw_trailers > WIRE_MAX_TRAILERS:
        may.add("trailer-flood")
    if len(trailers) > WIRE_MAX_TRAILERS:
        must.add("trailer-flood")
    return tuple(sorted(may | must)), tuple(sorted(must))


@functools.cache
def wire_cases():
    """Return the generated answers of this run and what h11 made of each: (case, reference)."""
    cases = generate_answers(random.Random(WIRE_SEED), WIRE_CASES)
    return [(case, reference(case.method, case.answer)) for case in cases]


def test_generated_answers_cover_every_rule_and_outcome():
    cases = wire_cases()
    categories = {case.category for case, _ref in cases}
    for name in WIRE_MUTATIONS:
        assert any(name in category.split(":")[1].split("+") for category in categories
                   if category.startswith("mutated:")), name
    for framing in ("length", "chunked", "close", "bodiless"):
        assert "valid-" + framing in categories
    outcomes = collections.Counter(ref.outcome for _case, ref in cases)
    assert min(outcomes[outcome] for outcome in ("accepted", "rejected", "incomplete")) > 100
    for rule in STRICTER_THAN_H11:
        assert any(rule in ref.must for _case, ref in cases), rule
    assert any(set(ref.may) - set(ref.must) for _case, ref in cases)
    assert sum(ref.reusable for _case, ref in cases) > 300
    assert sum(ref.needs_eof for _case, ref in cases) > 50


@pytest.mark.parametrize(("name", "outcome", "reusable", "must"), [
    ("desync", "accepted", False, ("length-and-chunked",)),
    ("continue-8", "accepted", True, ()),
    ("continue-9", "accepted", True, ("interim-flood",)),
    ("trailers-32", "accepted", True, ()),
    ("trailers-33", "accepted", True, ("trailer-flood",)),
    ("http2", "accepted", True, ("version",)),
    ("bare-lf", "accepted", True, ()),
    ("until-close", "accepted", False, ()),
    ("extra-answer", "accepted", False, ()),
    ("switching", "rejected", False, ()),
    ("two-codings", "rejected", False, ()),
    ("cut-after-cr", "incomplete", False, ()),
    ("huge-head", "rejected", False, ()),
])
def test_reference_reads_named_answers_as_h11_does(name, outcome, reusable, must):
    method, answer = next((method, answer) for named, method, answer in WIRE_NAMED
                          if named == name)
    ref = reference(method, answer)
    assert (ref.outcome, ref.reusable, ref.must) == (outcome, reusable, must)
    if name == "desync":
        assert (ref.status, ref.body, answer[ref.end:]) == (201, b"", EVIL_ANSWER)
    if name == "until-close":
        assert (ref.needs_eof, ref.body) == (True, b"hello world")


class _EndOfData(Exception):
    """A reader went on receiving long after the stream had ended."""


class SplitSocket:
    """A socket stand-in that hands out ``data`` in segments of ``sizes``.

    After the data, ``recv`` returns b"" (the host closed), or with
    ``eof=False`` raises TimeoutError (the host keeps the connection open and
    sends nothing more). ``delivered`` counts the bytes handed out.
    """

    def __init__(self, data, sizes, eof=True):
        self._data = data
        self._ends = list(itertools.accumulate(sizes))
        self._eof = eof
        self._segment = 0
        self._late_calls = 0
        self.delivered = 0

    def settimeout(self, _value):
        """Nothing waits here."""

    def recv(self, size):
        if self.delivered >= len(self._data):
            self._late_calls += 1
            if self._late_calls > 100:
                raise _EndOfData("recv() called %d times after the end" % self._late_calls)
            if self._eof:
                return b""
            raise TimeoutError("timed out")
        end = min(self._ends[self._segment], self.delivered + size)
        data = self._data[self.delivered:end]
        self.delivered = end
        if end == self._ends[self._segment]:
            self._segment += 1
        return data


def wire_splits(rng, length):
    """Yield (name, sizes) of the ways to split ``length`` bytes: whole, bytes, random."""
    yield "whole", [length]
    if length <= 2048:
        yield "bytes", [1] * length
    sizes = []
    while sum(sizes) < length:
        sizes.append(min(length - sum(sizes), rng.choice(
            [1, 2, 3, rng.randint(1, 64), rng.randint(1, 4096), rng.randint(1, 65536)])))
    yield "random", sizes


class WireResult(collections.namedtuple(
        "WireResult", "kind status headers data complete reusable sink delivered error")):
    """What the reader made of an answer: ``kind`` "answer", "refused", "timeout" or "escaped"."""

    def essence(self):
        """Return what must not depend on how the bytes were split."""
        return (self.kind, self.status, self.headers, self.data, self.complete, self.sink)


def read_wire(case, sizes, eof=True, sink=None):
    """Read ``case``'s answer with _read_answer from a SplitSocket; return a WireResult."""
    sock = SplitSocket(case.answer, sizes, eof)
    try:
        answer = django_resto_gevent._read_answer(
            sock, case.method, django_resto_gevent._Deadline(10), 10, sink)
    except django_resto_gevent._AnswerError as exc:
        return WireResult("refused", None, None, None, None, None, None, sock.delivered, str(exc))
    except TimeoutError as exc:
        return WireResult("timeout", None, None, None, None, None, None, sock.delivered, str(exc))
    except Exception as exc:  # anything else is a bug of the reader
        return WireResult("escaped", None, None, None, None, None, None, sock.delivered,
                          repr(exc))
    return WireResult("answer", answer.status, answer.headers, answer.data, answer.complete,
                      answer.reusable, sink and sink.getvalue(), sock.delivered, None)


def _framing_normalized(headers):
    """Return ``headers`` with h11's normal forms: one Content-Length, lower-case coding."""
    if headers is None:
        return None
    normal = dict(headers)
    if "content-length" in normal:
        normal["content-length"] = {part.strip(" \t") for part in
                                    normal["content-length"].split(",")}
    if "transfer-encoding" in normal:
        normal["transfer-encoding"] = normal["transfer-encoding"].lower()
    return normal


def wire_verdict(case, ref, got, open_stream=False, sink=False):
    """Return what is wrong with ``got`` (the reader's) given ``ref`` (h11's), or None."""
    if got.kind == "escaped":
        return "raised %s, neither _AnswerError nor OSError" % got.error
    accepted = ref.outcome == "accepted" and not ref.must
    if got.kind == "timeout":
        if open_stream and ref.outcome == "rejected":
            return None  # h11 saw the error sooner; the deadline ends the wait
        return "waited for bytes after the end of the answer (%s)" % got.error
    if got.kind == "refused":
        if accepted and not ref.may:
            return "refused what h11 takes: %s" % got.error
        return None
    # An answer came back.
    if ref.must:
        return "took an answer that %s must refuse" % "/".join(ref.must)
    if ref.status is None or got.status != ref.status:
        return "status %s, h11: %s (%s)" % (got.status, ref.status, ref.error or "taken")
    if _framing_normalized(got.headers) != _framing_normalized(ref.headers):
        return "headers %r, h11: %r" % (got.headers, ref.headers)
    streamed = sink and case.method == "GET" and got.status == 200
    if streamed:
        if got.data or got.sink != ref.body or not got.complete:
            return "200 to GET: %d bytes kept, %d in the sink (complete %s), h11: %d" % (
                len(got.data), len(got.sink), got.complete, len(ref.body))
    else:
        if sink and got.sink:
            return "%d bytes of a %d answer in the sink" % (len(got.sink), got.status)
        cut = django_resto_gevent._MAX_ANSWER_BODY
        if not got.complete:
            if len(got.data) != cut or not ref.body.startswith(got.data):
                return "cut at %d bytes, h11 read %d" % (len(got.data), len(ref.body))
        elif ref.outcome != "accepted":
            return "took an answer h11 refuses: %s" % ref.error
        elif got.data != ref.body:
            return "body %r, h11: %r" % (got.data[:80], ref.body[:80])
    # The reader cannot know of bytes not received yet (the pool checks an
    # idle connection before its next request): held against what it got.
    if got.reusable and not (got.complete and ref.keep_alive and got.delivered == ref.end):
        return "reusable, but h11 says not for the %d bytes received" % got.delivered
    return None


def _wire_failure(index, case, split, verdict):
    """Return one line that says which answer failed how, for the assertion message."""
    answer = case.answer if len(case.answer) <= 300 else case.answer[:300] + b"..."
    return "#%d %s %s [%s split]: %s\n    %r" % (index, case.category, case.method, split,
                                                 verdict, answer)


def test_answer_reader_agrees_with_h11():
    rng = random.Random(WIRE_SEED)
    failures = []
    for index, (case, ref) in enumerate(wire_cases()):
        essences = {}
        for split, sizes in wire_splits(rng, len(case.answer)):
            got = read_wire(case, sizes)
            verdict = wire_verdict(case, ref, got)
            if verdict:
                failures.append(_wire_failure(index, case, split, verdict))
            essences[split] = got.essence()
        if any(essence != essences["whole"] for essence in essences.values()):
            failures.append(_wire_failure(index, case, "any", "depends on the split: %r"
                                          % essences))
    assert not failures, "%d disagreements with h11:\n%s" % (len(failures),
                                                            "\n".join(failures[:40]))


def test_answer_reader_needs_no_end_of_stream_after_a_framed_answer():
    # A kept-alive host sends nothing after its answer: reading on would hang.
    rng = random.Random(WIRE_SEED + 1)
    failures = []
    for index, (case, ref) in enumerate(wire_cases()):
        if ref.outcome == "incomplete" or ref.needs_eof:
            continue
        split, sizes = list(wire_splits(rng, len(case.answer)))[-1]
        verdict = wire_verdict(case, ref, read_wire(case, sizes, eof=False), open_stream=True)
        if verdict:
            failures.append(_wire_failure(index, case, split + " open", verdict))
    assert not failures, "%d disagreements with h11:\n%s" % (len(failures),
                                                            "\n".join(failures[:40]))


def test_answer_reader_streams_200_answers_to_get_into_the_sink():
    rng = random.Random(WIRE_SEED + 2)
    failures = []
    for index, (case, ref) in enumerate(wire_cases()):
        if case.method != "GET":
            continue
        split, sizes = list(wire_splits(rng, len(case.answer)))[-1]
        verdict = wire_verdict(case, ref, read_wire(case, sizes, sink=io.BytesIO()), sink=True)
        if verdict:
            failures.append(_wire_failure(index, case, split + " sink", verdict))
    assert not failures, "%d disagreements with h11:\n%s" % (len(failures),
                                                            "\n".join(failures[:40]))


# The client of the loopback tests: in a new process, patched by gevent or
# not (argv[1]), it runs the operations of a plan (a JSON file, argv[2]) on
# one DefaultTransport and prints what each gave. Where patched, a greenlet
# ticks every millisecond: a read that never yields would starve it.
WIRE_CLIENT_SCRIPT = r"""
import base64, faulthandler, io, json, sys, time
faulthandler.dump_traceback_later(120, exit=True)  # a hung client fails the test
if sys.argv[1] == "patched":
    from gevent import monkey
    monkey.patch_all()
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
import django_resto_gevent as resto

assert resto._sockets_patched() is (sys.argv[1] == "patched")
with open(sys.argv[2]) as source:
    plan = json.load(source)
host = plan["host"]
transport = resto.DefaultTransport(base_url="/media/", retries=0, timeout=plan["timeout"])
ticks = [0]
if sys.argv[1] == "patched":
    import gevent

    def tick():
        for _ in range(10 ** 7):
            gevent.sleep(0.001)
            ticks[0] += 1

    ticker = gevent.spawn(tick)
encode = lambda data: base64.b64encode(data).decode()
results = []
for op in plan["ops"]:
    result = {}
    started, ticked = time.monotonic(), ticks[0]
    try:
        if op["call"] == "request":
            body = base64.b64decode(op["body"]) if op.get("body") else None
            headers = {"Content-Length": str(len(body))} if body else None
            answer = transport._request(op["method"], transport.url(host, op["name"]), host,
                                        body=body, headers=headers, size=len(body or b""))
            result.update(status=answer.status, headers=answer.headers, data=encode(answer.data),
                          complete=answer.complete)
        elif op["call"] == "fetch":
            sink = io.BytesIO()
            result["written"] = transport.fetch(host, op["name"], sink)
            result["sink"] = encode(sink.getvalue())
        elif op["call"] == "content":
            result["data"] = encode(transport.content(host, op["name"]))
        elif op["call"] == "size":
            result["size"] = transport.size(host, op["name"])
    except Exception as exc:
        result.update(error=type(exc).__name__, message=str(exc)[:500],
                      status=getattr(exc, "status", None),
                      allowed=isinstance(exc, (resto.RestoError, FileNotFoundError)))
    result.update(seconds=time.monotonic() - started, ticks=ticks[0] - ticked)
    results.append(result)
print(json.dumps(results))
"""

# The attempts of the loopback tests: a deadline, and how late an end may be.
WIRE_TIMEOUT = 1.0
WIRE_SLACK = 1.0


def run_wire_client(mode, host, ops, tmp_path, timeout=WIRE_TIMEOUT):
    """Run ``ops`` on ``host`` in a new process (``mode``: "patched" or not); return the results."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"host": host, "timeout": timeout, "ops": ops}))
    return json.loads(python_output(WIRE_CLIENT_SCRIPT, mode, str(plan)))


def _e2e_sizes(rng, answer, ref):
    """Return the segments a raw host sends ``answer`` in.

    Whatever follows the end of the answer leaves with its last byte: on
    loopback the reader then sees it, as h11 does.
    """
    last = len(answer) if ref.end is None or ref.end == len(answer) else ref.end - 1
    cuts = sorted({rng.randint(0, last) for _ in range(rng.randint(0, 5))} - {0, len(answer)})
    return [end - start for start, end in zip([0] + cuts, cuts + [len(answer)], strict=True)]


def _e2e_verdict(call, case, ref, result):
    """Return what is wrong with the result of a case's operation, or None."""
    if result.get("error") and not result["allowed"]:
        return "escaped %s: %s" % (result["error"], result["message"])
    if result["seconds"] > WIRE_TIMEOUT + WIRE_SLACK:
        return "took %.2f seconds" % result["seconds"]
    taken = ref.outcome == "accepted" and not ref.must
    if call == "request":
        if result.get("error"):
            if result["error"] != "TransportError":
                return "raised %s: %s" % (result["error"], result["message"])
            got = WireResult("refused", *[None] * 7, result["message"])
        else:
            got = WireResult("answer", result["status"], result["headers"],
                             base64.b64decode(result["data"]), result["complete"], False, None,
                             None, None)
        return wire_verdict(case, ref, got)
    # fetch(): 200 into the file, 404 FileNotFoundError, others UnexpectedStatusCode.
    if not taken:
        if result.get("error"):
            return None
        return "fetched what h11 refuses (%s)" % (ref.error or "/".join(ref.must))
    if result.get("error") == "TransportError" and ref.may:
        return None
    expected = {200: None, 404: "FileNotFoundError", 410: "FileNotFoundError"}.get(
        ref.status, "UnexpectedStatusCode")
    if result.get("error") != expected:
        return "%s (%s), h11: %d" % (result.get("error"), result.get("message"), ref.status)
    if expected == "UnexpectedStatusCode" and result["status"] != ref.status:
        return "UnexpectedStatusCode %s, h11: %d" % (result["status"], ref.status)
    if expected is None and base64.b64decode(result["sink"]) != ref.body:
        return "fetched %d bytes, h11: %d" % (result["written"], len(ref.body))
    return None


@pytest.mark.parametrize("mode", ["patched", "unpatched"])
def test_answers_over_loopback_agree_with_h11(mode, raw_host, tmp_path):
    rng = random.Random(WIRE_SEED + 3)
    small = [(case, ref) for case, ref in wire_cases() if len(case.answer) <= 64 * 1024]
    named = [pair for pair in small if pair[0].category.startswith("named:")]
    others = [pair for pair in small if not pair[0].category.startswith("named:")]
    chosen = named + rng.sample(others, max(0, min(len(others), WIRE_E2E_CASES - len(named))))
    answers, ops, checks = [], [], []
    for case, ref in chosen:
        for call in ["request", "fetch"] if case.method == "GET" else ["request"]:
            number = len(answers)
            answers.append(RawAnswer(
                case.answer, sizes=_e2e_sizes(rng, case.answer, ref),
                pause=0.002 if rng.random() < 0.1 else 0,
                # Kept open only where h11 saw the end (or the fault) by itself.
                close=ref.outcome == "incomplete" or ref.needs_eof))
            ops.append({"call": call, "method": case.method, "name": "case/%d" % number,
                        "body": base64.b64encode(b"abc").decode() if case.method == "PUT"
                        else None})
            # A second request, on the same connection if the first left it reusable.
            ops.append({"call": "request", "method": "GET", "name": "marker/%d" % number})
            checks.append((number, call, case, ref))
    host = raw_host(answers)
    results = run_wire_client(mode, host.address, ops, tmp_path)
    failures = []
    for (number, call, case, ref), result, marker in zip(checks, results[::2], results[1::2],
                                                        strict=True):
        verdict = _e2e_verdict(call, case, ref, result)
        if not verdict and (marker.get("error") or marker["status"] != 200
                            or base64.b64decode(marker["data"]) != b"MARKER"):
            verdict = "the next request read %r" % (marker.get("message") or marker)
        if not verdict and not ref.reusable and (
                host.connection_of("/media/case/%d" % number)
                == host.connection_of("/media/marker/%d" % number)):
            verdict = "the next request went on the same connection, h11 would not reuse it"
        if verdict:
            failures.append(_wire_failure(number, case, call, verdict))
    assert not failures, "%d disagreements with h11 (%s):\n%s" % (
        len(failures), mode, "\n".join(failures[:40]))
    reused = sum(host.connection_of("/media/case/%d" % number)
                 == host.connection_of("/media/marker/%d" % number) for number, *_ in checks)
    assert reused > len(checks) // 10  # keep-alive was exercised, not only refusals


# Answers that broke the reader before issue 12, each named.


@pytest.mark.parametrize("follow", ["content", "size"])
def test_chunked_answer_with_a_length_never_desyncs_the_next_request(follow, raw_host):
    # The smuggled answer arrives when the next request is sent: a reader
    # that took the 201 as chunked would read EVIL as the answer to that one.
    head = DESYNC_ANSWER[:-len(EVIL_ANSWER)]
    host = raw_host([RawAnswer(head, before_next=EVIL_ANSWER)])
    transport = one_attempt_transport()
    with pytest.raises(TransportError, match="ambiguous"):
        transport.put(host.address, "case/0", b"abc")
    if follow == "content":
        assert transport.content(host.address, "next.txt") == b"MARKER"
    else:
        assert transport.size(host.address, "next.txt") == 6


# Hosts whose answer never ends: what they send first, then again and again
# (a flood 50 ms after the request: the ticker of a patched client ticks
# meanwhile, and must go on ticking through the flood).
ENDLESS_ANSWERS = {
    "interim-flood": RawAnswer(b"", repeat=b"HTTP/1.1 100 Continue\r\n\r\n", delay=0.05),
    "trailer-flood": RawAnswer(_chunked(chunks=b"5\r\nhello\r\n0\r\n"),
                               repeat=b"X-Trailer: flood\r\n", delay=0.05),
    "header-flood": RawAnswer(b"HTTP/1.1 200 OK\r\n", repeat=b"X-Header: flood\r\n",
                              delay=0.05),
    "length-trickle": RawAnswer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 10 ** 12,
                                repeat=b"x" * 100, pause=0.01),
}


@pytest.mark.parametrize("mode", ["patched", "unpatched"])
@pytest.mark.parametrize("endless", sorted(ENDLESS_ANSWERS))
def test_an_answer_that_never_ends_is_cut_by_the_deadline(endless, mode, raw_host, tmp_path):
    host = raw_host([ENDLESS_ANSWERS[endless]])
    timeout = 0.5
    [result] = run_wire_client(mode, host.address, [{"call": "content", "name": "case/0"}],
                               tmp_path, timeout=timeout)
    assert result.get("error") == "TransportError", result
    assert result["seconds"] < timeout + 0.5, result
    if mode == "patched":
        # Other greenlets ran while it read: a quarter of the ticks at least.
        assert result["ticks"] >= 1000 * result["seconds"] / 4, result


def test_gzip_content_comes_back_as_stored(raw_host):
    host = raw_host([RawAnswer(_ok(b"Content-Encoding: gzip",
                                   b"Content-Length: %d" % len(_GZIPPED), body=_GZIPPED))])
    assert one_attempt_transport().content(host.address, "case/0") == _GZIPPED


def test_get_after_early_hints(raw_host):
    host = raw_host([RawAnswer({name: answer for name, _method, answer in WIRE_NAMED}[
        "early-hints"])])
    assert one_attempt_transport().content(host.address, "case/0") == b"hello"


HTTP_SERVER_SCRIPT = r"""
import hashlib, json, sys
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
import django_resto_gevent as resto

assert not resto._sockets_patched()
storage = resto.DistributedStorage(hosts=[sys.argv[1]], timeout=5, retries=0)
with storage.open("big.bin") as opened:
    data = opened.read()
print(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
"""


def test_python_http_server_as_a_host_unpatched(tmp_path):
    # HTTP/1.0, no keep-alive: each answer ends with its connection.
    data = os.urandom(50 * 1000)
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "big.bin").write_bytes(data)
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "http.server printed nothing within 30 seconds"
        port = re.search(r"port ([0-9]+)", process.stdout.readline()).group(1)
        report = json.loads(python_output(HTTP_SERVER_SCRIPT, "127.0.0.1:" + port))
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
    assert report == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


###############################################################################
# Host kinds: listings held against reference parsers, on generated documents
###############################################################################

# Names a listing must carry through: spaces, unicode, XML and URL specials.
LISTING_NAMES = ["plain.txt", "with space.txt", "caf\u00e9.txt", "\u65e5\u672c.txt", "a&b.txt",
                 "<tag>.txt", "quote\".txt", "apos'.txt", "100%.txt", "a+b=c~d.txt",
                 "what?.txt", "#1.txt", "semi;colon.txt", "back\\slash.txt", "x" * 120]


def random_listing(rng, count):
    """Return ``count`` random (name, is_dir, size, mtime) entries with unique names."""
    names = set()
    entries = []
    while len(entries) < count:
        base = rng.choice(LISTING_NAMES)
        name = "%s-%d%s" % (base[:40], rng.randrange(10 ** 6), rng.choice(["", ".bin"]))
        if name in names:
            continue
        names.add(name)
        is_dir = rng.random() < 0.2
        entries.append((name, is_dir, None if is_dir else rng.randrange(0, 10 ** 10),
                        rng.randrange(0, 2 ** 32)))
    return entries


def feed_in_pieces(parser, document, rng):
    """Write ``document`` to ``parser`` in random pieces; return its ``close()``."""
    position = 0
    while position < len(document):
        size = rng.choice([1, 2, 7, 64, 1000, 65536])
        assert parser.write(document[position:position + size])
        position += size
    return parser.close()


def http_date(mtime, rng):
    """Format ``mtime`` as one of the HTTP date forms a server may send."""
    moment = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
    return rng.choice([
        email.utils.formatdate(mtime, usegmt=True),  # IMF-fixdate, RFC 9110
        moment.strftime("%a, %d %b %Y %H:%M:%S +0000"),
        moment.strftime("%a, %d %b %Y %H:%M:%S -0000"),
        moment.strftime("%d %b %Y %H:%M:%S GMT"),
    ])


def multistatus_document(directory, entries, rng):
    """Return a 207 body listing ``entries`` under ``directory``, in a random dialect."""
    prefix = rng.choice(["D:", "d:", "lp1:", ""])
    declaration = 'xmlns:%s="DAV:"' % prefix[:-1] if prefix else 'xmlns="DAV:"'
    encoding = rng.choice(["utf-8", "utf-16", "iso-8859-1"])
    origin = rng.choice(["", "http://media.example:8080", "https://m.example"])

    def href(path):
        safe = rng.choice(["/", "/~", "/!$&'()*+,;=:@"])
        text = quote(path, safe=safe)
        if rng.random() < 0.3:  # lower-case escapes are as valid
            text = re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)
        return xml.sax.saxutils.escape(origin + text)

    def tag(name):
        return prefix + name

    parts = ['<?xml version="1.0" encoding="%s"?>\n<%s %s>' % (encoding, tag("multistatus"),
                                                                declaration)]
    rows = [(directory, True, None, None)] + [
        (directory + name + ("/" if is_dir else ""), is_dir, size, mtime)
        for name, is_dir, size, mtime in entries]
    for path, is_dir, size, mtime in rows:
        props = ["<%s>%s</%s>" % (tag("resourcetype"),
                                  "<%s/>" % tag("collection") if is_dir else "",
                                  tag("resourcetype"))]
        if size is not None:
            props.append("<%s>%d</%s>" % (tag("getcontentlength"), size,
                                          tag("getcontentlength")))
        if mtime is not None:
            props.append("<%s>%s</%s>" % (tag("getlastmodified"), http_date(mtime, rng),
                                          tag("getlastmodified")))
        rng.shuffle(props)
        missing = "<%s><%s><%s/></%s><%s>HTTP/1.1 404 Not Found</%s></%s>" % (
            tag("propstat"), tag("prop"), tag("getetag"), tag("prop"), tag("status"),
            tag("status"), tag("propstat"))
        parts.append("<%s><%s>%s</%s><%s><%s>%s</%s><%s>HTTP/1.1 200 OK</%s></%s>%s</%s>\n" % (
            tag("response"), tag("href"), href(path), tag("href"), tag("propstat"),
            tag("prop"), "".join(props), tag("prop"), tag("status"), tag("status"),
            tag("propstat"), missing if rng.random() < 0.5 else "", tag("response")))
    parts.append("</%s>\n" % tag("multistatus"))
    text = "".join(parts)
    if encoding == "iso-8859-1":
        # Characters outside Latin-1 as character references, as a server must.
        text = text.encode("ascii", "xmlcharrefreplace").decode("ascii")
    return text.encode(encoding)


# An XML listing is kept and parsed whole up to _XML_LISTING_KEPT bytes, and
# streamed past it: the tests of XML listings run in both ways, and with a
# switch from one to the other in the middle of a document.
XML_LISTING_WAYS = {"kept": None, "streamed": 0, "switched": 333}


@pytest.fixture(params=list(XML_LISTING_WAYS))
def xml_listing_way(request, monkeypatch):
    """Parse XML listings kept whole, streamed, or switched part-way."""
    if XML_LISTING_WAYS[request.param] is not None:
        monkeypatch.setattr(django_resto_gevent, "_XML_LISTING_KEPT",
                            XML_LISTING_WAYS[request.param])
    return request.param


def test_webdav_listing_matches_webdav4_on_generated_documents(xml_listing_way):
    # webdav4 (a maintained WebDAV client, the fsspec filesystem of DVC) reads
    # a Multi-Status on its own: hrefs through httpx's URL, dates through
    # email.utils then dateutil, properties wherever they sit.
    multistatus = pytest.importorskip("webdav4.multistatus")
    rng = random.Random(13)
    for _round in range(60):
        directory = rng.choice(["/media/", "/media/dir with space/", "/m\u00e9dia/sub/"])
        entries = random_listing(rng, rng.randrange(0, 40))
        document = multistatus_document(directory, entries, rng)
        ours, page = feed_in_pieces(django_resto_gevent._WebDAVListingParser(directory),
                                    document, rng)
        assert page is None
        reference = multistatus.MultiStatusResponse(document)
        expected = []
        for response in reference.responses.values():
            if response.path_norm.rstrip("/") == directory.rstrip("/"):
                continue
            properties = response.properties
            expected.append(django_resto_gevent._Entry(
                response.path_norm[len(directory):], bool(properties.collection),
                properties.content_length, properties.modified.timestamp()
                if properties.modified else None, None))
        assert sorted(ours) == sorted(expected)
        assert len(ours) == len(entries)


def s3_listing_document(prefix, entries, rng, token):
    """Return a ListBucketResult body for ``entries`` under ``prefix``."""
    namespace = rng.choice([' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', ""])
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult%s><Name>media</Name>'
             '<Prefix>%s</Prefix><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>'
             '<IsTruncated>%s</IsTruncated>' % (namespace, xml.sax.saxutils.escape(prefix),
                                                "true" if token else "false")]
    if token:
        parts.append("<NextContinuationToken>%s</NextContinuationToken>"
                     % xml.sax.saxutils.escape(token))
    for name, is_dir, size, mtime in entries:
        if is_dir:
            parts.append("<CommonPrefixes><Prefix>%s</Prefix></CommonPrefixes>"
                         % xml.sax.saxutils.escape(prefix + name + "/"))
            continue
        etag = hashlib.md5(name.encode()).hexdigest()
        if rng.random() < 0.3:
            etag += "-%d" % rng.randrange(2, 50)  # multipart: not an MD5
        moment = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%S") + rng.choice([".000Z", "Z", ".123Z"])
        parts.append("<Contents><Key>%s</Key><LastModified>%s</LastModified><ETag>&quot;%s"
                     "&quot;</ETag><Size>%d</Size><StorageClass>STANDARD</StorageClass>"
                     "</Contents>" % (xml.sax.saxutils.escape(prefix + name), stamp, etag,
                                      size))
    parts.append("<KeyCount>%d</KeyCount></ListBucketResult>" % len(entries))
    return "".join(parts).encode("utf-8")


def test_s3_listing_matches_botocore_on_generated_documents(xml_listing_way):
    parsers = pytest.importorskip("botocore.parsers")
    from botocore.loaders import Loader
    from botocore.model import ServiceModel

    model = ServiceModel(Loader().load_service_model("s3", "service-2"))
    shape = model.operation_model("ListObjectsV2").output_shape
    rng = random.Random(5)
    for _round in range(60):
        prefix = rng.choice(["", "media/", "media/d\u00e9j\u00e0 vu/", "a&b/"])
        entries = random_listing(rng, rng.randrange(0, 40))
        token = rng.choice([None, "1/ab+c=&<>" + str(rng.random())])
        document = s3_listing_document(prefix, entries, rng, token)
        ours, page = feed_in_pieces(django_resto_gevent._S3ListingParser(prefix), document,
                                    rng)
        parsed = parsers.RestXMLParser().parse(
            {"status_code": 200, "headers": {}, "body": document}, shape)
        expected = [django_resto_gevent._Entry(item["Prefix"][len(prefix):-1], True, None,
                                               None, None)
                    for item in parsed.get("CommonPrefixes", [])]
        for item in parsed.get("Contents", []):
            etag = item["ETag"].strip('"')
            expected.append(django_resto_gevent._Entry(
                item["Key"][len(prefix):], False, item["Size"],
                item["LastModified"].timestamp(), None if "-" in etag else etag))
        assert sorted(ours) == sorted(expected)
        assert page == (parsed.get("NextContinuationToken") if parsed["IsTruncated"] else None)


def test_xml_listings_read_records_at_any_depth_and_refuse_a_record_as_root(
        xml_listing_way):
    # webdav4 finds responses anywhere below the root (".//"): so do we,
    # whether the listing is kept or streamed.
    rng = random.Random(3)
    entry = ("<D:response><D:href>/media/%s</D:href><D:propstat><D:prop><D:resourcetype/>"
             "<D:getcontentlength>%d</D:getcontentlength></D:prop><D:status>HTTP/1.1 200 OK"
             "</D:status></D:propstat></D:response>")
    document = ('<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">%s<x:wrap xmlns:x="urn:x">'
                "%s</x:wrap>%s</D:multistatus>" % (entry % ("a", 1), entry % ("b", 2),
                                                   entry % ("c", 3)) + " " * 400).encode()
    entries, page = feed_in_pieces(django_resto_gevent._WebDAVListingParser("/media/"),
                                   document, rng)
    assert sorted((entry.name, entry.size) for entry in entries) == [
        ("a", 1), ("b", 2), ("c", 3)]
    assert page is None
    for parser, root in ((django_resto_gevent._WebDAVListingParser("/media/"),
                          (entry % ("a", 1)).replace("<D:response>",
                                                     '<D:response xmlns:D="DAV:">', 1)),
                         (django_resto_gevent._S3ListingParser(""),
                          "<Contents><Key>a</Key><IsTruncated>true</IsTruncated></Contents>")):
        parser.write(('<?xml version="1.0"?>' + root + " " * 400).encode())
        with pytest.raises(django_resto_gevent._ListingError, match="its root is a"):
            parser.close()


@pytest.mark.parametrize("prolog", [0, 600])
def test_an_xml_listing_with_a_document_type_is_refused(xml_listing_way, prolog):
    # Entities would let a small listing grow a hundredfold in memory. The
    # declaration is refused wherever the pieces cut it, kept or streamed.
    entities = "".join('<!ENTITY e%d "%s">' % (level, "&e%d;" % (level - 1) * 10 if level
                                                 else "x" * 100) for level in range(4))
    rng = random.Random(prolog)
    document = ('<?xml version="1.0"?><!--%s--><!DOCTYPE m [%s]><m>&e3;</m>'
                % ("." * prolog, entities)).encode()
    for parser, sizes in ((django_resto_gevent._WebDAVListingParser("/media/"), [1]),
                          (django_resto_gevent._WebDAVListingParser("/media/"),
                           [1, 2, 7, 64, 1000]),
                          (django_resto_gevent._S3ListingParser(""), [1, 2, 7, 64, 1000])):
        position = 0
        while position < len(document) and parser.write(
                document[position:position + rng.choice(sizes)]):
            position = parser.written
        assert position < len(document)  # refused before the end came
        with pytest.raises(django_resto_gevent._ListingError, match="document type"):
            parser.close()


def test_json_listing_matches_the_json_module_on_generated_documents():
    # nginx's autoindex array is read one object at a time as the bytes come;
    # json.loads() of the whole document is the reference.
    rng = random.Random(7)
    for _round in range(100):
        entries = random_listing(rng, rng.randrange(0, 60))
        items = [{"name": name, "type": "directory" if is_dir else "file",
                  "mtime": email.utils.formatdate(mtime, usegmt=True)}
                 | ({} if is_dir else {"size": size}) for name, is_dir, size, mtime in entries]
        # nginx's spacing, or none, or unicode escaped.
        text = rng.choice([
            "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]\n",
            json.dumps(items, separators=(",", ":")),
            json.dumps(items, indent=rng.choice([None, 2])),
        ])
        ours, page = feed_in_pieces(django_resto_gevent._JSONListingParser("/media/"),
                                    text.encode("utf-8"), rng)
        assert page is None
        expected = [django_resto_gevent._Entry(
            item["name"], item["type"] == "directory", item.get("size"),
            email.utils.parsedate_to_datetime(item["mtime"]).timestamp(), None)
            for item in json.loads(text)]
        assert ours == expected


@pytest.mark.parametrize(("document", "error"), [
    (b"[{\"name\": \"a\"", "ends before its closing"),
    (b"<html>", "not a JSON listing"),
    (b"[1, 2]", "not an object"),
    (b"[{\"name\": \"" + b"x" * 70000, "over 65536 bytes"),
])
def test_a_broken_json_listing_is_an_error(document, error):
    parser = django_resto_gevent._JSONListingParser("/media/")
    parser.write(document)
    with pytest.raises(django_resto_gevent._ListingError, match=error):
        parser.close()


def test_webdav_listing_leaves_out_hrefs_outside_the_directory():
    document = multistatus_document("/media/", [], random.Random(1)).replace(
        b"</D:multistatus>", b"").replace(b"</d:multistatus>", b"")
    parser = django_resto_gevent._WebDAVListingParser("/media/")
    body = (b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">'
            + b"".join(b"<D:response><D:href>%s</D:href><D:propstat><D:prop><D:resourcetype/>"
                       b"</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
                       b"</D:response>" % href
                       for href in (b"/etc/passwd", b"/media/../x", b"/media/a/b",
                                    b"/media/%2e%2e", b"/media/ok.txt"))
            + b"</D:multistatus>")
    assert document
    parser.write(body)
    assert [entry.name for entry in parser.close()[0]] == ["ok.txt"]


###############################################################################
# Host kinds: S3, on the SeaweedFS filer and S3 gateway; AWS Signature Version 4
###############################################################################

OBJECT_STORE_NAMES = AWKWARD_NAMES + ["new dir/n\u00e9/deep.txt", "a+b=c~d.txt"]


def filer_content(seaweed, name):
    """Return the bytes the filer holds for media ``name``, or None on 404."""
    response = urllib3.request("GET", seaweed.filer_url + "/media/" + quote(name), timeout=10)
    return response.data if response.status == 200 else None


def s3_content(seaweed, name, bucket="media"):
    """Return the bytes the S3 gateway holds for media ``name``, or None on 404."""
    response = seaweed.s3_request("GET", "/%s/media/%s" % (bucket, quote(name)))
    assert response.status in (200, 404), response.data[:300]
    return response.data if response.status == 200 else None


def s3_options(seaweed, **options):
    """The keywords of a storage that writes to the S3 gateway's "media" bucket."""
    return dict(options, s3_access_key_id=seaweed.access_key,
                s3_secret_access_key=seaweed.secret_key)


def s3_host(seaweed, bucket="media", suffix=""):
    """The host entry of the gateway's ``bucket``."""
    return "s3+%s/%s%s" % (seaweed.s3_url, bucket, suffix)


@pytest.mark.parametrize("storage_class", STORAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_nginx_and_seaweed_filer_side_by_side(storage_class, nginx_hosts, seaweed, tmp_path,
                                              caplog):
    hosts = [nginx_hosts.hosts[0], seaweed.filer_host]
    storage = make_storage(storage_class, hosts, tmp_path)
    prefix = "filer-%s/" % storage_class.__name__
    big = os.urandom(5 * 1024 * 1024 + 7)
    files = {prefix + name: name.encode() * 3 for name in OBJECT_STORE_NAMES}
    files[prefix + "big.bin"] = big
    for name, data in files.items():
        assert storage.save(name, ContentFile(data)) == name
    settle(storage)
    for name, data in files.items():
        with open(nginx_hosts.path(0, name), "rb") as stored:
            assert stored.read() == data, name
        assert filer_content(seaweed, name) == data, name
        assert storage.exists(name)
        assert storage.size(name) == len(data)
        with storage.open(name) as opened:
            assert opened.read() == data
    # Overwrite through the transport, then delete through the storage.
    overwritten = prefix + OBJECT_STORE_NAMES[0]
    storage.transport.create(seaweed.filer_host, overwritten, b"new bytes")
    assert filer_content(seaweed, overwritten) == b"new bytes"
    storage.delete(overwritten)
    settle(storage)
    assert filer_content(seaweed, overwritten) is None
    assert not os.path.exists(nginx_hosts.path(0, overwritten))
    assert not storage.exists(overwritten)
    assert resto_records(caplog) == []


@pytest.mark.parametrize("storage_class", STORAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_nginx_and_s3_gateway_side_by_side(storage_class, nginx_hosts, seaweed, tmp_path,
                                           caplog):
    caplog.set_level(logging.DEBUG)
    hosts = [nginx_hosts.hosts[0], s3_host(seaweed)]
    storage = make_storage(storage_class, hosts, tmp_path, **s3_options(seaweed))
    prefix = "s3-%s/" % storage_class.__name__
    files = {prefix + name: name.encode() * 3 for name in OBJECT_STORE_NAMES}
    files[prefix + "big.bin"] = os.urandom(6 * 1024 * 1024 + 3)
    files[prefix + "empty.txt"] = b""
    for name, data in files.items():
        assert storage.save(name, ContentFile(data)) == name
    settle(storage)
    for name, data in files.items():
        assert s3_content(seaweed, name) == data, name
        with open(nginx_hosts.path(0, name), "rb") as stored:
            assert stored.read() == data, name
    if storage_class is DistributedStorage:
        # Reads go to either host: ask the S3 one alone too.
        alone = DistributedStorage(hosts=[s3_host(seaweed)], **s3_options(seaweed))
        for name, data in files.items():
            assert alone.exists(name)
            assert alone.size(name) == len(data)
            with alone.open(name) as opened:
                assert opened.read() == data
        assert not alone.exists(prefix + "never-saved.txt")
        with pytest.raises(FileNotFoundError):
            alone.size(prefix + "never-saved.txt")
    # S3 answers 200 to every PUT and 204 to every DELETE: no overwrite or
    # missing-file warning can be known, so none is invented.
    name = prefix + "a b.txt"
    assert storage.transport.create(s3_host(seaweed), name, b"overwritten") is True
    assert s3_content(seaweed, name) == b"overwritten"
    storage.delete(name)
    settle(storage)
    assert s3_content(seaweed, name) is None
    assert storage.transport.delete(s3_host(seaweed), name) is True
    warnings_logged = resto_records(caplog, logging.WARNING)
    assert warnings_logged == []
    assert resto_records(caplog) == []
    assert seaweed.secret_key not in caplog.text


def test_s3_custom_key_prefix(seaweed):
    storage = DistributedStorage(hosts=[s3_host(seaweed, suffix="/site/uploads/")],
                                 **s3_options(seaweed))
    storage.save("prefixed.txt", ContentFile(b"p"))
    response = seaweed.s3_request("GET", "/media/site/uploads/prefixed.txt")
    assert (response.status, response.data) == (200, b"p")
    assert s3_content(seaweed, "prefixed.txt") is None  # not under media/
    storage.delete("prefixed.txt")


def test_s3_wrong_secret_is_a_clear_error(seaweed, tmp_path, caplog):
    host = s3_host(seaweed)
    storage = HybridStorage(location=str(tmp_path), hosts=[host],
                            s3_access_key_id=seaweed.access_key,
                            s3_secret_access_key="not-the-secret")
    with pytest.raises(ReplicationError) as info:
        storage.save("refused.txt", ContentFile(b"r"))
    assert info.value.hosts == [host]
    message = str(info.value)
    assert "answered 403" in message
    assert "S3 error SignatureDoesNotMatch." in message
    assert "check RESTO_S3_ACCESS_KEY_ID, RESTO_S3_SECRET_ACCESS_KEY" in message
    assert "not-the-secret" not in message + caplog.text
    assert s3_content(seaweed, "refused.txt") is None


def test_s3_unsigned_requests_are_refused(seaweed):
    # The oracle of the signature tests means something only if the gateway
    # really checks: an unsigned PUT must not land.
    response = urllib3.request("PUT", seaweed.s3_url + "/media/media/unsigned.txt",
                               body=b"u", timeout=10)
    assert response.status == 403
    assert s3_content(seaweed, "unsigned.txt") is None


def test_s3_hosts_need_credentials(tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["s3+http://127.0.0.1:1/bucket"])
    with pytest.raises(ImproperlyConfigured, match="no credentials: set RESTO_S3_ACCESS_KEY"):
        storage.save("never.txt", ContentFile(b"x"))
    assert not (tmp_path / "never.txt").exists()


@pytest.mark.parametrize("entry", ["s3+ftp://h/bucket", "s3+http://h", "s3+http://h/",
                                   "s3+https://h/b?acl=private"])
def test_bad_s3_entries_are_explained(entry, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=[entry])
    with pytest.raises(ImproperlyConfigured, match="which is not an S3 bucket"):
        storage.save("never.txt", ContentFile(b"x"))


@pytest.mark.parametrize("entry", ["s3+http://key:hunter2@h/bucket", "http://u:hunter2@h:80",
                                   "u:hunter2@h:80", ["not", "hashable"]])
def test_host_entries_with_credentials_are_refused_unshown(entry, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=[entry])
    with pytest.raises(ImproperlyConfigured) as info:
        storage.save("never.txt", ContentFile(b"x"))
    if isinstance(entry, str):
        assert "credentials in it (not shown)" in str(info.value)
        assert "hunter2" not in str(info.value)
    else:
        assert "which is not a media host" in str(info.value)
    assert not (tmp_path / "never.txt").exists()


@pytest.mark.parametrize(("entry", "url"), [
    ("s3+https://s3.example.com/bucket", "https://s3.example.com/bucket/media/a%20b.txt"),
    ("s3+http://127.0.0.1:8333/b/custom/", "http://127.0.0.1:8333/b/custom/a%20b.txt"),
    ("s3+https://s3.eu-west-1.amazonaws.com/b?region=eu-west-1",
     "https://s3.eu-west-1.amazonaws.com/b/media/a%20b.txt"),
])
def test_s3_object_urls(entry, url):
    assert DefaultTransport(base_url="/media/").url(entry, "a b.txt") == url


def test_sync_and_check_with_filer_and_s3_hosts(seaweed, media_servers, tmp_path, capsys):
    write_master(tmp_path, {"sync-s3/" + name: data for name, data in MASTER_FILES.items()})
    hosts = [seaweed.filer_host, s3_host(seaweed)]
    with storage_alias(HybridStorage, hosts, tmp_path, **s3_options(seaweed)):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--prefix",
                                  "sync-s3")
        assert status == 0, out
        for name, data in MASTER_FILES.items():
            assert filer_content(seaweed, "sync-s3/" + name) == data
            assert s3_content(seaweed, "sync-s3/" + name) == data
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--prefix",
                                  "sync-s3", "--dry-run")
        assert status == 0, out  # complete now: nothing to upload
        status, out, _ = run_main(capsys, "check", "--storage", "replicated")
    assert status == 0, out
    assert out.splitlines()[1].endswith(" ok")
    assert out.splitlines()[2].endswith(" ok")


# Requests to sign with botocore and with this module: the signatures must match.
SIGNED_KEYS = ["plain.txt", "with space.txt", "caf\u00e9.txt", "\u65e5\u672c/\u8a9e.txt",
               "a+b.txt", "a=b.txt", "100%.txt", "til~de.txt", "#1.txt", "what?.txt",
               "deep/nested/path/file.bin", "dir with space/\u00fc.txt", "a/b//c.txt"]
SIGNED_ENDPOINTS = ["http://127.0.0.1:8333", "https://s3.example.com",
                    "https://s3.example.com:8443", "http://localhost"]


@pytest.mark.parametrize("key", SIGNED_KEYS)
@pytest.mark.parametrize("method", ["PUT", "GET", "HEAD", "DELETE"])
@pytest.mark.parametrize("endpoint", SIGNED_ENDPOINTS)
def test_sigv4_matches_botocore(key, method, endpoint):
    botocore_auth = pytest.importorskip("botocore.auth")
    from unittest import mock

    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    now = datetime.datetime(2024, 2, 29, 23, 59, 58)
    url = "%s/bucket/%s" % (endpoint, quote(key, safe="/"))
    body = b"payload" if method == "PUT" else b""
    headers = {"Content-Length": str(len(body)), "Content-Type": "text/plain"} \
        if method == "PUT" else {}
    for signed_payload in (False, True):
        request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
        request.context["client_config"] = Config(
            s3={"payload_signing_enabled": signed_payload})
        with mock.patch("botocore.auth.get_current_datetime", return_value=now):
            botocore_auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfiCY"),
                                      "s3", "eu-west-3").add_auth(request)
        payload_hash = hashlib.sha256(body).hexdigest() if signed_payload or not body \
            else "UNSIGNED-PAYLOAD"
        if not signed_payload and method != "PUT":
            payload_hash = request.headers["X-Amz-Content-SHA256"]
        ours = django_resto_gevent._sigv4_headers(
            method, url, headers, "AKIDEXAMPLE", "wJalr/K7MDENG+bPxRfiCY", "eu-west-3",
            now=now, payload_hash=payload_hash)
        assert ours["X-Amz-Date"] == request.headers["X-Amz-Date"]
        assert ours["X-Amz-Content-Sha256"] == request.headers["X-Amz-Content-SHA256"]
        assert ours["Authorization"] == request.headers["Authorization"]


###############################################################################
# Transport
###############################################################################


def one_attempt_transport():
    """Return a transport that tries each request once, within 5 seconds."""
    return DefaultTransport(base_url="/media/", retries=0, timeout=5)


@pytest.mark.parametrize(
    ("base_url", "host", "name", "url"),
    [
        ("/media/", "m:8080", "a.txt", "http://m:8080/media/a.txt"),
        ("/media", "m:8080", "a.txt", "http://m:8080/media/a.txt"),
        ("https://cdn.example/files/", "m:443", "a.txt", "https://m:443/files/a.txt"),
        ("https://cdn.example/files/", "http://m:80", "a.txt", "http://m:80/files/a.txt"),
        ("/media/", "m:1", "caf\u00e9.txt", "http://m:1/media/caf%C3%A9.txt"),
        ("/media/", "m:1", "a b.txt", "http://m:1/media/a%20b.txt"),
        ("/media/", "m:1", "100%.txt", "http://m:1/media/100%25.txt"),
        ("/media/", "m:1", "what?.txt", "http://m:1/media/what%3F.txt"),
        ("/media/", "m:1", "#1.txt", "http://m:1/media/%231.txt"),
        ("/media/", "m:1", "d s/\u00fc.txt", "http://m:1/media/d%20s/%C3%BC.txt"),
        ("/m\u00e9dia files/", "m:1", "a.txt", "http://m:1/m%C3%A9dia%20files/a.txt"),
        ("/already%20encoded/", "m:1", "a.txt", "http://m:1/already%20encoded/a.txt"),
        ("/media/", "s3+http://s3:1/b/k p/", "a.txt", "http://s3:1/b/k%20p/a.txt"),
    ],
)
def test_transport_url(base_url, host, name, url):
    assert DefaultTransport(base_url=base_url).url(host, name) == url


def test_media_url_that_needs_encoding_reaches_the_host_decoded(media_servers):
    server, = media_servers(1)
    transport = DefaultTransport(base_url="/m\u00e9dia files/")
    assert transport.create(server.address, "caf\u00e9 1.txt", b"x") is True
    assert server.files == {"/m\u00e9dia files/caf\u00e9 1.txt": b"x"}


def test_a_request_path_that_is_not_encoded_is_never_sent(canned_host):
    host = canned_host((b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False))
    transport = one_attempt_transport()
    url = "http://%s/media/a b\r\nX-Injected: 1" % host.address
    with pytest.raises(TransportError, match="is not encoded") as info:
        transport._request("PUT", url, host.address, body=b"x",
                           headers={"Content-Length": "1"}, size=1)
    assert info.value.retryable is False  # the same request cannot fare better
    assert transport.create(host.address, "ok.txt", b"y") is True
    # Only the second request reached the host.
    assert [head.split(b"\r\n")[0] for head, _ in host.requests] == [
        b"PUT /media/ok.txt HTTP/1.1"]


# (method, status) -> what the transport method returns, or the exception it raises.
STATUS_RULES = [
    ("create", 201, True),
    ("create", 200, False),
    ("create", 204, False),
    ("create", 202, UnexpectedStatusCode),
    ("create", 403, UnexpectedStatusCode),
    ("create", 409, UnexpectedStatusCode),
    ("create", 413, UnexpectedStatusCode),
    ("create", 500, UnexpectedStatusCode),
    ("delete", 200, True),
    ("delete", 204, True),
    ("delete", 404, False),
    ("delete", 410, False),
    ("delete", 202, UnexpectedStatusCode),
    ("delete", 500, UnexpectedStatusCode),
    ("exists", 200, True),
    ("exists", 404, False),
    ("exists", 410, False),
    ("exists", 202, UnexpectedStatusCode),
    ("exists", 403, UnexpectedStatusCode),
    ("size", 200, 0),
    ("size", 404, FileNotFoundError),
    ("size", 410, FileNotFoundError),
    ("size", 202, UnexpectedStatusCode),
    ("content", 200, b""),
    ("content", 404, FileNotFoundError),
    ("content", 202, UnexpectedStatusCode),
    ("content", 500, UnexpectedStatusCode),
]

_VERBS = {"create": "PUT", "delete": "DELETE", "exists": "HEAD", "size": "HEAD", "content": "GET"}


@pytest.mark.parametrize(("operation", "status", "expected"), STATUS_RULES)
def test_transport_status_rules(operation, status, expected, media_servers, caplog):
    method = _VERBS[operation]
    server, = media_servers(1, status={method: status})
    transport = DefaultTransport(base_url="/media/")
    args = (server.address, "a.txt") + ((b"data",) if operation == "create" else ())
    call = getattr(transport, operation)
    if isinstance(expected, type):
        with pytest.raises(expected) as info:
            call(*args)
        if expected is UnexpectedStatusCode:
            error = info.value
            assert (error.method, error.host, error.status) == (method, server.address, status)
            assert error.url == "http://%s/media/a.txt" % server.address
    else:
        assert call(*args) == expected
    if operation == "create" and status in (403, 404, 409, 500):
        # It may be a WebDAV server missing the parent collection: MKCOL it,
        # then PUT again, once.
        assert server.log == [(method, "/media/a.txt", status), ("MKCOL", "/media/", 201),
                              (method, "/media/a.txt", status)]
    else:
        assert server.log == [(method, "/media/a.txt", status)]
    warnings = resto_records(caplog, logging.WARNING)
    if operation == "create" and status in (200, 204):
        assert warnings == ["PUT on existing file a.txt on %s." % server.address]
    elif operation == "delete" and status in (404, 410):
        assert warnings == ["DELETE on missing file a.txt on %s." % server.address]
    else:
        assert warnings == []


def test_transport_refused_connection_is_a_transport_error():
    with MediaServer() as server:
        address = server.address
    with pytest.raises(TransportError) as info:
        DefaultTransport(base_url="/media/").create(address, "a.txt", b"x")
    assert info.value.host == address
    assert info.value.method == "PUT"


def test_transport_sends_content_length_not_chunked(media_servers, tmp_path):
    server, = media_servers(1)
    path = tmp_path / "body.bin"
    path.write_bytes(b"x" * 300_000)
    with open(path, "rb") as body:
        body.seek(1000)
        assert DefaultTransport(base_url="/media/").create(server.address, "b.bin", body)
    assert server.files["/media/b.bin"] == b"x" * 299_000


def test_connections_are_kept_alive_across_saves(media_servers, tmp_path):
    servers = media_servers(3)
    storage = HybridStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    for index in range(5):
        storage.save("k%d.txt" % index, ContentFile(b"keep"))
    for server in servers:
        assert server.connections == 1, server.address


class RecordingSocket:
    """A connected socket that records the bytes of every send."""

    def __init__(self, sock, sent):
        self._sock = sock
        self._sent = sent

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendall(self, data, *args):
        self._sent.append(bytes(data))
        return self._sock.sendall(data, *args)


def recording_connect(connect, sent):
    """Wrap a connection's connect() so that its socket records what it sends."""

    def connect_and_record(connection):
        connect(connection)
        connection.sock = RecordingSocket(connection.sock, sent)

    return connect_and_record


def test_small_body_leaves_with_its_headers_in_one_send(media_servers, tmp_path, monkeypatch):
    server, = media_servers(1)
    sent = []
    monkeypatch.setattr(django_resto_gevent._HTTPConnection, "connect",
                        recording_connect(django_resto_gevent._HTTPConnection.connect, sent))
    transport = DefaultTransport(base_url="/media/")
    small = b"s" * 1000
    assert transport.create(server.address, "small.txt", small)
    message, = sent
    assert message.startswith(b"PUT /media/small.txt HTTP/1.1\r\n")
    assert message.endswith(b"\r\n\r\n" + small)
    # Who wrote, for the host's logs.
    version = django_resto_gevent.__version__.encode()
    assert b"\r\nUser-Agent: django-resto-gevent/" + version + b"\r\n" in message
    # A large file is streamed after its headers, from its position, in blocks.
    sent.clear()
    large = tmp_path / "large.bin"
    large.write_bytes(b"h" * 1000 + b"\0" * 600_000)
    with open(large, "rb") as body:
        body.seek(1000)
        assert transport.create(server.address, "large.bin", body)
    assert sent[0].endswith(b"\r\n\r\n")
    assert b"\0" not in sent[0]
    assert [len(block) for block in sent[1:]] == [256 * 1024, 256 * 1024, 600_000 - 512 * 1024]
    assert server.files == {"/media/small.txt": small, "/media/large.bin": b"\0" * 600_000}


def test_connection_closed_by_the_host_is_seen_and_replaced():
    listener = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    answer = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    connections = []

    def serve_two_connections():
        # Each connection gets one request answered, kept alive, then closed.
        for _ in range(2):
            peer, _address = listener.accept()
            connections.append(peer)
            request = b""
            while b"\r\n\r\nx" not in request:
                received = peer.recv(65536)
                assert received, "the client closed before the end of its request"
                request += received
            peer.sendall(answer)
            peer.close()

    server = gevent.spawn(serve_two_connections)
    try:
        transport = one_attempt_transport()
        assert transport.create(address, "first.txt", b"x") is True
        idle = idle_connections(address)
        assert len(idle) == 1
        # Wait (bounded) until the host's close reached the idle connection.
        assert select.select([idle[0].sock], [], [], 5)[0]
        assert idle[0].is_connected is False
        # No retries: a request on the dead connection would fail.
        assert transport.create(address, "second.txt", b"x") is True
        server.join(timeout=5)
        assert server.successful()
        assert len(connections) == 2
    finally:
        server.kill()
        listener.close()


def test_answer_before_the_whole_body_is_still_read():
    # A host over its size limit answers 413 and closes while the body is
    # still on its way: the sender sees a broken pipe, the answer says why.
    listener = socket.create_server(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]

    def refuse_after_the_headers():
        peer, _address = listener.accept()
        with peer:
            request = b""
            while b"\r\n\r\n" not in request:
                received = peer.recv(65536)
                assert received, "the client closed before the end of its request"
                request += received
            peer.sendall(b"HTTP/1.1 413 Request Entity Too Large\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            peer.shutdown(socket.SHUT_WR)
            # The fault's shape: a host that resets just after it answered
            # (the answer must reach the client first), not a wait for work.
            gevent.sleep(0.05)
        # Closed with the body unread: the kernel resets the connection.

    server = gevent.spawn(refuse_after_the_headers)
    try:
        with pytest.raises(UnexpectedStatusCode) as info:
            DefaultTransport(base_url="/media/", retries=0).create(
                address, "big.bin", b"x" * 20_000_000)
        assert info.value.status == 413
        assert "client_max_body_size" in str(info.value)
        server.join(timeout=5)
        assert server.successful()
    finally:
        server.kill()
        listener.close()


class CannedHost:
    """A raw HTTP host that answers each request with the next of ``answers``.

    It records every request (head and body, as bytes) and every
    connection; after an answer ending with ``close``, it closes the
    connection. Used for answers real servers rarely give.
    """

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.server = gevent.spawn(self._serve)

    def _serve(self):
        while self.answers:
            peer, _address = self.listener.accept()
            self.connections += 1
            with peer:
                self._serve_connection(peer)

    def _serve_connection(self, peer):
        data = b""
        while self.answers:
            while b"\r\n\r\n" not in data:
                received = peer.recv(65536)
                if not received:
                    return
                data += received
            head, _, data = data.partition(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)", head)
            length = int(length.group(1)) if length else 0
            while len(data) < length:
                received = peer.recv(65536)
                if not received:
                    return  # the client gave up before the end of its body
                data += received
            self.requests.append((head, data[:length]))
            data = data[length:]
            answer, close = self.answers.pop(0)
            peer.sendall(answer)
            if close:
                return

    def stop(self):
        self.server.kill()
        self.listener.close()


@pytest.fixture
def canned_host():
    """Start CannedHost(answers) on demand; stop every one after the test."""
    hosts = []

    def start(*answers):
        host = CannedHost(answers)
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        host.stop()


def test_answers_in_chunks_with_trailers_are_read_whole(canned_host):
    host = canned_host(
        (b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False))
    transport = one_attempt_transport()
    url = transport.url(host.address, "a.txt")
    answer = transport._request("DELETE", url, host.address)
    assert (answer.status, answer.data) == (500, b"hello world")
    # The whole answer was read: the same connection carries the next request.
    assert transport.delete(host.address, "a.txt") is True
    assert host.connections == 1


def test_interim_answers_are_skipped_and_headers_read_case_insensitively(canned_host):
    host = canned_host(
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nCONTENT-length: 0\r\n"
         b"X-Dup: a\r\nx-dup: b\r\nX-Folded: one\r\n\t two\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 0\r\nContent-Length: 7\r\n\r\n", False))
    transport = one_attempt_transport()
    url = transport.url(host.address, "a.txt")
    answer = transport._request("PUT", url, host.address, body=b"abc",
                                headers={"Content-Length": "3"}, size=3)
    assert answer.status == 200
    assert answer.headers["x-dup"] == "a, b"
    assert answer.headers["x-folded"] == "one two"
    # Two different Content-Length values are an error, never a guess.
    with pytest.raises(TransportError, match="Content-Length"):
        transport._request("PUT", url, host.address, body=b"abc",
                           headers={"Content-Length": "3"}, size=3)
    head, body = host.requests[0]
    assert head.startswith(b"PUT /media/a.txt HTTP/1.1\r\nHost: %s\r\n" % host.address.encode())
    assert body == b"abc"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 201 Created\r\n\r\nbody that ends with the connection",
])
def test_a_connection_the_answer_ends_is_not_reused(answer, canned_host):
    host = canned_host((answer, True), (answer, True))
    transport = one_attempt_transport()
    assert transport.create(host.address, "one.txt", b"1") is True
    assert transport.create(host.address, "two.txt", b"2") is True
    assert host.connections == 2


@pytest.mark.parametrize(("answer", "error"), [
    (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line: 'SPDY/3 200 OK'"),
    (b"HTTP/1.1 2OO OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 201 Created\r\nno colon here\r\n\r\n", "malformed header"),
    (b"HTTP/1.1 201 Created\r\nContent-Length: lots\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk-size line"),
    (b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\nshort",
     "ended 5 bytes before the end of a 10-byte body"),
    (b"HTTP/1.1 201 Created\r\nX-Junk: " + b"j" * 100_000, "answer head over 65536 bytes"),
    (b"", "without an answer"),
])
def test_a_malformed_answer_is_a_transport_error(answer, error, canned_host):
    host = canned_host((answer, True))
    transport = one_attempt_transport()
    with pytest.raises(TransportError, match=error) as info:
        transport.create(host.address, "bad.txt", b"x")
    assert info.value.host == host.address
    assert idle_connections(host.address) == []


@pytest.mark.parametrize(("answer", "hint"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x server: check the host, the port"),
    (b"", "closed the connection without answering"),
])
def test_what_a_garbled_or_missing_answer_means_is_said(answer, hint, canned_host):
    host = canned_host((answer, True))
    with pytest.raises(TransportError) as info:
        one_attempt_transport().create(
            host.address, "a.txt", b"x")
    assert hint in str(info.value)


def test_a_long_error_body_is_cut_and_its_connection_dropped(canned_host, monkeypatch):
    monkeypatch.setattr(django_resto_gevent, "_MAX_ANSWER_BODY", 1000)
    page = b"e" * 5000
    host = canned_host(
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 5000\r\n\r\n" + page, True),
        (b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"1388\r\n" + page + b"\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False))
    transport = one_attempt_transport()
    url = transport.url(host.address, "a.txt")
    for _ in range(2):
        answer = transport._request("DELETE", url, host.address)
        assert answer.status == 500
        assert len(answer.data) <= 1000
    assert transport.delete(host.address, "a.txt") is True
    assert host.connections == 3


def test_a_file_shorter_than_its_size_fails_instead_of_hanging(canned_host, tmp_path):
    host = canned_host((b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False))
    source = tmp_path / "short.bin"
    source.write_bytes(b"x" * 10)
    transport = one_attempt_transport()
    with open(source, "rb") as body, \
            pytest.raises(TransportError, match="ended 90 bytes short of its size"):
        transport.create(host.address, "short.bin", body, size=100)
    assert host.requests == []  # the host never got a whole request


def test_s3_request_path_is_sent_as_signed(canned_host):
    # S3 keys keep "." segments, and the signature covers the path as written.
    host = canned_host((b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False))
    entry = "s3+http://%s/bucket" % host.address
    transport = DefaultTransport(base_url="/media/", s3_credentials=("AKID", "secret"),
                                 s3_region="us-east-1")
    assert transport.create(entry, "a/./b.txt", b"x") is True
    head = host.requests[0][0]
    assert head.startswith(b"PUT /bucket/media/a/./b.txt HTTP/1.1\r\n")
    assert b"\r\nAuthorization: AWS4-HMAC-SHA256 " in head


@pytest.mark.parametrize(("url", "host_header", "path"), [
    ("http://Media.Example/media/a.txt", "media.example", "/media/a.txt"),
    ("http://media.example:80/media/a.txt", "media.example", "/media/a.txt"),
    ("https://media.example:443/m/a.txt", "media.example", "/m/a.txt"),
    ("http://media.example:8080/m/a.txt?x=1", "media.example:8080", "/m/a.txt?x=1"),
    ("http://[::1]:8080/m/a.txt", "[::1]:8080", "/m/a.txt"),
    ("http://127.0.0.1:8080/m/./b/a.txt", "127.0.0.1:8080", "/m/b/a.txt"),
    ("http://127.0.0.1:8080", "127.0.0.1:8080", "/"),
])
def test_request_route(url, host_header, path):
    transport = DefaultTransport(base_url="/media/")
    pool, header, request_path = transport._route(url)
    assert (header, request_path) == (host_header, path)
    # Kept for the next request of the same origin.
    assert transport._route(url)[0] is pool


def test_a_used_transport_pickles_and_the_copy_works(media_servers):
    server, = media_servers(1)
    transport = DefaultTransport(base_url="/media/")
    assert transport.create(server.address, "one.txt", b"1") is True
    copy = pickle.loads(pickle.dumps(transport))
    assert copy._routes == {}
    assert copy.create(server.address, "two.txt", b"2") is True
    assert server.files == {"/media/one.txt": b"1", "/media/two.txt": b"2"}


@pytest.mark.parametrize("value", [
    {"Authorization": "Bearer x\r\nX-Injected: 1"}, {"Bad Name": "x"}, {"X-Token": "\u20ac"},
])
def test_auth_headers_that_would_break_a_request_are_refused(value, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["127.0.0.1:1"], http_auth=value)
    with pytest.raises(ImproperlyConfigured, match="not an HTTP token .* not shown") as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert "X-Injected: 1" not in str(info.value)
    assert "\u20ac" not in str(info.value)
    assert not (tmp_path / "never.txt").exists()


def test_basic_auth_credentials_are_sent_as_utf8(canned_host):
    host = canned_host((b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False))
    transport = DefaultTransport(base_url="/media/", http_auth=("r\u00e9sum\u00e9", "p\u20acss"))
    assert transport.create(host.address, "a.txt", b"x") is True
    token = base64.b64encode("r\u00e9sum\u00e9:p\u20acss".encode()).decode()
    assert b"\r\nAuthorization: Basic %s\r\n" % token.encode() in host.requests[0][0] + b"\r\n"


def test_pool_manager_is_rebuilt_after_fork():
    parent = django_resto_gevent._pool_manager(1)
    assert django_resto_gevent._pool_manager(1) is parent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report whether it got a pool of its own
        child = django_resto_gevent._pool_manager(1)
        os.write(write_end, b"new" if child is not parent else b"same")
        os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 10) == b"new"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_pool_manager_has_a_pool_per_host():
    assert django_resto_gevent._pool_manager(40).pools._maxsize >= 40


###############################################################################
# Transport: S3 multipart uploads, checksums, object parameters
###############################################################################

MIB = 1024 * 1024

# Small enough for a test, large enough for S3 (and SeaweedFS, which refuses
# a part under 5 MiB other than the last).
MULTIPART = {"s3_multipart_threshold": 5 * MIB, "s3_part_size": 5 * MIB,
             "s3_parts_in_flight": 2}

# Three parts: two whole ones and a short last one.
THREE_PARTS = 2 * 5 * MIB + 12345


def s3_etag(seaweed, name):
    """Return the ETag the gateway gives media ``name`` (a multipart one ends "-<parts>")."""
    status, headers = seaweed.head("/media/media/" + quote(name))
    assert status == 200, name
    return headers["etag"].strip('"')


def uploads_of(seaweed, prefix):
    """Return the multipart uploads open under media ``prefix`` on the gateway."""
    return [upload for upload in seaweed.open_uploads() if upload[0].startswith("media/" + prefix)]


@pytest.mark.parametrize("storage_class", STORAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_s3_file_over_the_threshold_lands_in_parts(storage_class, nginx_hosts, seaweed, tmp_path,
                                                   caplog):
    hosts = [nginx_hosts.hosts[0], s3_host(seaweed)]
    storage = make_storage(storage_class, hosts, tmp_path, **s3_options(seaweed, **MULTIPART))
    prefix = "parts-%s/" % storage_class.__name__
    big, small = os.urandom(THREE_PARTS), os.urandom(5 * MIB)  # small: at the threshold
    assert storage.save(prefix + "big.bin", ContentFile(big)) == prefix + "big.bin"
    assert storage.save(prefix + "small.bin", ContentFile(small)) == prefix + "small.bin"
    settle(storage)
    assert s3_content(seaweed, prefix + "big.bin") == big
    assert s3_content(seaweed, prefix + "small.bin") == small
    with open(nginx_hosts.path(0, prefix + "big.bin"), "rb") as stored:
        assert stored.read() == big  # the nginx host got one PUT, as always
    # A multipart ETag: the MD5 of the parts' MD5s, then their count (what
    # _MultipartUpload._assembled() relies on).
    digests = b"".join(hashlib.md5(big[start:start + 5 * MIB]).digest()
                       for start in range(0, len(big), 5 * MIB))
    assert s3_etag(seaweed, prefix + "big.bin") == hashlib.md5(digests).hexdigest() + "-3"
    assert s3_etag(seaweed, prefix + "small.bin") == hashlib.md5(small).hexdigest()
    _, headers = seaweed.head("/media/media/%sbig.bin" % prefix)
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-amz-checksum-type"] == "COMPOSITE"  # each part's CRC-32 was checked
    assert uploads_of(seaweed, prefix) == []  # nothing left open: the parts are the object
    assert resto_records(caplog) == []


def test_s3_distributed_sends_parts_of_a_file_on_disk_in_place(seaweed, tmp_path):
    data = os.urandom(THREE_PARTS)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    storage = DistributedStorage(hosts=[s3_host(seaweed)], **s3_options(seaweed, **MULTIPART))
    with open(path, "rb") as incoming:
        storage.save("in-place/upload.bin", File(incoming, "upload.bin"))
    assert s3_content(seaweed, "in-place/upload.bin") == data
    assert s3_etag(seaweed, "in-place/upload.bin").endswith("-3")


def test_s3_parts_of_bytes_and_of_any_file_object(seaweed):
    transport = DefaultTransport(base_url="/media/", s3_credentials=(
        seaweed.access_key, seaweed.secret_key), **MULTIPART)
    data = os.urandom(THREE_PARTS)
    host = s3_host(seaweed)
    assert transport.put(host, "objects/bytes.bin", data) == 201
    source = io.BytesIO(b"skipped" + data)
    source.seek(7)  # sent from its position, as a single PUT is
    assert transport.put(host, "objects/bytesio.bin", source) == 201
    for name in ("bytes.bin", "bytesio.bin"):
        assert s3_content(seaweed, "objects/" + name) == data
        assert s3_etag(seaweed, "objects/" + name).endswith("-3")


def test_s3_parts_in_flight_bound_the_memory(seaweed, monkeypatch):
    # Each part read is counted until it is freed: never more alive at once
    # than the parts in flight.
    live, peak = [0], [0]

    class Part(bytes):
        def __del__(self):
            live[0] -= 1

    reader = django_resto_gevent._part_reader

    def tracked_reader(content):
        read = reader(content)

        def read_part(offset, length):
            part = Part(read(offset, length))
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return part
        return read_part

    monkeypatch.setattr(django_resto_gevent, "_part_reader", tracked_reader)
    options = dict(MULTIPART, s3_parts_in_flight=2)
    storage = DistributedStorage(hosts=[s3_host(seaweed)], **s3_options(seaweed, **options))
    data = os.urandom(5 * 5 * MIB + 1)  # six parts
    storage.save("bounded/six.bin", ContentFile(data))
    assert s3_content(seaweed, "bounded/six.bin") == data
    assert peak[0] == 2
    assert live[0] == 0


def test_s3_multipart_failure_aborts_and_fails_like_any_host(seaweed, tmp_path, caplog,
                                                            failures_signalled):
    # The proxy resets the connection in the middle of the second part.
    proxy = FaultProxy(seaweed.s3_url.partition("//")[2], cut_after=7 * MIB).start()
    try:
        host = "s3+http://%s/media" % proxy.address
        storage = HybridStorage(location=str(tmp_path), hosts=[host],
                                **s3_options(seaweed, retries=0, **MULTIPART))
        data = os.urandom(THREE_PARTS)
        with pytest.raises(ReplicationError) as info:
            storage.save("cut/big.bin", ContentFile(data))
    finally:
        proxy.stop()
    assert proxy.cut == 1
    assert info.value.hosts == [host]
    error = info.value.failures[0][1]
    assert isinstance(error, TransportError)
    assert "partNumber=" in error.url
    assert "uploadId=" in error.url
    assert [(signal["action"], signal["host"]) for signal in failures_signalled] == [
        ("create", host)]
    assert resto_records(caplog) == ["Failed to create cut/big.bin on %s. %s" % (host, error)]
    assert uploads_of(seaweed, "cut/") == []  # aborted: no part left stored
    assert s3_content(seaweed, "cut/big.bin") is None
    assert not (tmp_path / "cut" / "big.bin").exists()  # the save raised: nor a master copy


def test_s3_a_failed_part_is_retried_on_its_own(seaweed, caplog):
    caplog.set_level(logging.INFO)
    proxy = FaultProxy(seaweed.s3_url.partition("//")[2], cut_after=7 * MIB).start()
    try:
        host = "s3+http://%s/media" % proxy.address
        storage = DistributedStorage(hosts=[host], **s3_options(seaweed, retries=1, **MULTIPART))
        data = os.urandom(THREE_PARTS)
        storage.save("retried/big.bin", ContentFile(data))
    finally:
        proxy.stop()
    assert proxy.cut == 1
    retried = [message for message in resto_records(caplog, logging.INFO)
               if message.startswith("Retrying")]
    assert len(retried) == 1, retried
    assert "partNumber=" in retried[0]
    assert s3_content(seaweed, "retried/big.bin") == data
    assert uploads_of(seaweed, "retried/") == []


def test_s3_cancelled_multipart_upload_is_aborted(seaweed):
    # A caller's deadline (gevent.Timeout) lands while parts are in flight
    # through a slow link: the parts are stopped and the upload aborted.
    proxy = DelayProxy(seaweed.s3_url.partition("//")[2], 0.01).start()
    try:
        transport = DefaultTransport(base_url="/media/", timeout=10, s3_credentials=(
            seaweed.access_key, seaweed.secret_key), **MULTIPART)
        host = "s3+http://%s/media" % proxy.address
        started = time.monotonic()
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.5):
            transport.put(host, "cancelled/big.bin", os.urandom(THREE_PARTS))
        assert time.monotonic() - started < 5  # the abort went out at once
    finally:
        proxy.stop()
    assert uploads_of(seaweed, "cancelled/") == []
    assert s3_content(seaweed, "cancelled/big.bin") is None


@pytest.mark.parametrize("size", [100_000, THREE_PARTS], ids=["single-put", "multipart"])
def test_s3_damaged_body_is_refused_and_reported(size, seaweed, tmp_path, failures_signalled):
    # One bit flipped in the body of the first request on each connection:
    # the gateway checks the CRC-32 sent with it and refuses the body.
    proxy = FaultProxy(seaweed.s3_url.partition("//")[2], flip_at=64 * 1024).start()
    try:
        host = "s3+http://%s/media" % proxy.address
        storage = HybridStorage(location=str(tmp_path), hosts=[host],
                                **s3_options(seaweed, retries=0, **MULTIPART))
        with pytest.raises(ReplicationError) as info:
            storage.save("damaged/file.bin", ContentFile(os.urandom(size)))
    finally:
        proxy.stop()
    assert proxy.flipped >= 1
    error = info.value.failures[0][1]
    assert isinstance(error, UnexpectedStatusCode)
    assert error.status == 400
    assert "S3 error BadDigest. The body arrived damaged" in str(error)
    assert [signal["host"] for signal in failures_signalled] == [host]
    assert s3_content(seaweed, "damaged/file.bin") is None
    assert uploads_of(seaweed, "damaged/") == []


@pytest.mark.parametrize("size", [100_000, THREE_PARTS], ids=["single-put", "multipart"])
def test_s3_damaged_body_is_sent_again(size, seaweed):
    proxy = FaultProxy(seaweed.s3_url.partition("//")[2], flip_at=64 * 1024, flips=1).start()
    try:
        host = "s3+http://%s/media" % proxy.address
        storage = DistributedStorage(hosts=[host], **s3_options(seaweed, retries=1, **MULTIPART))
        data = os.urandom(size)
        name = storage.save("damaged-once/%d.bin" % size, ContentFile(data))
    finally:
        proxy.stop()
    assert proxy.flipped == 1
    assert s3_content(seaweed, name) == data


def css_and_downloads(name):
    """Object parameters as a function: what the mapping in OBJECT_PARAMETERS gives."""
    headers = {}
    if name.endswith(".css"):
        headers["Cache-Control"] = "public, max-age=86400"
    if name.startswith("downloads/"):
        headers.update({"Content-Disposition": 'attachment; filename="report 1.pdf"',
                        "x-amz-meta-origin": "resto", "Content-Type": "application/pdf"})
    return headers


OBJECT_PARAMETERS = {
    "*.css": {"Cache-Control": "public, max-age=86400"},
    "downloads/*": {"Content-Disposition": 'attachment; filename="report 1.pdf"',
                    "x-amz-meta-origin": "resto", "content-type": "application/pdf"},
}


@pytest.mark.parametrize("parameters", [OBJECT_PARAMETERS, css_and_downloads],
                         ids=["mapping", "callable"])
@pytest.mark.parametrize("storage_class", STORAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_object_parameters_are_stored_and_served_back(storage_class, parameters, nginx_hosts,
                                                       seaweed, tmp_path):
    hosts = [s3_host(seaweed), seaweed.filer_host, nginx_hosts.hosts[0]]
    storage = make_storage(storage_class, hosts, tmp_path, **s3_options(
        seaweed, object_parameters=parameters, **MULTIPART))
    prefix = "params-%s-%s" % (storage_class.__name__, "map" if parameters is
                               OBJECT_PARAMETERS else "call")
    files = {"downloads/%s/report.bin" % prefix: os.urandom(THREE_PARTS),  # multipart
             "downloads/%s/style.css" % prefix: b"body {}",
             "%s/plain.txt" % prefix: b"plain"}
    for name, data in files.items():
        storage.save(name, ContentFile(data))
    settle(storage)
    for name in files:
        _, s3 = seaweed.head("/media/media/" + quote(name))
        filer = urllib3.request("HEAD", seaweed.filer_url + "/media/" + quote(name)).headers
        nginx = urllib3.request("HEAD", "http://%s/media/%s" % (nginx_hosts.hosts[0],
                                                                quote(name))).headers
        expected = css_and_downloads(name)
        if name.endswith(".css"):
            assert s3["cache-control"] == filer["Cache-Control"] == "public, max-age=86400"
        if name.startswith("downloads/"):
            disposition = 'attachment; filename="report 1.pdf"'
            assert s3["content-disposition"] == filer["Content-Disposition"] == disposition
            assert s3["x-amz-meta-origin"] == "resto"  # S3 keeps metadata; the filer does not
            assert s3["content-type"] == filer["Content-Type"] == "application/pdf"
        else:
            guessed = "text/css" if name.endswith(".css") else "text/plain"
            assert s3["content-type"] == filer["Content-Type"] == guessed
        # nginx serves a file as its configuration says, whatever the PUT carried.
        assert "Cache-Control" not in nginx
        assert "Content-Disposition" not in nginx
        assert ("cache-control" in s3) == ("Cache-Control" in expected)


def test_what_s3_and_the_filer_keep_of_object_parameters(seaweed):
    # The table of the README: every header below goes to both; what HEAD
    # serves back is what each kept.
    headers = {"Cache-Control": "max-age=60", "Content-Disposition": "attachment",
               "Content-Encoding": "identity", "Content-Language": "fr",
               "Expires": "Wed, 21 Oct 2037 07:28:00 GMT", "x-amz-meta-colour": "blue",
               "x-amz-storage-class": "STANDARD", "x-amz-tagging": "team=media",
               "Seaweed-Colour": "blue"}
    storage = DistributedStorage(hosts=[s3_host(seaweed), seaweed.filer_host],
                                 **s3_options(seaweed, object_parameters={"kept/*": headers}))
    storage.save("kept/a.txt", ContentFile(b"kept"))
    _, s3 = seaweed.head("/media/media/kept/a.txt")
    filer = {key.lower(): value for key, value in urllib3.request(
        "HEAD", seaweed.filer_url + "/media/kept/a.txt", timeout=10).headers.items()}
    s3_kept = {key for key in headers if s3.get(key.lower()) == headers[key]}
    filer_kept = {key for key in headers if filer.get(key.lower()) == headers[key]}
    assert s3_kept == {"Cache-Control", "Content-Disposition", "Content-Encoding",
                       "Content-Language", "Expires", "x-amz-meta-colour",
                       "x-amz-storage-class"}
    assert s3["x-amz-tagging-count"] == "1"  # tags are kept, and counted on HEAD
    assert filer_kept == {"Cache-Control", "Content-Disposition", "Expires", "Seaweed-Colour"}
    assert s3["content-type"] == filer["content-type"].partition(";")[0] == "text/plain"


@pytest.mark.parametrize(("parameters", "message"), [
    ({"*": {"Cache-Control": "a\r\nX-Injected: 1"}}, "whose name is not an HTTP token or "
                                                      "whose value holds a line break"),
    ({"*": {"Bad Name": "x"}}, "'Bad Name'"),
    ({"*": {"Content-Length": "1"}}, "'Content-Length', which django_resto_gevent writes"),
    ({"*": {"x-amz-checksum-crc32": "AAAA"}}, "'x-amz-checksum-crc32', which"),
    ({"*": {"x-amz-copy-source": "/other/key"}}, "'x-amz-copy-source', which"),
    ({"*": {"Cache-Control": "a", "cache-control": "b"}}, "twice (header names ignore case)"),
    ({"*": {"Cache-Control": 86400}}, "must be a dict of header names to strings"),
    ({"*": "max-age=1"}, "must be a dict of header names to strings"),
    (["*.css"], "must be a dict of file name patterns to headers"),
])
def test_bad_object_parameters_are_refused_before_anything(parameters, message, media_servers,
                                                            tmp_path):
    server, = media_servers()
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address],
                            object_parameters=parameters)
    with pytest.raises(ImproperlyConfigured) as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert message in str(info.value)
    assert "The 'object_parameters' option of HybridStorage" in str(info.value)
    assert server.log == []
    assert not (tmp_path / "never.txt").exists()
    with override_settings(RESTO_OBJECT_PARAMETERS=parameters), \
            pytest.raises(ImproperlyConfigured, match="The RESTO_OBJECT_PARAMETERS setting"):
        HybridStorage(location=str(tmp_path), hosts=[server.address]).save(
            "never.txt", ContentFile(b"x"))


@pytest.mark.parametrize("storage_class", STORAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_bad_headers_from_a_callable_are_refused_before_any_request(storage_class, media_servers,
                                                                    tmp_path):
    server, = media_servers()

    def parameters(name):
        return {"Content-Disposition": "attachment; filename=\u65e5.txt"}

    storage = make_storage(storage_class, [server.address], tmp_path,
                           object_parameters=parameters)
    with pytest.raises(ImproperlyConfigured) as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert ("The headers that the RESTO_OBJECT_PARAMETERS / object_parameters function "
            "test_bad_headers_from_a_callable_are_refused_before_any_request.<locals>."
            "parameters returned for 'never.txt'") in str(info.value)
    assert "filename*=UTF-8''" in str(info.value)
    settle(storage)
    assert server.log == []
    assert not (tmp_path / "master" / "never.txt").exists()


def test_webdav_servers_keep_no_object_parameters_and_verify_nothing(webdav_hosts):
    # What the README says of plain hosts: the headers of RESTO_OBJECT_PARAMETERS
    # go with the PUT and are dropped, and a body is stored as it arrives.
    host = webdav_hosts.hosts[0]
    transport = DefaultTransport(base_url="/media/", retries=0, timeout=5, object_parameters={
        "*": {"Cache-Control": "max-age=60", "Content-Disposition": "attachment",
              "Content-Type": "application/x-resto", "X-Meta": "kept?"}})
    transport.create(host, "params/style.css", b"body {}")
    served = urllib3.request("HEAD", transport.url(host, "params/style.css"), timeout=10)
    assert served.status == 200
    assert not {"cache-control", "content-disposition", "x-meta"} & {
        key.lower() for key in served.headers}
    assert served.headers.get("Content-Type") != "application/x-resto"
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    put = urllib3.request("PUT", transport.url(host, "params/unchecked.txt"), body=b"sent",
                          headers={"Content-MD5": wrong_md5}, timeout=10)
    assert put.status in (200, 201, 204)
    assert transport.content(host, "params/unchecked.txt") == b"sent"


def test_object_parameters_go_to_plain_hosts_too(media_servers):
    server, = media_servers()
    transport = DefaultTransport(base_url="/media/", object_parameters={
        "*.txt": {"Cache-Control": "no-cache"}, "*": {"X-Other": "1"}})
    assert transport.object_headers("a.txt") == {"Cache-Control": "no-cache", "X-Other": "1"}
    assert transport.object_headers("a.bin") == {"X-Other": "1"}
    # A later pattern's header replaces an earlier one's, whatever its case.
    transport = DefaultTransport(base_url="/media/", object_parameters={
        "*": {"Cache-Control": "max-age=60"}, "hot/*": {"cache-control": "no-store"}})
    assert transport.object_headers("hot/a.txt") == {"cache-control": "no-store"}
    assert transport.object_headers("cold/a.txt") == {"Cache-Control": "max-age=60"}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("s3_part_size", 1024 * 1024, "from 5 MiB (5242880) to 5 GiB (5368709120), the sizes S3 "
                                  "allows, not 1048576. Set e.g. RESTO_S3_PART_SIZE = "),
    ("s3_part_size", "16MB", "not '16MB'"),
    ("s3_multipart_threshold", 6 * 1024 ** 3, "not 6442450944. Set e.g. "
                                              "RESTO_S3_MULTIPART_THRESHOLD = 64 * 1024 * 1024"),
    ("s3_parts_in_flight", 0, "must be a whole number from 1 to 64, not 0"),
    ("s3_parts_in_flight", True, "not True"),
])
def test_bad_multipart_settings_are_explained(option, value, message, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["s3+http://127.0.0.1:1/b"],
                            s3_access_key_id="k", s3_secret_access_key="s", **{option: value})
    with pytest.raises(ImproperlyConfigured) as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert "The %r option of HybridStorage" % option in str(info.value)
    assert message in str(info.value)
    assert not (tmp_path / "never.txt").exists()


def test_parts_grow_so_that_ten_thousand_hold_the_file():
    transport = types.SimpleNamespace(s3_part_size=5 * MIB, s3_parts_in_flight=4)
    kind = types.SimpleNamespace(entry="s3+http://h/b")
    for size in (5 * MIB + 1, 10000 * 5 * MIB, 10000 * 5 * MIB + 1, 5 * 1024 ** 4):
        upload = django_resto_gevent._MultipartUpload(transport, kind, "n", "u", b"", size, {})
        assert upload.count <= 10000
        assert (upload.count - 1) * upload.part_size < size <= upload.count * upload.part_size
        assert upload.part_size % MIB == 0
        assert upload.part_size >= 5 * MIB
    assert upload.part_size == 525 * MIB  # 5 TiB, the largest S3 object


S3_CREATED = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s")


def canned_s3_answer(body, status=b"200 OK", headers=b""):
    """Return an answer of a canned S3 host, with ``body``."""
    return (b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (status, headers, len(body), body), False)


INITIATED = canned_s3_answer(
    b'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult xmlns="http://s3'
    b'.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>media/big.bin</Key><UploadId>'
    b'id+/=&amp;1</UploadId></InitiateMultipartUploadResult>')
PART_STORED = canned_s3_answer(b"", headers=b'ETag: "0123"\r\n')
ABORTED = canned_s3_answer(b"", status=b"204 No Content")


@pytest.mark.parametrize(("answers", "message"), [
    ([INITIATED, PART_STORED, PART_STORED, canned_s3_answer(
        b"\n\n  <?xml version=\"1.0\"?><Error><Code>InternalError</Code></Error>"), ABORTED],
     "answered 200 with the S3 error InternalError in its body: the object was not assembled"),
    ([INITIATED, PART_STORED, canned_s3_answer(b""), ABORTED],
     "answered 200 without the ETag that CompleteMultipartUpload needs"),
    ([INITIATED, canned_s3_answer(b"x" * 10, status=b"403 Forbidden"), ABORTED],
     "answered 403, expected 200"),
    ([canned_s3_answer(b"<Other/>")], "answered 200 with a Other document, not an upload id"),
    ([canned_s3_answer(b"<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>")],
     "with a document type declaration, which S3 never sends"),
])
def test_s3_multipart_answers_that_fail_the_upload(answers, message, canned_host):
    host = canned_host(*answers)
    entry = "s3+http://%s/b" % host.address
    transport = DefaultTransport(base_url="/media/", retries=0, timeout=5,
                                 s3_credentials=("k", "s"),
                                 **dict(MULTIPART, s3_parts_in_flight=1))
    with pytest.raises(UnexpectedStatusCode, match=re.escape(message)):
        transport.put(entry, "big.bin", b"x" * (5 * MIB + 1))
    lines = [head.split(b"\r\n", 1)[0].decode() for head, _ in host.requests]
    assert lines[0] == "POST /b/media/big.bin?uploads HTTP/1.1"
    if len(lines) > 1:  # an upload was created: it is aborted, with its id encoded
        assert lines[-1] == "DELETE /b/media/big.bin?uploadId=id%2B%2F%3D%261 HTTP/1.1"
    parts = [line for line in lines if "partNumber" in line]
    assert parts[:1] in ([], ["PUT /b/media/big.bin?partNumber=1&uploadId=id%2B%2F%3D%261 "
                              "HTTP/1.1"])
    assert all(not answer for answer in host.answers)


def test_s3_an_abort_that_fails_is_logged_with_the_upload_id(canned_host, caplog):
    host = canned_host(INITIATED, canned_s3_answer(b"", status=b"403 Forbidden"),
                       canned_s3_answer(b"", status=b"500 Internal Server Error"))
    entry = "s3+http://%s/b" % host.address
    transport = DefaultTransport(base_url="/media/", retries=0, timeout=5,
                                 s3_credentials=("k", "s"),
                                 **dict(MULTIPART, s3_parts_in_flight=1))
    with pytest.raises(UnexpectedStatusCode, match="answered 403"):
        transport.put(entry, "big.bin", b"x" * (5 * MIB + 1))
    [logged] = resto_records(caplog)
    assert logged.startswith("Failed to abort the multipart upload id+/=&1 of big.bin on %s. "
                             "DELETE " % entry)
    assert "answered 500" in logged
    assert "a lifecycle rule (AbortIncompleteMultipartUpload) removes them" in logged


@pytest.mark.parametrize("assembled", [True, False])
def test_s3_completion_whose_answer_was_lost(assembled, canned_host):
    # The first CompleteMultipartUpload completes the upload, but its answer
    # is lost; the retry finds the upload gone (404). The object's ETag says
    # whether it holds the parts sent: the MD5 of their MD5s, then "-2".
    first, second = hashlib.md5(b"1").hexdigest(), hashlib.md5(b"2").hexdigest()
    etag = hashlib.md5(bytes.fromhex(first + second)).hexdigest() + "-2"
    host = canned_host(
        INITIATED,
        canned_s3_answer(b"", headers=b'ETag: "%s"\r\n' % first.encode()),
        canned_s3_answer(b"", headers=b'ETag: "%s"\r\n' % second.encode()),
        (b"", True),  # read, never answered
        canned_s3_answer(b"<Error><Code>NoSuchUpload</Code></Error>", status=b"404 Not Found"),
        canned_s3_answer(b"", headers=b'ETag: "%s"\r\n' % (
            etag if assembled else "0" * 32 + "-2").encode()),
        ABORTED)
    entry = "s3+http://%s/b" % host.address
    transport = DefaultTransport(base_url="/media/", retries=1, timeout=5,
                                 s3_credentials=("k", "s"),
                                 **dict(MULTIPART, s3_parts_in_flight=1))
    if assembled:
        assert transport.put(entry, "big.bin", b"x" * (5 * MIB + 1)) == 201
    else:
        with pytest.raises(UnexpectedStatusCode, match="answered 404.*NoSuchUpload"):
            transport.put(entry, "big.bin", b"x" * (5 * MIB + 1))
    methods = [head.split(b" ", 1)[0].decode() for head, _ in host.requests]
    assert methods == ["POST", "PUT", "PUT", "POST", "POST", "HEAD"] + (
        [] if assembled else ["DELETE"])


# XML and checksums against botocore, on generated inputs.

def random_text(rng, size):
    """Return text of ``size`` characters, XML-special and non-ASCII ones among them."""
    alphabet = "abcXYZ019 -_.+/=&<>\"'\u00e9\u65e5"
    return "".join(rng.choice(alphabet) for _ in range(size))


def test_complete_body_matches_botocore():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.serialize import create_serializer

    operation = botocore_session.get_session().get_service_model("s3").operation_model(
        "CompleteMultipartUpload")
    serializer = create_serializer("rest-xml")
    rng = random.Random(15)
    for _ in range(200):
        parts = [(number, '"%s"' % random_text(rng, rng.randrange(0, 40)),
                  base64.b64encode(rng.randbytes(4)).decode())
                 for number in range(1, rng.randrange(1, 30))]
        expected = serializer.serialize_to_request({
            "Bucket": "b", "Key": "k", "UploadId": "u", "MultipartUpload": {"Parts": [
                {"ETag": etag, "PartNumber": number, "ChecksumCRC32": crc}
                for number, etag, crc in parts]}}, operation)["body"]
        assert django_resto_gevent._s3_complete_body(parts) == expected


def test_upload_id_and_error_code_parsing_match_botocore():
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.parsers import create_parser

    model = botocore_session.get_session().get_service_model("s3")
    initiate = model.operation_model("CreateMultipartUpload").output_shape
    parser = create_parser("rest-xml")
    rng = random.Random(16)
    for _ in range(300):
        upload_id = random_text(rng, rng.randrange(1, 60)).strip() or "x"
        escaped = xml.sax.saxutils.escape(upload_id).encode()
        namespace = rng.choice([b' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"', b""])
        declaration = rng.choice([b'<?xml version="1.0" encoding="UTF-8"?>\n', b""])
        body = (declaration + b"<InitiateMultipartUploadResult%s><Bucket>b</Bucket><Key>k</Key>"
                b"<UploadId>%s</UploadId></InitiateMultipartUploadResult>" % (namespace, escaped))
        parsed = parser.parse({"body": body, "headers": {}, "status_code": 200}, initiate)
        assert django_resto_gevent._s3_upload_id(body) == parsed["UploadId"] == upload_id
        code = rng.choice(["BadDigest", "InternalError", "NoSuchUpload", "SlowDown"])
        error = (declaration + b"<Error><Code>%s</Code><Message>%s</Message></Error>"
                 % (code.encode(), escaped))
        parsed = parser.parse({"body": error, "headers": {}, "status_code": 400}, initiate)
        assert django_resto_gevent._s3_completion_error(error) == parsed["Error"]["Code"] == code
        assert django_resto_gevent._s3_error_code(error) == code


def test_crc32_header_matches_botocore():
    checksums = pytest.importorskip("botocore.httpchecksum")
    rng = random.Random(17)
    for size in [0, 1, 3, 4, 1000, 65536, 1 << 20] + [rng.randrange(1 << 16) for _ in range(50)]:
        data = rng.randbytes(size)
        reference = checksums.Crc32Checksum()
        reference.update(data)
        assert django_resto_gevent._crc32_text(zlib.crc32(data)) == reference.b64digest()
        payload = django_resto_gevent._Payload(ContentFile(data))
        with payload:
            assert django_resto_gevent._crc32_text(payload.crc32()) == reference.b64digest()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8333/b/media/a%20b.txt?uploads",
    "http://127.0.0.1:8333/b/media/a.txt?partNumber=7&uploadId=id%2B%2F%3D%261",
    "https://s3.example.com/b/media/caf%C3%A9.bin?uploadId=2~x.y_z-",
])
def test_multipart_requests_sign_as_botocore(url):
    botocore_auth = pytest.importorskip("botocore.auth")
    from unittest import mock

    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = datetime.datetime(2024, 2, 29, 23, 59, 58)
    body = b"<CompleteMultipartUpload/>"
    headers = {"Content-Length": str(len(body)), "x-amz-checksum-crc32": "AAAAAA=="}
    request = AWSRequest(method="POST", url=url, headers=dict(headers), data=body)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        botocore_auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "s3",
                                  "us-east-1").add_auth(request)
    kind = DefaultTransport(base_url="/media/", s3_credentials=(
        "AKIDEXAMPLE", "secret"))._host("s3+http://h/b")
    with mock.patch.object(django_resto_gevent, "_sigv4_timestamp",
                           return_value=now.strftime("%Y%m%dT%H%M%SZ")):
        ours = kind.sign("POST", url, dict(headers, **{
            "X-Amz-Content-Sha256": hashlib.sha256(body).hexdigest()}))
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Content-Sha256"] == request.headers["X-Amz-Content-SHA256"]


###############################################################################
# Fan-out
###############################################################################


def test_fan_out_runs_hosts_in_parallel_and_keeps_host_order():
    running = []
    peak = []
    all_running = gevent.event.Event()
    finished = {host: gevent.event.Event() for host in ("1", "2", "3")}

    def operation(host, name):
        running.append(host)
        peak.append(len(running))
        if len(running) == 3:
            all_running.set()
        # Bounded waits, which only hosts run in parallel get through: all
        # three run at once, then each waits for the next one to finish, so
        # the first host finishes last.
        assert all_running.wait(5)
        if host != "3":
            assert finished[str(int(host) + 1)].wait(5)
        running.remove(host)
        finished[host].set()
        if host == "2":
            raise ValueError("host 2 fails")
        return host + name

    results = django_resto_gevent._fan_out(operation, ["1", "2", "3"], "x")
    assert max(peak) == 3
    assert [r.host for r in results] == ["1", "2", "3"]
    assert results[0] == HostResult("1", "1x", None)
    assert isinstance(results[1].error, ValueError)
    assert not results[1].ok
    assert results[2].value == "3x"


@pytest.mark.parametrize("count", [1, 3])
def test_fan_out_runs_the_last_host_inline(count):
    caller = gevent.getcurrent()
    hosts = [str(index) for index in range(count)]
    results = django_resto_gevent._fan_out(lambda host, name: gevent.getcurrent(), hosts, "x")
    assert [result.value is caller for result in results] == [False] * (count - 1) + [True]


def test_async_execute_keeps_the_contract_of_execute(media_servers, tmp_path):
    # execute() runs now and returns the results in host order, as in the
    # other storages; the background path is execute_one().
    servers = media_servers(2)
    servers[1].status = {"DELETE": 500}
    storage = AsyncStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    results = storage.execute(lambda host, name: host, "x.txt")
    assert [(r.host, r.ok, r.value) for r in results] == [
        (servers[0].address, True, servers[0].address),
        (servers[1].address, True, servers[1].address)]
    servers[0].files["/media/gone.txt"] = b"g"
    with pytest.raises(ReplicationError, match="on 1 of 2 media hosts"):
        storage.execute(storage.transport.delete, "gone.txt")
    assert servers[0].files == {}
    assert storage.join(timeout=0) is True  # nothing was left in the background


###############################################################################
# Background: AsyncStorage order, bounds, exit
###############################################################################


def test_async_keeps_the_order_of_operations_on_a_name(media_servers, tmp_path):
    servers = media_servers(3, latency=0.01)
    storage = AsyncStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    for round_number in range(5):
        storage.save("o.txt", ContentFile(b"%d" % round_number))
        storage.delete("o.txt")
    storage.save("o.txt", ContentFile(b"last"))
    assert storage.join(timeout=30)
    for server in servers:
        assert [(m, s) for m, _, s in server.log] == [("PUT", 201), ("DELETE", 204)] * 5 + [
            ("PUT", 201)]
        assert server.files == {"/media/o.txt": b"last"}


def test_async_backlog_is_bounded(media_servers, tmp_path):
    server, = media_servers(1)
    release = gevent.event.Event()
    storage = AsyncStorage(location=str(tmp_path), hosts=[server.address],
                           async_max_pending=2, timeout=0.2, retries=0)
    for index in range(2):
        storage.execute_one(lambda host, name: release.wait(), server.address, "n%d" % index)
    started = time.monotonic()
    with pytest.raises(BacklogError, match="2 replications pending"):
        storage.execute_one(lambda host, name: None, server.address, "n2")
    assert 1.0 <= time.monotonic() - started < 5
    release.set()
    assert storage.join(timeout=10)
    storage.save("after.txt", ContentFile(b"a"))  # room again
    assert storage.join(timeout=10)
    assert server.files == {"/media/after.txt": b"a"}


def test_join_all_waits_for_every_async_storage(media_servers, tmp_path):
    server, = media_servers(1, latency=0.2)
    first = AsyncStorage(location=str(tmp_path / "1"), hosts=[server.address])
    second = AsyncStorage(location=str(tmp_path / "2"), hosts=[server.address])
    first.save("one.txt", ContentFile(b"1"))
    second.save("two.txt", ContentFile(b"2"))
    assert AsyncStorage.join_all(timeout=30)
    assert server.files == {"/media/one.txt": b"1", "/media/two.txt": b"2"}


def test_soak_random_faults_keep_every_saved_file(media_servers, tmp_path, monkeypatch):
    """Thousands of operations with random faults: what save() returned is kept."""
    monkeypatch.setattr(django_resto_gevent, "_RETRY_BACKOFF", 0.001)  # keep it short
    rng = random.Random(20261124)
    servers = media_servers(3)
    storages = [
        HybridStorage(location=str(tmp_path), hosts=[s.address for s in servers],
                      min_replicas=2, retries=2, timeout=1),
        DistributedStorage(hosts=[s.address for s in servers], min_replicas=2, retries=2,
                           timeout=1),
    ]
    saved = {}  # name -> bytes, for every save() that returned
    refused = 0
    for step in range(2000):
        storage = storages[step % 2]
        victims = rng.sample(servers, rng.choice([0, 1, 1, 1, 2]))
        for victim in victims:
            fault = rng.choice(["retryable", "retryable", "error", "refuse"])
            if fault == "retryable":
                victim.fail_first = {"PUT": 1, "DELETE": 1, "HEAD": 1}
            elif fault == "error":
                victim.status = {"PUT": 500, "DELETE": 500}
            else:
                victim.read_only = True
        try:
            if saved and rng.random() < 0.25:
                name = rng.choice(sorted(saved))
                del saved[name]  # even a failed delete may have removed some copies
                storage.delete(name)
            else:
                data = rng.randbytes(rng.choice([0, 10, 1000, 70_000]))
                name = storage.save("soak/%d.bin" % step, ContentFile(data))
                saved[name] = data
        except ReplicationError:
            refused += 1
        finally:
            for victim in victims:
                victim.fail_first, victim.status, victim.read_only = 0, None, False
    assert refused > 0
    assert len(saved) > 500
    for name, data in saved.items():
        copies = [server.files.get("/media/" + name) for server in servers]
        assert sum(copy == data for copy in copies) >= 2, name
        assert all(copy in (None, data) for copy in copies), name


###############################################################################
# Background: processes that gevent did not patch, exit, gunicorn
###############################################################################

UNPATCHED_SCRIPT = r"""
import json, sys, time
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
from django.core.files.base import ContentFile
import django_resto_gevent as resto

assert not resto._sockets_patched()
report = {}
servers = [resto.MediaServer(latency=0.5).start() for _ in range(3)]
hanging = resto.MediaServer(hang=True).start()
trickling = resto.MediaServer(trickle=0.1).start()
hosts = [server.address for server in servers]
storage = resto.HybridStorage(location=sys.argv[1], hosts=hosts)
started = time.monotonic()
storage.save("parallel.txt", ContentFile(b"p"))
report["parallel_seconds"] = time.monotonic() - started
for server in servers:
    server.latency = 0
for name, bad in (("hang", hanging), ("trickle", trickling)):
    storage = resto.HybridStorage(location=sys.argv[1], hosts=hosts + [bad.address],
                                  timeout=0.3)
    started = time.monotonic()
    try:
        storage.save(name + ".txt", ContentFile(b"x"))
        report[name] = "saved"
    except resto.ReplicationError as error:
        report[name] = error.hosts == [bad.address]
    report[name + "_seconds"] = time.monotonic() - started
storage = resto.AsyncStorage(location=sys.argv[1], hosts=hosts)
for index in range(20):
    storage.save("async/%d.txt" % index, ContentFile(b"a"))
report["joined"] = storage.join(timeout=30)
report["files"] = [len(server.files) for server in servers]
for server in servers + [hanging, trickling]:
    server.stop()
print(json.dumps(report))
"""


def test_unpatched_process_fans_out_on_threads_within_deadlines(tmp_path):
    report = json.loads(python_output(UNPATCHED_SCRIPT, str(tmp_path)))
    # Three hosts answering in 0.5 s each: in parallel, not one after another.
    assert report["parallel_seconds"] < 1.2
    # Two attempts of at most 0.3 s each, plus a backoff, for hang and trickle.
    assert report["hang"] is True
    assert report["hang_seconds"] < 2.0
    assert report["trickle"] is True
    assert report["trickle_seconds"] < 2.0
    assert report["joined"] is True
    # parallel and async/*: hang and trickle raised, so their copies were removed.
    assert report["files"] == [1 + 20] * 3


UNPATCHED_MULTIPART_SCRIPT = r"""
import _thread, json, os, sys, threading
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
from django.core.files.base import ContentFile
import django_resto_gevent as resto

assert not resto._sockets_patched()
good, cut, slow, location, key, secret = sys.argv[1:]
senders = set()
send_part = resto._MultipartUpload._send_part

def recording_send_part(self, number):
    senders.add(threading.current_thread().name)
    return send_part(self, number)

resto._MultipartUpload._send_part = recording_send_part
options = dict(s3_access_key_id=key, s3_secret_access_key=secret, retries=0,
               s3_multipart_threshold=5 << 20, s3_part_size=5 << 20, s3_parts_in_flight=2)
data = os.urandom((10 << 20) + 12345)
report = {}
storage = resto.HybridStorage(location=location, hosts=[good], **options)
storage.save("threads/big.bin", ContentFile(data))
report["landed"] = storage.transport.content(good, "threads/big.bin") == data
report["senders"] = sorted(senders)
storage = resto.HybridStorage(location=location, hosts=[cut], **options)
try:
    storage.save("threads/cut.bin", ContentFile(data))
    report["cut"] = "saved"
except resto.ReplicationError as error:
    report["cut"] = error.hosts
# Ctrl-C in the middle of the parts, sent through a slow link.
threading.Timer(0.5, _thread.interrupt_main).start()
try:
    storage.transport.put(slow, "threads/interrupted.bin", data)
    report["interrupted"] = False
except KeyboardInterrupt:
    report["interrupted"] = True
print(json.dumps(report))
"""


def test_unpatched_process_sends_parts_on_threads(seaweed, tmp_path):
    gateway = seaweed.s3_url.partition("//")[2]
    # Every connection that carries more than 3 MiB is reset: a part (5 MiB)
    # never lands, on a kept-alive connection or a new one. (A single cut
    # could land on the connection kept from the initiate request, whose
    # failure without an answer is taken for a host closing it: the part
    # went again on a new connection and the save passed, now and then.)
    proxy = FaultProxy(gateway, cut_each_after=3 * MIB).start()
    slow = DelayProxy(gateway, 0.01).start()
    try:
        cut = "s3+http://%s/media" % proxy.address
        report = json.loads(python_output(
            UNPATCHED_MULTIPART_SCRIPT, s3_host(seaweed), cut, "s3+http://%s/media"
            % slow.address, str(tmp_path), seaweed.access_key, seaweed.secret_key))
    finally:
        proxy.stop()
        slow.stop()
    assert report == {"landed": True, "senders": ["resto-part"], "cut": [cut],
                      "interrupted": True}
    assert proxy.cut >= 1  # each part in flight, and any part sent again
    assert uploads_of(seaweed, "threads/") == []  # the cut and the interrupted: aborted
    assert s3_content(seaweed, "threads/interrupted.bin") is None


STALLED_HOST_SCRIPT = r"""
import json, os, socket, sys, time
if sys.argv[1] == "patched":
    from gevent import monkey
    monkey.patch_all()
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
from django.core.files.base import ContentFile
import django_resto_gevent as resto

assert resto._sockets_patched() is (sys.argv[1] == "patched")
resto._MIN_TRANSFER_RATE = 64 * 1024 * 1024  # the 16 MiB below: a 0.55 s bound
# A host whose kernel takes the connection, then nobody ever reads from it.
stalled = socket.create_server(("127.0.0.1", 0))
good = resto.MediaServer().start()
bad = "127.0.0.1:%d" % stalled.getsockname()[1]
storage = resto.HybridStorage(location=sys.argv[2], hosts=[good.address, bad],
                              timeout=0.3, retries=0)
data = os.urandom(16 * 1024 * 1024)
report = {}
started = time.monotonic()
try:
    storage.save("big.bin", ContentFile(data))
    report["failed"] = []
except resto.ReplicationError as error:
    report["failed"] = error.hosts
    report["error"] = str(error)
report["seconds"] = time.monotonic() - started
# The good host took the whole file; the save raised, so its copy was removed.
report["good_log"] = [[method, status] for method, _path, status in good.log]
good.stop()
print(json.dumps(report))
"""


@pytest.mark.parametrize("mode", ["patched", "unpatched"])
def test_a_host_that_stops_reading_an_upload_is_cut_at_the_deadline(mode, tmp_path):
    report = json.loads(python_output(STALLED_HOST_SCRIPT, mode, str(tmp_path)))
    assert report["failed"] == [report["failed"][0]]
    assert "no complete answer within 0.6 seconds" in report["error"]
    assert report["seconds"] < 3.0
    assert report["good_log"] == [["PUT", 201], ["DELETE", 204]]


def test_pool_made_before_patching_is_not_reused_after():
    script = (
        "from django.conf import settings; settings.configure()\n"
        "import django_resto_gevent as r\n"
        "before = r._pool_manager(1)\n"
        "from gevent import monkey; monkey.patch_all()\n"
        "print(r._pool_manager(1) is before)\n"
    )
    assert python_output(script).strip() == "False"


LATE_SSL_SCRIPT = r"""
import json, socket, sys
if sys.argv[1] == "patched-first":
    from gevent import monkey
    monkey.patch_all()
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/")
django.setup()
from django.core.files.base import ContentFile
import django_resto_gevent as resto
if sys.argv[1] == "patched-late":  # what gunicorn --preload's gevent worker does
    from gevent import monkey
    monkey.patch_all()

# An https:// host whose port refuses connections, and a plain one.
closed = socket.socket()
closed.bind(("127.0.0.1", 0))
tls = resto.DistributedStorage(hosts=["https://127.0.0.1:%d" % closed.getsockname()[1]],
                               retries=0)
server = resto.MediaServer().start()
plain = resto.DistributedStorage(hosts=[server.address])
report = {"https": [], "plain": []}
for attempt in range(2):
    try:
        tls.save("tls.txt", ContentFile(b"t"))
    except resto.ReplicationError as error:
        cause = error.failures[0][1]
        report["https"].append([type(cause).__name__, str(cause)])
    report["plain"].append(plain.save("plain-%d.txt" % attempt, ContentFile(b"p")))
server.stop()
print(json.dumps(report))
"""


@pytest.mark.parametrize("mode", ["unpatched", "patched-first", "patched-late"])
def test_ssl_patched_after_urllib3_is_a_clear_error(mode):
    report = json.loads(python_output(LATE_SSL_SCRIPT, mode))
    assert report["plain"] == ["plain-0.txt", "plain-1.txt"]  # plain HTTP works regardless
    kinds = [kind for kind, _ in report["https"]]
    if mode != "patched-late":
        assert kinds == ["TransportError"] * 2  # the port refused: nothing else went wrong
        return
    # Every time, not only at the first request of the process.
    assert kinds == ["ImproperlyConfigured"] * 2
    message = report["https"][0][1]
    assert message.startswith("gevent patched the ssl module after urllib3 had imported it")
    assert "at the top of gunicorn.conf.py" in message


@pytest.fixture
def served_directory(tmp_path):
    """Start ``python -m django_resto_gevent serve`` on a directory; stop it by PID."""
    root = tmp_path / "served"
    process = subprocess.Popen(
        [sys.executable, "-m", "django_resto_gevent", "serve", "--root", str(root),
         "--latency", "0.02"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "serve printed nothing within 30 seconds"
        url = process.stdout.readline().split(" on ")[1].strip().rstrip("/")
        yield url.split("//")[1], root
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        process.stdout.close()


EXIT_SCRIPT = r"""
import sys
if sys.argv[1] == "patched":
    from gevent import monkey
    monkey.patch_all()
import django
from django.conf import settings
settings.configure(MEDIA_URL="/media/", RESTO_ASYNC_EXIT_TIMEOUT=60)
django.setup()
from django.core.files.base import ContentFile
import django_resto_gevent as resto

storage = resto.AsyncStorage(location=sys.argv[3], hosts=[sys.argv[2]])
for index in range(30):
    storage.save("exit/%d.txt" % index, ContentFile(b"%d" % index))
# join(timeout=0) waits for nothing: False while replications are pending.
print("pending" if storage.join(timeout=0) is False else "none")
"""


@pytest.mark.parametrize("mode", ["patched", "unpatched"])
def test_async_replications_are_flushed_at_exit(mode, served_directory, tmp_path):
    address, root = served_directory
    pending = python_output(EXIT_SCRIPT, mode, address, str(tmp_path / "master"))
    assert pending.strip() == "pending"  # replications were pending when the script ended
    for index in range(30):
        assert (root / "media" / "exit" / ("%d.txt" % index)).read_bytes() == b"%d" % index


GUNICORN_SITE = r'''
import os

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="e2e",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1"],
    MIDDLEWARE=[],
    MEDIA_ROOT=os.environ["E2E_MEDIA_ROOT"],
    MEDIA_URL="/media/",
    RESTO_MEDIA_HOSTS=os.environ["E2E_HOSTS"].split(","),
    RESTO_CA_BUNDLE=os.environ.get("E2E_CA_BUNDLE"),
    RESTO_HTTP_AUTH=os.environ["E2E_HTTP_AUTH"].split(":") if "E2E_HTTP_AUTH" in os.environ
    else None,
    STORAGES={
        "default": {"BACKEND": "django_resto_gevent.AsyncStorage"},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    },
)

import django  # noqa: E402

django.setup()

from django.core.files.base import ContentFile  # noqa: E402
from django.core.files.storage import default_storage  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def upload(request, name):
    saved = default_storage.save(name, ContentFile(request.body))
    # join(timeout=0) waits for nothing: False while replications are pending.
    pending = default_storage.join(timeout=0) is False
    return HttpResponse("%s %d" % (saved, pending))


urlpatterns = [path("upload/<path:name>", upload)]
application = get_wsgi_application()
'''

GUNICORN_CONFIG = r'''
import sys


def worker_exit(server, worker):
    from django_resto_gevent import AsyncStorage

    # join_all(timeout=0) waits for nothing: False while replications are pending.
    pending = AsyncStorage.join_all(timeout=0) is False
    print("worker_exit pending=%d" % pending, file=sys.stderr, flush=True)
    AsyncStorage.join_all(timeout=30)
'''


def find_gunicorn():
    """Return the gunicorn next to this Python, or None."""
    return shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or shutil.which(
        "gunicorn")


@contextlib.contextmanager
def gunicorn_site(tmp_path, config, hosts, *options, **env):
    """Serve GUNICORN_SITE under ``gunicorn -k gevent -w 1`` with ``config``.

    ``hosts`` are its media hosts, ``options`` more gunicorn options, ``env``
    more environment. Yields a namespace with the ``port``; after the block,
    gunicorn has had SIGTERM and exited, and the namespace also holds its
    ``returncode`` and ``stderr`` (kept in a file: a full pipe would stall it).
    """
    gunicorn = find_gunicorn()
    if gunicorn is None:
        missing("gunicorn is not installed (pip install -e .[test])")
    (tmp_path / "e2e_site.py").write_text(GUNICORN_SITE)
    (tmp_path / "e2e_gunicorn.py").write_text(config)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, str(tmp_path)]),
               E2E_MEDIA_ROOT=str(tmp_path / "media"), E2E_HOSTS=",".join(hosts), **env)
    site = types.SimpleNamespace(port=port, returncode=None, stderr=None)
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [gunicorn, "-k", "gevent", "-w", "1", "-b", "127.0.0.1:%d" % port, "-c",
             str(tmp_path / "e2e_gunicorn.py"), *options, "e2e_site:application"],
            cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.1)
                pytest.fail("gunicorn exited: " + log_path.read_text())
        else:
            pytest.fail("gunicorn did not accept connections within 30 seconds")
        yield site
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    site.returncode = process.returncode
    site.stderr = log_path.read_text()


def test_gunicorn_sigterm_flushes_pending_replications(nginx_hosts, tmp_path):
    # Slow paths to the nginx hosts keep replications pending at SIGTERM (a
    # gevent worker notices the signal within a second; each upload takes ~3 s).
    proxies = [DelayProxy(host, 0.2).start() for host in nginx_hosts.hosts]
    try:
        with gunicorn_site(tmp_path, GUNICORN_CONFIG,
                           [proxy.address for proxy in proxies],
                           "--graceful-timeout", "60") as site:
            http = urllib3.PoolManager(retries=False, timeout=30)
            uploads = {"e2e/%d.bin" % index: os.urandom(1024 * 1024) for index in range(6)}
            pending_seen = []
            for name, data in uploads.items():
                response = http.request(
                    "POST", "http://127.0.0.1:%d/upload/%s" % (site.port, name), body=data)
                assert response.status == 200, response.data[:500]
                saved, pending = response.data.decode().split()
                assert saved == name
                pending_seen.append(int(pending))
    finally:
        for proxy in proxies:
            proxy.stop()
    assert site.returncode == 0, site.stderr
    assert max(pending_seen) > 0  # each view returned before its replication ended
    pending_at_exit = re.findall("worker_exit pending=([0-9]+)", site.stderr)
    assert pending_at_exit, site.stderr
    assert int(pending_at_exit[0]) > 0  # SIGTERM came while replications were pending
    for name, data in uploads.items():
        _assert_on_nginx(nginx_hosts, name, data)


def readme_gunicorn_config():
    """Return the gunicorn.conf.py that README.rst's deployment section shows."""
    with open(os.path.join(HERE, "README.rst")) as readme:
        block = readme.read().split("with that hook::\n\n", 1)[1]
    lines = itertools.takewhile(lambda line: not line or line.startswith("    "),
                                block.split("\n"))
    return textwrap.dedent("\n".join(lines))


@pytest.mark.parametrize("config", ["worker-patches", "readme"])
def test_gunicorn_preload_with_https_hosts(config, nginx_https, certificates, tmp_path):
    # With --preload the master imports the application (and urllib3);
    # gunicorn's gevent worker patches after fork(), unless README's
    # gunicorn.conf.py patched first.
    if config == "readme":
        config_text = readme_gunicorn_config()
        assert config_text.startswith("from gevent import monkey\n\nmonkey.patch_all()")
        assert "preload_app = True" in config_text
        options = ()
    else:
        config_text, options = GUNICORN_CONFIG, ("--preload", "--graceful-timeout", "60")
    with gunicorn_site(
        tmp_path, config_text, nginx_https.hosts, *options,
        E2E_CA_BUNDLE=certificates.ca, E2E_HTTP_AUTH="%s:%s" % (NGINX_USER, NGINX_PASSWORD),
    ) as site:
        http = urllib3.PoolManager(retries=False, timeout=30)
        uploads = {"preload/%d.bin" % index: os.urandom(64 * 1024) for index in range(2)}
        for name, data in uploads.items():
            response = http.request(
                "POST", "http://127.0.0.1:%d/upload/%s" % (site.port, name), body=data)
            assert response.status == 200, response.data[:500]
            assert response.data.decode().split()[0] == name
    assert site.returncode == 0, site.stderr
    assert "maximum recursion depth" not in site.stderr
    failed = re.findall(r"Failed to create (\S+) on (\S+)\. (.*)", site.stderr)
    if config == "readme":
        assert failed == [], site.stderr
        assert "MonkeyPatchWarning" not in site.stderr
        for name, data in uploads.items():
            _assert_on_nginx(nginx_https, name, data)
        return
    assert "MonkeyPatchWarning" in site.stderr  # gevent's own hint, as README says
    # What the sysadmin finds in the log: once per file and host.
    assert sorted((name, host) for name, host, _ in failed) == sorted(
        (name, host) for name in uploads for host in nginx_https.hosts), site.stderr
    for _, _, message in failed:
        assert message == (
            "gevent patched the ssl module after urllib3 had imported it, so HTTPS "
            "requests to the media hosts would fail with RecursionError (gevent issue "
            "#1016). gunicorn --preload with gevent workers does this: the application "
            "is loaded before the worker patches. Patch first, at the top of "
            "gunicorn.conf.py (from gevent import monkey; monkey.patch_all()), or do not "
            "use --preload. Elsewhere, patch first thing in the script that starts the "
            "process.")
    for name in uploads:
        _assert_gone_from_nginx(nginx_https, name)


###############################################################################
# Storages: reliability, the fault matrix
###############################################################################

# Each fault: the knobs of the faulty server (None: a host that does not exist
# as a server), whether a retry recovers, and what the faulty server logs.
FAULTS = {
    "refused": (None, False, None),
    "unknown-host": ("nonexistent.invalid:80", False, None),
    "never-answers": ({"hang": True}, False, [("PUT", "/media/a.txt", None)] * 2),
    "trickle": ({"trickle": 0.1}, False, [("PUT", "/media/a.txt", 201),
                                           ("PUT", "/media/a.txt", 204)]),
    "500": ({"status": 500}, False, [("PUT", "/media/a.txt", 500)]),
    "503-then-ok": ({"fail_first": {"PUT": 1}}, True, [("PUT", "/media/a.txt", 503),
                                              ("PUT", "/media/a.txt", 201)]),
    "403": ({"read_only": True}, False, [("PUT", "/media/a.txt", 403)]),
    "202": ({"status": {"PUT": 202}}, False, [("PUT", "/media/a.txt", 202)]),
    "reset-mid-body": ({"reset_after": 1000}, False, [("PUT", "/media/a.txt", None)] * 2),
}

# Two attempts of at most 0.3 s and a backoff, twice for Distributed (its
# exists() check before the save also waits for the faulty host): a generous
# bound that a hang or a trickle without a deadline would blow through.
FAULT_TIMEOUT = 0.3
FAULT_BOUND = 2 * 2 * (FAULT_TIMEOUT + 0.1) + 1.0


@pytest.fixture
def failures_signalled():
    """Collect the replication_failed signals sent during the test."""
    received = []

    def receiver(sender, **kwargs):
        received.append(dict(kwargs, sender=sender))

    django_resto_gevent.replication_failed.connect(receiver)
    yield received
    django_resto_gevent.replication_failed.disconnect(receiver)


def _faulty_host(media_servers, fault):
    """Return (address, server or None) for ``fault``."""
    knobs = FAULTS[fault][0]
    if knobs is None:
        down = MediaServer().start()
        down.stop()  # its port now refuses connections
        return down.address, None
    if isinstance(knobs, str):
        return knobs, None
    server, = media_servers(1, **copy.deepcopy(knobs))  # knobs count down
    return server.address, server


@storage_kinds()
@pytest.mark.parametrize("fatal", [True, False], ids=["fatal", "not-fatal"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix(fault, fatal, storage_class, media_servers, tmp_path, caplog,
                      failures_signalled):
    good = media_servers(2)
    bad_address, bad = _faulty_host(media_servers, fault)
    hosts = [good[0].address, good[1].address, bad_address]
    data = os.urandom(3000)  # more than reset_after
    storage = make_storage(storage_class, hosts, tmp_path, timeout=FAULT_TIMEOUT,
                           fatal_exceptions=fatal)
    recovers = FAULTS[fault][1]
    raises = fatal and not recovers and storage_class is not AsyncStorage
    started = time.monotonic()
    if raises:
        with pytest.raises(ReplicationError) as info:
            storage.save("a.txt", ContentFile(data))
        assert info.value.hosts == [bad_address]
    else:
        with pytest.warns(RuntimeWarning, match="no master copy") if (
                storage_class is DistributedStorage and not fatal) else contextlib.nullcontext():
            assert storage.save("a.txt", ContentFile(data)) == "a.txt"
    settle(storage)
    assert time.monotonic() - started < FAULT_BOUND

    if recovers:
        assert resto_records(caplog) == []
        assert failures_signalled == []
    else:
        errors = resto_records(caplog)
        assert len(errors) == 1
        assert errors[0].startswith("Failed to create a.txt on %s. " % bad_address)
        signal, = failures_signalled
        assert signal["sender"] is storage_class
        assert (signal["action"], signal["name"], signal["host"]) == ("create", "a.txt",
                                                                        bad_address)
        assert signal["storage"] is storage
        assert isinstance(signal["exception"], RestoError)
    if bad is not None:
        assert bad.requests("PUT") == FAULTS[fault][2]
        landed_on_bad = fault in ("trickle", "503-then-ok")
        assert (bad.files.get("/media/a.txt") == data) is landed_on_bad
    # A save that raised leaves no copy on the hosts that took it, nor a master copy.
    for server in good:
        assert server.files == ({} if raises else {"/media/a.txt": data})
    if storage_class is not DistributedStorage:
        master = tmp_path / "master" / "a.txt"
        assert (master.read_bytes() if master.exists() else None) == (None if raises else data)


@pytest.mark.parametrize(("min_replicas", "succeeds"), [(1, True), (2, True), (3, False)])
@pytest.mark.parametrize("storage_class", [HybridStorage, DistributedStorage],
                         ids=lambda cls: cls.__name__)
def test_write_quorum(storage_class, min_replicas, succeeds, media_servers, tmp_path, caplog,
                      failures_signalled):
    servers, bad = _one_bad_host(media_servers, 3, status=500)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path,
                           min_replicas=min_replicas)
    if succeeds:
        assert storage.save("q.txt", ContentFile(b"q")) == "q.txt"
    else:
        with pytest.raises(ReplicationError, match="on 1 of 3 media hosts"):
            storage.save("q.txt", ContentFile(b"q"))
    assert len(resto_records(caplog)) == 1
    assert [s["host"] for s in failures_signalled] == [bad.address]
    for server in servers[:2]:
        assert server.files == ({"/media/q.txt": b"q"} if succeeds else {})
    if storage_class is HybridStorage:
        assert (tmp_path / "master" / "q.txt").exists() is succeeds


def test_quorum_defaults_follow_fatal_exceptions(tmp_path):
    hosts = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    assert HybridStorage(location=str(tmp_path), hosts=hosts).min_replicas == 3
    assert HybridStorage(location=str(tmp_path), hosts=hosts,
                         fatal_exceptions=False).min_replicas == 0
    with override_settings(RESTO_MIN_REPLICAS=2):
        assert HybridStorage(location=str(tmp_path), hosts=hosts).min_replicas == 2
    storage = HybridStorage(location=str(tmp_path), hosts=hosts, min_replicas=4)
    with pytest.raises(ImproperlyConfigured, match="min_replicas=4 .* only 3 media hosts"):
        storage.save("never.txt", ContentFile(b"x"))
    assert not (tmp_path / "never.txt").exists()


def test_distributed_failed_save_leaves_the_name_free(media_servers):
    servers, bad = _one_bad_host(media_servers, 3, fail_first={"PUT": 2})
    storage = DistributedStorage(hosts=[s.address for s in servers])
    with pytest.raises(ReplicationError):
        storage.save("free.txt", ContentFile(b"1"))
    assert not storage.exists("free.txt")
    assert storage.save("free.txt", ContentFile(b"2")) == "free.txt"  # the same name
    for server in servers:
        assert server.files == {"/media/free.txt": b"2"}


def test_retry_rereads_the_body_from_the_start(media_servers, tmp_path):
    server, = media_servers(1, fail_first=1)
    data = os.urandom(3 * 1024 * 1024)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address])
    storage.save("retried.bin", ContentFile(data))
    assert server.files["/media/retried.bin"] == data
    assert [status for _, _, status in server.log] == [503, 201]


def test_distributed_retry_rereads_the_spool(media_servers):
    servers = media_servers(2) + media_servers(1, fail_first=1)
    data = os.urandom(2 * 1024 * 1024)  # spooled to a temporary file
    DistributedStorage(hosts=[s.address for s in servers]).save("s.bin", ContentFile(data))
    for server in servers:
        assert server.files["/media/s.bin"] == data


def test_delete_404_on_retry_counts_as_done(media_servers, caplog):
    server, = media_servers(1, lose_answers=1)  # the first DELETE acts, its answer is lost
    server.files["/media/x.txt"] = b"x"
    transport = DefaultTransport(base_url="/media/", timeout=FAULT_TIMEOUT, retries=1)
    assert transport.delete(server.address, "x.txt") is True
    assert server.log == [("DELETE", "/media/x.txt", None),  # acted, never answered
                          ("DELETE", "/media/x.txt", 404)]  # the retry's answer
    assert server.files == {}
    assert resto_records(caplog, logging.WARNING) == []


def test_no_retries_when_set_to_zero(media_servers, tmp_path):
    server, = media_servers(1, fail_first=1)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address], retries=0)
    with pytest.raises(ReplicationError, match="answered 503"):
        storage.save("once.txt", ContentFile(b"1"))
    assert len(server.log) == 1


def test_slow_but_steady_upload_is_not_cut(media_servers, tmp_path):
    # 4 MiB at about 8 MiB/s takes ~0.5 s, longer than the 0.3 s timeout; the
    # bound grows with the body (one second per MiB).
    server, = media_servers(1)
    data = os.urandom(4 * 1024 * 1024)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address],
                            timeout=FAULT_TIMEOUT, retries=0)
    server.read_pause = 0.03
    started = time.monotonic()
    storage.save("steady.bin", ContentFile(data))
    assert time.monotonic() - started > FAULT_TIMEOUT  # it did outlast the plain timeout
    assert server.files["/media/steady.bin"] == data


def test_a_killed_request_leaves_no_broken_connection(media_servers, tmp_path):
    server, = media_servers(1, hang=True)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address],
                            timeout=FAULT_TIMEOUT, retries=0)
    with pytest.raises(ReplicationError, match="no complete answer"):
        storage.save("k1.txt", ContentFile(b"1"))
    server.hang = False
    storage.save("k2.txt", ContentFile(b"2"))
    assert server.files == {"/media/k2.txt": b"2"}


def test_signal_receiver_errors_do_not_break_saves(media_servers, tmp_path, caplog):
    server, = media_servers(1, status=500)

    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    django_resto_gevent.replication_failed.connect(broken)
    try:
        storage = HybridStorage(location=str(tmp_path), hosts=[server.address],
                                fatal_exceptions=False)
        storage.save("r.txt", ContentFile(b"r"))
    finally:
        django_resto_gevent.replication_failed.disconnect(broken)
    assert any("receiver failed" in message for message in resto_records(caplog))


###############################################################################
# Storages: core operations, each class on 1, 2 and 3 media servers
###############################################################################


def test_save_replicates_to_every_host(replicated):
    storage, servers = replicated
    name = storage.save("dir/hello.txt", ContentFile(b"hello"))
    settle(storage)
    assert name == "dir/hello.txt"
    for server in servers:
        assert server.files == {"/media/dir/hello.txt": b"hello"}
        assert server.requests("PUT") == [("PUT", "/media/dir/hello.txt", 201)]
        assert server.requests("DELETE") == []
    if not isinstance(storage, DistributedStorage):
        with open(storage.path(name), "rb") as master_copy:
            assert master_copy.read() == b"hello"


def test_save_existing_name_gets_an_alternative(replicated):
    storage, servers = replicated
    first = storage.save("same.txt", ContentFile(b"first"))
    settle(storage)
    second = storage.save("same.txt", ContentFile(b"second"))
    settle(storage)
    assert first == "same.txt"
    assert second != first
    assert second.startswith("same_")
    assert second.endswith(".txt")
    for server in servers:
        assert server.files == {"/media/same.txt": b"first", "/media/" + second: b"second"}
        assert [status for _, _, status in server.requests("PUT")] == [201, 201]


def test_save_without_name_uses_the_content_name(replicated):
    storage, servers = replicated
    assert storage.save(None, ContentFile(b"named", name="from-content.txt")) == "from-content.txt"
    settle(storage)
    for server in servers:
        assert server.files["/media/from-content.txt"] == b"named"


def test_delete_existing_file(replicated, caplog):
    storage, servers = replicated
    name = storage.save("gone.txt", ContentFile(b"bye"))
    settle(storage)
    storage.delete(name)
    settle(storage)
    for server in servers:
        assert server.files == {}
        assert server.requests("DELETE") == [("DELETE", "/media/gone.txt", 204)]
    assert not storage.exists(name)
    assert resto_records(caplog, logging.WARNING) == []


def test_delete_missing_file_warns_per_host(replicated, caplog):
    storage, servers = replicated
    storage.delete("never-there.txt")
    settle(storage)
    for server in servers:
        assert server.requests("DELETE") == [("DELETE", "/media/never-there.txt", 404)]
    assert sorted(resto_records(caplog, logging.WARNING)) == sorted(
        "DELETE on missing file never-there.txt on %s." % server.address for server in servers
    )
    assert resto_records(caplog) == []


def test_exists_size_open_and_url(replicated):
    storage, servers = replicated
    name = storage.save("data/some file.bin", ContentFile(b"0123456789"))
    settle(storage)
    assert storage.exists(name)
    assert not storage.exists("data/other.bin")
    assert storage.size(name) == 10
    with storage.open(name) as opened:
        assert opened.read() == b"0123456789"
    assert storage.url(name) == "/media/data/some%20file.bin"


def test_missing_file_size_and_open(replicated):
    storage, _ = replicated
    with pytest.raises(FileNotFoundError):
        storage.size("missing.txt")
    with pytest.raises(FileNotFoundError):
        storage.open("missing.txt")


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_awkward_names_land_at_their_path(replicated, name):
    storage, servers = replicated
    saved = storage.save(name, ContentFile(name.encode()))
    settle(storage)
    assert saved == name
    for server in servers:
        assert server.files == {"/media/" + name: name.encode()}
    assert storage.exists(name)
    with storage.open(name) as opened:
        assert opened.read() == name.encode()
    storage.delete(name)
    settle(storage)
    for server in servers:
        assert server.files == {}


@storage_kinds()
@pytest.mark.parametrize("operation", ["save", "delete", "exists", "size", "open"])
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_before_any_request(storage_class, operation, name,
                                                  media_servers, tmp_path):
    server, = media_servers(1)
    storage = make_storage(storage_class, [server.address], tmp_path)
    args = (name, ContentFile(b"x")) if operation == "save" else (name,)
    with pytest.raises((SuspiciousFileOperation, ValueError)):
        getattr(storage, operation)(*args)
    settle(storage)
    assert server.log == []
    assert not os.path.exists(tmp_path / "outside.txt")


@storage_kinds()
@pytest.mark.parametrize("mode", ["r+b", "w+", "x", "xb", "rbt", "wr", "", None])
def test_open_modes_that_cannot_replicate_whole_are_refused(storage_class, mode,
                                                            media_servers, tmp_path):
    server, = media_servers(1)
    storage = make_storage(storage_class, [server.address], tmp_path)
    with pytest.raises(ValueError, match="takes mode 'r', 'w' or 'a'.*not %s" % re.escape(
            repr(mode))):
        storage.open("a.txt", mode)
    assert server.log == []


def test_distributed_has_no_local_paths(media_servers):
    server, = media_servers(1)
    storage = DistributedStorage(hosts=[server.address])
    for method, why in [("path", "keeps no local copy"), ("get_accessed_time", "no access time"),
                        ("get_created_time", "only when a file was last written")]:
        with pytest.raises(NotImplementedError, match=why):
            getattr(storage, method)("a")
    assert server.log == []


def test_distributed_listdir_and_modified_time_come_from_the_hosts(media_servers):
    first, second, blind = media_servers(3)
    blind.listing = False  # cannot list: the others' word stands
    storage = DistributedStorage(hosts=[first.address, second.address, blind.address])
    with pytest.raises(FileNotFoundError):
        storage.listdir("")
    storage.save("a.txt", ContentFile(b"a"))
    storage.save("d/b.txt", ContentFile(b"b"))
    second.files["/media/only-here.txt"] = b"o"
    assert storage.listdir("") == (["d"], ["a.txt", "only-here.txt"])
    assert storage.listdir("d/") == ([], ["b.txt"])
    modified = storage.get_modified_time("a.txt")
    assert modified.tzinfo is not None
    assert abs(modified.timestamp() - time.time()) < 5
    with pytest.raises(FileNotFoundError):
        storage.get_modified_time("never.txt")


def test_distributed_gives_up_when_every_name_is_taken(media_servers):
    server, = media_servers(1, status={"HEAD": 200})  # says every name exists
    storage = DistributedStorage(hosts=[server.address])
    with pytest.raises(RestoError, match="Gave up looking for a free name near 'x.txt'"):
        storage.save("x.txt", ContentFile(b"x"))
    assert len(server.requests("HEAD")) == 100
    assert server.requests("PUT") == []
    assert storage.exists("x.txt")  # outside a save, exists() is not counted


def test_distributed_url_follows_filesystem_storage(media_servers):
    server, = media_servers(1)
    storage = DistributedStorage(hosts=[server.address], base_url="https://cdn.example/m")
    assert storage.url("a b/\u00e9.txt") == "https://cdn.example/m/a%20b/%C3%A9.txt"
    assert storage.url("/lead.txt") == "https://cdn.example/m/lead.txt"


def test_distributed_streams_a_real_file_in_place(media_servers, tmp_path):
    servers = media_servers(3)
    source = tmp_path / "upload.bin"
    data = os.urandom(3 * 1024 * 1024 + 5)
    source.write_bytes(data)
    storage = DistributedStorage(hosts=[s.address for s in servers])
    with open(source, "rb") as handle:
        assert storage.save("big/upload.bin", File(handle)) == "big/upload.bin"
    for server in servers:
        assert server.files["/media/big/upload.bin"] == data
    with storage.open("big/upload.bin") as opened:
        assert opened.read() == data
    assert storage.size("big/upload.bin") == len(data)


def test_distributed_spools_large_content_once(media_servers):
    servers = media_servers(3)
    data = os.urandom(2 * 1024 * 1024 + 7)  # above the in-memory limit
    storage = DistributedStorage(hosts=[s.address for s in servers])
    storage.save("spooled.bin", ContentFile(data))
    for server in servers:
        assert server.files["/media/spooled.bin"] == data


def test_distributed_saves_text_content(media_servers):
    server, = media_servers(1)
    storage = DistributedStorage(hosts=[server.address])
    storage.save("text.txt", ContentFile("caf\u00e9"))
    assert server.files["/media/text.txt"] == "caf\u00e9".encode()


def test_distributed_saves_empty_content(media_servers):
    servers = media_servers(2)
    storage = DistributedStorage(hosts=[s.address for s in servers])
    storage.save("empty.txt", ContentFile(b""))
    for server in servers:
        assert server.files["/media/empty.txt"] == b""
    assert storage.size("empty.txt") == 0


###############################################################################
# Storages: AsyncStorage in the background
###############################################################################


def test_async_save_returns_before_replication_and_join_waits(media_servers, tmp_path):
    servers = media_servers(3, latency=0.2)
    storage = AsyncStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    storage.save("later.txt", ContentFile(b"later"))
    assert all(server.files == {} for server in servers)
    assert (tmp_path / "later.txt").read_bytes() == b"later"
    assert storage.join() is True
    for server in servers:
        assert server.files == {"/media/later.txt": b"later"}


def test_async_join_timeout_reports_pending_work(media_servers, tmp_path):
    server, = media_servers(1, latency=1.0)
    storage = AsyncStorage(location=str(tmp_path), hosts=[server.address])
    storage.save("slow.txt", ContentFile(b"slow"))
    assert storage.join(timeout=0.05) is False
    assert storage.join(timeout=30) is True
    assert server.files == {"/media/slow.txt": b"slow"}


def test_async_execute_one_is_the_task_queue_hook(media_servers, tmp_path):
    servers = media_servers(2)
    queued = []

    class QueuedStorage(AsyncStorage):
        def execute_one(self, func, host, name, *args, action=None):
            queued.append((host, name, action))

    storage = QueuedStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    storage.save("queued.txt", ContentFile(b"q"))
    storage.delete("queued.txt")
    assert queued == [(servers[0].address, "queued.txt", "create"),
                      (servers[1].address, "queued.txt", "create"),
                      (servers[0].address, "queued.txt", None),
                      (servers[1].address, "queued.txt", None)]
    assert all(server.log == [] for server in servers)


###############################################################################
# Storages: failures
###############################################################################


def _one_bad_host(media_servers, count, **knobs):
    """Start ``count`` servers of which the last one has the fault ``knobs``."""
    servers = media_servers(count - 1) + media_servers(1, **knobs)
    return servers, servers[-1]


@storage_kinds()
@pytest.mark.parametrize("count", [1, 2, 3])
def test_failed_save_fatal(storage_class, count, media_servers, tmp_path, caplog):
    servers, bad = _one_bad_host(media_servers, count, read_only=True)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    if storage_class is AsyncStorage:
        # Background replication cannot raise into save(): it logs.
        storage.save("a.txt", ContentFile(b"a"))
        settle(storage)
    else:
        with pytest.raises(ReplicationError) as info:
            storage.save("a.txt", ContentFile(b"a"))
        error = info.value
        assert error.hosts == [bad.address]
        assert (error.action, error.name, error.host_count) == ("create", "a.txt", count)
        assert isinstance(error.failures[0][1], UnexpectedStatusCode)
        assert error.failures[0][1].status == 403
        assert bad.address in str(error)
        assert "403" in str(error)
        assert isinstance(error, OSError)
    errors = resto_records(caplog)
    assert len(errors) == 1
    assert errors[0].startswith("Failed to create a.txt on %s. PUT http://%s/media/a.txt "
                                "answered 403" % (bad.address, bad.address))
    for server in servers[:-1]:
        if storage_class is AsyncStorage:  # nothing raised: the copies stay, sync repairs
            assert server.files == {"/media/a.txt": b"a"}
        else:  # a save that raised leaves no orphan
            assert server.files == {}
            assert server.requests("DELETE") == [("DELETE", "/media/a.txt", 204)]
    assert bad.files == {}
    if storage_class is HybridStorage:
        assert not (tmp_path / "master" / "a.txt").exists()  # nor a master copy
    elif storage_class is AsyncStorage:
        assert (tmp_path / "master" / "a.txt").read_bytes() == b"a"


@storage_kinds()
def test_failed_save_not_fatal_logs_and_goes_on(storage_class, media_servers, tmp_path, caplog):
    servers, bad = _one_bad_host(media_servers, 3, status=500)
    hosts = [s.address for s in servers]
    distributed = storage_class is DistributedStorage
    storage = make_storage(storage_class, hosts, tmp_path, fatal_exceptions=False)
    with pytest.warns(RuntimeWarning) if distributed else contextlib.nullcontext():
        assert storage.save("b.txt", ContentFile(b"b")) == "b.txt"
    settle(storage)
    assert resto_records(caplog) == [
        "Failed to create b.txt on %s. PUT http://%s/media/b.txt answered 500, "
        "expected 201 or 200 or 204. (Parent collections may be missing, but MKCOL "
        "http://%s/media/ answered 500.)" % (bad.address, bad.address, bad.address)
    ]
    assert [bool(s.files) for s in servers] == [True, True, False]


def test_distributed_warns_once_without_fatal_exceptions(media_servers):
    server, = media_servers(1)
    # Read when used, not when built: a settings change before the first
    # save is what counts.
    storage = DistributedStorage(hosts=[server.address])

    def save_twice():
        storage.save("a.txt", ContentFile(b"a"))
        storage.save("b.txt", ContentFile(b"b"))

    with override_settings(RESTO_FATAL_EXCEPTIONS=False), \
            pytest.warns(RuntimeWarning, match="no master copy") as record:
        save_twice()
    assert len(record) == 1
    assert record[0].filename == __file__  # it points at the save


@pytest.mark.parametrize("storage_class", [HybridStorage, DistributedStorage],
                         ids=lambda cls: cls.__name__)
def test_every_failed_host_is_named_in_host_order(storage_class, media_servers, tmp_path):
    good, = media_servers(1)
    refused = MediaServer().start()
    refused.stop()  # its port now refuses connections
    accepted_202, = media_servers(1, status={"PUT": 202})
    hosts = [refused.address, good.address, accepted_202.address]
    storage = make_storage(storage_class, hosts, tmp_path)
    with pytest.raises(ReplicationError) as info:
        storage.save("c.txt", ContentFile(b"c"))
    assert info.value.hosts == [refused.address, accepted_202.address]
    assert isinstance(info.value.failures[0][1], TransportError)
    assert info.value.failures[1][1].status == 202
    assert good.files == {}  # the partial copy was removed


@pytest.mark.parametrize("show_traceback", [False, True])
def test_traceback_only_when_asked(show_traceback, media_servers, tmp_path, caplog):
    server, = media_servers(1, status=500)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address],
                            fatal_exceptions=False, show_traceback=show_traceback)
    storage.save("t.txt", ContentFile(b"t"))
    records = [r for r in caplog.records if r.name == "django_resto_gevent"
               and r.levelno == logging.ERROR]
    assert len(records) == 1
    assert bool(records[0].exc_info) is show_traceback


@storage_kinds()
def test_failed_delete(storage_class, media_servers, tmp_path, caplog):
    servers, bad = _one_bad_host(media_servers, 2, status={"DELETE": 503})
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    storage.save("d.txt", ContentFile(b"d"))
    settle(storage)
    if storage_class is AsyncStorage:
        storage.delete("d.txt")
        settle(storage)
    else:
        with pytest.raises(ReplicationError, match=bad.address):
            storage.delete("d.txt")
    assert resto_records(caplog) == [
        "Failed to delete d.txt on %s. DELETE http://%s/media/d.txt answered 503, "
        "expected 200 or 204 or 404 or 410." % (bad.address, bad.address)
    ]
    assert servers[0].files == {}
    assert bad.files == {"/media/d.txt": b"d"}


def test_distributed_reads_fail_over_to_a_host_that_has_the_file(media_servers):
    servers = media_servers(3)
    storage = DistributedStorage(hosts=[s.address for s in servers])
    storage.save("f.txt", ContentFile(b"f"))
    servers[0].status = 500
    del servers[1].files["/media/f.txt"]
    for _ in range(6):  # hosts are tried in random order: every order must work
        assert storage.size("f.txt") == 1
        with storage.open("f.txt") as opened:
            assert opened.read() == b"f"
        assert storage.exists("f.txt")


def test_distributed_read_errors(media_servers):
    server, = media_servers(1)
    down = MediaServer().start()
    down.stop()  # its port now refuses connections
    storage = DistributedStorage(hosts=[down.address, server.address])
    with pytest.raises(FileNotFoundError) as info:
        storage.size("none.txt")
    assert str(info.value) == "[Errno 2] none.txt not found on %s (unreachable: %s): 'none.txt'" % (
        server.address, down.address)
    assert not storage.exists("none.txt")
    # A host that answers an error is reachable but did not say 404: the file
    # may be there, so this is no FileNotFoundError.
    server.status = 500
    with pytest.raises(ReplicationError) as info:
        storage.open("none.txt")
    assert sorted(info.value.hosts) == sorted([down.address, server.address])
    with pytest.raises(ReplicationError):
        storage.exists("none.txt")


###############################################################################
# Storages: Django integration
###############################################################################


@storage_kinds()
def test_pickle_round_trip(storage_class, media_servers, tmp_path):
    servers = media_servers(2)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path, timeout=4)
    storage.save("before.txt", ContentFile(b"1"))  # leaves pools, pending tasks behind
    copy = pickle.loads(pickle.dumps(storage))
    settle(storage)
    assert copy == storage
    assert copy.hosts == storage.hosts
    assert copy.timeout == 4
    copy.save("after.txt", ContentFile(b"2"))
    settle(copy)
    for server in servers:
        assert server.files == {"/media/before.txt": b"1", "/media/after.txt": b"2"}


@storage_kinds()
def test_deconstruct_and_equality(storage_class, tmp_path):
    hosts = ["127.0.0.1:1", "127.0.0.1:2"]
    storage = make_storage(storage_class, hosts, tmp_path, timeout=3)
    path, args, kwargs = storage.deconstruct()
    assert path == "django_resto_gevent." + storage_class.__name__
    assert args == ()
    assert kwargs["hosts"] == hosts
    assert kwargs["timeout"] == 3
    assert storage_class(*args, **kwargs) == storage
    assert make_storage(storage_class, hosts[:1], tmp_path, timeout=3) != storage
    assert len({storage, storage_class(*args, **kwargs)}) == 1


@storage_kinds()
def test_storages_setting_options(storage_class, media_servers, tmp_path):
    from django.core.files.storage import storages

    servers = media_servers(2)
    options = {"hosts": [s.address for s in servers], "timeout": 5}
    if storage_class is not DistributedStorage:
        options["location"] = str(tmp_path)
    backend = {"BACKEND": "django_resto_gevent." + storage_class.__name__, "OPTIONS": options}
    # An alias of its own: on Django 4.2, DEFAULT_FILE_STORAGE (set in
    # conftest) takes over the "default" alias.
    with override_settings(STORAGES={"default": backend, "replicated": backend}):
        storage = storages["replicated"]
        assert type(storage) is storage_class
        assert storage.timeout == 5
        storage.save("configured.txt", ContentFile(b"c"))
        settle(storage)
    for server in servers:
        assert server.files == {"/media/configured.txt": b"c"}


def test_default_storage_from_settings(media_servers, tmp_path):
    """DEFAULT_FILE_STORAGE on Django 4.2, STORAGES later (see conftest)."""
    servers = media_servers(2)
    with override_settings(RESTO_MEDIA_HOSTS=[s.address for s in servers],
                           MEDIA_ROOT=str(tmp_path)):
        name = default_storage.save("default.txt", ContentFile(b"d"))
        assert type(default_storage._wrapped) is HybridStorage
    assert (tmp_path / name).read_bytes() == b"d"
    for server in servers:
        assert server.files == {"/media/default.txt": b"d"}


###############################################################################
# Storages: Django's storage API (names, write modes, overwrite, failed saves)
###############################################################################


def _master_or_hosts(storage, servers, name):
    """Return the bytes of ``name``: the master copy's and every host's, which must agree."""
    copies = {server.files.get("/media/" + name) for server in servers}
    if not isinstance(storage, DistributedStorage):
        path = pathlib.Path(storage.location, name)
        copies.add(path.read_bytes() if path.exists() else None)
    assert len(copies) == 1, copies
    return copies.pop()


@storage_kinds()
def test_pathlib_names_work_everywhere(storage_class, media_servers, tmp_path):
    servers = media_servers(2)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    name = storage.save(pathlib.PurePosixPath("paths/a.txt"), ContentFile(b"path"))
    settle(storage)
    assert name == "paths/a.txt"
    assert _master_or_hosts(storage, servers, name) == b"path"
    path = pathlib.Path("paths/a.txt")
    assert storage.exists(path)
    assert storage.size(path) == 4
    with storage.open(path) as opened:
        assert opened.read() == b"path"
    assert storage.url(path) == storage.url(name)
    storage.delete(path)
    settle(storage)
    assert _master_or_hosts(storage, servers, name) is None
    with pytest.raises(SuspiciousFileOperation, match="'..' component"):
        storage.save(pathlib.PurePosixPath("../out.txt"), ContentFile(b"x"))


@storage_kinds()
@pytest.mark.parametrize("name", [None, ""])
def test_delete_without_a_name_is_django_s_value_error(storage_class, name, media_servers,
                                                         tmp_path):
    server, = media_servers(1)
    storage = make_storage(storage_class, [server.address], tmp_path)
    with pytest.raises(ValueError, match=r"^The name must be given to delete\(\)\.$"):
        storage.delete(name)
    assert server.log == []


@storage_kinds()
@pytest.mark.parametrize(("mode", "written", "stored"), [
    ("wb", [b"bytes\x00\xff"], b"bytes\x00\xff"),
    ("w", ["caf\u00e9\n", "two"], "caf\u00e9\ntwo".encode()),
    ("wt", ["text"], b"text"),
])
def test_a_file_written_through_open_is_replicated_when_closed(
        storage_class, mode, written, stored, media_servers, tmp_path):
    servers = media_servers(3)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    with storage.open("notes/n.txt", mode) as opened:
        for part in written:
            opened.write(part)
        assert all(server.requests("PUT") == [] for server in servers)
    settle(storage)
    assert _master_or_hosts(storage, servers, "notes/n.txt") == stored
    opened.close()  # closing again replicates nothing more
    settle(storage)
    assert [len(server.requests("PUT")) for server in servers] == [1, 1, 1]
    with storage.open("notes/n.txt", "r" if "b" not in mode else "rb") as again:
        assert again.read() == (stored if "b" in mode else stored.decode())


@storage_kinds()
def test_writing_replaces_the_whole_file_and_appending_extends_it(storage_class,
                                                                  media_servers, tmp_path,
                                                                  caplog):
    servers = media_servers(2)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    assert storage.save("log.txt", ContentFile(b"a much longer first version")) == "log.txt"
    settle(storage)
    with storage.open("log.txt", "wb") as opened:
        opened.write(b"short")
    settle(storage)
    assert _master_or_hosts(storage, servers, "log.txt") == b"short"
    with storage.open("log.txt", "ab") as opened:
        opened.write(b"+more")
    with storage.open("missing.txt", "a") as opened:
        opened.write("fresh")
    settle(storage)
    assert _master_or_hosts(storage, servers, "log.txt") == b"short+more"
    assert _master_or_hosts(storage, servers, "missing.txt") == b"fresh"
    # Overwriting through open() is what was asked for: no warning.
    assert resto_records(caplog, logging.WARNING) == []


@storage_kinds()
def test_a_with_block_left_by_an_exception_stores_nothing(storage_class, media_servers,
                                                          tmp_path):
    servers = media_servers(2)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path)
    storage.save("keep.txt", ContentFile(b"old"))
    settle(storage)
    puts = [len(server.requests("PUT")) for server in servers]
    def write_then_fail(name, mode, data):
        with storage.open(name, mode) as opened:
            opened.write(data)
            raise KeyError("stop")

    with pytest.raises(KeyError):
        write_then_fail("keep.txt", "wb", b"half a new ver")
    with pytest.raises(KeyError):
        write_then_fail("new.txt", "w", "half")
    opened = storage.open("new.txt", "w")
    opened.discard()
    settle(storage)
    assert _master_or_hosts(storage, servers, "keep.txt") == b"old"
    assert _master_or_hosts(storage, servers, "new.txt") is None
    assert [len(server.requests("PUT")) for server in servers] == puts
    opened.close()  # after discard(): nothing
    settle(storage)
    assert [len(server.requests("PUT")) for server in servers] == puts
    if not isinstance(storage, DistributedStorage):
        assert sorted(os.listdir(storage.location)) == ["keep.txt"]  # no partial file left


@pytest.mark.parametrize("storage_class", [HybridStorage, DistributedStorage],
                         ids=lambda cls: cls.__name__)
def test_a_write_that_fails_its_quorum_raises_from_close(storage_class, media_servers,
                                                         tmp_path):
    good, bad = media_servers(2)
    bad.status = {"PUT": 500}
    storage = make_storage(storage_class, [good.address, bad.address], tmp_path)
    opened = storage.open("q.txt", "wb")
    opened.write(b"quorum")
    with pytest.raises(ReplicationError, match="Failed to write q.txt on 1 of 2"):
        opened.close()
    # An overwrite keeps what landed (the old file is gone anyway): sync repairs.
    assert good.files["/media/q.txt"] == b"quorum"


@storage_kinds()
def test_allow_overwrite_keeps_the_name_and_truncates(storage_class, media_servers,
                                                      tmp_path, caplog):
    servers = media_servers(2)
    storage = make_storage(storage_class, [s.address for s in servers], tmp_path,
                           allow_overwrite=True)
    assert storage.save("same.txt", ContentFile(b"the first, longer one")) == "same.txt"
    settle(storage)
    heads = [len(server.requests("HEAD")) for server in servers]
    assert storage.save("same.txt", ContentFile(b"second")) == "same.txt"
    settle(storage)
    assert _master_or_hosts(storage, servers, "same.txt") == b"second"
    # Distributed asks no host whether the name is taken: one round trip.
    assert [len(server.requests("HEAD")) for server in servers] == heads
    assert resto_records(caplog, logging.WARNING) == []
    with pytest.raises(SuspiciousFileOperation, match="over the field's max_length of 5"):
        storage.save("toolong.txt", ContentFile(b"x"), max_length=5)
    if not isinstance(storage, DistributedStorage):
        assert sorted(os.listdir(storage.location)) == ["same.txt"]


@storage_kinds()
def test_allow_overwrite_setting(storage_class, media_servers, tmp_path):
    server, = media_servers(1)
    storage = make_storage(storage_class, [server.address], tmp_path)
    with override_settings(RESTO_ALLOW_OVERWRITE=True):
        assert storage.allow_overwrite is True
        storage.save("s.txt", ContentFile(b"1"))
        assert storage.save("s.txt", ContentFile(b"2")) == "s.txt"
        settle(storage)
    assert server.files["/media/s.txt"] == b"2"
    assert storage.allow_overwrite is False
    with override_settings(RESTO_ALLOW_OVERWRITE="yes"), \
            pytest.raises(ImproperlyConfigured, match="RESTO_ALLOW_OVERWRITE"):
        storage.allow_overwrite  # noqa: B018


def test_hybrid_save_that_fails_its_quorum_leaves_nothing_behind(media_servers, tmp_path,
                                                                 caplog):
    good, other, down = media_servers(3)
    down.status = {"PUT": 503}
    storage = make_storage(HybridStorage, [good.address, other.address, down.address],
                           tmp_path, retries=0)
    received = []
    django_resto_gevent.replication_failed.connect(
        lambda **kwargs: received.append(kwargs["action"]), weak=False,
        dispatch_uid="quorum-cleanup")
    try:
        with pytest.raises(ReplicationError, match="Failed to create gone.txt on 1 of 3"):
            storage.save("gone.txt", ContentFile(b"orphan?"))
    finally:
        django_resto_gevent.replication_failed.disconnect(dispatch_uid="quorum-cleanup")
    assert not os.path.exists(os.path.join(storage.location, "gone.txt"))
    assert "/media/gone.txt" not in good.files
    assert "/media/gone.txt" not in other.files
    assert [m for m, _path, _status in good.log] == ["PUT", "DELETE"]
    assert received == ["create"]
    # Below the host count, a save that met its quorum stays; sync repairs the rest.
    storage = make_storage(HybridStorage, [good.address, other.address, down.address],
                           tmp_path, retries=0, min_replicas=2)
    assert storage.save("stays.txt", ContentFile(b"kept")) == "stays.txt"
    assert good.files["/media/stays.txt"] == b"kept"
    assert os.path.exists(os.path.join(storage.location, "stays.txt"))


###############################################################################
# Storages against real nginx media hosts
###############################################################################


def _assert_on_nginx(nginx_hosts, name, data):
    """Check that every host's root (nginx, Apache, lighttpd) holds exactly ``data``."""
    for index in range(nginx_hosts.count):
        with open(nginx_hosts.path(index, name), "rb") as stored:
            assert stored.read() == data, (index, name)


def _assert_gone_from_nginx(nginx_hosts, name):
    for index in range(nginx_hosts.count):
        assert not os.path.exists(nginx_hosts.path(index, name)), (index, name)


@storage_kinds()
def test_nginx_core_scenario(storage_class, nginx_hosts, tmp_path, caplog):
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path)
    name = storage.save("photos/2026/cat.jpg", ContentFile(b"meow"))
    settle(storage)
    _assert_on_nginx(nginx_hosts, name, b"meow")
    assert storage.exists(name)
    assert storage.size(name) == 4
    with storage.open(name) as opened:
        assert opened.read() == b"meow"
    other = storage.save("photos/2026/cat.jpg", ContentFile(b"purr"))
    settle(storage)
    assert other != name
    _assert_on_nginx(nginx_hosts, name, b"meow")
    _assert_on_nginx(nginx_hosts, other, b"purr")
    storage.delete(name)
    settle(storage)
    _assert_gone_from_nginx(nginx_hosts, name)
    assert not storage.exists(name)
    storage.delete(name)  # already gone everywhere: a warning per host
    settle(storage)
    assert len(resto_records(caplog, logging.WARNING)) == 3
    assert resto_records(caplog) == []


@storage_kinds()
def test_nginx_awkward_names(storage_class, nginx_hosts, tmp_path):
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path)
    for name in AWKWARD_NAMES:
        assert storage.save(name, ContentFile(name.encode())) == name
    settle(storage)
    for name in AWKWARD_NAMES:
        _assert_on_nginx(nginx_hosts, name, name.encode())
        assert storage.size(name) == len(name.encode())
    for name in AWKWARD_NAMES:
        storage.delete(name)
    settle(storage)
    for name in AWKWARD_NAMES:
        _assert_gone_from_nginx(nginx_hosts, name)


@storage_kinds()
def test_nginx_multi_mebibyte_file(storage_class, nginx_hosts, tmp_path):
    data = os.urandom(8 * 1024 * 1024 + 3)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path)
    with open(source, "rb") as handle:
        name = storage.save("videos/big.bin", File(handle))
    settle(storage)
    _assert_on_nginx(nginx_hosts, name, data)
    assert storage.size(name) == len(data)
    with storage.open(name) as opened:
        assert opened.read() == data


def test_nginx_overwrite_is_a_warning(nginx_hosts, caplog):
    transport = DefaultTransport(base_url="/media/")
    host = nginx_hosts.hosts[0]
    assert transport.create(host, "twice.txt", b"one") is True
    assert transport.create(host, "twice.txt", b"two") is False
    assert transport.content(host, "twice.txt") == b"two"
    assert resto_records(caplog, logging.WARNING) == [
        "PUT on existing file twice.txt on %s." % host
    ]


def test_nginx_status_semantics(nginx_hosts):
    transport = DefaultTransport(base_url="/media/")
    host = nginx_hosts.hosts[1]
    assert transport.exists(host, "x/y.txt") is False
    assert transport.delete(host, "x/y.txt") is False
    with pytest.raises(FileNotFoundError):
        transport.size(host, "x/y.txt")
    assert transport.create(host, "x/y.txt", b"xy") is True
    assert transport.exists(host, "x/y.txt")
    assert transport.size(host, "x/y.txt") == 2
    assert transport.delete(host, "x/y.txt") is True


def test_nginx_host_down_fails_loudly(nginx_hosts, tmp_path):
    refused = MediaServer().start()
    refused.stop()
    storage = HybridStorage(location=str(tmp_path), hosts=nginx_hosts.hosts + [refused.address])
    with pytest.raises(ReplicationError) as info:
        storage.save("partial.txt", ContentFile(b"p"))
    assert info.value.hosts == [refused.address]
    # The save raised, so nothing may refer to it: no copy stays anywhere.
    _assert_gone_from_nginx(nginx_hosts, "partial.txt")
    assert not (tmp_path / "partial.txt").exists()


def test_nginx_body_limit_is_explained(tmp_path_factory, tmp_path):
    limited = start_nginx(tmp_path_factory, max_body_size="1k")
    try:
        source = tmp_path / "upload.bin"
        source.write_bytes(os.urandom(5 * 1024 * 1024))
        storage = DistributedStorage(hosts=limited.hosts, retries=0)
        with open(source, "rb") as upload, pytest.raises(ReplicationError) as info:
            storage.save("big.bin", File(upload))
        assert info.value.hosts == limited.hosts
        for _host, error in info.value.failures:
            assert isinstance(error, UnexpectedStatusCode)
            assert error.status == 413
            assert "raise client_max_body_size" in str(error)
        assert not any(os.path.exists(limited.path(index, "big.bin")) for index in range(3))
    finally:
        limited.stop()


###############################################################################
# Storages: Django's storage contract, on real nginx media hosts
###############################################################################


@storage_kinds()
def test_contract_urls_quote_as_filesystem_storage_and_serve_the_file(storage_class,
                                                                      nginx_hosts, tmp_path):
    base_url = "http://%s/media/" % nginx_hosts.hosts[0]
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path, base_url=base_url)
    reference = FileSystemStorage(location=str(tmp_path / "reference"), base_url=base_url)
    for name in ["a b/caf\u00e9 #1?.txt", "100%.txt", "plain.txt"]:
        assert storage.save(name, ContentFile(name.encode())) == name
        settle(storage)
        assert storage.url(name) == reference.url(name)
        answer = urllib3.request("GET", storage.url(name), retries=False, timeout=5)
        assert (answer.status, answer.data) == (200, name.encode())


@storage_kinds()
def test_contract_settings_changes_reach_filesystem_storage_keywords(storage_class,
                                                                     nginx_hosts, tmp_path):
    # Location, base_url and permissions come from settings, read when used
    # (setting_changed), as FileSystemStorage's do; the hosts' path is
    # MEDIA_URL's path.
    storage = storage_class(hosts=nginx_hosts.hosts)
    with override_settings(MEDIA_ROOT=str(tmp_path / "moved"),
                           MEDIA_URL="http://cdn.example/media/",
                           FILE_UPLOAD_PERMISSIONS=0o640,
                           FILE_UPLOAD_DIRECTORY_PERMISSIONS=0o750):
        assert storage.base_url == "http://cdn.example/media/"
        assert storage.url("x y.txt") == "http://cdn.example/media/x%20y.txt"
        name = storage.save("dir/perm.txt", ContentFile(b"p"))
        settle(storage)
        _assert_on_nginx(nginx_hosts, name, b"p")
        if storage_class is not DistributedStorage:
            assert storage.location == str(tmp_path / "moved")
            assert (tmp_path / "moved" / "dir" / "perm.txt").stat().st_mode & 0o777 == 0o640
            assert (tmp_path / "moved" / "dir").stat().st_mode & 0o777 == 0o750
    assert storage.base_url == "/media/"


@pytest.mark.parametrize("storage_class", [HybridStorage, AsyncStorage],
                         ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("how", ["allow_overwrite", "open"])
def test_contract_permissions_hold_for_files_written_in_place(storage_class, how, nginx_hosts,
                                                              tmp_path):
    with override_settings(FILE_UPLOAD_PERMISSIONS=0o604,
                           FILE_UPLOAD_DIRECTORY_PERMISSIONS=0o701):
        storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path,
                               allow_overwrite=how == "allow_overwrite")
        if how == "open":
            with storage.open("deep/er/w.txt", "wb") as opened:
                opened.write(b"w")
        else:
            storage.save("deep/er/w.txt", ContentFile(b"w"))
        settle(storage)
    master = tmp_path / "master" / "deep" / "er"
    assert (master / "w.txt").stat().st_mode & 0o777 == 0o604
    assert master.stat().st_mode & 0o777 == 0o701
    _assert_on_nginx(nginx_hosts, "deep/er/w.txt", b"w")


@pytest.mark.parametrize("storage_class", [HybridStorage, AsyncStorage],
                         ids=lambda cls: cls.__name__)
def test_contract_concurrent_saves_of_one_name_get_their_own_names(storage_class,
                                                                   nginx_hosts, tmp_path):
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path)
    contents = [b"racer %d" % index for index in range(8)]
    greenlets = [gevent.spawn(storage.save, "race.txt", ContentFile(data))
                 for data in contents]
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    settle(storage)
    names = [greenlet.value for greenlet in greenlets]
    assert len(set(names)) == len(names)
    for name, data in zip(names, contents, strict=True):
        _assert_on_nginx(nginx_hosts, name, data)
        assert (tmp_path / "master" / name).read_bytes() == data


@storage_kinds()
def test_contract_overwrites_truncate_on_every_host(storage_class, nginx_hosts, tmp_path,
                                                    caplog):
    storage = make_storage(storage_class, nginx_hosts.hosts, tmp_path, allow_overwrite=True)
    long, short = b"x" * 5000, b"short"
    assert storage.save(pathlib.Path("o/over.bin"), ContentFile(long)) == "o/over.bin"
    settle(storage)
    assert storage.save("o/over.bin", ContentFile(short)) == "o/over.bin"
    settle(storage)
    _assert_on_nginx(nginx_hosts, "o/over.bin", short)
    with storage.open("o/over.bin", "w") as opened:
        opened.write("caf\u00e9")
    settle(storage)
    _assert_on_nginx(nginx_hosts, "o/over.bin", "caf\u00e9".encode())
    with storage.open("o/over.bin", "ab") as opened:
        opened.write(b"!")
    settle(storage)
    _assert_on_nginx(nginx_hosts, "o/over.bin", "caf\u00e9!".encode())
    assert storage.size("o/over.bin") == len("caf\u00e9!".encode())
    with storage.open("o/over.bin", "r") as opened:
        assert opened.read() == "caf\u00e9!"
    storage.delete(pathlib.Path("o/over.bin"))
    settle(storage)
    _assert_gone_from_nginx(nginx_hosts, "o/over.bin")
    assert resto_records(caplog, logging.WARNING) == []
    assert resto_records(caplog) == []


###############################################################################
# WebDAV servers that need parent collections (RFC 4918)
###############################################################################


def test_webdav_host_gets_parent_collections_made_top_down(media_servers):
    server, = media_servers(1, require_collections=True)
    storage = DistributedStorage(hosts=[server.address])
    storage.save("a/b/deep.txt", ContentFile(b"deep"))
    assert server.files == {"/media/a/b/deep.txt": b"deep"}
    assert server.log[1:] == [
        ("PUT", "/media/a/b/deep.txt", 409),
        ("MKCOL", "/media/", 201),
        ("MKCOL", "/media/a/", 201),
        ("MKCOL", "/media/a/b/", 201),
        ("PUT", "/media/a/b/deep.txt", 201),
    ]


def test_webdav_known_collections_cost_nothing_later(media_servers, tmp_path):
    server, = media_servers(1, require_collections=True)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address])
    storage.save("x/one.txt", ContentFile(b"1"))
    del server.log[:]
    storage.save("x/two.txt", ContentFile(b"2"))
    assert server.log == [("PUT", "/media/x/two.txt", 201)]
    del server.log[:]
    # A new directory under a known one: only that one is made, before the PUT.
    storage.save("x/y/three.txt", ContentFile(b"3"))
    assert server.log == [("MKCOL", "/media/x/y/", 201), ("PUT", "/media/x/y/three.txt", 201)]


def test_webdav_collection_removed_behind_our_back_is_made_again(media_servers, tmp_path):
    server, = media_servers(1, require_collections=True)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address])
    storage.save("gone/one.txt", ContentFile(b"1"))
    server.files.clear()
    server.collections.discard("/media/gone/")
    del server.log[:]
    storage.save("gone/two.txt", ContentFile(b"2"))
    assert server.files == {"/media/gone/two.txt": b"2"}
    assert server.log == [("PUT", "/media/gone/two.txt", 409), ("MKCOL", "/media/", 405),
                          ("MKCOL", "/media/gone/", 201), ("PUT", "/media/gone/two.txt", 201)]


def test_webdav_memory_of_collections_is_bounded(media_servers, tmp_path, monkeypatch):
    monkeypatch.setattr(django_resto_gevent, "_MAX_KNOWN_COLLECTIONS", 3)
    server, = media_servers(1, require_collections=True)
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address])
    for day in range(1, 6):
        storage.save("2026/11/%02d/photo.jpg" % day, ContentFile(b"%d" % day))
        assert len(django_resto_gevent._process.known_collections) <= 3
    assert len(server.files) == 5


def test_webdav_host_replaced_behind_a_known_address(media_servers):
    # The address once needed collections; the server now there wants none
    # and refuses MKCOL below a collection it never made.
    server, = media_servers(1)
    django_resto_gevent._process.collection_hosts.add(server.url)
    django_resto_gevent._process.known_collections.add(server.url + "/media/")
    storage = DistributedStorage(hosts=[server.address])
    assert storage.save("d/x.txt", ContentFile(b"x")) == "d/x.txt"
    assert server.files == {"/media/d/x.txt": b"x"}
    assert ("MKCOL", "/media/d/", 409) in server.log


def test_webdav_concurrent_saves_into_one_new_directory(media_servers, tmp_path):
    servers = media_servers(2, require_collections=True, latency=0.01)
    storage = HybridStorage(location=str(tmp_path), hosts=[s.address for s in servers])
    names = ["together/%d.txt" % index for index in range(8)]
    saves = [gevent.spawn(storage.save, name, ContentFile(name.encode())) for name in names]
    gevent.joinall(saves, raise_error=True, timeout=30)
    assert [save.value for save in saves] == names
    for server in servers:
        assert server.files == {"/media/" + name: name.encode() for name in names}
        statuses = {status for method, _, status in server.log if method == "MKCOL"}
        assert statuses <= {201, 405}


def test_webdav_directory_mode_round_trip(tmp_path):
    (tmp_path / "root").mkdir()
    with MediaServer(root=str(tmp_path / "root"), require_collections=True) as server:
        storage = DistributedStorage(hosts=[server.address])
        storage.save("d1/d2/f.txt", ContentFile(b"f"))
        assert (tmp_path / "root" / "media" / "d1" / "d2" / "f.txt").read_bytes() == b"f"
        assert storage.open("d1/d2/f.txt").read() == b"f"


def test_webdav_mkcol_refused_is_a_clear_error(media_servers, tmp_path):
    server, = media_servers(1, require_collections=True, status={"MKCOL": 403})
    storage = HybridStorage(location=str(tmp_path), hosts=[server.address])
    with pytest.raises(ReplicationError) as info:
        storage.save("sub/x.txt", ContentFile(b"x"))
    error = info.value.failures[0][1]
    assert isinstance(error, UnexpectedStatusCode)
    assert (error.method, error.status) == ("PUT", 409)
    assert "MKCOL http://%s/media/ answered 403" % server.address in str(error)
    assert "needs parent collections" in str(error)
    assert "refuses to create directories" in str(error)
    assert server.files == {}
    # PROPFIND says /media/ is not there (404): the refusal stands.
    assert server.log == [("PUT", "/media/sub/x.txt", 409), ("MKCOL", "/media/", 403),
                          ("PROPFIND", "/media/", 404)]


def canned_answer(status, body=b""):
    """Return a kept-alive CannedHost answer with ``status`` and ``body``."""
    return b"HTTP/1.1 %d Status\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body), False


def multistatus(resourcetype):
    """Return a PROPFIND answer's body for /media/sub/ with this resourcetype element."""
    return (b'<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">'
            b"<D:response><D:href>/media/sub/</D:href><D:propstat><D:prop>%s</D:prop>"
            b"<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>"
            % resourcetype)


# A collection as Apache's mod_dav_fs says it (its live properties in their
# own prefix), as lighttpd says it, and in a default namespace.
COLLECTION_ANSWERS = {
    "apache": b'<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:">\n'
              b'<D:response xmlns:lp2="http://apache.org/dav/props/" xmlns:lp1="DAV:">\n'
              b"<D:href>/media/sub/</D:href>\n<D:propstat>\n<D:prop>\n"
              b"<lp1:resourcetype><D:collection/></lp1:resourcetype>\n</D:prop>\n"
              b"<D:status>HTTP/1.1 200 OK</D:status>\n</D:propstat>\n</D:response>\n"
              b"</D:multistatus>\n",
    "lighttpd": multistatus(b"<D:resourcetype><D:collection/></D:resourcetype>"),
    "default-namespace": b'<multistatus xmlns="DAV:"><response><href>/media/sub/</href>'
                         b"<propstat><prop><resourcetype><collection></collection>"
                         b"</resourcetype></prop><status>HTTP/1.1 200 OK</status></propstat>"
                         b"</response></multistatus>",
}


@pytest.mark.parametrize("answer", list(COLLECTION_ANSWERS.values()),
                         ids=list(COLLECTION_ANSWERS))
def test_webdav_mkcol_race_lost_to_a_collection_made_meanwhile(answer, canned_host):
    # Issue 12: Apache answers 403 to a MKCOL whose collection a concurrent
    # request has just made. A PROPFIND finds it there: the save goes on.
    host = canned_host(canned_answer(409), canned_answer(201), canned_answer(403),
                       canned_answer(207, answer), canned_answer(201), canned_answer(201))
    transport = one_attempt_transport()
    assert transport.create(host.address, "sub/x.txt", b"x") is True
    # Found is as good as made: the next save into it is a bare PUT.
    assert transport.create(host.address, "sub/y.txt", b"y") is True
    assert [head.split(b"\r\n")[0] for head, _ in host.requests] == [
        b"PUT /media/sub/x.txt HTTP/1.1", b"MKCOL /media/ HTTP/1.1",
        b"MKCOL /media/sub/ HTTP/1.1", b"PROPFIND /media/sub/ HTTP/1.1",
        b"PUT /media/sub/x.txt HTTP/1.1", b"PUT /media/sub/y.txt HTTP/1.1"]
    head, body = host.requests[3]
    assert b"\r\nDepth: 0\r\n" in head
    asked = xml.etree.ElementTree.fromstring(body)
    assert [prop.tag for prop in asked.find("{DAV:}prop")] == ["{DAV:}resourcetype"]


@pytest.mark.parametrize("answer", [
    canned_answer(404),
    canned_answer(405),  # no PROPFIND here (nginx without dav-ext)
    canned_answer(207, multistatus(b"<D:resourcetype/>")),  # a file, not a collection
    canned_answer(207, b"<html>Multi-Status</html"),  # not XML
], ids=["missing", "no-propfind", "not-a-collection", "not-xml"])
def test_webdav_mkcol_refused_and_no_collection_there_is_an_error(answer, canned_host):
    host = canned_host(canned_answer(409), canned_answer(201), canned_answer(403), answer)
    with pytest.raises(UnexpectedStatusCode) as info:
        one_attempt_transport().create(host.address, "sub/x.txt", b"x")
    error = info.value
    assert (error.method, error.status) == ("PUT", 409)
    assert "MKCOL http://%s/media/sub/ answered 403" % host.address in str(error)
    assert "refuses to create directories" in str(error)
    assert len(host.requests) == 4  # no second PUT


@pytest.mark.parametrize("storage_class", [HybridStorage, DistributedStorage],
                         ids=lambda cls: cls.__name__)
def test_webdav_servers_get_parent_collections(storage_class, webdav_hosts, tmp_path):
    # The session's server keeps its ports but was emptied; conftest's
    # forget_collections empties the process's memory of its collections.
    storage = make_storage(storage_class, webdav_hosts.hosts, tmp_path)
    big = os.urandom(3 * 1024 * 1024)
    files = {"flat.txt": b"flat", "new dir/caf\u00e9/n\u00e9.txt": b"ne",
             "new dir/caf\u00e9/second.txt": b"second", "new dir/other/third.txt": b"third",
             "new dir/big.bin": big, "new dir/empty.txt": b""}
    for name, data in files.items():
        assert storage.save(name, ContentFile(data)) == name
    for name, data in files.items():
        _assert_on_nginx(webdav_hosts, name, data)
        assert storage.exists(name)
        assert storage.size(name) == len(data)
        with storage.open(name) as opened:
            assert opened.read() == data
    storage.delete("flat.txt")
    _assert_gone_from_nginx(webdav_hosts, "flat.txt")
    for index in range(3):
        mkcols = [(uri, status) for method, uri, status, _ in webdav_hosts.requests(index)
                  if method == "MKCOL"]
        # Each collection made once, top down; none again for later files.
        assert mkcols == [("/media/", "201"), ("/media/new%20dir/", "201"),
                          ("/media/new%20dir/caf%C3%A9/", "201"),
                          ("/media/new%20dir/other/", "201")]


def test_webdav_servers_concurrent_saves_into_new_directories(webdav_hosts):
    # Issue 12: Apache answers 403 to the MKCOL that loses a race to make a
    # collection (before the fix, half of these rounds failed). Each round,
    # 20 saves at once into a new directory and ten new subdirectories shared
    # by pairs, the process's memory of collections forgotten, so that every
    # save races for every collection. One host: 20 connections stay within
    # the session's Apache (16 threads).
    host = webdav_hosts.hosts[0]
    storage = DistributedStorage(hosts=[host])
    written = {}
    for round_number in range(10):
        django_resto_gevent._process.reset()
        names = ["round%d/pair%d/%d.txt" % (round_number, index // 2, index)
                 for index in range(20)]
        saves = [gevent.spawn(storage.save, name, ContentFile(name.encode() * 50))
                 for name in names]
        gevent.joinall(saves, timeout=60)
        failures = [(name, save.exception) for name, save in zip(names, saves, strict=True)
                    if not save.successful()]
        assert failures == [], "round %d" % round_number
        assert [save.value for save in saves] == names
        written.update((name, name.encode() * 50) for name in names)
    for name, data in written.items():
        with open(webdav_hosts.path(0, name), "rb") as stored:
            assert stored.read() == data, name
    # Every MKCOL that lost its race was followed by a PROPFIND that found it.
    statuses = [(method, status) for method, _, status, _ in webdav_hosts.requests(0)
                if method in ("MKCOL", "PROPFIND")]
    assert {status for method, status in statuses if method == "MKCOL"} <= {"201", "403", "405"}
    lost = statuses.count(("MKCOL", "403"))
    assert [entry for entry in statuses if entry[0] == "PROPFIND"] == [("PROPFIND", "207")] * lost


def test_webdav_servers_say_which_urls_are_collections(webdav_hosts):
    # What the lost-race check asks (PROPFIND, Depth 0) and what each
    # server answers: nginx without dav-ext knows no PROPFIND (405), but
    # answers a lost MKCOL race with 405 itself, so never needs to be asked.
    transport = one_attempt_transport()
    host = webdav_hosts.hosts[0]
    transport.create(host, "d/f.txt", b"f")
    answers = {path: transport._is_collection(host, transport.url(host, path))
               for path in ("d/", "missing/", "d/f.txt")}
    knows_propfind = webdav_hosts.name != "nginx"
    assert answers == {"d/": knows_propfind, "missing/": False, "d/f.txt": False}


###############################################################################
# HTTPS and authentication
###############################################################################


def test_basic_auth_is_sent_to_the_media_hosts(media_servers, tmp_path):
    expected = {"Authorization": "Basic dXBsb2FkZXI6cHc="}  # uploader:pw
    servers = media_servers(2, require_headers=expected)
    storage = HybridStorage(location=str(tmp_path), hosts=[s.address for s in servers],
                            http_auth=("uploader", "pw"))
    storage.save("auth.txt", ContentFile(b"a"))
    storage.delete("auth.txt")
    for server in servers:
        assert [status for _, _, status in server.log] == [201, 204]


def test_header_credentials_from_settings(media_servers):
    token = {"Authorization": "Bearer t0ken-abc"}
    server, = media_servers(1, require_headers=token)
    with override_settings(RESTO_HTTP_AUTH=token):
        storage = DistributedStorage(hosts=[server.address])
        storage.save("bearer.txt", ContentFile(b"b"))
        assert storage.exists("bearer.txt")
    assert server.files == {"/media/bearer.txt": b"b"}


def test_wrong_credentials_name_the_host_and_the_setting(media_servers, tmp_path, caplog):
    good, bad = media_servers(2, require_headers={"Authorization": "Bearer right"})
    storage = HybridStorage(location=str(tmp_path), hosts=[good.address, bad.address],
                            http_auth={"Authorization": "Bearer wrong-secret"})
    with pytest.raises(ReplicationError) as info:
        storage.save("denied.txt", ContentFile(b"d"))
    message = str(info.value)
    assert good.address in message
    assert bad.address in message
    assert "401: the host wants credentials; check RESTO_HTTP_AUTH" in message
    assert "wrong-secret" not in message
    assert all("wrong-secret" not in record.getMessage() for record in caplog.records)


def test_credentials_stay_out_of_migrations_and_repr(tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["127.0.0.1:1"],
                            http_auth=("user", "hidden-password"))
    _, _, kwargs = storage.deconstruct()
    assert "http_auth" not in kwargs
    assert kwargs["hosts"] == ["127.0.0.1:1"]
    for text in (repr(storage), repr(storage.transport), str(kwargs)):
        assert "hidden-password" not in text
    # The storage itself keeps them: a task queue gets a working copy.
    assert pickle.loads(pickle.dumps(storage)).transport._auth_headers == \
        storage.transport._auth_headers != {}


@pytest.mark.parametrize("value", ["user:password", ("only-user",), {"Authorization": 1}])
def test_bad_credentials_are_explained_without_showing_them(value, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["127.0.0.1:1"], http_auth=value)
    with pytest.raises(ImproperlyConfigured, match="'http_auth' option of HybridStorage") as info:
        storage.save("never.txt", ContentFile(b"x"))
    assert "('user', 'password')" in str(info.value)
    assert "password" not in str(value) or str(value) not in str(info.value)
    assert not (tmp_path / "never.txt").exists()


def test_missing_ca_bundle_is_explained(tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=["https://127.0.0.1:1"],
                            ca_bundle=str(tmp_path / "nope.pem"))
    with pytest.raises(ImproperlyConfigured, match="'ca_bundle' option .* not a file"):
        storage.save("never.txt", ContentFile(b"x"))
    assert not (tmp_path / "never.txt").exists()


@pytest.mark.parametrize("storage_class", [HybridStorage, DistributedStorage],
                         ids=lambda cls: cls.__name__)
def test_nginx_https_with_basic_auth(storage_class, nginx_https, certificates, tmp_path,
                                     caplog):
    caplog.set_level(logging.DEBUG)  # urllib3's own logs too: no secret in any
    storage = make_storage(storage_class, nginx_https.hosts, tmp_path,
                           ca_bundle=certificates.ca,
                           http_auth=(NGINX_USER, NGINX_PASSWORD))
    names = ["tls-%d.txt" % index for index in range(3)] + ["caf\u00e9 tls.txt"]
    for name in names:
        storage.save(name, ContentFile(name.encode() * 1000))
    storage.delete(names[0])
    for name in names[1:]:
        _assert_on_nginx(nginx_https, name, name.encode() * 1000)
    _assert_gone_from_nginx(nginx_https, names[0])
    assert storage.size(names[1]) == len(names[1]) * 1000
    for index in range(3):
        requests = nginx_https.requests(index)
        assert {status for _, _, status, _ in requests} <= {"200", "201", "204", "404"}
        # Kept alive: every request to a host on one connection, one handshake.
        assert len({connection for _, _, _, connection in requests}) == 1, requests
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert NGINX_PASSWORD not in logged
    assert "dXBsb2FkZXI6" not in logged  # the start of the Basic token


def test_nginx_https_in_an_unpatched_process(nginx_https, certificates):
    script = (
        "import sys, django\n"
        "from django.conf import settings\n"
        "settings.configure(MEDIA_URL='/media/')\n"
        "django.setup()\n"
        "from django.core.files.base import ContentFile\n"
        "import django_resto_gevent as resto\n"
        "storage = resto.DistributedStorage(hosts=sys.argv[1:4], ca_bundle=sys.argv[4],\n"
        "                                   http_auth=(sys.argv[5], sys.argv[6]))\n"
        "print(storage.save('threads.txt', ContentFile(b'over TLS on threads')))\n"
        "print(storage.size('threads.txt'))\n"
    )
    output = python_output(script, *nginx_https.hosts, certificates.ca, NGINX_USER,
                           NGINX_PASSWORD)
    assert output.split() == ["threads.txt", "19"]
    _assert_on_nginx(nginx_https, "threads.txt", b"over TLS on threads")


def test_nginx_https_wrong_ca_is_a_clear_error(nginx_https, certificates, tmp_path):
    storage = HybridStorage(location=str(tmp_path), hosts=nginx_https.hosts,
                            ca_bundle=certificates.other_ca,
                            http_auth=(NGINX_USER, NGINX_PASSWORD))
    with pytest.raises(ReplicationError) as info:
        storage.save("untrusted.txt", ContentFile(b"u"))
    assert info.value.hosts == nginx_https.hosts
    message = str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "set RESTO_CA_BUNDLE to the PEM file of the CA that signed it" in message
    for index in range(3):
        assert nginx_https.requests(index) == []  # nothing reached nginx's HTTP layer


def test_nginx_https_without_ca_uses_the_system_cas_and_fails(nginx_https, tmp_path):
    storage = DistributedStorage(hosts=nginx_https.hosts[:1], retries=0)
    with pytest.raises(ReplicationError, match="CERTIFICATE_VERIFY_FAILED"):
        storage.save("system-ca.txt", ContentFile(b"s"))


def test_nginx_https_wrong_password_names_the_host(nginx_https, certificates, tmp_path,
                                                   caplog):
    storage = HybridStorage(location=str(tmp_path), hosts=nginx_https.hosts[:2],
                            ca_bundle=certificates.ca,
                            http_auth=(NGINX_USER, "not-the-password"))
    with pytest.raises(ReplicationError) as info:
        storage.save("denied.txt", ContentFile(b"d"))
    assert info.value.hosts == nginx_https.hosts[:2]
    assert all(error.status == 401 for _, error in info.value.failures)
    assert "check RESTO_HTTP_AUTH" in str(info.value)
    assert "not-the-password" not in str(info.value) + caplog.text
    assert not os.path.exists(nginx_https.path(0, "denied.txt"))


def test_nginx_https_unverified_warns_once(nginx_https, tmp_path, caplog):
    with override_settings(RESTO_TLS_VERIFY=False,
                           RESTO_HTTP_AUTH=(NGINX_USER, NGINX_PASSWORD)):
        storage = DistributedStorage(hosts=nginx_https.hosts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            for index in range(3):
                storage.save("insecure-%d.txt" % index, ContentFile(b"i"))
    _assert_on_nginx(nginx_https, "insecure-2.txt", b"i")
    assert [message for message in resto_records(caplog, logging.WARNING)
            if "RESTO_TLS_VERIFY is False" in message] != []
    assert len([message for message in resto_records(caplog, logging.WARNING)
                if "RESTO_TLS_VERIFY is False" in message]) == 1


###############################################################################
# Test media server
###############################################################################


def test_media_server_in_memory_round_trip(media_servers):
    server, = media_servers(1)
    http = urllib3.PoolManager(retries=False, timeout=5)
    assert http.request("PUT", server.url + "/a%20b.txt", body=b"ab").status == 201
    assert http.request("PUT", server.url + "/a%20b.txt", body=b"AB").status == 204
    assert http.request("GET", server.url + "/a%20b.txt").data == b"AB"
    assert http.request("HEAD", server.url + "/a%20b.txt").headers["Content-Length"] == "2"
    assert http.request("DELETE", server.url + "/a%20b.txt").status == 204
    assert http.request("DELETE", server.url + "/a%20b.txt").status == 404
    assert http.request("POST", server.url + "/a%20b.txt").status == 405
    assert [entry[2] for entry in server.log] == [201, 204, 200, 200, 204, 404, 405]
    assert server.requests("PUT") == [("PUT", "/a b.txt", 201), ("PUT", "/a b.txt", 204)]


def test_media_server_directory_mode_is_confined(tmp_path):
    root = tmp_path / "root"
    with MediaServer(root=str(root)) as server:
        http = urllib3.PoolManager(retries=False, timeout=5)
        assert http.request("PUT", server.url + "/media/d/f.txt", body=b"f").status == 201
        assert (root / "media" / "d" / "f.txt").read_bytes() == b"f"
        for path in ("/../escaped.txt", "/media/../../escaped.txt", "/%2e%2e/escaped.txt"):
            connection = http_client(server)
            connection.request("PUT", path, body=b"evil")
            assert connection.getresponse().status == 403, path
            connection.close()
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["root"]


def http_client(server):
    """Return a raw http.client connection, which sends paths unnormalized."""
    return http.client.HTTPConnection(server.bind_host, server.port, timeout=5)


def test_media_server_fault_knobs(media_servers):
    server, = media_servers(1, read_only=True)
    http = urllib3.PoolManager(retries=False, timeout=5)
    assert http.request("PUT", server.url + "/x", body=b"x").status == 403
    assert http.request("GET", server.url + "/x").status == 404
    server.read_only = False
    server.status = {"GET": 503}
    assert http.request("PUT", server.url + "/x", body=b"x").status == 201
    assert http.request("GET", server.url + "/x").status == 503
    server.status = 418
    assert http.request("HEAD", server.url + "/x").status == 418
    server.status = None
    server.latency = 0.3
    with gevent.Timeout(0.1, False):
        http.request("GET", server.url + "/x")
        pytest.fail("the latency knob did not delay the answer")


def test_media_server_in_an_unpatched_process_runs_on_a_thread():
    script = (
        "import urllib3, django_resto_gevent as r\n"
        "with r.MediaServer() as s:\n"
        "    print(urllib3.request('PUT', s.url + '/t', body=b't', timeout=5).status)\n"
        "    print(s.files)\n"
    )
    assert python_output(script).split("\n")[:2] == ["201", "{'/t': b't'}"]


def python_output(script, *args):
    """Run ``script`` in a new Python process (never patched); return its stdout."""
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


###############################################################################
# Command line
###############################################################################


def test_demo_runs_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "django_resto_gevent", "demo"], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every change reached every host" in result.stdout
    for storage_class in ("HybridStorage", "AsyncStorage", "DistributedStorage"):
        assert storage_class + " " in result.stdout
    assert "3/3 hosts" in result.stdout
    assert "/3 hosts" in result.stdout


def test_serve_command_serves_a_directory_until_sigterm(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "django_resto_gevent", "serve", "--root", str(tmp_path)],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "serve printed nothing within 30 seconds"
        line = process.stdout.readline()
        assert line.startswith("Serving %s on http://127.0.0.1:" % tmp_path), line
        url = line.split(" on ")[1].strip().rstrip("/")
        response = urllib3.request("PUT", url + "/media/s.txt", body=b"s", timeout=5)
        assert response.status == 201
        assert (tmp_path / "media" / "s.txt").read_bytes() == b"s"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        process.stdout.close()
        process.stderr.close()


def test_the_command_starts_with_the_collector_paused_and_exits_as_usual(media_servers,
                                                                           tmp_path):
    # "python -m django_resto_gevent" pauses the collector until django.setup()
    # is done, and skips the interpreter's teardown once main() returned: what
    # a usual exit does before the teardown still happens, in its order.
    server, = media_servers(1)
    write_master(tmp_path / "master")
    for name, data in MASTER_FILES.items():
        server.files["/media/" + name] = data
    seen = tmp_path / "seen.txt"
    (tmp_path / "resto_cli_settings.py").write_text(
        SETTINGS_MODULE_TEMPLATE.format(root=str(tmp_path / "master"), hosts=[server.address])
        + textwrap.dedent("""
            import atexit, gc, logging, threading
            SEEN = %r

            def note(line):
                with open(SEEN, "a") as seen:
                    seen.write(line + "\\n")

            note("settings read with the collector %%s" %% gc.isenabled())

            def outlive_the_command():
                threading.main_thread().join()  # returns as the exit begins
                note("the thread ended")

            threading.Thread(target=outlive_the_command).start()  # joined at exit

            def at_exit():
                note("atexit ran with the collector %%s, start-up frozen %%s"
                     %% (gc.isenabled(), gc.get_freeze_count() > 0))
                logging.getLogger("resto.test").info("logged, kept until logging's exit")

            # Registered after logging's own exit function: run before it.
            atexit.register(at_exit)
            LOGGING = {"version": 1, "handlers": {"memory": {
                "class": "logging.handlers.MemoryHandler", "capacity": 1000,
                "target": "file"}, "file": {"class": "logging.FileHandler",
                "filename": SEEN}}, "root": {"handlers": ["memory"], "level": "INFO"}}
            """) % str(seen))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), HERE]))
    # -v: the interpreter says "# cleanup[...]" for each module it tears down.
    result = subprocess.run(
        [sys.executable, "-v", "-m", "django_resto_gevent", "sync", "--dry-run", "--settings",
         "resto_cli_settings"], cwd=str(tmp_path), env=environment, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "# cleanup[" not in result.stderr
    # Written to a pipe, block-buffered: flushed before the process left.
    assert "Every host matches the master copy" in result.stdout.splitlines()[-1]
    assert seen.read_text().splitlines() == [
        "settings read with the collector False",
        "the thread ended",
        "atexit ran with the collector True, start-up frozen True",
        "logged, kept until logging's exit",
    ]
    failing = subprocess.run(
        [sys.executable, "-m", "django_resto_gevent", "sync", "--dry-run", "--settings",
         "resto_cli_settings", "--hosts", "nowhere:1"], cwd=str(tmp_path), env=environment,
        capture_output=True, text=True, timeout=120)
    assert failing.returncode == 2, failing.stdout + failing.stderr
    # An exit function registered before the command started (as a coverage
    # hook started by site is) would run after leave(): the exit tears down.
    seen.unlink()
    wrapped = subprocess.run(
        [sys.executable, "-v", "-c", "import atexit, runpy, sys\n"
         "atexit.register(lambda: open(%r, 'a').write('registered before, ran\\n'))\n"
         "sys.argv[0] = 'django_resto_gevent'\n"
         "runpy.run_module('django_resto_gevent', run_name='__main__', alter_sys=True)"
         % str(seen), "sync", "--dry-run", "--settings", "resto_cli_settings"],
        cwd=str(tmp_path), env=environment, capture_output=True, text=True, timeout=120)
    assert wrapped.returncode == 0, wrapped.stdout + wrapped.stderr[-3000:]
    assert seen.read_text().splitlines()[-1] == "registered before, ran"
    assert "# cleanup[" in wrapped.stderr


###############################################################################
# Command line: sync and check
###############################################################################

MASTER_FILES = {
    "a.txt": b"alpha",
    "dir/b.txt": b"bravo" * 100,
    "dir/sub/c.bin": bytes(range(256)) * 4096,  # 1 MiB
    "caf\u00e9 x/d.txt": b"delta",
}


def write_master(root, files=MASTER_FILES):
    """Write ``files`` into the master copy at ``root``."""
    for name, data in files.items():
        path = os.path.join(str(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as output:
            output.write(data)


def test_the_master_walk_reads_one_directory(tmp_path):
    write_master(tmp_path, dict(MASTER_FILES, **{"dir/.hidden": b"h", "dir/z/e.txt": b""}))
    os.symlink(str(tmp_path / "dir" / "sub"), str(tmp_path / "dir" / "linked"))
    os.symlink(str(tmp_path / "a.txt"), str(tmp_path / "dir" / "link.txt"))
    files, subdirectories = django_resto_gevent._master_directory(str(tmp_path), "dir")
    assert subdirectories == ["sub", "z"]  # a link to a directory is not followed
    assert [(entry.name, entry.size) for entry in files] == [
        (".hidden", 1), ("b.txt", 500), ("link.txt", 5)]  # a link to a file is
    assert files[1].mtime == os.stat(str(tmp_path / "dir" / "b.txt")).st_mtime
    assert django_resto_gevent._master_directory(str(tmp_path), "dir", files_too=False) == (
        [], ["sub", "z"])
    for not_a_directory in ("nowhere", "a.txt"):
        with pytest.raises(OSError, match=re.escape(str(tmp_path / not_a_directory))):
            django_resto_gevent._master_directory(str(tmp_path), not_a_directory)


@contextlib.contextmanager
def storage_alias(storage_class, hosts, location=None, **options):
    """Configure the STORAGES alias "replicated" for the command line."""
    options = dict(options, hosts=hosts)
    if location is not None:
        options["location"] = str(location)
    backend = {"BACKEND": "django_resto_gevent." + storage_class.__name__, "OPTIONS": options}
    with override_settings(STORAGES={"default": backend, "replicated": backend}):
        yield


def run_main(capsys, *argv):
    """Run the command line in this (patched) process; return (status, stdout, stderr)."""
    status = django_resto_gevent.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def sync_table(out):
    """Return the summary table of sync: {host: {column: value}}."""
    lines = out.splitlines()
    header = lines[0].replace("to upload", "to_upload").replace("to delete", "to_delete") \
        .replace("to copy", "to_copy").split()
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != len(header) or cells[0] == "host":
            break
        rows[cells[0]] = {column: cell if cell == "HEAD" else int(cell)
                          for column, cell in zip(header[1:], cells[1:], strict=True)}
    return rows


def test_sync_repairs_missing_and_truncated_files(media_servers, tmp_path, capsys, caplog):
    write_master(tmp_path)
    complete, missing, truncated = media_servers(3)
    for name, data in MASTER_FILES.items():
        complete.files["/media/" + name] = data
        truncated.files["/media/" + name] = data
    missing.files["/media/a.txt"] = b"alpha"
    truncated.files["/media/dir/sub/c.bin"] = MASTER_FILES["dir/sub/c.bin"][:1000]
    hosts = [complete.address, missing.address, truncated.address]
    with storage_alias(HybridStorage, hosts, tmp_path):
        status, out, err = run_main(capsys, "sync", "--storage", "replicated")
    assert status == 0, out + err
    for server in (complete, missing, truncated):
        assert server.files == {"/media/" + name: data for name, data in MASTER_FILES.items()}
    # One PROPFIND per directory, and nothing else where nothing is missing.
    assert sorted(path for _, path, _ in complete.log) == [
        "/media/", "/media/caf\u00e9 x/", "/media/dir/", "/media/dir/sub/"]
    assert {method for method, _, _ in complete.log} == {"PROPFIND"}
    assert sorted(path for method, path, _ in missing.log if method == "PUT") == sorted(
        "/media/" + name for name in MASTER_FILES if name != "a.txt")
    assert [path for method, path, _ in truncated.log if method == "PUT"] == [
        "/media/dir/sub/c.bin"]
    rows = sync_table(out)
    assert rows[complete.address] == {"dirs": 4, "files": 4, "same": 4, "missing": 0,
                                      "size": 0, "stale": 0, "content": 0, "orphans": 0,
                                      "uploaded": 0, "deleted": 0, "failed": 0}
    assert (rows[missing.address]["missing"], rows[missing.address]["uploaded"]) == (3, 3)
    assert (rows[truncated.address]["size"], rows[truncated.address]["uploaded"]) == (1, 1)
    assert out.splitlines()[-1].startswith("4 files x 3 hosts in ")
    assert out.splitlines()[-1].endswith(
        ", compared by size and modification time; content not compared: use --checksum. "
        "Every host matches the master copy.")
    assert err == ""  # not a terminal: no progress line
    assert resto_records(caplog, logging.WARNING) == []  # overwriting is the point


def test_sync_dry_run_changes_nothing(media_servers, tmp_path, capsys):
    write_master(tmp_path)
    servers = media_servers(2)
    with storage_alias(AsyncStorage, [s.address for s in servers], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
    assert status == 1  # the hosts are incomplete: nothing was repaired
    for server in servers:
        assert server.files == {}
        # The top is missing: the directories below it are asked about too.
        assert {method for method, _, _ in server.log} == {"PROPFIND"}
    assert "to upload" in out.splitlines()[0]
    assert sync_table(out)[servers[0].address]["to_upload"] == 4
    assert out.splitlines()[-1].startswith("Dry run: 4 files x 2 hosts")
    assert out.splitlines()[-1].endswith("8 uploads needed; nothing was changed.")


def test_sync_with_a_host_down_repairs_the_others(media_servers, tmp_path, capsys):
    write_master(tmp_path, {"d%02d/f.txt" % index: b"%d" % index for index in range(12)})
    up, = media_servers(1)
    down = MediaServer().start()
    down.stop()
    with storage_alias(HybridStorage, [up.address, down.address], tmp_path, timeout=0.5,
                       retries=0):
        started = time.monotonic()
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated",
                                  "--concurrency", "1")
    assert status == 1
    assert len(up.files) == 12
    rows = sync_table(out)
    assert rows[up.address]["uploaded"] == 12
    # Taken as down after 3 failures in a row; the listings already asked
    # for (directories ahead) fail too, and no upload is tried.
    failed = rows[down.address]["failed"]
    assert 3 <= failed <= 12
    assert rows[down.address]["files"] == 0
    assert "FAILED ./ on %s: PROPFIND" % down.address in out
    assert "Is the media server running and listening there?" in out
    assert "object at 0x" not in out  # one clean line per error
    last = out.splitlines()[-1]
    assert "%d could not be checked or repaired" % failed in last
    assert re.search(r" Down: %s \(PROPFIND http://%s/media/\S* failed: [^()]*\. Is the media "
                     r"server running and listening there\?\)\.$"
                     % (re.escape(down.address), re.escape(down.address)), last), last
    # Taken as down after 3 refusals, the host costs nothing more.
    assert time.monotonic() - started < 10


def test_sync_prefix_and_hosts_subset(media_servers, tmp_path, capsys):
    write_master(tmp_path)
    first, second = media_servers(2)
    second.files["/media/other.txt"] = b"outside the prefix"
    with storage_alias(HybridStorage, [first.address, second.address], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--prefix",
                                  "dir", "--hosts", second.address, "--delete")
    assert status == 0, out
    assert first.log == []
    assert second.files == {"/media/dir/b.txt": MASTER_FILES["dir/b.txt"],
                            "/media/dir/sub/c.bin": MASTER_FILES["dir/sub/c.bin"],
                            "/media/other.txt": b"outside the prefix"}
    assert "2 files x 1 hosts" in out
    # A prefix that is one file: its directory is listed, the others left alone.
    with storage_alias(HybridStorage, [first.address], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--prefix",
                                  "dir/b.txt", "--delete")
    assert status == 0, out
    assert first.files == {"/media/dir/b.txt": MASTER_FILES["dir/b.txt"]}


def test_sync_empty_tree(media_servers, tmp_path, capsys):
    server, = media_servers(1)
    with storage_alias(HybridStorage, [server.address], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated")
    assert status == 0
    assert server.log == [("PROPFIND", "/media/", 404)]
    assert "0 files x 1 hosts" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefix", "../etc"], "--prefix '../etc' is not a path inside the storage"),
    (["--prefix", "nowhere"], "--prefix 'nowhere': no such file or directory"),
    (["--hosts", "127.0.0.1:9"], "--hosts names 127.0.0.1:9, which is not among"),
    (["--concurrency", "0"], "--concurrency must be 1 or more"),
    (["--max-delete", "3"], "--max-delete 3: give a count of 0 or more, with --delete"),
    (["--storage", "nonexistent"], "No storage 'nonexistent'"),
])
def test_sync_usage_errors_exit_2(argv, message, media_servers, tmp_path, capsys):
    server, = media_servers(1)
    with storage_alias(HybridStorage, [server.address], tmp_path):
        status, _, err = run_main(capsys, "sync", "--storage", "replicated", *argv)
    assert status == 2
    assert message in err
    assert server.log == []


def test_sync_refuses_delete_from_an_empty_or_unreadable_master(media_servers, tmp_path,
                                                                capsys):
    server, = media_servers(1)
    server.files["/media/a.txt"] = b"alpha"
    (tmp_path / "master").mkdir()
    with storage_alias(HybridStorage, [server.address], tmp_path / "master"):
        status, _, err = run_main(capsys, "sync", "--storage", "replicated", "--delete")
    assert status == 2
    assert "--delete refused: the master copy %s is empty, so every file on the hosts " \
           "would be deleted. Is it mounted?" % (tmp_path / "master") in err
    with storage_alias(DistributedStorage, [server.address]):
        status, _, err = run_main(capsys, "sync", "--storage", "replicated", "--delete")
    assert status == 2
    assert "keeps no master copy to say what is an orphan" in err
    assert server.log == []
    assert server.files == {"/media/a.txt": b"alpha"}


def test_sync_delete_guards(media_servers, tmp_path, capsys):
    write_master(tmp_path, {"keep.txt": b"k", "empty/.keep-dir/x": b"x"})
    os.remove(tmp_path / "empty" / ".keep-dir" / "x")
    os.rmdir(tmp_path / "empty" / ".keep-dir")  # empty/ is now an empty directory
    server, = media_servers(1)
    server.files.update({"/media/keep.txt": b"k", "/media/empty/o1.txt": b"1",
                         "/media/o2.txt": b"2", "/media/o3.txt": b"3", "/media/o4.txt": b"4"})
    with storage_alias(HybridStorage, [server.address], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--delete",
                                  "--max-delete", "2")
    assert status == 1, out
    # Two of the three orphans beside keep.txt are gone; the one in the empty
    # master directory stays, whatever the count.
    assert "/media/empty/o1.txt" in server.files
    assert sum(name in server.files for name in ("/media/o2.txt", "/media/o3.txt",
                                                  "/media/o4.txt")) == 1
    row = sync_table(out)[server.address]
    assert (row["orphans"], row["deleted"]) == (4, 2)
    assert "%s: orphans in empty/ not deleted: that master directory is empty (is it " \
           "mounted?)" % server.address in out
    assert "%s: deletions stopped at --max-delete 2" % server.address in out
    assert out.splitlines()[-1].endswith("2 orphans not deleted (see above).")


def test_sync_refuses_distributed_storage_delete_but_heals_it(media_servers, capsys):
    first, second = media_servers(2)
    first.files["/media/a.txt"] = b"alpha"
    second.files["/media/b/c.txt"] = b"charlie"
    with storage_alias(DistributedStorage, [first.address, second.address]):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
        assert status == 1, out
        assert first.files == {"/media/a.txt": b"alpha"}
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated")
        assert status == 0, out
        status, again, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
    assert status == 0, again
    for server in (first, second):
        assert server.files == {"/media/a.txt": b"alpha", "/media/b/c.txt": b"charlie"}
    assert sync_table(out)[first.address]["copied"] == 1
    assert again.splitlines()[-1].endswith("Every host holds the same files; nothing was "
                                           "changed.")


def test_heal_newest_copy_wins_and_is_logged(media_servers, capsys, caplog):
    first, second, third = media_servers(3)
    for server, data, age in ((first, b"old", 7200), (second, b"newest", 10),
                              (third, b"older!", 3600)):
        server.files["/media/x.txt"] = data
        server.mtimes["/media/x.txt"] = time.time() - age
    with storage_alias(DistributedStorage, [first.address, second.address, third.address]):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--checksum")
    assert status == 0, out
    assert [server.files["/media/x.txt"] for server in (first, second, third)] == [
        b"newest"] * 3
    [message] = resto_records(caplog, logging.WARNING)
    assert message.startswith("Heal: x.txt differs between hosts; the copy on %s wins "
                              "(newest, modified " % second.address)
    assert message.endswith(", 6 bytes) over %s, %s." % (first.address, third.address))


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def test_sync_shows_progress_only_after_the_first_second(media_servers, tmp_path,
                                                         monkeypatch, capsys):
    write_master(tmp_path)
    server, = media_servers(1)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with storage_alias(HybridStorage, [server.address], tmp_path):
        assert django_resto_gevent.main(["sync", "--storage", "replicated"]) == 0
    assert terminal.getvalue() == ""  # a short run shows no progress
    # Slow enough to last a second: the line comes, then ends with a newline.
    write_master(tmp_path, {"slow/%d.txt" % index: b"x" for index in range(12)})
    server.latency = 0.1
    with storage_alias(HybridStorage, [server.address], tmp_path):
        assert django_resto_gevent.main(["sync", "--storage", "replicated",
                                         "--concurrency", "1"]) == 0
    progress = terminal.getvalue()
    assert progress.startswith("\r")
    assert "directories listed" in progress
    assert "12 uploaded, 0 deleted, 0 failed" in progress
    assert "ETA" not in progress
    assert progress.endswith("\n")


def run_program(tmp_path, hosts, program, *argv, **options):
    """Run ``program`` (a script's argv, or ``-m django_resto_gevent``), never patched,
    with a settings module naming ``hosts``; ``options`` go to subprocess.run()."""
    (tmp_path / "resto_cli_settings.py").write_text(
        SETTINGS_MODULE_TEMPLATE.format(root=str(tmp_path / "master"), hosts=list(hosts)))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), HERE]))
    options.setdefault("capture_output", True)
    return subprocess.run(
        [sys.executable, *program, *argv, "--settings", "resto_cli_settings"],
        cwd=str(tmp_path), env=environment, text=True, timeout=120, **options)


def run_command(tmp_path, hosts, *argv):
    """Run ``python -m django_resto_gevent`` with a settings module naming ``hosts``."""
    return run_program(tmp_path, hosts, ("-m", "django_resto_gevent"), *argv)


def test_sync_command_repairs_nginx_hosts(nginx_hosts, tmp_path):
    write_master(tmp_path / "master")
    # Host 0 is complete, host 1 lost a file, host 2 holds a truncated one.
    for index in range(3):
        write_master(os.path.join(nginx_hosts.roots[index], "media"))
    os.remove(nginx_hosts.path(1, "dir/b.txt"))
    with open(nginx_hosts.path(2, "dir/sub/c.bin"), "r+b") as truncated:
        truncated.truncate(10)
    result = run_command(tmp_path, nginx_hosts.hosts, "sync")
    assert result.returncode == 0, result.stdout + result.stderr
    for name, data in MASTER_FILES.items():
        _assert_on_nginx(nginx_hosts, name, data)
    # These hosts list nothing (no dav-ext, no autoindex): HEAD per file.
    methods = [{method for method, _, _, _ in nginx_hosts.requests(i)} - {"PROPFIND", "GET"}
               for i in range(3)]
    assert methods == [{"HEAD"}, {"HEAD", "PUT"}, {"HEAD", "PUT"}]
    assert "cannot list directories" in result.stdout
    assert result.stdout.splitlines()[-1].endswith(
        "Every host matches the master copy; orphans not looked for on %s (no listing)."
        % ", ".join(nginx_hosts.hosts))


# 24 directories of three files, and one at the top: enough for every share.
SHARED_TREE = dict({"d%02d/f%d.txt" % (directory, number): b"file %d of %d" % (number, directory)
                    for directory in range(24) for number in range(3)}, **{"top.txt": b"top"})


def summary_rows(out):
    """Return the per-host rows of a sync summary (its table, without the timing)."""
    return [line for line in out.splitlines() if line.startswith(("host ", "127.0.0.1:"))]


def test_sync_shares_the_directories_among_processes(nginx_listing_session, tmp_path):
    hosts = nginx_listing_session
    hosts.clear()
    write_master(tmp_path / "master", SHARED_TREE)
    # Host 0 lost the first file of each directory and holds an orphan; host 1
    # is empty. Both copies are written after the master, as saves are.
    write_master(os.path.join(hosts.roots[0], "media"), dict(
        {name: data for name, data in SHARED_TREE.items() if not name.endswith("/f0.txt")},
        **{"d03/orphan.txt": b"orphan"}))
    module = ("-m", "django_resto_gevent")
    one = run_program(tmp_path, hosts.hosts[:2], module, "sync", "--dry-run", "--jobs", "1")
    three = run_program(tmp_path, hosts.hosts[:2], module, "sync", "--dry-run", "--jobs", "3")
    assert one.returncode == three.returncode == 1, three.stdout + three.stderr
    # The same findings, however the tree was shared.
    assert summary_rows(three.stdout) == summary_rows(one.stdout)
    assert summary_rows(three.stdout)[1].split()[1:] == [
        "25", "73", "49", "24", "0", "0", "0", "1", "24", "0", "0"]
    assert " by 3 processes, " in three.stdout.splitlines()[-1]
    assert " processes" not in one.stdout.splitlines()[-1]
    logged = [len(hosts.requests(index)) for index in range(2)]
    repaired = run_program(tmp_path, hosts.hosts[:2], module, "sync", "--delete", "--jobs", "3")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert summary_rows(repaired.stdout)[1].split()[-3:] == ["24", "1", "0"]
    assert summary_rows(repaired.stdout)[2].split()[-3:] == ["73", "0", "0"]
    assert " by 3 processes, " in repaired.stdout.splitlines()[-1]
    assert not os.path.exists(hosts.path(0, "d03/orphan.txt"))
    for index in range(2):
        # Each directory listed once, by the one process whose share it is.
        listed = sorted(uri.partition("?")[0] for method, uri, _, _
                        in hosts.requests(index)[logged[index]:]
                        if method == "GET" and uri.partition("?")[0].endswith("/"))
        assert listed == ["/media/"] + ["/media/d%02d/" % number for number in range(24)]
        for name, data in SHARED_TREE.items():
            with open(hosts.path(index, name), "rb") as copy:
                assert copy.read() == data, (index, name)
    again = run_program(tmp_path, hosts.hosts[:2], module, "sync", "--dry-run", "--jobs", "3")
    assert again.returncode == 0, again.stdout
    assert "Every host matches the master copy; nothing was changed." in again.stdout


def test_sync_reports_the_share_of_a_process_that_died(nginx_listing_session, tmp_path):
    hosts = nginx_listing_session
    hosts.clear()
    write_master(tmp_path / "master", SHARED_TREE)
    # A driver whose second process ends without a report, as a killed one would.
    (tmp_path / "dying_share.py").write_text(
        "import os, sys\n"
        "import django_resto_gevent\n"
        "def die(sync, share, pipe):\n"
        "    os._exit(3)\n"
        "django_resto_gevent._Sync._work = die\n"
        "django_resto_gevent._process.command_line = True  # as python -m sets it\n"
        "sys.exit(django_resto_gevent.main(sys.argv[1:]))\n")
    result = run_program(tmp_path, hosts.hosts[:1], ["dying_share.py"], "sync", "--jobs", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("FAILED (share 2 of 2) on %s: the sync process for share 2 of 2 ended without its "
            "report (exit status 3): the directories of that share were not compared\n"
            % hosts.hosts[0]) in result.stdout
    # The first share was repaired all the same; the second was not touched.
    landed = [name for name in SHARED_TREE if os.path.exists(hosts.path(0, name))]
    assert 0 < len(landed) < len(SHARED_TREE)
    assert "every host matches" not in result.stdout.lower()


@pytest.mark.parametrize(("argv", "message"), [
    (("--jobs", "0"), "--jobs must be 1 or more, not 0."),
    (("--jobs", "2", "--delete", "--max-delete", "3"),
     "--jobs 2 with --max-delete: the bound on deletions holds exactly only in one process; "
     "give --jobs 1, or leave --jobs out."),
])
def test_sync_jobs_refused(media_servers, tmp_path, capsys, argv, message):
    write_master(tmp_path)
    server, = media_servers(1)
    with storage_alias(HybridStorage, [server.address], tmp_path):
        status, _, err = run_main(capsys, "sync", "--storage", "replicated", *argv)
    assert status == 2
    assert err == "error: %s\n" % message


def test_sync_jobs_refused_for_a_distributed_storage(media_servers, capsys):
    server, = media_servers(1)
    with storage_alias(DistributedStorage, [server.address]):
        status, _, err = run_main(capsys, "sync", "--storage", "replicated", "--jobs", "2")
    assert status == 2
    assert err == ("error: --jobs 2: a DistributedStorage is healed in one process (its tree "
                   "is found in the hosts' listings as it goes); leave --jobs out.\n")


def test_sync_forks_only_as_its_own_command(media_servers, tmp_path, capsys):
    # Called as main() from a program (here pytest), sync stays in its process:
    # fork() would copy that program's threads and state half-way.
    write_master(tmp_path, SHARED_TREE)
    server, = media_servers(1)
    with storage_alias(HybridStorage, [server.address], tmp_path):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--jobs", "2")
    assert status == 0, out
    assert " processes" not in out.splitlines()[-1]
    assert len(server.files) == len(SHARED_TREE)


def test_sync_progress_counts_every_process(media_servers, tmp_path):
    # Under a terminal, the process that draws the line adds the others'
    # counts. Every directory with files falls to the second process: what the
    # first one draws while it waits can only come from the other.
    names = [name for name in ("d%d" % number for number in range(40))
             if django_resto_gevent._share_of(name, 2) == 1][:3]
    assert django_resto_gevent._share_of("", 2) == 0  # the top, empty of files
    write_master(tmp_path / "master", {"%s/%d.txt" % (directory, number): b"x"
                                       for directory in names for number in range(6)})
    server, = media_servers(1)
    server.latency = 0.1  # 18 uploads one at a time: the run lasts past the first second
    (tmp_path / "on_a_terminal.py").write_text(
        "import sys\n"
        "import django_resto_gevent\n"
        "class Terminal:\n"
        "    def __init__(self, stream):\n"
        "        self.stream = stream\n"
        "    def isatty(self):\n"
        "        return True\n"
        "    def write(self, text):\n"
        "        return self.stream.write(text)\n"
        "    def flush(self):\n"
        "        self.stream.flush()\n"
        "sys.stderr = Terminal(sys.stderr)\n"
        "django_resto_gevent._process.command_line = True  # as python -m sets it\n"
        "sys.exit(django_resto_gevent.main(sys.argv[1:]))\n")
    result = run_program(tmp_path, [server.address], ["on_a_terminal.py"], "sync", "--jobs", "2",
                         "--concurrency", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " by 2 processes, " in result.stdout.splitlines()[-1]
    # (Text mode reads each "\r" as a line end.)
    lines = [line for line in result.stderr.splitlines() if line]
    assert all(" directories listed, " in line for line in lines), lines
    uploaded = [int(re.search(r"(\d+) uploaded", line).group(1)) for line in lines]
    assert any(0 < count < 18 for count in uploaded[:-1]), lines  # the other's, as they came
    assert uploaded == sorted(uploaded), lines
    assert "18 uploaded, 0 deleted, 0 failed" in lines[-1]


def test_check_command_on_nginx_hosts(nginx_hosts, tmp_path):
    os.makedirs(tmp_path / "master")
    result = run_command(tmp_path, nginx_hosts.hosts, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["host", "PUT", "HEAD", "GET", "DELETE", "result"]
    for host, line in zip(nginx_hosts.hosts, lines[1:4], strict=True):
        assert line.startswith(host)
        assert line.endswith(" ok")
        assert line.count("ms") == 4
    assert "public URL /media/.resto-check/" in result.stdout
    assert "not fetched (MEDIA_URL is a path" in result.stdout
    for index in range(3):
        methods = [method for method, _, status, _ in nginx_hosts.requests(index)]
        assert methods == ["PUT", "HEAD", "GET", "DELETE"]
        assert os.listdir(os.path.join(nginx_hosts.roots[index], "media", ".resto-check")) \
            == []


@pytest.mark.parametrize(("knobs", "explanation"), [
    ({"read_only": True}, "403 on PUT: is dav_methods enabled and this address allowed?"),
    ({"status": {"PUT": 413}}, "413: the file is over the server's body limit; raise "
                               "client_max_body_size"),
    ({"require_collections": True, "status": {"MKCOL": 405, "PUT": 409}},
     "409: the server needs parent collections"),
    ({"require_headers": {"Authorization": "Bearer x"}}, "check RESTO_HTTP_AUTH"),
    ({"hang": True}, "No complete answer within RESTO_TIMEOUT"),
])
def test_check_command_explains_unusable_hosts(knobs, explanation, media_servers, tmp_path,
                                               capsys):
    good, = media_servers(1)
    bad, = media_servers(1, **knobs)
    with storage_alias(DistributedStorage, [good.address, bad.address], timeout=0.5,
                       retries=0):
        status, out, _ = run_main(capsys, "check", "--storage", "replicated")
    assert status == 1, out
    lines = out.splitlines()
    assert lines[1].startswith(good.address)
    assert lines[1].endswith(" ok")
    assert lines[2].startswith(bad.address)
    assert "FAILED: " in lines[2]
    assert explanation in lines[2]
    assert lines[-1] == "Some media hosts are unusable: see FAILED above."
    assert good.files == {}  # the probe was removed
    assert [method for method, _, _ in good.log] == ["PUT", "HEAD", "GET", "DELETE"]


def test_check_command_fetches_an_absolute_public_url(media_servers, capsys):
    servers = media_servers(2)
    # The public URL is the first media host itself, as a CDN would be in front.
    with storage_alias(DistributedStorage, [s.address for s in servers],
                       base_url=servers[0].url + "/media/"):
        status, out, _ = run_main(capsys, "check", "--storage", "replicated")
    assert status == 0, out
    assert "public URL %s/media/.resto-check/" % servers[0].url in out
    assert out.splitlines()[-2].endswith(": ok")
    assert [method for method, _, _ in servers[0].log] == ["PUT", "HEAD", "GET", "GET",
                                                            "DELETE"]


###############################################################################
# Command line: sync against real hosts of every kind
###############################################################################


class SyncHost:
    """One host of a kind, seen from its own side: put, read and age files there."""

    def __init__(self, kind, entry, base, options=None, disk=None, seaweed=None, owner=None):
        self.kind = kind
        self.entry = entry
        self.base = base  # the storage's path on the host, e.g. "media/t1a2b/"
        self.options = options or {}
        self.disk = disk  # where the host's files are, for nginx, Apache, lighttpd
        self.seaweed = seaweed
        self.owner = owner  # (uid, gid) that must own what the test writes (Apache)

    def put(self, name, data):
        """Store ``data`` as ``name`` on the host, behind the storage's back."""
        if self.disk is not None:
            path = os.path.join(self.disk, self.base, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as output:
                output.write(data)
            if self.owner is not None:
                for root, directories, files in os.walk(os.path.join(self.disk, "media")):
                    for item in [root] + [os.path.join(root, f) for f in directories + files]:
                        os.chown(item, *self.owner)
        elif self.kind == "filer":
            response = urllib3.request("PUT", "%s/%s%s" % (self.seaweed.filer_url, self.base,
                                                           quote(name)), body=data, timeout=10)
            assert response.status == 201, response.data
        else:
            response = self.seaweed.s3_request("PUT", "/media/%s%s" % (self.base, quote(name)),
                                               body=data)
            assert response.status == 200, response.data

    def read(self, name):
        """Return the bytes the host holds for ``name``, or None."""
        if self.disk is not None:
            try:
                with open(os.path.join(self.disk, self.base, name), "rb") as stored:
                    return stored.read()
            except FileNotFoundError:
                return None
        if self.kind == "filer":
            response = urllib3.request("GET", "%s/%s%s" % (self.seaweed.filer_url, self.base,
                                                           quote(name)), timeout=10)
        else:
            response = self.seaweed.s3_request("GET", "/media/%s%s" % (self.base, quote(name)))
        return response.data if response.status == 200 else None

    def can_age(self):
        """Tell whether the test can set a copy's modification time on the host."""
        return self.disk is not None

    def age(self, name, seconds):
        """Make the host's copy of ``name`` ``seconds`` older."""
        path = os.path.join(self.disk, self.base, name)
        when = os.stat(path).st_mtime - seconds
        os.utime(path, (when, when))


SYNC_HOST_KINDS = ["nginx", "nginx-dav-ext", "apache", "lighttpd", "filer", "s3"]


@pytest.fixture(params=SYNC_HOST_KINDS)
def sync_host(request):
    """One host of each kind that lists, under a storage path of this test's own."""
    base = "media/t%s/" % os.urandom(4).hex()
    kind = request.param
    if kind in ("filer", "s3"):
        seaweed = request.getfixturevalue("seaweed")
        if kind == "filer":
            return SyncHost(kind, seaweed.filer_host, base, seaweed=seaweed)
        return SyncHost(kind, s3_host(seaweed), base, s3_options(seaweed), seaweed=seaweed)
    session = request.getfixturevalue({"nginx": "nginx_listing_session",
                                       "nginx-dav-ext": "nginx_dav_ext_session",
                                       "apache": "apache_session",
                                       "lighttpd": "lighttpd_session"}[kind])
    session.clear()
    owner = None
    if kind == "apache" and os.geteuid() == 0:
        account = pwd.getpwnam("www-data")
        owner = (account.pw_uid, account.pw_gid)
    return SyncHost(kind, session.hosts[0], base, disk=session.roots[0], owner=owner)


def wait_past(moment):
    """Wait until the clock passes ``moment`` (at most 3 s).

    A host keeps whole seconds: a copy written in the same second as the
    master file cannot be told apart from an older one. This waits for the
    clock, not for any work.
    """
    for _ in range(300):
        if time.time() > moment:
            return
        time.sleep(0.01)
    raise AssertionError("the clock did not pass %r" % moment)


# A name that starts with a dot is one nginx lists in no way: asked with HEAD.
SYNC_KEPT = {"keep.txt": b"kept", "dir/sub/deep.txt": b"deep", "caf\u00e9 x/d.txt": b"delta",
             "dir/.dotkept.txt": b"dot kept"}


def test_sync_finds_and_repairs_every_divergence(sync_host, tmp_path, capsys, caplog):
    master = tmp_path / "master"
    host = sync_host
    # On the host: copies that are right, one of another size, one with other
    # bytes of the same size (a corrupted copy), orphans; then the master.
    for name, data in SYNC_KEPT.items():
        host.put(name, data)
    host.put("size.txt", b"short")
    host.put("corrupt.txt", b"XXXXXXXX")
    host.put("orphan.txt", b"deleted from the master, left on the host")
    host.put("gone/x.txt", b"a whole directory the master no longer has")
    if not host.can_age():
        host.put("stale.txt", b"old text")
    master_files = dict(SYNC_KEPT, **{"missing.txt": b"never reached the host",
                                      ".dotmissing.txt": b"a dot file the host lacks",
                                      "size.txt": b"longer than the host's",
                                      "corrupt.txt": b"original", "stale.txt": b"new text"})
    write_master(master, master_files)
    if host.can_age():
        host.put("stale.txt", b"old text")
        host.age("stale.txt", 3600)  # an overwrite of the master that the host missed
        for name in SYNC_KEPT:
            host.age(name, -5)  # written after the master, as saves do
        host.age("corrupt.txt", -5)
    else:
        # The host's copies cannot be aged: the master's are, an hour back,
        # as if written before the host's (a host keeps whole seconds, so a
        # copy made in the second after its master file could otherwise look
        # a second older than it: stale).
        past = time.time() - 3600
        for name in [*SYNC_KEPT, "corrupt.txt", "size.txt"]:
            os.utime(master / name, (past, past))
        # The stale copy is as old as can be made: the master file is a
        # second newer (hosts keep whole seconds), then the clock passes it.
        newer = time.time() + 1
        os.utime(master / "stale.txt", (newer, newer))
        wait_past(newer)
    options = dict(host.options, base_url="/" + host.base)
    argv = ["sync", "--storage", "replicated"]
    with storage_alias(HybridStorage, [host.entry], master, **options):
        status, out, _ = run_main(capsys, *argv, "--dry-run")
        assert status == 1, out
        row = sync_table(out)[host.entry]
        assert row["dirs"] >= 4, out  # listed, not checked file by file
        assert (row["missing"], row["size"], row["stale"], row["orphans"], row["same"],
                row["content"]) == (2, 1, 1, 2, 5, 0), out
        assert ", compared by size and modification time; content not compared: use " \
               "--checksum. " in out.splitlines()[-1]
        status, out, _ = run_main(capsys, *argv, "--dry-run", "--checksum")
        assert status == 1, out
        row = sync_table(out)[host.entry]
        assert (row["content"], row["same"]) == (1, 4), out
        assert host.read("orphan.txt") is not None  # a dry run changes nothing
        status, out, _ = run_main(capsys, *argv, "--checksum", "--delete")
        assert status == 0, out
        row = sync_table(out)[host.entry]
        assert (row["uploaded"], row["deleted"]) == (5, 2), out
        for name, data in master_files.items():
            assert host.read(name) == data, name
        assert host.read("orphan.txt") is None
        assert host.read("gone/x.txt") is None
        status, out, _ = run_main(capsys, *argv, "--dry-run", "--checksum", "--delete")
    assert status == 0, out
    assert out.splitlines()[-1].endswith(
        "Every host matches the master copy; nothing was changed."), out
    assert resto_records(caplog) == []


def test_heal_asks_a_host_that_cannot_list_with_head(nginx_listing_session, nginx_hosts,
                                                     capsys, caplog):
    nginx_listing_session.clear()
    base = "media/blind%s/" % os.urandom(3).hex()
    listing = SyncHost("nginx", nginx_listing_session.hosts[0], base,
                       disk=nginx_listing_session.roots[0])
    blind = SyncHost("nginx", nginx_hosts.hosts[0], base, disk=nginx_hosts.roots[0])
    listing.put("lost-on-blind.txt", b"alpha")
    listing.put("dir/both.txt", b"older")
    blind.put("dir/both.txt", b"the newer copy")
    listing.age("dir/both.txt", 3600)
    blind.put("only-on-blind.txt", b"nobody can see me")
    hosts = [listing.entry, blind.entry]
    with storage_alias(DistributedStorage, hosts, base_url="/" + base):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
        assert status == 1, out
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:3]}
        assert rows == {listing.entry: ["2", "2", "1", "0", "1", "0", "1", "0"],
                        blind.entry: ["HEAD", "2", "1", "1", "0", "0", "1", "0"]}, out
        assert out.splitlines()[3].startswith(
            "%s cannot list directories (PROPFIND http://%s/%s answered 405; "
            % (blind.entry, blind.entry, base)), out
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated")
        assert status == 0, out
    # Found with HEAD on the host that cannot list: what it lacked, and that its
    # copy was the newest.
    assert blind.read("lost-on-blind.txt") == b"alpha"
    assert listing.read("dir/both.txt") == blind.read("dir/both.txt") == b"the newer copy"
    # What only the blind host holds cannot be found (the summary says so).
    assert listing.read("only-on-blind.txt") is None
    heads = {uri for method, uri, _, _ in nginx_hosts.requests(0) if method == "HEAD"}
    assert {"/%slost-on-blind.txt" % base, "/%sdir/both.txt" % base} <= heads
    assert ["Heal: dir/both.txt differs between hosts; the copy on %s wins" % blind.entry in
            message for message in resto_records(caplog, logging.WARNING)] == [True, True]


def test_heal_distributed_hosts_from_each_other(nginx_listing_session, apache_session,
                                                capsys, caplog):
    nginx_listing_session.clear()
    apache_session.clear()
    account = pwd.getpwnam("www-data") if os.geteuid() == 0 else None
    base = "media/heal%s/" % os.urandom(3).hex()
    nginx = SyncHost("nginx", nginx_listing_session.hosts[0], base,
                     disk=nginx_listing_session.roots[0])
    apache = SyncHost("apache", apache_session.hosts[0], base, disk=apache_session.roots[0],
                      owner=account and (account.pw_uid, account.pw_gid))
    nginx.put("only-on-nginx.txt", b"n")
    apache.put("deep/only-on-apache.txt", b"a")
    nginx.put("both.txt", b"older")
    apache.put("both.txt", b"newer copy")
    nginx.age("both.txt", 3600)
    hosts = [nginx.entry, apache.entry]
    with storage_alias(DistributedStorage, hosts, base_url="/" + base):
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
        assert status == 1, out
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated")
        assert status == 0, out
        status, out, _ = run_main(capsys, "sync", "--storage", "replicated", "--dry-run")
        assert status == 0, out
        storage = DistributedStorage(hosts=hosts, base_url="/" + base)
        assert storage.listdir("") == (["deep"], ["both.txt", "only-on-nginx.txt"])
        assert storage.listdir("deep") == ([], ["only-on-apache.txt"])
        modified = storage.get_modified_time("both.txt")
        assert modified.tzinfo is not None
        assert abs(modified.timestamp() - time.time()) < 60
    for host in (nginx, apache):
        assert host.read("only-on-nginx.txt") == b"n"
        assert host.read("deep/only-on-apache.txt") == b"a"
        assert host.read("both.txt") == b"newer copy"
    # The choice is logged by the dry run and by the run that made it.
    assert ["Heal: both.txt differs between hosts; the copy on %s wins" % apache.entry in
            message for message in resto_records(caplog, logging.WARNING)] == [True, True]
