"""Bundles (fm-edge export/import): a round trip between two data dirs gives the same
runs; every tampered bundle is refused with nothing changed; exported results reach the
studio through `tools/studio.py import-bundle`, de-duplicated like uploaded ones; a cloud
pipeline carried by a bundle is adopted by the next sync, not fought over."""

import asyncio
import hashlib
import io
import json
import os
import tarfile

import pytest

from studio_fixture import API_KEY, run_studio_cli, start_studio
from fmedge import bundle_format as F
from fmedge.bundle import export_bundle, import_bundle
from fmedge.cache.models import ModelCache
from fmedge.config import EdgeConfig
from fmedge.errors import BusyError, InvalidIdError, NotFoundError, StorageError, UsageError
from fmedge.examples import example
from fmedge.runtime import EdgeRuntime
from fmedge.sync.once import sync_once

GREET = {"name": "greet", "version": "1", "stages": [
    {"id": "hello", "type": "json_transform", "config": {"data": {
        "greeting": "{{'hello ' + input.who}}", "length": "{{len(input.who)}}"}}}]}
GREET_LOUD = {"name": "greet-loud", "version": "3", "extends": "greet", "stages": [
    {"id": "hello", "type": "json_transform", "config": {"data": {
        "greeting": "{{('hello ' + input.who).upper()}}"}}}]}
SENSOR_INPUT = {"sensor_data": [1, 2, 3, 2, 40], "threshold": 1.5, "sensor_id": "s1"}


def device(tmp_path, name, **settings):
    return EdgeRuntime(EdgeConfig(data_dir=str(tmp_path / name), **settings))


def run(rt, pipeline_id, inputs):
    return asyncio.run(rt.run(pipeline_id, inputs))


def stocked(tmp_path, name="a"):
    """A device with three cached pipelines (one extends another) and two finished runs."""
    rt = device(tmp_path, name)
    rt.pipelines.store_now("greet", GREET)
    rt.pipelines.store_now("greet-loud", GREET_LOUD, version="3")
    rt.pipelines.store_now("sensor-stats", example("data-processor"), source="cloud",
                           version="7")
    run(rt, "greet", {"who": "edge"})
    run(rt, "sensor-stats", SENSOR_INPUT)
    return rt


def snapshot(rt):
    """Everything an import could change: cache rows, sync state, every file's bytes."""
    rows = [sorted(rt.pipelines.db.execute("SELECT * FROM %s" % table))
            for table in ("pipelines", "previous_versions")]
    files = {}
    for root, dirs, names in os.walk(rt.config.data_dir):
        dirs.sort()
        for name in names:
            if name.endswith(("-wal", "-shm", ".db")):
                continue     # SQLite files: compared by their rows above
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, rt.config.data_dir)] = \
                    hashlib.sha256(handle.read()).hexdigest()
    return rows, files


