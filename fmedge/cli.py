"""The `fm-edge` command: parse, call the library, print, map errors to exit codes.

No business logic lives here: every command calls the same runtime/store methods the HTTP
API and library users call.
"""

import argparse
import json
import os
import sys

from . import __version__
from .config import (FIELD_BY_NAME, EdgeConfig, mask, set_config_value, unknown_key_message,
                     unset_config_value)
from .errors import ConfigError, FmEdgeError, UsageError

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_FAILED = 1          # a run failed, or an unexpected error
EXIT_USAGE = 2           # bad input, configuration or storage problem
EXIT_OFFLINE = 3         # cloud unreachable
EXIT_BUSY = 4            # busy or locked
EXIT_AUTH = 5            # the cloud refused the api_key
EXIT_INTERRUPTED = 130   # Ctrl-C


def main(argv=None):
    """Entry point of `fm-edge` and `python3 fm-edge.pyz`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=requested_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args)
    try:
        return args.handler(args) or EXIT_OK
    except FmEdgeError as exc:
        _print_error(args, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fm-edge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `fm-edge list | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# -- parser ---------------------------------------------------------------------------------

def build_parser(only=None):
    """The whole CLI, or with ``only`` one command: building all fifteen sub-parsers is
    a noticeable share of a cold `fm-edge run`, and a command line names just one."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="fm-edge", parents=[_common_options(defaults=True)],
        description="Run FlowMason pipelines on this device, offline first.",
        epilog="exit codes: 0 ok, 1 run failed, 2 bad input/config/storage, 3 offline, "
               "4 busy, 5 auth failed, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"fm-edge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, register in _COMMANDS.items():
        if only is None or name == only:
            register(commands, common)
    return parser


_VALUE_OPTIONS = ("--data-dir", "--set", "--log-level", "--log-format")


def requested_command(argv):
    """The command an argument list names (its first positional argument), when it is one
    of ours; None (build everything) when unsure."""
    takes_value = False
    for arg in argv:
        if takes_value:
            takes_value = False
        elif arg.startswith("-"):
            # argparse accepts unambiguous prefixes (--data for --data-dir).
            takes_value = "=" not in arg and len(arg) > 2 and any(
                option.startswith(arg) for option in _VALUE_OPTIONS)
        else:
            return arg if arg in _COMMANDS else None
    return None


