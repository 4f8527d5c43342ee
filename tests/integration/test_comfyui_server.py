"""Against a real ComfyUI server (see conftest.py): the pack loads, its nodes and workflows match the live
definitions, the template browser serves the workflows, and the API workflow runs to a video on disk."""
import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import workflow_check as wc  # noqa: E402

PACK_NODES = ["MoGAModelLoader", "MoGAAttentionSettings", "MoGAShotPrompts", "MoGASampler", "MoGADecode"]


def _without_files(entry):
    """An /object_info entry with the model-file lists emptied and python_module dropped (both depend on the host)."""
    e = copy.deepcopy(entry)
    e.pop("python_module", None)
    for kind in e["input"].values():
        for name, spec in kind.items():
            if (e["name"], name) in wc.FILE_INPUTS:
                if isinstance(spec[0], list):
                    spec[0] = []
                else:
                    spec[1]["options"] = []
    return e


def test_pack_loaded_without_errors(comfy_server):
    log = (comfy_server.state / "server.log").read_text(errors="replace")
    assert "ComfyUI-MoGA" in log
    bad = [line for line in log.splitlines() if "IMPORT FAILED" in line and "MoGA" in line]
    assert not bad, "\n".join(bad)


def test_object_info_lists_every_node_as_defined(object_info, offline_info):
    pack, _ = offline_info
    for name in PACK_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        assert _without_files(object_info[name]) == _without_files(pack[name]), name
    assert object_info["MoGASampler"]["output"] == ["LATENT"]
    assert object_info["MoGADecode"]["output"] == ["IMAGE", "FLOAT"]


def test_core_nodes_match_the_snapshot_the_offline_tests_use(object_info, offline_info):
    _, core = offline_info
    for name, entry in core.items():
        assert _without_files(object_info[name]) == _without_files(entry), name


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_ui_workflows_have_no_missing_nodes_on_the_live_server(object_info, path):
    ui = json.loads(path.read_text())
    assert wc.check_ui(ui, object_info) == []


@pytest.mark.parametrize("path", sorted((REPO / "workflows" / "api").glob("*.json")), ids=lambda p: p.name)
def test_api_workflows_match_the_live_server(object_info, path):
    assert wc.check_api(json.loads(path.read_text()), object_info) == []


def test_template_browser_serves_the_workflows(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    names = set(listed.get("ComfyUI-MoGA", []))
    on_disk = {p.stem for p in (REPO / "workflows").glob("*.json")}
    assert on_disk and on_disk <= names, listed
    for stem in on_disk:
        body = comfy_server.get(f"/api/workflow_templates/ComfyUI-MoGA/{stem}.json")
        assert (json.loads(body) if isinstance(body, bytes) else body)["nodes"]
        assert comfy_server.get(f"/api/workflow_templates/ComfyUI-MoGA/{stem}.jpg")[:3] == b"\xff\xd8\xff"


def _chromium():
    import os
    import shutil
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_frontend_loads_the_ui_workflow_without_missing_nodes(comfy_server, path, tmp_path):
    """The real frontend (headless Chromium) loads the UI file and turns it into exactly the API file."""
    import subprocess
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium: `apt-get install chromium` (or set CHROMIUM) for the headless frontend check")
    out = tmp_path / "frontend.json"
    res = subprocess.run([str(comfy_server.python), str(Path(__file__).parent / "browser_check.py"), chromium,
                          str(comfy_server.port), str(path), str(out), str(tmp_path / "screen.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert "error" not in seen, seen.get("error")
    assert seen["missing"] == []
    assert not [d for d in seen["dialogs"] if "missing" in d.lower()], seen["dialogs"]
    api = json.loads((REPO / "workflows" / "api" / f"{path.stem}_api.json").read_text())
    assert seen["output"] == api  # the frontend maps the positional widget values as we meant them
