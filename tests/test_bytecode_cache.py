"""The on-disk bytecode cache that fm-edge.pyz loads its modules through."""

import marshal
import os
import subprocess
import sys
import traceback
import zipfile

import pytest

from conftest import ROOT, clean_env
from fmedge.bytecode_cache import _HEADER, ZipBytecodeFinder, cache_dir

PACKAGE = "bcdemo"


def make_archive(path, value=1):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{PACKAGE}/__init__.py", "")
        archive.writestr(f"{PACKAGE}/sub/__init__.py", "")
        archive.writestr(f"{PACKAGE}/sub/mod.py",
                         f"VALUE = {value}\n\n\ndef fail():\n    raise ValueError('boom')\n")
    return str(path)


@pytest.fixture
def load(monkeypatch):
    """load(archive, folder) -> bcdemo.sub.mod imported through a fresh finder."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)   # as under `python3 -I`

    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] == PACKAGE]:
            del sys.modules[name]

    def importer(archive, folder):
        forget()
        finder = ZipBytecodeFinder(archive, folder, packages=(PACKAGE,))
        sys.meta_path.insert(0, finder)
        try:
            __import__(f"{PACKAGE}.sub.mod")
            return sys.modules[f"{PACKAGE}.sub.mod"]
        finally:
            sys.meta_path.remove(finder)

    yield importer
    forget()


def cached_file(folder):
    return os.path.join(folder, f"{PACKAGE}.sub.mod.pyc")


def test_first_import_compiles_and_caches_then_the_cache_is_used(tmp_path, load):
    archive, folder = make_archive(tmp_path / "a.zip"), str(tmp_path / "cache")
    module = load(archive, folder)
    assert module.VALUE == 1
    assert module.__file__ == os.path.join(archive, PACKAGE, "sub", "mod.py")
    assert os.path.exists(cached_file(folder))
    # Swap the cached code for other code under the same source stamp: what the next
    # import runs is then visibly the cache's.
    with open(cached_file(folder), "rb") as handle:
        stamp = handle.read()[:_HEADER]
    planted = compile("VALUE = 'from the cache'\n", "elsewhere.py", "exec")
    with open(cached_file(folder), "wb") as handle:
        handle.write(stamp + marshal.dumps(planted))
    module = load(archive, folder)
    assert module.VALUE == "from the cache"


def test_changed_source_is_recompiled_and_recached(tmp_path, load):
    folder = str(tmp_path / "cache")
    assert load(make_archive(tmp_path / "a.zip", value=1), folder).VALUE == 1
    assert load(make_archive(tmp_path / "b.zip", value=2), folder).VALUE == 2
    assert load(make_archive(tmp_path / "c.zip", value=2), folder).VALUE == 2


def test_damaged_cache_file_is_ignored_and_rewritten(tmp_path, load):
    archive, folder = make_archive(tmp_path / "a.zip"), str(tmp_path / "cache")
    load(archive, folder)
    with open(cached_file(folder), "rb") as handle:
        good = handle.read()
    with open(cached_file(folder), "wb") as handle:
        handle.write(good[:_HEADER] + b"\x00garbage")
    assert load(archive, folder).VALUE == 1
    with open(cached_file(folder), "rb") as handle:
        assert handle.read() == good


def test_unwritable_or_disabled_cache_still_imports(tmp_path, load):
    archive = make_archive(tmp_path / "a.zip")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    assert load(archive, str(blocker / "cache")).VALUE == 1
    assert load(archive, None).VALUE == 1
    assert not list(tmp_path.glob("**/*.pyc"))


def test_tracebacks_name_the_archive_and_show_the_source_line(tmp_path, load):
    archive, folder = make_archive(tmp_path / "a.zip"), str(tmp_path / "cache")
    load(archive, folder)
    module = load(make_archive(tmp_path / "moved.zip"), folder)   # from the cache
    with pytest.raises(ValueError) as caught:
        module.fail()
    frame = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert frame.filename == os.path.join(str(tmp_path / "moved.zip"), PACKAGE, "sub", "mod.py")
    assert frame.line == "raise ValueError('boom')"


def test_cache_dir_settings(tmp_path):
    tag = sys.implementation.cache_tag
    assert cache_dir({"FM_EDGE_BYTECODE_CACHE": "off"}) is None
    assert cache_dir({"FM_EDGE_BYTECODE_CACHE": str(tmp_path)}) == str(tmp_path / tag)
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "fm-edge", "bytecode",
                                                               tag)


def test_pyz_fills_the_cache_and_runs_from_it(tmp_path):
    pyz, folder = str(tmp_path / "fm.pyz"), tmp_path / "cache"
    subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output", pyz],
                   check=True, stdout=subprocess.PIPE)
    env = clean_env(FM_EDGE_BYTECODE_CACHE=str(folder))
    command = [sys.executable, "-I", pyz, "--data-dir", str(tmp_path / "d"), "run",
               "data-processor", "--input", '{"sensor_data": [1, 2, 3]}', "--json"]
    outputs = []
    for _ in range(2):     # the first run compiles and caches, the second loads the cache
        done = subprocess.run(command, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    cached = {p.name for p in folder.glob("*/*.pyc")}
    assert {"fmedge.cli.pyc", "fmedge.pipeline.executor.pyc"} <= cached
    assert '"status": "completed"' in outputs[1]
    assert zipfile.ZipFile(pyz).namelist().count("fmedge/cli.pyc") == 0


def test_respects_dont_write_bytecode(tmp_path, load, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)   # python3 -B
    assert load(make_archive(tmp_path / "a.zip"), str(tmp_path / "cache")).VALUE == 1
    assert not (tmp_path / "cache").exists()
