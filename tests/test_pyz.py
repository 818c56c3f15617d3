"""fm-edge.pyz: reproducible, isolated (-I), runs from anywhere, refuses old Pythons."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, clean_env, run_cli


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    out = tmp_path_factory.mktemp("pyz")
    first, second = str(out / "a.pyz"), str(out / "b.pyz")
    for target in (first, second):
        subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output",
                        target], check=True, stdout=subprocess.PIPE)
    return first, second


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_two_builds_are_identical(pyz):
    assert sha256(pyz[0]) == sha256(pyz[1])


def test_bundles_pinned_urllib3_and_no_tests(pyz):
    names = zipfile.ZipFile(pyz[0]).namelist()
    assert "__main__.py" in names and "fmedge/cli.py" in names
    assert "urllib3/__init__.py" in names and "urllib3/LICENSE.txt" in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    version = zipfile.ZipFile(pyz[0]).read("urllib3/_version.py").decode()
    assert "2.5.0" in version


def test_runs_isolated_from_any_directory(pyz, tmp_path):
    command = [sys.executable, "-I", pyz[0]]
    version = run_cli("--version", command=command, cwd=str(tmp_path))
    assert version.code == 0 and version.out.startswith("fm-edge ")
    status = run_cli("--data-dir", str(tmp_path / "d"), "status", "--json", command=command,
                     cwd="/")
    assert status.code == 0 and status.json()["pipelines"] == 0


def test_pyz_uses_its_own_urllib3(pyz, tmp_path):
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import urllib3, fmedge; "
             "print(urllib3.__file__); print(fmedge.__file__)")
    out = subprocess.run([sys.executable, "-I", "-c", probe, pyz[0]], cwd=str(tmp_path),
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    assert all(line.startswith(pyz[0]) for line in out.split())


def test_refuses_python_older_than_3_9(pyz, tmp_path):
    main = zipfile.ZipFile(pyz[0]).read("__main__.py").decode()
    # Run the real entry code under a Python that claims to be 3.8.
    code = "import sys\nsys.version_info = (3, 8, 10)\n" + main
    script = tmp_path / "old.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-I", str(script)], stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 2
    assert proc.stderr == "fm-edge needs Python 3.9 or newer; this is Python 3.8\n"


def test_pip_install_gives_a_working_command(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check", ROOT]
    subprocess.run(pip, check=True, env=clean_env(PIP_NO_CACHE_DIR="0"))
    fm_edge = str(venv / "bin" / "fm-edge")
    version = run_cli("--version", command=[fm_edge], cwd=str(tmp_path))
    assert version.code == 0 and version.out.startswith("fm-edge ")
    status = run_cli("--data-dir", str(tmp_path / "d"), "status", "--json",
                     command=[fm_edge], cwd=str(tmp_path))
    assert status.code == 0 and json.loads(status.out)["results"]["pending"] == 0


def test_slimmed_sources_keep_every_line_number():
    import glob

    sys.path.insert(0, ROOT)
    from build_pyz import slim_source

    for path in glob.glob(os.path.join(ROOT, "fmedge", "**", "*.py"), recursive=True):
        text = open(path, encoding="utf-8").read()
        slim = slim_source(text)
        assert slim.count("\n") == text.count("\n"), path
        compile(slim, path, "exec")
        assert "#" not in "".join(line for line in slim.splitlines()
                                  if line.lstrip().startswith("#"))
