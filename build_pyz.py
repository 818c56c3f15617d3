#!/usr/bin/env python3
"""Build fm-edge.pyz: the one file users copy to a device.

    python3 build_pyz.py [--output fm-edge.pyz] [--urllib3-wheel PATH]

The archive holds the ``fmedge`` package, urllib3 (pinned version, pinned sha256) and a
``__main__.py`` that refuses Python < 3.9 in one line. It is reproducible: entries are
sorted, timestamps and permissions fixed, and the bytecode is hash-based, so two builds of
the same tree with the same Python give the same sha256. Modules ride along as sources;
at run time fmedge/bytecode_cache.py compiles each once per machine and keeps the code in
an on-disk cache (a zip has no __pycache__). Only that loader and the package's
``__init__`` are bundled as bytecode for the building Python (any other Python falls back
to the sources beside them).

urllib3 is fetched with pip into ``~/.cache/fm-edge/build`` (or taken from
``--urllib3-wheel`` on an air-gapped builder), checked against the pinned hash, and
unpacked into a staging folder; it is never committed to the repository.
"""

import argparse
import ast
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import tokenize
import zipfile

URLLIB3_VERSION = "2.5.0"
URLLIB3_WHEEL = f"urllib3-{URLLIB3_VERSION}-py3-none-any.whl"
URLLIB3_SHA256 = "e6b01673c0fa6a13e374b50871808eb3bf7046c4b125b216f6bf1cc604cff0dc"
# Parts of urllib3 that need packages fm-edge never bundles (pyOpenSSL, PySocks) or
# only run in a browser (emscripten): leaving them out keeps the file small.
URLLIB3_EXCLUDED = ("urllib3/contrib/emscripten/", "urllib3/contrib/pyopenssl.py",
                    "urllib3/contrib/socks.py", "urllib3/py.typed")

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fm-edge", "build")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the zip format's epoch: no build time leaks in

