"""The deployment files in tools/deploy/: systemd unit, Dockerfile, entrypoint, cron line.

Each is checked by running what can run here (no Docker engine, no systemd as PID 1):

- docker-entrypoint.sh runs under ``sh`` against a freshly built fm-edge.pyz
  (``FM_EDGE_PYZ``): the seed's CLOUD_URL/API_KEY reach fm-edge (``config show``), ``serve``
  execs fm-edge (same pid, SIGTERM exits 0), a missing api_token is generated once and
  required by the API, and it refuses clearly when it cannot work;
- the Dockerfile's own HEALTHCHECK command is run against that server; its build stage is
  replayed from exactly the files it COPYs; every path it names exists and agrees with the
  entrypoint;
- the systemd unit passes ``systemd-analyze verify`` without a warning and holds the
  directives the design asks for; its ExecStart is a valid fm-edge command;
- the cron line, run through ``sh`` with the file's own environment, exits with the codes
  its comments document (2 no cloud, 0 synced, 5 key refused, 3 offline) and appends a
  JSON report to its log.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT

DEPLOY = os.path.join(ROOT, "tools", "deploy")
ENTRYPOINT = os.path.join(DEPLOY, "docker-entrypoint.sh")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
UNIT = os.path.join(DEPLOY, "fm-edge.service")
CRON = os.path.join(DEPLOY, "fm-edge.cron")
UNIT_DATA_DIR = "/var/lib/fm-edge"
INSTALLED_PYZ = "/opt/fm-edge/fm-edge.pyz"
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """A fresh fm-edge.pyz of this tree, readable by every user (the setpriv test)."""
    folder = tmp_path_factory.mktemp("deploy-pyz")
    target = str(folder / "fm-edge.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output", target],
                   check=True, stdout=subprocess.PIPE)
    return target


def base_env(**extra):
    """A bare environment (like a container's): no FLOWMASON_* leaking in from ours."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_entrypoint(pyz, *args, timeout=60, **env):
    env.setdefault("FM_EDGE_PYZ", pyz)
    env.setdefault("FM_EDGE_PYTHON", sys.executable)
    return subprocess.run(["sh", ENTRYPOINT] + list(args), env=base_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def wait_for(predicate, what, proc=None, deadline_s=DEADLINE_S):
    """Poll ``predicate`` until truthy; fail at the deadline or when ``proc`` exits."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) while waiting for "
                                 f"{what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_pidfile(data_dir):
    try:
        with open(os.path.join(data_dir, "fm-edge.pid"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def http_get(port, path, token=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# == Dockerfile parsing =====================================================================

def dockerfile_instructions(path=DOCKERFILE):
    """[(INSTRUCTION, arguments)] with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#"):
                continue          # comments, also inside a continued instruction
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line:
                word, _, rest = line.partition(" ")
                instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages():
    """[{"name", "image", "instructions"}] per FROM."""
    stages = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"image": parts[0], "name": name, "instructions": []})
        else:
            assert stages, f"{word} before the first FROM"
            stages[-1]["instructions"].append((word, rest))
    return stages


def copy_parts(arguments):
    """(flags, sources, destination) of a COPY instruction (shell or JSON form)."""
    words = shlex.split(arguments)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    if arguments.lstrip().startswith("["):
        paths = json.loads(arguments)
    return flags, paths[:-1], paths[-1]


def healthcheck_command():
    for word, rest in dockerfile_instructions():
        if word == "HEALTHCHECK":
            _, _, command = rest.partition("CMD ")
            return json.loads(command)
    raise AssertionError("the Dockerfile has no HEALTHCHECK")


def entrypoint_default(name):
    """The default the entrypoint script gives ``name`` (``${NAME:-default}``)."""
    with open(ENTRYPOINT, encoding="utf-8") as handle:
        match = re.search(r"\$\{" + name + r":-([^}]*)\}", handle.read())
    assert match, f"the entrypoint gives {name} no default"
    return match.group(1)


# == entrypoint ==============================================================================

def test_entrypoint_is_posix_sh():
    with open(ENTRYPOINT, encoding="utf-8") as handle:
        assert handle.readline().strip() == "#!/bin/sh"
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            checked = subprocess.run([shell, "-n", ENTRYPOINT], stderr=subprocess.PIPE,
                                     universal_newlines=True)
            assert checked.returncode == 0, (shell, checked.stderr)


