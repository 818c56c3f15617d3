"""Start the test cloud (tools/studio.py) and the chaos proxy from tests.

Importable by any test module (``from studio_fixture import ...``); pytest finds the
fixtures below when a test module imports them by name.

- ``start_studio(folder)``: a studio in this process, on an ephemeral port (``.url``,
  ``.faults``, ``.requests``, ``.store``, ``.stop()``);
- ``StudioProcess(folder)``: the same as a subprocess (for kill/restart scenarios);
- ``run_studio_cli(db, *args)``: the admin commands (push, delete, add-model, ...);
- ``start_proxy(port, **mode)``: a ChaosProxy in front of a port;
- ``make_tls_files(folder)``: a test CA and a server certificate for 127.0.0.1/localhost;
- ``wait_until(predicate)``: poll with a deadline instead of sleeping.
"""

import os
import selectors
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
STUDIO_SCRIPT = os.path.join(TOOLS, "studio.py")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import chaosproxy  # noqa: E402  (lives in tools/, added to the path just above)
import studio  # noqa: E402

API_KEY = "test-key-5f1c0a9e"
DEVICE_ID = "edge-test-01"
START_DEADLINE = 20.0   # seconds a subprocess studio may take to print its URL


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.01)


def start_studio(folder, api_key=API_KEY, tls=None, fault_api=False, db_name="studio.db"):
    """A studio serving from ``folder/db_name``; ``tls`` is a TlsFiles (or None for HTTP)."""
    cert, key = (tls.server_cert, tls.server_key) if tls else (None, None)
    return studio.serve_in_thread(os.path.join(str(folder), db_name), api_key,
                                  tls_cert=cert, tls_key=key, fault_api=fault_api)


def start_proxy(upstream_port, upstream_host="127.0.0.1", **mode):
    return chaosproxy.ChaosProxy(upstream_host, upstream_port, **mode).start()


def port_of(url):
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def run_studio_cli(db_path, *args, check=True):
    """Run ``tools/studio.py ARGS --db DB``; returns the CompletedProcess."""
    command = [sys.executable, STUDIO_SCRIPT] + list(args) + ["--db", str(db_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError("studio %s failed (%d): %s" % (args, done.returncode, done.stderr))
    return done


class StudioProcess:
    """``python3 tools/studio.py --port 0 ...`` as a child process; ``.url`` once listening."""

    def __init__(self, folder, api_key=API_KEY, extra_args=(), db_name="studio.db"):
        self.db_path = os.path.join(str(folder), db_name)
        env = dict(os.environ, STUDIO_API_KEY=api_key)
        command = [sys.executable, STUDIO_SCRIPT, "--port", "0", "--db", self.db_path]
        self.proc = subprocess.Popen(command + list(extra_args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.url = self._read_url()

    def _read_url(self):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_DEADLINE
        try:
            while time.monotonic() < deadline:
                if selector.select(timeout=0.1):
                    line = self.proc.stdout.readline().decode()
                    if not line:
                        break
                    if "listening on" in line:
                        return line.split("listening on ", 1)[1].split()[0]
        finally:
            selector.close()
        self.stop()
        raise AssertionError("studio did not start: %s" % self.proc.stderr.read().decode())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


class TlsFiles:
    """Paths of a test CA certificate and of a server certificate + key it signed."""

    def __init__(self, ca_cert, server_cert, server_key):
        self.ca_cert = ca_cert
        self.server_cert = server_cert
        self.server_key = server_key


_LEAF_EXT = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=%s
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""


def make_tls_files(folder, names=("localhost", "127.0.0.1"), prefix="test", starts_in_days=0):
    """A CA and a server certificate for ``names`` (DNS names or IPs), in ``folder``.

    Uses the ``openssl`` command when present, else the ``cryptography`` package; skips
    the test when neither exists. A real CA + leaf (not one self-signed leaf) keeps the
    certificates valid under Python 3.13's strict X.509 checks. ``starts_in_days`` > 0
    makes a server certificate that is not valid yet (needs ``cryptography``).
    """
    folder = str(folder)
    if shutil.which("openssl") and not starts_in_days:
        return _tls_with_openssl(folder, names, prefix)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        pytest.skip("this TLS test needs the openssl command or the cryptography package")
    return _tls_with_cryptography(folder, names, prefix, starts_in_days)


def _san(names):
    return ",".join(("IP:%s" if name.replace(".", "").isdigit() else "DNS:%s") % name
                    for name in names)


def _openssl(*args, cwd):
    subprocess.run(("openssl",) + args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _tls_with_openssl(folder, names, prefix):
    paths = {part: os.path.join(folder, "%s-%s" % (prefix, part)) for part in
             ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr", "leaf.ext")}
    with open(paths["leaf.ext"], "w") as handle:
        handle.write(_LEAF_EXT % _san(names))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", paths["ca.key"], "-out", paths["ca.pem"],
             "-days", "3", "-subj", "/CN=fm-edge %s test CA" % prefix,
             "-extensions", "v3_ca", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    _openssl("req", "-new", *ec, "-keyout", paths["server.key"], "-out", paths["server.csr"],
             "-subj", "/CN=%s" % names[0], cwd=folder)
    _openssl("x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.pem"],
             "-CAkey", paths["ca.key"], "-CAcreateserial", "-out", paths["server.pem"],
             "-days", "2", "-extfile", paths["leaf.ext"], cwd=folder)
    return TlsFiles(paths["ca.pem"], paths["server.pem"], paths["server.key"])


def _tls_with_cryptography(folder, names, prefix, starts_in_days=0):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fm-edge %s test CA" % prefix)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=3))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                            False), critical=True)
               .add_extension(ca_ski, critical=False)
               .sign(ca_key, hashes.SHA256()))
    alt = [x509.IPAddress(ipaddress.ip_address(n)) if n.replace(".", "").isdigit()
           else x509.DNSName(n) for n in names]
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=starts_in_days, hours=-1))
            .not_valid_after(now + datetime.timedelta(days=starts_in_days + 2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(folder, "%s-%s" % (prefix, part))
             for part in ("ca.pem", "server.pem", "server.key")]
    pem = serialization.Encoding.PEM
    for path, data in zip(paths, (ca_cert.public_bytes(pem), leaf.public_bytes(pem),
                                  leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))):
        with open(path, "wb") as handle:
            handle.write(data)
    return TlsFiles(*paths)


# -- pytest fixtures ----------------------------------------------------------------------------

@pytest.fixture
def studio_server(tmp_path):
    """An in-process studio on an ephemeral port, stopped after the test."""
    server = start_studio(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def chaos_proxy(studio_server):
    """A chaos proxy in front of ``studio_server`` (``proxy.url`` is the cloud_url to use)."""
    proxy = start_proxy(studio_server.server_address[1])
    yield proxy
    proxy.stop()
