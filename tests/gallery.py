"""The 24 gallery templates shipped in flowmason 1.0.24, for tests.

The templates are not copied into this repository: the first call downloads the pinned
wheel with pip (``pip download flowmason==1.0.24 --no-deps``), checks its sha256, and
keeps the JSON files in ``~/.cache/fm-edge-test/gallery`` (``FM_EDGE_GALLERY_DIR``
overrides it), so later runs work offline.

    from tests.gallery import gallery_templates, require_gallery
    docs = require_gallery()          # {template id: document}; skips the test if offline
"""

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

FLOWMASON_VERSION = "1.0.24"
WHEEL_NAME = "flowmason-{}-py3-none-any.whl".format(FLOWMASON_VERSION)
# Pinned so a re-published or tampered wheel cannot silently change what the tests check.
WHEEL_SHA256 = "058083d03beb823a27b837c31842ecf4eddcc8592eba1b4607347691b5249136"
TEMPLATES_IN_WHEEL = "flowmason_studio_backend/data/templates/"
DOWNLOAD_TIMEOUT_S = 300
COMPLETE_MARKER = "COMPLETE"

TEMPLATE_NAMES = (
    "agentic-support-workflow", "ai-research-assistant", "blog-post-writer",
    "content-factory", "content-review-loop", "customer-email-responder",
    "data-extractor", "devops-cicd-deployment", "devops-health-monitor",
    "devops-incident-response", "devops-multi-service-orchestration",
    "document-batch-processor", "document-qa", "enterprise-data-pipeline", "hello-world",
    "iterative-refinement", "lead-qualification", "multi-agent-debate",
    "multi-draft-selector", "opportunity-analyzer", "persona-chat", "research-synthesizer",
    "sales-call-summarizer", "validated-output",
)

# flowmason-semantics §5: these call HTTP services (CI, deploy and monitoring APIs, Slack,
# PagerDuty, CRM...) through http_request; the other 19 need only a local LLM.
NEEDS_EXTERNAL_SERVICE = frozenset({
    "devops-cicd-deployment", "devops-health-monitor", "devops-incident-response",
    "devops-multi-service-orchestration", "enterprise-data-pipeline",
})


class GalleryUnavailable(Exception):
    """The templates are not cached and cannot be downloaded (usually: no network)."""


def gallery_dir() -> Path:
    default = Path.home() / ".cache" / "fm-edge-test" / "gallery"
    return Path(os.environ.get("FM_EDGE_GALLERY_DIR", str(default)))


def gallery_templates():
    """{template id: document} for the 24 templates; GalleryUnavailable if unobtainable."""
    return copy.deepcopy(_load_templates())   # callers may mutate their copy


def require_gallery():
    """``gallery_templates()``, or skip the calling test with the reason."""
    import pytest

    try:
        return gallery_templates()
    except GalleryUnavailable as error:
        pytest.skip("flowmason {} gallery unavailable: {}".format(FLOWMASON_VERSION, error))


@functools.lru_cache(maxsize=1)
def _load_templates():
    folder = gallery_dir()
    if not (folder / COMPLETE_MARKER).is_file():
        _populate(folder)
    templates = {}
    for path in sorted(folder.glob("*.json")):
        templates[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    if sorted(templates) != sorted(TEMPLATE_NAMES):
        raise GalleryUnavailable("{} holds {} templates, expected the 24 of {}; delete the "
                                 "folder to download again".format(
                                     folder, len(templates), WHEEL_NAME))
    return templates


def _populate(folder: Path):
    """Download the wheel and extract the templates into ``folder`` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(folder.parent)) as work:
        wheel = _download_wheel(Path(work))
        staging = Path(work) / "templates"
        staging.mkdir()
        with zipfile.ZipFile(str(wheel)) as archive:
            for member in archive.namelist():
                if member.startswith(TEMPLATES_IN_WHEEL) and member.endswith(".json"):
                    target = staging / Path(member).name
                    target.write_bytes(archive.read(member))
        (staging / COMPLETE_MARKER).write_text(WHEEL_SHA256 + "\n", encoding="utf-8")
        if (folder / COMPLETE_MARKER).is_file():
            return   # another test process finished first
        if folder.exists():
            shutil.rmtree(str(folder), ignore_errors=True)   # an interrupted attempt
        try:
            os.replace(str(staging), str(folder))
        except OSError:
            # Another test process finished first; its copy is identical.
            if not (folder / COMPLETE_MARKER).is_file():
                raise


def _download_wheel(work: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "flowmason==" + FLOWMASON_VERSION,
               "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q",
               "-d", str(work)]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        raise GalleryUnavailable("pip download failed: {} {}".format(
            error, detail.decode("utf-8", "replace")[-500:])) from error
    wheel = work / WHEEL_NAME
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel.is_file() else None
    if digest != WHEEL_SHA256:
        raise GalleryUnavailable("{} has sha256 {}, expected {}".format(
            WHEEL_NAME, digest, WHEEL_SHA256))
    return wheel