def test_entrypoint_maps_the_seed_variables_onto_fm_edge(pyz, tmp_path):
    data = str(tmp_path / "edge")
    seed = {"CLOUD_URL": "https://studio.example.test", "API_KEY": "seed-api-key-0123456789"}
    shown = run_entrypoint(pyz, "config", "show", "--json", FLOWMASON_EDGE_DATA_DIR=data,
                           **seed)
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert config["cloud_url"] == {"value": seed["CLOUD_URL"], "source": "env"}
    assert config["api_key"]["source"] == "env"
    assert config["api_key"]["value"] != seed["API_KEY"]        # still masked
    assert config["data_dir"] == {"value": data, "source": "env"}
    revealed = run_entrypoint(pyz, "config", "get", "api_key", "--reveal", "--json",
                              FLOWMASON_EDGE_DATA_DIR=data, **seed)
    assert json.loads(revealed.stdout)["value"] == seed["API_KEY"], revealed.stderr
    token = run_entrypoint(pyz, "config", "get", "api_token", "--reveal", "--json",
                           FLOWMASON_EDGE_DATA_DIR=data, API_TOKEN="seed-token-abcdef")
    assert json.loads(token.stdout) == {"key": "api_token", "value": "seed-token-abcdef",
                                        "source": "env"}
    # A command other than serve runs once and creates nothing (no token is generated).
    assert not os.path.exists(os.path.join(data, "config.json"))


def test_an_explicit_fm_edge_variable_wins_over_the_seed_name(pyz, tmp_path):
    shown = run_entrypoint(pyz, "config", "get", "cloud_url", "--json",
                           FLOWMASON_EDGE_DATA_DIR=str(tmp_path / "edge"),
                           CLOUD_URL="https://seed.example.test",
                           FLOWMASON_CLOUD_URL="https://explicit.example.test")
    assert json.loads(shown.stdout)["value"] == "https://explicit.example.test"
    assert "CLOUD_URL and FLOWMASON_CLOUD_URL are set and differ" in shown.stderr


def test_the_data_dir_defaults_to_the_volume(pyz):
    shown = run_entrypoint(pyz, "config", "get", "data_dir", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"key": "data_dir", "value": "/var/flowmason/edge",
                                        "source": "env"}
    docker_env = [rest for word, rest in dockerfile_stages()[-1]["instructions"]
                  if word == "ENV"]
    assert any("FLOWMASON_EDGE_DATA_DIR=/var/flowmason/edge" in env for env in docker_env)


def start_entrypoint(pyz, data, **env):
    proc = subprocess.Popen(
        ["sh", ENTRYPOINT], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        universal_newlines=True,
        env=base_env(FM_EDGE_PYZ=pyz, FM_EDGE_PYTHON=sys.executable,
                     FLOWMASON_EDGE_DATA_DIR=data, FLOWMASON_EDGE_HOST="127.0.0.1",
                     FLOWMASON_EDGE_PORT="0", **env))
    def serving():
        info = read_pidfile(data)
        return info if info and info.get("pid") == proc.pid else None

    info = wait_for(serving, "the entrypoint's fm-edge to serve", proc)
    return proc, info["port"]