def gguf(path, size=4096):
    data = b"GGUF" + bytes(range(256)) * (size // 256)
    with open(path, "wb") as handle:
        handle.write(data[:size])
    return str(path)


# == Round trip ================================================================================

def test_pipelines_run_the_same_after_export_and_import(tmp_path):
    a = stocked(tmp_path)
    bundle = str(tmp_path / "usb" / "site.tar.gz")
    report = export_bundle(a, bundle)
    assert [p["id"] for p in report["pipelines"]] == ["greet", "greet-loud", "sensor-stats"]
    assert report["compression"] == "gzip" and report["signed"] is False
    assert report["results"] is None and report["models"] == []
    with open(bundle, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == report["sha256"]
    assert os.listdir(str(tmp_path / "usb")) == ["site.tar.gz"]   # no temp file left

    b = device(tmp_path, "b")
    imported = import_bundle(b, bundle)
    assert imported["signature"] == "unsigned"
    assert [(p["id"], p["status"]) for p in imported["pipelines"]] == [
        ("greet", "added"), ("greet-loud", "added"), ("sensor-stats", "added")]
    for entry in a.pipelines.list_now():
        copied = b.pipelines.entry(entry["id"])
        assert copied["source"] == "bundle"
        assert (copied["version"], copied["sha256"]) == (entry["version"], entry["sha256"])
    for pipeline_id, inputs in (("greet", {"who": "edge"}), ("greet-loud", {"who": "edge"}),
                                ("sensor-stats", SENSOR_INPUT)):
        there, here = run(a, pipeline_id, inputs), run(b, pipeline_id, inputs)
        assert there.status == here.status == "completed"
        assert there.output == here.output
    assert run(b, "greet-loud", {"who": "x"}).output["result"]["greeting"] == "HELLO X"

    again = import_bundle(b, bundle)
    assert {p["status"] for p in again["pipelines"]} == {"unchanged"}


def test_members_come_in_a_fixed_order_and_plain_tar_works(tmp_path):
    a = stocked(tmp_path)
    bundle = str(tmp_path / "site.tar")
    report = export_bundle(a, bundle, pipelines=["sensor-stats", "greet"], results=True,
                           key="k")
    assert report["compression"] == "none" and report["signed"] is True
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(F.MANIFEST).read())
    assert names == [F.MANIFEST, F.SIGNATURE, "pipelines/greet.json",
                     "pipelines/sensor-stats.json", F.RESULTS_PATH]
    assert manifest["format"] == F.FORMAT and manifest["format_version"] == 1
    assert manifest["device_id"] == a.device_id and manifest["results"]["count"] == 2
    assert [m["path"] for m in manifest["members"]] == names[2:]
    assert {p["id"]: p["version"] for p in manifest["pipelines"]} == {
        "greet": "1", "sensor-stats": "7"}


def test_export_marks_no_result_synced(tmp_path):
    a = stocked(tmp_path)
    report = export_bundle(a, str(tmp_path / "r.tar.gz"), pipelines=[], results=True)
    assert report["results"] == {"count": 2, "skipped_not_json": 0, "marked_synced": 0}
    assert a.results.stats()["pending"] == 2


def test_export_names_what_is_missing(tmp_path):
    a = stocked(tmp_path)
    with pytest.raises(NotFoundError, match="pipeline nope is not cached"):
        export_bundle(a, str(tmp_path / "x.tar"), pipelines=["nope"])
    with pytest.raises(InvalidIdError):
        export_bundle(a, str(tmp_path / "x.tar"), pipelines=["../etc"])
    with pytest.raises(NotFoundError, match="model tiny is not in the model cache"):
        export_bundle(a, str(tmp_path / "x.tar"), models=["tiny"])
    with pytest.raises(UsageError, match="is a directory"):
        export_bundle(a, str(tmp_path))
    assert not os.path.exists(str(tmp_path / "x.tar"))


def test_import_replaces_an_older_version_and_keeps_it_for_rollback(tmp_path):
    a = stocked(tmp_path)
    a.pipelines.store_now("greet", dict(GREET, version="2"), version="2")
    bundle = str(tmp_path / "v2.tar")
    export_bundle(a, bundle, pipelines=["greet"])
    b = device(tmp_path, "b")
    b.pipelines.store_now("greet", GREET)
    report = import_bundle(b, bundle)
    assert report["pipelines"][0]["status"] == "updated"
    assert report["pipelines"][0]["previous_version"] == "1"
    assert b.pipelines.entry("greet")["previous_version"] == "1"
    assert b.pipelines.rollback_now("greet")["version"] == "1"


def test_models_travel_through_the_model_cache(tmp_path):
    a = stocked(tmp_path)
    ModelCache(config=a.config).add(gguf(tmp_path / "tiny.gguf"), name="tiny")
    bundle = str(tmp_path / "m.tar.gz")
    report = export_bundle(a, bundle, pipelines=[], models=["tiny"])
    assert report["models"][0]["name"] == "tiny" and report["models"][0]["size"] == 4096
    b = device(tmp_path, "b")
    imported = import_bundle(b, bundle)
    assert imported["models"][0]["status"] == "added"
    path = ModelCache(config=b.config).get_model_path("tiny")
    with open(path, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == report["models"][0]["sha256"]
    assert not [n for n in os.listdir(b.config.data_dir) if n.startswith(".bundle-import")]
    assert import_bundle(b, bundle)["models"][0]["status"] == "unchanged"


def test_a_model_in_use_is_not_replaced(tmp_path):
    a = stocked(tmp_path)
    ModelCache(config=a.config).add(gguf(tmp_path / "new.gguf", 8192), name="tiny")
    bundle = str(tmp_path / "m.tar")
    export_bundle(a, bundle, models=["tiny"])
    b = device(tmp_path, "b")
    cache = ModelCache(config=b.config)
    cache.add(gguf(tmp_path / "old.gguf", 4096), name="tiny")
    before = snapshot(b)
    with cache.use("tiny"):
        with pytest.raises(BusyError, match="model tiny is in use"):
            import_bundle(b, bundle)
    assert snapshot(b) == before


def test_signed_with_the_configured_key(tmp_path):
    a = stocked(tmp_path)
    a.config.bundle_key = "site-secret-1"     # the config field the CLI sets
    bundle = str(tmp_path / "s.tar.gz")
    assert export_bundle(a, bundle)["signed"] is True
    b = device(tmp_path, "b")
    b.config.bundle_key = "site-secret-1"
    assert import_bundle(b, bundle)["signature"] == "verified"
    assert import_bundle(device(tmp_path, "c"), bundle)["signature"] == "not_checked"


# == Tampering: refused, nothing changed =======================================================

def read_members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]


def write_members(path, members):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info = info if isinstance(info, tarfile.TarInfo) else F.member_header(
                info, len(data), 0)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return str(path)


def with_manifest(members, change):
    """The members with the manifest rewritten by ``change`` (and no signature)."""
    manifest = json.loads(members[0][1])
    change(manifest)
    rest = [(m, d) for m, d in members[1:] if m.name != F.SIGNATURE]
    return [(F.MANIFEST, json.dumps(manifest).encode())] + rest


def listed(manifest, path, data):
    manifest["members"].append({"path": path, "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()})


def link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def flip_byte(members):
    out = []
    for info, data in members:
        if info.name == "pipelines/greet.json":
            data = data.replace(b"hello", b"jello")
        out.append((info, data))
    return out


def replace_member(members, name, new):
    return [(new, b"") if info.name == name else (info, data) for info, data in members]


def bad_pipeline(members):
    doc = json.dumps({"stages": [{"id": "a", "type": "no_such_component"}]},
                     sort_keys=True, separators=(",", ":")).encode()

    def change(manifest):
        listed(manifest, "pipelines/evil.json", doc)
        manifest["pipelines"].append({"id": "evil", "version": "1", "path":
                                      "pipelines/evil.json",
                                      "sha256": hashlib.sha256(doc).hexdigest()})
    return with_manifest(members, change) + [("pipelines/evil.json", doc)]


def not_gguf(members):
    data = b"MZ this is not a model"

    def change(manifest):
        listed(manifest, "models/fake.gguf", data)
        manifest["models"].append({"name": "fake", "path": "models/fake.gguf",
                                   "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return with_manifest(members, change) + [("models/fake.gguf", data)]


TAMPERING = {
    "one byte changed": (flip_byte, "does not match the sha256"),
    "member ../../etc/x": (lambda m: m + [("../../etc/x", b"owned")], "climbs out"),
    "member ../../etc/x listed": (
        lambda m: with_manifest(m, lambda x: listed(x, "../../etc/x", b"owned"))
        + [("../../etc/x", b"owned")], "neither pipelines"),
    "absolute member": (lambda m: m + [("/etc/x", b"owned")], "absolute path"),
    "symlink member": (lambda m: replace_member(
        m, "pipelines/greet.json", link("pipelines/greet.json", "/etc/passwd",
                                        tarfile.SYMTYPE)), "symbolic link"),
    "hard link member": (lambda m: replace_member(
        m, "pipelines/greet.json", link("pipelines/greet.json", "/etc/passwd",
                                        tarfile.LNKTYPE)), "hard link"),
    "extra unlisted member": (lambda m: m + [("pipelines/extra.json", b"{}")], "not listed"),
    "member missing": (lambda m: [x for x in m if x[0].name != "pipelines/greet.json"],
                       "missing"),
    "member twice": (lambda m: m + [m[-1]], "appears twice"),
    "manifest not first": (lambda m: m[1:] + m[:1], "first member"),
    "pipeline listed twice": (lambda m: with_manifest(
        m, lambda x: x["pipelines"].append(x["pipelines"][0])), "listed twice"),
    "newer format": (lambda m: with_manifest(m, lambda x: x.update(format_version=2)),
                     "upgrade fm-edge"),
    "invalid pipeline": (bad_pipeline, "no_such_component"),
    "not a GGUF model": (not_gguf, "not a GGUF file"),
    "not a tar at all": (lambda m: None, "damaged or not an fm-edge bundle"),
}


@pytest.fixture
def victim(tmp_path):
    """A good plain bundle from device a, and device b holding other pipelines."""
    a = stocked(tmp_path)
    bundle = str(tmp_path / "good.tar")
    export_bundle(a, bundle, pipelines=["greet", "sensor-stats"], results=True)
    b = device(tmp_path, "b")
    b.pipelines.store_now("greet", dict(GREET, version="0"), version="0")
    b.pipelines.store_now("local-one", GREET_LOUD)
    return bundle, b


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundle_is_refused_with_nothing_changed(tmp_path, victim, case):
    bundle, b = victim
    tamper, message = TAMPERING[case]
    members = tamper(read_members(bundle))
    bad = str(tmp_path / "bad.tar")
    if members is None:
        with open(bad, "wb") as handle:
            handle.write(b"this is not a tar archive\n" * 100)
    else:
        write_members(bad, members)
    before = snapshot(b)
    with pytest.raises(UsageError, match=message):
        import_bundle(b, bad)
    assert snapshot(b) == before
    assert not os.path.exists(os.path.join(b.config.data_dir, "..", "..", "etc", "x"))


def test_wrong_signature_and_edited_manifest_are_refused(tmp_path, victim):
    _, b = victim
    a = device(tmp_path, "a")
    signed = str(tmp_path / "signed.tar")
    export_bundle(a, signed, pipelines=["greet"], key="key-one")
    before = snapshot(b)
    with pytest.raises(UsageError, match="signature does not match") as caught:
        import_bundle(b, signed, key="key-two")
    assert caught.value.code == "bad_signature"
    edited = [(m, d.replace(b'"version": "1"', b'"version": "9"')) if m.name == F.MANIFEST
              else (m, d) for m, d in read_members(signed)]
    with pytest.raises(UsageError, match="signature does not match"):
        import_bundle(b, write_members(tmp_path / "edited.tar", edited), key="key-one")
    assert snapshot(b) == before


def test_unsigned_bundle_refused_when_a_key_is_configured(tmp_path, victim):
    bundle, b = victim
    b.config.bundle_key = "site-secret-1"
    before = snapshot(b)
    with pytest.raises(UsageError, match="not signed") as caught:
        import_bundle(b, bundle)
    assert caught.value.code == "bundle_unsigned"
    assert snapshot(b) == before


def test_not_enough_disk_is_refused_before_anything(tmp_path, victim):
    bundle, _ = victim
    b = device(tmp_path, "b2", min_free_disk_mb=1e7)    # 10 TB kept free: never there
    b.pipelines.store_now("local-one", GREET)
    before = snapshot(b)
    with pytest.raises(StorageError, match="nothing was imported"):
        import_bundle(b, bundle)
    assert snapshot(b) == before


# == Results to the studio, pipelines back from the cloud ======================================

def cloud(tmp_path):
    folder = tmp_path / "cloud"
    folder.mkdir(exist_ok=True)
    return start_studio(folder)


def studio_import(db, bundle, *extra, check=True):
    done = run_studio_cli(db, "import-bundle", bundle, "--json", *extra, check=check)
    return json.loads(done.stdout) if check else done


def test_studio_import_bundle_counts_each_result_once(tmp_path):
    a = stocked(tmp_path)
    bundle = str(tmp_path / "results.tar.gz")
    export_bundle(a, bundle, pipelines=[], results=True)
    (tmp_path / "cloud").mkdir()
    db = str(tmp_path / "cloud" / "studio.db")
    first = studio_import(db, bundle)
    assert (first["results"], first["accepted"], first["duplicate"]) == (2, 2, 0)
    second = studio_import(db, bundle)
    assert (second["accepted"], second["duplicate"]) == (0, 2)
    studio = cloud(tmp_path)
    try:
        stored = studio.store.list_results()
        assert len(stored) == 2 and {r["device_id"] for r in stored} == {a.device_id}
        # The link comes back: the device's own upload is answered "duplicate", and only
        # then are its results marked synced.
        rt = device(tmp_path, "a", cloud_url=studio.url, api_key=API_KEY)
        report = sync_once(rt)
        assert report.counters["duplicate"] == 2 and report.counters["uploaded"] == 0
        assert report.pending == 0 and len(studio.store.list_results()) == 2
    finally:
        studio.stop()


def test_results_uploaded_by_sync_are_duplicates_in_a_later_import(tmp_path):
    studio = cloud(tmp_path)
    try:
        rt = device(tmp_path, "a", cloud_url=studio.url, api_key=API_KEY)
        rt.pipelines.store_now("greet", GREET)
        run(rt, "greet", {"who": "one"})
        bundle = str(tmp_path / "late.tar")
        export_bundle(rt, bundle, results=True)        # before the link came back
        assert sync_once(rt).counters["uploaded"] == 1
        answer = studio_import(studio.store.path, bundle)
        assert (answer["accepted"], answer["duplicate"]) == (0, 1)
        assert len(studio.store.list_results()) == 1
    finally:
        studio.stop()


def test_studio_refuses_a_tampered_or_wrongly_signed_bundle(tmp_path):
    a = stocked(tmp_path)
    bundle = str(tmp_path / "r.tar")
    export_bundle(a, bundle, pipelines=[], results=True, key="k1")
    db = str(tmp_path / "studio.db")
    done = studio_import(db, bundle, "--key", "k2", check=False)
    assert done.returncode == 1 and "signature" in done.stderr
    flipped = [(m, d.replace(b"edge", b"edgf")) if m.name == F.RESULTS_PATH else (m, d)
               for m, d in read_members(bundle)]
    done = studio_import(db, write_members(tmp_path / "bad.tar", flipped), check=False)
    assert done.returncode == 1 and "sha256" in done.stderr
    assert studio_import(db, bundle, "--key", "k1")["accepted"] == 2


def test_a_cloud_pipeline_carried_by_bundle_is_adopted_by_sync(tmp_path):
    studio = cloud(tmp_path)
    try:
        studio.store.push_pipeline(json.dumps(GREET, indent=2).encode(), "greet")
        a = device(tmp_path, "a", cloud_url=studio.url, api_key=API_KEY)
        assert sync_once(a).counters["pipelines_updated"] == 1
        bundle = str(tmp_path / "cloudy.tar.gz")
        export_bundle(a, bundle)
        b = device(tmp_path, "b", cloud_url=studio.url, api_key=API_KEY)
        report = import_bundle(b, bundle)
        assert report["sync_state"] == {"etags_recorded": 1, "cursor_reset": True}
        imported = b.pipelines.entry("greet")
        counters = sync_once(b).counters
        assert counters["pipelines_unchanged"] == 1 and counters["pipelines_updated"] == 0
        assert counters["pipelines_refused"] == 0 and counters["pipelines_kept_local"] == 0
        assert b.pipelines.entry("greet")["sha256"] == imported["sha256"]
    finally:
        studio.stop()