MAIN = b'''# fm-edge.pyz entry point. Kept free of f-strings so old Pythons can print the message.
import sys

if sys.version_info < (3, 9):
    sys.stderr.write("fm-edge needs Python 3.9 or newer; this is Python %d.%d\\n"
                     % sys.version_info[:2])
    sys.exit(2)

if sys.argv[1:] == ["--version"]:  # answered without loading the CLI: scripts poll it
    from fmedge import __version__

    sys.stdout.write("fm-edge %s\\n" % __version__)
    sys.exit(0)

# Before anything else of fm-edge loads: compiled modules are cached on disk between runs.
from fmedge.bytecode_cache import install

install(sys.path[0])

from fmedge.cli import main

sys.exit(main())
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the single-file fm-edge.pyz.")
    parser.add_argument("--output", default=os.path.join(ROOT, "fm-edge.pyz"))
    parser.add_argument("--urllib3-wheel", help="use this wheel instead of fetching it")
    args = parser.parse_args(argv)
    wheel = args.urllib3_wheel or fetch_urllib3()
    check_sha256(wheel, URLLIB3_SHA256)
    with tempfile.TemporaryDirectory(prefix="fm-edge-pyz-") as staging:
        members = stage(staging, wheel)
        data = archive(staging, members)
    write(args.output, data)
    digest = hashlib.sha256(data).hexdigest()
    print(f"wrote {args.output}: {len(data)} bytes ({len(data) / 1024:.0f} KB), "
          f"sha256 {digest}")
    return 0


def fetch_urllib3():
    """The pinned urllib3 wheel, from the cache or downloaded once with pip."""
    path = os.path.join(CACHE_DIR, URLLIB3_WHEEL)
    if os.path.exists(path):
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--dest", CACHE_DIR,
                    f"urllib3=={URLLIB3_VERSION}"], check=True)
    if not os.path.exists(path):
        sys.exit(f"build_pyz: pip did not produce {URLLIB3_WHEEL} in {CACHE_DIR}")
    return path


def check_sha256(path, expected):
    with open(path, "rb") as handle:
        actual = hashlib.sha256(handle.read()).hexdigest()
    if actual != expected:
        sys.exit(f"build_pyz: {path} has sha256 {actual}, expected {expected}: "
                 "refusing to bundle it (delete it to fetch it again)")


def stage(staging, wheel):
    """Copy fmedge and urllib3 into ``staging``; return the archive member names."""
    members = ["__main__.py"]
    _write_file(os.path.join(staging, "__main__.py"), MAIN)
    members += _copy_package(os.path.join(ROOT, "fmedge"), staging)
    members += _unpack_urllib3(wheel, staging)
    members += compile_startup(staging)
    return sorted(members)


# The only modules that ride along as bytecode: what loads before the on-disk bytecode cache
# (fmedge/bytecode_cache.py) takes over; everything else is compiled once per machine and
# then loaded from that cache, which keeps the file small.
STARTUP_IMPORTS = ("fmedge.bytecode_cache",)

# Run in a child Python with -X no_debug_ranges: bytecode without column tables is a third
# smaller (tracebacks still name the line, without the ^^^ markers under it).
COMPILE_STARTUP = """
import importlib, os, py_compile, sys
staging, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, staging)
for name in names:
    importlib.import_module(name)
for module in sorted(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'fmedge'):
    member = os.path.relpath(module, staging).replace(os.sep, '/')
    py_compile.compile(module, cfile=module + 'c', dfile=member, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    print(member + 'c')
"""


def compile_startup(staging):
    """Hash-based .pyc beside each source the start path imports: deterministic, valid
    without mtimes (zipimport looks for module.pyc beside module.py)."""
    found = subprocess.run(
        [sys.executable, "-I", "-X", "no_debug_ranges", "-c", COMPILE_STARTUP, staging]
        + list(STARTUP_IMPORTS), cwd=staging, check=True, stdout=subprocess.PIPE,
        universal_newlines=True).stdout.split()
    return sorted(found)


def _copy_package(package_dir, staging):
    names = []
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            source = os.path.join(folder, name)
            member = os.path.relpath(source, ROOT).replace(os.sep, "/")
            with open(source, encoding="utf-8") as handle:
                slim = slim_source(handle.read())
            _write_file(os.path.join(staging, member), slim.encode("utf-8"))
            names.append(member)
    return names


def slim_source(text):
    """``text`` without comments and docstrings, every line at its original number.

    Docstrings become ``""`` and comments vanish, but no line is added or removed, so a
    traceback from inside the pyz points at the same line as the repository's file. This
    keeps the archive under its size budget while carrying bytecode for the start path.
    """
    spans = _comment_spans(text) + _docstring_spans(text)
    lines = text.splitlines(keepends=True)
    for (row1, col1), (row2, col2), replacement in sorted(spans, reverse=True):
        head = lines[row1 - 1][:col1]
        tail = lines[row2 - 1][col2:]
        newlines = "\n" * (row2 - row1)
        lines[row1 - 1:row2] = [head + replacement + newlines + tail] + [""] * (row2 - row1)
    return "".join(line.rstrip() + "\n" if line.endswith("\n") else line for line in
                   "".join(lines).splitlines(keepends=True))


def _tokens(text):
    return list(tokenize.generate_tokens(io.StringIO(text).readline))


def _comment_spans(text):
    return [(tok.start, tok.end, "") for tok in _tokens(text) if tok.type == tokenize.COMMENT]


def _docstring_spans(text):
    """(start, end, '""') of each module/class/function docstring, in characters."""
    rows = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            rows.add(body[0].lineno)
    spans, seen = [], set()
    for tok in _tokens(text):
        row = tok.start[0]
        if tok.type == tokenize.STRING and row in rows and row not in seen:
            seen.add(row)   # the first string token of the statement's line is the docstring
            spans.append((tok.start, tok.end, '""'))
    return spans


def _unpack_urllib3(wheel, staging):
    names = []
    with zipfile.ZipFile(wheel) as archive_in:
        for info in archive_in.infolist():
            name = info.filename
            if name.endswith("LICENSE.txt"):
                target = "urllib3/LICENSE.txt"  # MIT: the notice travels with the code
            elif name.startswith("urllib3/") and not name.startswith(URLLIB3_EXCLUDED):
                target = name
            else:
                continue
            data = archive_in.read(info)
            if target.endswith(".py"):   # same slimming as ours; the licence stays whole
                data = slim_source(data.decode("utf-8")).encode("utf-8")
            _write_file(os.path.join(staging, target), data)
            names.append(target)
    return names


def archive(staging, members):
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for member in members:
            info = zipfile.ZipInfo(member, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(os.path.join(staging, member), "rb") as handle:
                out.writestr(info, handle.read(), compresslevel=9)
    return buffer.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def _write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


if __name__ == "__main__":
    sys.exit(main())