def stop_entrypoint(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stderr.close()
    return code, err


def run_healthcheck(port):
    command = healthcheck_command()
    assert command[0] == "python3"
    return subprocess.run([sys.executable] + command[1:], env=base_env(
        FLOWMASON_EDGE_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=60).returncode


def test_serve_execs_fm_edge_with_a_generated_token_and_passes_the_healthcheck(pyz, tmp_path):
    data = str(tmp_path / "edge")
    proc, port = start_entrypoint(pyz, data, CLOUD_URL="https://studio.example.test",
                                  API_KEY="seed-api-key-0123456789")
    try:
        # exec: the pid the shell started is fm-edge itself (docker stop's SIGTERM reaches it)
        with open(f"/proc/{proc.pid}/environ", "rb") as handle:
            environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if item)
        assert environ[b"FLOWMASON_API_KEY"] == b"seed-api-key-0123456789"
        assert environ[b"FLOWMASON_CLOUD_URL"] == b"https://studio.example.test"
        assert b"API_KEY" not in environ and b"API_TOKEN" not in environ
        assert environ[b"FLOWMASON_EDGE_DATA_DIR"] == data.encode()

        token = json.loads(run_entrypoint(pyz, "config", "get", "api_token", "--reveal",
                                          "--json", FLOWMASON_EDGE_DATA_DIR=data).stdout)
        assert token["source"] == "file" and len(token["value"]) >= 32
        assert os.stat(os.path.join(data, "config.json")).st_mode & 0o777 == 0o600
        assert http_get(port, "/health")[0] == 200
        assert http_get(port, "/runs")[0] == 401
        assert http_get(port, "/runs", token=token["value"])[0] == 200
        assert run_healthcheck(port) == 0
    finally:
        code, err = stop_entrypoint(proc)
    assert code == 0, err
    assert "generated one and saved it in " + os.path.join(data, "config.json") in err
    assert token["value"] not in err
    assert run_healthcheck(port) != 0        # nothing answers: the check fails

    # The next start keeps the saved token and generates nothing.
    proc, port = start_entrypoint(pyz, data)
    code, err = stop_entrypoint(proc)
    assert code == 0, err
    assert "generated" not in err
    again = json.loads(run_entrypoint(pyz, "config", "get", "api_token", "--reveal", "--json",
                                      FLOWMASON_EDGE_DATA_DIR=data).stdout)
    assert again["value"] == token["value"]


def test_serve_without_a_token_refuses_when_generation_is_off(pyz, tmp_path):
    data = str(tmp_path / "edge")
    refused = run_entrypoint(pyz, "serve", FLOWMASON_EDGE_DATA_DIR=data,
                             FM_EDGE_GENERATE_TOKEN="0")
    assert refused.returncode == 2
    assert "no api_token is set" in refused.stderr and "API_TOKEN" in refused.stderr
    assert not os.path.exists(os.path.join(data, "config.json"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the script as another user")
def test_serve_refuses_a_data_dir_it_cannot_write(pyz):
    folder = tempfile.mkdtemp(prefix="fm-edge-deploy-")
    try:
        os.chmod(folder, 0o755)
        shutil.copy(pyz, os.path.join(folder, "fm-edge.pyz"))
        volume = os.path.join(folder, "volume")            # root-owned, like a fresh host dir
        os.mkdir(volume, 0o755)
        refused = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", ENTRYPOINT],
            env=base_env(FM_EDGE_PYZ=os.path.join(folder, "fm-edge.pyz"),
                         FM_EDGE_PYTHON=sys.executable, HOME=folder,
                         FLOWMASON_EDGE_DATA_DIR=os.path.join(volume, "edge")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            timeout=60)
    finally:
        shutil.rmtree(folder)
    assert refused.returncode == 2, refused.stderr
    assert "not writable by uid 65534" in refused.stderr
    assert "chown -R 65534:65534" in refused.stderr


# == Dockerfile ==============================================================================

def test_dockerfile_stages_use_python_3_11_slim_and_name_existing_files():
    stages = dockerfile_stages()
    assert len(stages) == 2 and all(s["image"] == "python:3.11-slim" for s in stages)
    build, final = stages
    names = {s["name"] for s in stages if s["name"]}
    runs = " && ".join(rest for word, rest in build["instructions"] if word == "RUN")
    workdir = [rest for word, rest in build["instructions"] if word == "WORKDIR"][-1]
    assert "python3 build_pyz.py --output fm-edge.pyz" in runs
    copied = {}
    for stage in stages:
        for word, rest in stage["instructions"]:
            assert word != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
            if word != "COPY":
                continue
            flags, sources, destination = copy_parts(rest)
            origin = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if origin:
                assert origin[0] in names and stage is final
                assert sources == [workdir + "/fm-edge.pyz"]     # what the RUN built
            else:
                for source in sources:        # relative to the build context: the repo
                    assert os.path.exists(os.path.join(ROOT, source)), source
            copied.update({os.path.basename(s.rstrip("/")): destination for s in sources})
    final_words = dict(final["instructions"])
    assert copied["fm-edge.pyz"] == entrypoint_default("FM_EDGE_PYZ") == INSTALLED_PYZ
    assert json.loads(final_words["ENTRYPOINT"]) == [copied["docker-entrypoint.sh"]]
    assert json.loads(final_words["CMD"]) == ["serve"]
    assert final_words["VOLUME"] == "/var/flowmason"
    assert final_words["USER"] not in ("root", "0") and final_words["USER"]
    assert final_words["EXPOSE"] == "8080"
    assert entrypoint_default("FLOWMASON_EDGE_DATA_DIR").startswith("/var/flowmason/")
    assert healthcheck_command()[:2] == ["python3", "-I"]


def test_dockerfile_run_lines_are_valid_sh():
    for word, rest in dockerfile_instructions():
        if word == "RUN" and not rest.startswith("["):
            checked = subprocess.run(["sh", "-n", "-c", rest], stderr=subprocess.PIPE,
                                     universal_newlines=True)
            assert checked.returncode == 0, (rest, checked.stderr)


def test_the_build_stage_builds_the_pyz_from_only_the_files_it_copies(tmp_path):
    """Replays the build stage: its COPY sources into an empty WORKDIR, then its RUN."""
    build = dockerfile_stages()[0]
    workdir = tmp_path / "src"
    workdir.mkdir()
    for word, rest in build["instructions"]:
        if word == "COPY":
            _, sources, destination = copy_parts(rest)
            for source in sources:
                target = os.path.join(str(workdir), destination)
                if os.path.isdir(os.path.join(ROOT, source)):
                    shutil.copytree(os.path.join(ROOT, source), target,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(os.path.join(ROOT, source), target)
        elif word == "RUN":
            command = rest.replace("python3 ", sys.executable + " ")
            done = subprocess.run(["sh", "-c", command], cwd=str(workdir), env=base_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip().splitlines()[-1].startswith("fm-edge ")
    assert (workdir / "fm-edge.pyz").exists()


# == systemd unit ============================================================================

def parse_unit(path=UNIT):
    """{section: {key: [values]}} (keys repeat; an empty value resets, as in systemd)."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as handle:
        text = handle.read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def comment_above(directive, path=UNIT):
    """The comment lines right above ``directive`` in the unit file."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    index = lines.index(directive)
    comment = []
    while index > 0 and lines[index - 1].startswith("#"):
        index -= 1
        comment.insert(0, lines[index])
    return "\n".join(comment)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not here")
def test_the_unit_verifies_without_a_warning(tmp_path):
    unit = tmp_path / "fm-edge.service"
    shutil.copy(UNIT, str(unit))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    # verify exits 0 on unknown keys and bad values but prints them: no line about our file
    complaints = [line for line in done.stdout.splitlines() if "fm-edge.service" in line]
    assert done.returncode == 0 and not complaints, done.stdout


def test_the_unit_runs_serve_as_fm_edge_with_the_hardening(pyz):
    from fmedge.server import CANCEL_WAIT_S, SHUTDOWN_GRACE_S

    unit = parse_unit()
    service = {key: values[-1] if values else "" for key, values in unit["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/usr/bin/python3" and INSTALLED_PYZ in argv
    assert argv[argv.index(INSTALLED_PYZ) + 1:] == ["serve"]
    assert service["User"] == "fm-edge"
    assert f"FLOWMASON_EDGE_DATA_DIR={UNIT_DATA_DIR}" in unit["Service"]["Environment"]
    assert service["Restart"] == "on-failure" and float(service["RestartSec"]) > 0
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > SHUTDOWN_GRACE_S + CANCEL_WAIT_S
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "MemoryDenyWriteExecute"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert UNIT_DATA_DIR in service["ReadWritePaths"].split()
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET",
                                                               "AF_INET6"}
    assert service["SystemCallArchitectures"] == "native"
    assert "jetson" in comment_above("PrivateDevices=yes").lower()
    assert "llama" in comment_above("MemoryDenyWriteExecute=yes")
    # The command after the interpreter is a valid fm-edge command.
    helped = subprocess.run([sys.executable] + argv[1:argv.index(INSTALLED_PYZ)] +
                            [pyz, "serve", "--help"], stdout=subprocess.PIPE,
                            universal_newlines=True, env=base_env(), timeout=60)
    assert helped.returncode == 0 and "--host" in helped.stdout


# == cron ====================================================================================

def parse_cron(path=CRON):
    """(environment, [(schedule fields, user, command)]) of a /etc/cron.d file."""
    env, jobs = {}, []
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert text.endswith("\n"), "cron ignores a last line without a newline"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if match:
            env[match.group(1)] = match.group(2)
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not a cron.d job line (5 times, user, command): {line}"
        jobs.append((fields[:5], fields[5], fields[6]))
    return env, jobs


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def cron_job():
    env, jobs = parse_cron()
    assert len(jobs) == 1
    schedule, user, command = jobs[0]
    assert all(CRON_FIELD.match(field) for field in schedule), schedule
    assert schedule[0] == "*/5" and user == "fm-edge"
    return env, command


def test_the_cron_line_is_a_valid_fm_edge_sync(pyz):
    env, command = cron_job()
    assert env["FLOWMASON_EDGE_DATA_DIR"] == UNIT_DATA_DIR
    program, _, log = command.partition(">>")
    assert log.split()[0].startswith(UNIT_DATA_DIR + "/logs/") and "2>&1" in log
    argv = shlex.split(program)
    assert argv[0] == "python3" and INSTALLED_PYZ in argv
    fm_edge_args = argv[argv.index(INSTALLED_PYZ) + 1:]
    assert fm_edge_args == ["sync", "--json"]
    helped = subprocess.run([sys.executable, "-I", pyz] + fm_edge_args + ["--help"],
                            stdout=subprocess.PIPE, universal_newlines=True, env=base_env(),
                            timeout=60)
    assert helped.returncode == 0 and "--wait" in helped.stdout


def json_reports(text):
    """Every JSON object that starts a line of ``text`` (the log also gets stderr)."""
    decoder, reports, index = json.JSONDecoder(), [], 0
    while True:
        index = text.find("{", index)
        if index < 0:
            return reports
        if index == 0 or text[index - 1] == "\n":
            try:
                report, end = decoder.raw_decode(text, index)
                reports.append(report)
                index = end
                continue
            except ValueError:
                pass
        index += 1


def test_the_cron_command_exits_with_the_documented_codes(pyz, tmp_path):
    from studio_fixture import API_KEY, start_studio

    env, command = cron_job()
    data = str(tmp_path / "edge")
    os.makedirs(os.path.join(data, "logs"))
    command = command.replace(INSTALLED_PYZ, pyz).replace(UNIT_DATA_DIR, data)
    cron_env = dict(env, FLOWMASON_EDGE_DATA_DIR=data, HOME=str(tmp_path), LANG="C.UTF-8")
    if not shutil.which("python3", path=cron_env["PATH"]):
        cron_env["PATH"] = os.path.dirname(sys.executable) + ":" + cron_env["PATH"]
    log = os.path.join(data, "logs", "sync.log")

    def cron_pass():
        """One run of the line as cron runs it; (exit code, the report it appended)."""
        before = os.path.getsize(log) if os.path.exists(log) else 0
        done = subprocess.run([cron_env["SHELL"], "-c", command], env=cron_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=120)
        assert done.stdout == "", "everything goes to the log"
        with open(log, encoding="utf-8") as handle:
            handle.seek(before)
            reports = json_reports(handle.read())
        assert len(reports) == 1, reports
        return done.returncode, reports[0]

    def config_set(key, value):
        done = subprocess.run([sys.executable, "-I", pyz, "config", "set", key, value],
                              env=cron_env, stdout=subprocess.PIPE, timeout=60)
        assert done.returncode == 0

    code, report = cron_pass()
    assert code == 2 and report["exit_code"] == 2               # no cloud_url
    studio = start_studio(str(tmp_path))
    try:
        config_set("cloud_url", studio.url)
        config_set("api_key", API_KEY)
        from fmedge.cache import ResultStore

        store = ResultStore(os.path.join(data, "results"), min_free_mb=0)
        store.save_now("cron-run-1", {"pipeline_id": "p", "status": "completed"})
        store.close()
        code, report = cron_pass()
        assert code == 0 and report["exit_code"] == 0 and report["pending"] == 0, report
        config_set("api_key", "not-the-key")
        code, report = cron_pass()
        assert code == 5 and report["exit_code"] == 5, report
        url = studio.url
    finally:
        studio.stop()
    config_set("cloud_url", url)                              # nothing listens there now
    config_set("api_key", API_KEY)
    code, report = cron_pass()
    assert code == 3 and report["exit_code"] == 3, report
