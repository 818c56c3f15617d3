"""Bytecode for the modules of fm-edge.pyz, cached on disk between runs.

Python caches compiled modules in ``__pycache__`` beside their sources, but a zip archive
has no such place: every ``python3 fm-edge.pyz ...`` would compile each module it imports
from source, and zipimport even compiles a source module twice (once to find its file
name, once to run it). That was most of the time of a cold ``fm-edge run``.

``install(archive)`` puts a finder in front of the import system for the ``fmedge`` and
``urllib3`` packages inside the archive. It compiles a module once, writes the code to
``<cache>/<python tag>/<module>.pyc`` stamped with a hash of its source, and later runs
load that file while the source hash still matches (a new fm-edge.pyz with changed sources
recompiles what changed). The cache is only an accelerator: when it cannot be read or
written (read-only home, full disk, damaged file) modules are compiled as before.

Where: ``$FM_EDGE_BYTECODE_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/fm-edge/bytecode``, else ``~/.cache/fm-edge/bytecode``.
"""

import _imp
import marshal
import os
import sys
import zipimport
from importlib.machinery import ModuleSpec
from importlib.util import MAGIC_NUMBER, source_hash

ENV_VAR = "FM_EDGE_BYTECODE_CACHE"
PACKAGES = ("fmedge", "urllib3")
_HEADER = len(MAGIC_NUMBER) + 8     # magic, then the 8-byte hash of the source


def cache_dir(environ=os.environ):
    """The folder for this Python's cached bytecode, or None when disabled."""
    chosen = environ.get(ENV_VAR)
    if chosen is None:
        base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".cache")
        chosen = os.path.join(base, "fm-edge", "bytecode")
    if chosen.lower() in ("", "off", "0", "no"):
        return None
    return os.path.join(chosen, sys.implementation.cache_tag or "python")


def install(archive, folder=None, packages=PACKAGES):
    """Serve ``packages`` from ``archive`` through the cache; returns the finder (already
    first on ``sys.meta_path``)."""
    finder = ZipBytecodeFinder(archive, cache_dir() if folder is None else folder, packages)
    sys.meta_path.insert(0, finder)
    return finder


class ZipBytecodeFinder:
    """Finds this archive's modules without compiling them (zipimport's own finder does)."""

    def __init__(self, archive, folder, packages=PACKAGES):
        self.archive = archive
        self.folder = folder
        self.packages = tuple(packages)
        self._importers = {}          # package folder inside the archive -> zipimporter

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in self.packages:
            return None
        package_dir = name.rpartition(".")[0].replace(".", "/")
        importer = self._importer(package_dir)
        try:
            is_package = importer.is_package(name)
        except zipimport.ZipImportError:
            return None
        location = os.path.join(self.archive, *name.split("."))
        origin = os.path.join(location, "__init__.py") if is_package else location + ".py"
        spec = ModuleSpec(name, ZipBytecodeLoader(importer, self.folder), origin=origin,
                          is_package=is_package)
        spec.has_location = True       # the module gets its file name, as from zipimport
        if is_package:
            spec.submodule_search_locations = [location]
        return spec

    def _importer(self, package_dir):
        importer = self._importers.get(package_dir)
        if importer is None:
            where = os.path.join(self.archive, package_dir) if package_dir else self.archive
            importer = self._importers[package_dir] = zipimport.zipimporter(where)
        return importer

    def invalidate_caches(self):
        self._importers.clear()


class ZipBytecodeLoader:
    """Runs a module from cached bytecode, compiling (and caching) it when needed."""

    def __init__(self, importer, folder):
        self.importer = importer
        self.folder = folder

    def create_module(self, spec):
        return None                    # the default module object

    def exec_module(self, module):
        # What every import system loader does with a module's code: fm-edge's own
        # modules from its own archive, never anything a pipeline or the network supplies.
        exec(self.get_code(module.__name__, module.__spec__.origin), module.__dict__)

    def get_code(self, name, origin=None):
        source = self.importer.get_source(name)
        if source is None:
            raise ImportError(f"no source for {name} in {self.importer.archive}", name=name)
        data = source.encode("utf-8")
        stamp = MAGIC_NUMBER + source_hash(data)
        cached = self._read(name, stamp)
        if cached is not None:
            # Name this archive in tracebacks, wherever the code was compiled (as
            # importlib does for a __pycache__ file).
            _imp._fix_co_filename(cached, origin or name)
            return cached
        code = compile(data, origin or name, "exec", dont_inherit=True)
        self._write(name, stamp + marshal.dumps(code))
        return code

    def get_source(self, name):
        """For tracebacks (linecache asks the module's loader)."""
        return self.importer.get_source(name)

    def is_package(self, name):
        return self.importer.is_package(name)

    def _read(self, name, stamp):
        if self.folder is None:
            return None
        try:
            with open(os.path.join(self.folder, name + ".pyc"), "rb") as handle:
                data = handle.read()
            if data[:_HEADER] == stamp:
                return marshal.loads(data[_HEADER:])
        except (OSError, ValueError, EOFError, TypeError):
            pass                       # absent or damaged: compile it again
        return None

    def _write(self, name, data):
        if self.folder is None or sys.dont_write_bytecode:
            return
        target = os.path.join(self.folder, name + ".pyc")
        partial = f"{target}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            with open(partial, "wb") as handle:
                handle.write(data)
            os.replace(partial, target)    # readers see the old file or the whole new one
        except OSError:
            try:
                os.unlink(partial)
            except OSError:
                pass