def _common_options(defaults=False):
    """Options accepted before or after the command (`fm-edge --json list` = `list --json`)."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=default(None), metavar="DIR",
                        help="data directory (default: $FLOWMASON_EDGE_DATA_DIR, "
                             "/var/flowmason/edge, or ~/.flowmason/edge)")
    common.add_argument("--set", dest="overrides", action="append", default=default([]),
                        metavar="KEY=VALUE", help="override one setting for this command")
    common.add_argument("--json", action="store_true", default=default(False),
                        help="print machine-readable JSON")
    common.add_argument("--log-level", default=default("warning"),
                        choices=("debug", "info", "warning", "error"), help="log verbosity")
    common.add_argument("--log-format", default=default("text"), choices=("text", "json"),
                        help="log lines as text or one JSON object per line")
    return common


def _command(commands, common, name, handler, help_text):
    sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def _add_config(commands, common):
    sub = _command(commands, common, "config", None, "show or change settings")
    actions = sub.add_subparsers(dest="action", metavar="ACTION", required=True)
    setter = actions.add_parser("set", parents=[common], help="save a setting")
    setter.add_argument("key")
    setter.add_argument("value")
    setter.set_defaults(handler=cmd_config_set)
    getter = actions.add_parser("get", parents=[common], help="print one effective setting")
    getter.add_argument("key")
    getter.add_argument("--reveal", action="store_true", help="print a secret unmasked")
    getter.set_defaults(handler=cmd_config_get)
    unsetter = actions.add_parser("unset", parents=[common], help="remove a saved setting")
    unsetter.add_argument("key")
    unsetter.set_defaults(handler=cmd_config_unset)
    shower = actions.add_parser("show", parents=[common],
                                help="every effective setting and where it comes from")
    shower.set_defaults(handler=cmd_config_show)


def _add_add(commands, common):
    sub = _command(commands, common, "add", cmd_add,
                   "store pipeline documents on this device")
    sub.add_argument("files", nargs="+", metavar="FILE",
                     help="pipeline JSON file(s); '-' reads standard input (needs --id)")
    sub.add_argument("--id", dest="pipeline_id",
                     help="pipeline id (default: the document's 'id', else the file name)")


def _add_serve(commands, common):
    sub = _command(commands, common, "serve", cmd_serve,
                   "run the local HTTP API in the foreground (systemd, Docker)")
    _bind_options(sub)


def _bind_options(sub):
    sub.add_argument("--host", help="address to bind (default: the host setting, 127.0.0.1)")
    sub.add_argument("--port", type=int, help="port to bind (default: the port setting, 8080)")


def _add_start(commands, common):
    sub = _command(commands, common, "start", cmd_start,
                   "start the runtime and HTTP API in the background (pidfile and log file "
                   "in the data dir)")
    _bind_options(sub)
    sub.add_argument("--foreground", action="store_true", help="same as `serve`")


def _add_stop(commands, common):
    sub = _command(commands, common, "stop", cmd_stop,
                   "stop the background runtime: running runs finish or are interrupted "
                   "within the grace period")
    sub.add_argument("--force", action="store_true", help="kill at once (SIGKILL)")
    sub.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                     help="how long to wait before killing (default 20)")


def _add_models(commands, common):
    sub = _command(commands, common, "models", None, "list, import, download or remove models")
    actions = sub.add_subparsers(dest="action", metavar="ACTION", required=True)
    lister = actions.add_parser("list", parents=[common], help="cached models (and the "
                                "backend's, for ollama/openai)")
    lister.set_defaults(handler=cmd_models_list)
    adder = actions.add_parser("add", parents=[common],
                               help="import a GGUF file (e.g. from a USB stick)")
    adder.add_argument("file")
    adder.add_argument("--name", help="model name (default: the file name without .gguf)")
    adder.set_defaults(handler=cmd_models_add)
    puller = actions.add_parser("pull", parents=[common],
                                help="download a model from the cloud (or --url); with the "
                                     "ollama backend, ask Ollama to pull it")
    puller.add_argument("name")
    puller.add_argument("--url", help="download from this URL instead of the cloud")
    puller.add_argument("--sha256", help="expected sha256 of the file (for --url)")
    puller.set_defaults(handler=cmd_models_pull)
    remover = actions.add_parser("rm", parents=[common], help="remove a cached model")
    remover.add_argument("name")
    remover.set_defaults(handler=cmd_models_rm)


def _add_doctor(commands, common):
    _command(commands, common, "doctor", cmd_doctor,
             "check the LLM backend, models, llama-cpp-python, data dir, disk and cloud")


def _add_export(commands, common):
    sub = _command(commands, common, "export", cmd_export,
                   "write an air-gapped bundle: pipelines, models, results; signed with "
                   "bundle_key when set")
    sub.add_argument("bundle", metavar="BUNDLE")
    sub.add_argument("--pipelines", metavar="IDS", help="comma-separated ids (default: all)")
    sub.add_argument("--models", metavar="NAMES", help="comma-separated model names")
    sub.add_argument("--results", action="store_true",
                     help="include results not yet synced (for tools/studio.py import-bundle)")


def _add_import(commands, common):
    sub = _command(commands, common, "import", cmd_import,
                   "verify a bundle completely, then install its pipelines and models")
    sub.add_argument("bundle", metavar="BUNDLE")


def _add_run(commands, common):
    sub = _command(commands, common, "run", cmd_run,
                   "run a pipeline on this device and print its result")
    sub.add_argument("pipeline", metavar="PIPELINE",
                     help="a cached pipeline id, a bundled example id, or a pipeline JSON file")
    sub.add_argument("--input", "-i", dest="input", metavar="FILE|-|JSON",
                     help="inputs: a JSON file, '-' for standard input, or inline JSON "
                          "(default: {})")
    sub.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="time limit for this run (default: execution_timeout)")


def _add_sync(commands, common):
    sub = _command(commands, common, "sync", cmd_sync,
                   "one sync pass with the cloud (results up, pipelines down); for cron")
    sub.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                     help="how long to wait for another sync to finish before giving up "
                          "with exit code 4 (default 5)")


def _add_list(commands, common):
    _command(commands, common, "list", cmd_list, "list cached pipelines")


def _add_remove(commands, common):
    sub = _command(commands, common, "remove", cmd_remove, "remove a cached pipeline")
    sub.add_argument("pipeline_id", metavar="ID")


def _add_clear_cache(commands, common):
    sub = _command(commands, common, "clear-cache", cmd_clear_cache,
                   "delete cached pipelines, models and/or synced results "
                   "(all three when no kind is given)")
    sub.add_argument("--pipelines", action="store_true", help="cached pipelines")
    sub.add_argument("--models", action="store_true", help="cached model files")
    sub.add_argument("--results", action="store_true",
                     help="synced and quarantined results")
    sub.add_argument("--include-pending", action="store_true",
                     help="with --results: also results not yet synced (they are lost)")
    sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _add_status(commands, common):
    _command(commands, common, "status", cmd_status,
             "daemon, data dir, cached pipelines, results waiting to sync, disk free")


_COMMANDS = {"serve": _add_serve, "start": _add_start, "stop": _add_stop, "status": _add_status,
             "run": _add_run, "sync": _add_sync, "config": _add_config, "add": _add_add,
             "list": _add_list, "remove": _add_remove, "clear-cache": _add_clear_cache,
             "models": _add_models, "doctor": _add_doctor, "export": _add_export,
             "import": _add_import}


# -- helpers --------------------------------------------------------------------------------

def load_config(args):
    """The effective configuration: defaults < file < env < --data-dir/--set flags."""
    flags = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        if key.strip() not in FIELD_BY_NAME:
            raise ConfigError(unknown_key_message(key.strip(), "--set"))
        flags[key.strip()] = value
    return EdgeConfig.load(data_dir=args.data_dir, flags=flags)


def make_runtime(args):
    from .runtime import EdgeRuntime

    return EdgeRuntime(load_config(args))


def emit(args, data, human):
    """Print ``data`` as JSON with --json, else the human text (a string or lines)."""
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(human if isinstance(human, str) else "\n".join(human))


def _print_error(args, exc):
    if getattr(args, "json", False):
        body = {"error": {"code": exc.code, "message": str(exc)}}
        print(json.dumps(body), file=sys.stderr)
    else:
        print(f"fm-edge: error: {exc}", file=sys.stderr)


def _setup_logging(args, log_dir=None, secrets=()):
    from .logs import setup_logging

    return setup_logging(args.log_level, args.log_format, log_dir=log_dir, secrets=secrets)


def confirm(question, args):
    """Ask on a terminal unless --yes; scripts (no terminal) are not asked."""
    if args.yes or not sys.stdin.isatty():
        return True
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _daemon_line(daemon):
    if not daemon["running"]:
        return "daemon:        not running (start it with `fm-edge start`)"
    health = daemon.get("health") or {}
    checks = health.get("checks") or {}
    sync = checks.get("sync") or {}
    online = sync.get("state") or ("error" if "error" in health else "no cloud")
    return (f"daemon:        running, pid {daemon['pid']}, {daemon['url']}, up "
            f"{daemon['uptime_s']:.0f} s, sync {online}")


def _human_bytes(count):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024.0
    return f"{count} B"


# -- commands -------------------------------------------------------------------------------

def cmd_config_set(args):
    config = load_config(args)
    value = set_config_value(config.data_dir, args.key, args.value)
    shown = mask(value) if FIELD_BY_NAME[args.key].secret else value
    emit(args, {"key": args.key, "value": shown, "file": config.config_file},
         f"{args.key} = {_show(shown)}  (saved in {config.config_file})")


def cmd_config_get(args):
    config = load_config(args)
    spec = FIELD_BY_NAME.get(args.key)
    if spec is None:
        raise ConfigError(unknown_key_message(args.key))
    value = getattr(config, args.key)
    if spec.secret and not args.reveal:
        value = mask(value)
    emit(args, {"key": args.key, "value": value, "source": config.sources[args.key]},
         _show(value))


def cmd_config_unset(args):
    config = load_config(args)
    removed = unset_config_value(config.data_dir, args.key)
    text = f"{args.key} removed from {config.config_file}" if removed else (
        f"{args.key} was not set in {config.config_file}")
    emit(args, {"key": args.key, "removed": removed}, text)


def cmd_config_show(args):
    config = load_config(args)
    values = config.as_dict(mask_secrets=True)
    rows = [{"key": k, "value": v, "source": config.sources[k]} for k, v in values.items()]
    width = max(len(k) for k in values)
    lines = [f"{r['key']:<{width}}  {_show(r['value'])}   ({r['source']})" for r in rows]
    emit(args, {r["key"]: {"value": r["value"], "source": r["source"]} for r in rows}, lines)


def _show(value):
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def cmd_add(args):
    from .pipeline_files import read_pipeline_files

    documents = read_pipeline_files(args.files, args.pipeline_id)
    runtime = make_runtime(args)
    # Validate every document before storing any: a bad file stores nothing.
    for pipeline_id, document, path in documents:
        parsed = runtime.pipelines.validator(document, pipeline_id)
        for warning in getattr(parsed, "warnings", ()):
            print(f"fm-edge: warning: {path}: {warning}", file=sys.stderr)
    entries = [runtime.pipelines.store_now(pipeline_id, document, source="local")
               for pipeline_id, document, _ in documents]
    emit(args, entries, [f"added {e['id']} (version {e['version']}, "
                         f"sha256 {e['sha256'][:12]})" for e in entries])


def cmd_models_list(args):
    from .cache.models import list_models

    report = list_models(load_config(args))
    lines = [f"{'NAME':<28} {'SIZE':>10}  {'SHA256':<14} LAST USED"]
    lines += [f"{m['name']:<28} {_human_bytes(m['size']):>10}  "
              f"{(m.get('sha256') or '?')[:12]:<14} "
              f"{_when(m['last_used']) if m.get('last_used') else '-'}"
              for m in report["models"]]
    if report.get("backend_models") is not None:
        lines.append(f"{report['backend']} has: " + (", ".join(report["backend_models"])
                                                      or "no models"))
    if report.get("backend_error"):
        lines.append(f"{report['backend']}: {report['backend_error']}")
    emit(args, report, lines)


def cmd_models_add(args):
    from .cache.models import add_model

    entry = add_model(load_config(args), args.file, name=args.name,
                      progress=False if args.json else None)
    emit(args, entry, f"added model {entry['name']} ({_human_bytes(entry['size'])}, "
                      f"sha256 {entry['sha256'][:12]})")


def cmd_models_pull(args):
    from .cache.models import pull_model

    entry = pull_model(load_config(args), args.name, url=args.url, sha256=args.sha256,
                       progress=False if args.json else None)
    emit(args, entry, f"model {entry['name']} is ready")


def cmd_models_rm(args):
    from .cache.models import remove_model

    emit(args, remove_model(load_config(args), args.name), f"removed model {args.name}")


def cmd_doctor(args):
    from .doctor import doctor_report, exit_code, format_report

    report = doctor_report(load_config(args))
    emit(args, report, format_report(report))
    return exit_code(report)


def cmd_export(args):
    from .bundle import export_bundle

    def ids(text):
        return [item.strip() for item in text.split(",") if item.strip()] if text else None

    report = export_bundle(make_runtime(args), args.bundle, pipelines=ids(args.pipelines),
                           models=ids(args.models) or None, results=args.results)
    emit(args, report, f"wrote {report['bundle']}: {len(report['pipelines'])} pipelines, "
                       f"{len(report['models'])} models, "
                       f"{(report['results'] or {}).get('count', 0)} results, "
                       f"{'signed' if report['signed'] else 'unsigned'}")


def cmd_import(args):
    from .bundle import import_bundle

    report = import_bundle(make_runtime(args), args.bundle)
    lines = [f"{p['id']} {p['version']}: {p['status']}" for p in report["pipelines"]]
    lines += [f"model {m['name']}: {m['status']}" for m in report["models"]]
    emit(args, report, lines or "nothing to import")


def cmd_serve(args):
    from . import daemon
    from .server import serve

    config = load_config(args)
    runtime = _runtime_for(config)
    _setup_logging(args, log_dir=os.path.join(config.data_dir, "logs"),
                   secrets=(config.api_key, config.api_token, config.llm_api_key))

    def ready(host, port):
        daemon.claim_pidfile(config, host, port)
        print(f"fm-edge: serving on http://{host}:{port} (data dir {config.data_dir})",
              file=sys.stderr, flush=True)

    try:
        return serve(runtime, args.host, args.port, on_ready=ready)
    finally:
        daemon.release_pidfile(config)


def _runtime_for(config):
    from .runtime import EdgeRuntime

    return EdgeRuntime(config)


def cmd_start(args):
    if args.foreground:
        return cmd_serve(args)
    from . import daemon

    config = load_config(args)
    options = ["--data-dir", config.data_dir, "--log-level", args.log_level,
               "--log-format", args.log_format]
    for item in args.overrides:
        options += ["--set", item]
    serve = daemon.serve_command(options)
    if args.host:
        serve += ["--host", args.host]
    if args.port is not None:
        serve += ["--port", str(args.port)]
    logs = os.path.join(config.data_dir, "logs")
    # The daemon logs to fm-edge.log itself (rotated); fm-edge.out catches anything a
    # crash prints before logging is set up.
    info = daemon.start_background(config, serve, os.path.join(logs, "fm-edge.out"))
    url = f"http://{info['host']}:{info['port']}"
    log_path = os.path.join(logs, "fm-edge.log")
    emit(args, dict(info, url=url, log=log_path, owner=None),
         f"fm-edge started (pid {info['pid']}) on {url}; log: {log_path}")


def cmd_stop(args):
    from . import daemon

    report = daemon.stop_daemon(load_config(args), timeout_s=args.timeout, force=args.force)
    text = (f"fm-edge stopped (pid {report['pid']})" if report["stopped"]
            else "fm-edge is not running")
    emit(args, report, text)


def cmd_run(args):
    from .run_command import run_pipeline

    result = run_pipeline(load_config(args), args.pipeline, args.input, args.timeout)
    data = result.to_dict()
    if args.json:
        emit(args, data, "")
    else:
        print(f"status:   {result.status}", file=sys.stderr)
        print(f"run id:   {result.run_id}", file=sys.stderr)
        print(f"duration: {result.duration_ms:.1f} ms", file=sys.stderr)
        if result.error:
            where = f" (stage {result.failed_stage})" if result.failed_stage else ""
            print(f"error:    {result.error}{where}", file=sys.stderr)
        print(json.dumps(result.output, indent=2, sort_keys=True, default=str))
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_sync(args):
    from .sync.once import sync_once

    report = sync_once(make_runtime(args), wait_lock_s=args.wait)
    emit(args, report.to_dict(), report.to_text() if hasattr(report, "to_text")
         else report.message)
    return report.exit_code


def cmd_list(args):
    entries = make_runtime(args).pipelines.list_now()
    lines = [f"{'ID':<32} {'VERSION':<10} {'SOURCE':<7} {'SIZE':>9}  LAST USED"]
    lines += [f"{e['id']:<32} {e['version']:<10} {e['source']:<7} "
              f"{_human_bytes(e['size']):>9}  {_when(e['last_used_at'])}" for e in entries]
    emit(args, entries, lines if entries else "no pipelines cached; add one with "
                                              "`fm-edge add FILE`")


def _when(timestamp):
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_remove(args):
    removed = make_runtime(args).pipelines.remove_now(args.pipeline_id)
    if not removed:
        from .errors import NotFoundError

        raise NotFoundError(f"pipeline {args.pipeline_id} is not cached; "
                            "`fm-edge list` shows the cached ones")
    emit(args, {"removed": args.pipeline_id}, f"removed {args.pipeline_id}")


def cmd_clear_cache(args):
    kinds = [k for k in ("pipelines", "models", "results") if getattr(args, k)]
    kinds = kinds or ["pipelines", "models", "results"]
    if args.include_pending and "results" not in kinds:
        raise UsageError("--include-pending only applies with --results")
    runtime = make_runtime(args)
    warning = " (including results NOT yet synced: they will be lost)" if (
        args.include_pending) else ""
    if not confirm(f"Delete cached {', '.join(kinds)}{warning} in "
                   f"{runtime.config.data_dir}?", args):
        print("nothing deleted", file=sys.stderr)
        return EXIT_USAGE
    from .maintenance import clear_cache

    report = clear_cache(runtime, kinds, include_pending=args.include_pending)
    emit(args, report, [f"{kind}: {count} removed" for kind, count in report.items()
                        if kind != "pending_kept"] + (
        [f"kept {report['pending_kept']} results not yet synced "
         "(--include-pending deletes them)"] if report.get("pending_kept") else []))


def cmd_status(args):
    from .daemon import daemon_status

    runtime = make_runtime(args)
    status = runtime.status()
    status["daemon"] = daemon_status(runtime.config)
    results = status["results"]
    lines = [_daemon_line(status["daemon"]),
        f"data dir:      {status['data_dir']}",
        f"device id:     {status['device_id']}",
        f"cloud:         {status['cloud_url'] or 'not configured (offline only)'}",
        f"llm:           {status['llm_backend']} / {status['llm_model']}",
        f"pipelines:     {status['pipelines']} cached",
        f"results:       {results['pending']} pending sync, {results['synced']} synced, "
        f"{results['quarantined']} quarantined, {results['running']} running",
        f"result store:  {_human_bytes(results['bytes'])} of "
        f"{_human_bytes(results['max_bytes'])}",
        f"disk free:     {_human_bytes(status['disk_free_bytes'])}",
    ]
    emit(args, status, lines)
