"""The workflow files in workflows/ against the node definitions (no ComfyUI needed).

Core nodes are checked against tests/data/comfyui_v0.3.64_core_nodes.json (GET /object_info of a real ComfyUI
v0.3.64); this pack's nodes against their own schemas. tests/integration checks both against a live server.
"""
import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_workflow_files as mwf  # noqa: E402
import workflow_check as wc  # noqa: E402

WF = wc.ROOT / "workflows"
UI_FILES = sorted(WF.glob("*.json"))
API_FILES = sorted((WF / "api").glob("*.json"))
ALLOWED_CORE = {"CLIPLoader", "VAELoader", "CreateVideo", "SaveVideo",
                # the patch path: core's own model pipeline (all in the v0.3.64 snapshot)
                "UNETLoader", "LoraLoaderModelOnly", "ModelSamplingSD3", "KSampler"}


@pytest.fixture(scope="module")
def info():
    return mwf.all_object_info()


@pytest.fixture(scope="module")
def pack_nodes(info):
    return {k for k, v in info.items() if v["category"] == "MoGA"}


def test_there_are_workflows():
    assert any(p.name == "moga_multishot_t2v.json" for p in UI_FILES)
    assert any(p.name == "moga_multishot_t2v_api.json" for p in API_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_matches_node_definitions(path, info, pack_nodes):
    ui = json.loads(path.read_text())
    assert wc.check_ui(ui, info) == []
    used = {n["type"] for n in ui["nodes"]}
    assert used <= pack_nodes | ALLOWED_CORE, used - pack_nodes - ALLOWED_CORE
    # the template browser shows a same-name .jpg
    thumb = path.with_suffix(".jpg")
    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb} missing or not a JPEG"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_matches_node_definitions(path, info, pack_nodes):
    api = json.loads(path.read_text())
    assert wc.check_api(api, info) == []
    used = {n["class_type"] for n in api.values()}
    assert used <= pack_nodes | ALLOWED_CORE


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_and_api_describe_the_same_graph(path, info):
    api_path = WF / "api" / f"{path.stem}_api.json"
    assert api_path.exists(), f"{path.name} has no API twin {api_path}"
    api = json.loads(api_path.read_text())
    as_run = wc.ui_to_api(json.loads(path.read_text()), info)
    assert as_run == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def test_ui_files_are_what_the_generator_writes():
    assert mwf.main(["--check"]) == 0


# nodes the main workflows leave out: MoGA LoRA needs a LoRA file the user has (its list would be empty)
OPTIONAL_NODES = {"MoGALora"}


def test_all_pack_nodes_used_in_the_main_workflows(pack_nodes):
    used = set()
    for name in ("moga_multishot_t2v", "moga_patch_t2v_14b"):  # the MoGA Sampler path and core's own (patch) path
        used |= {n["class_type"] for n in json.loads((WF / "api" / f"{name}_api.json").read_text()).values()}
    assert OPTIONAL_NODES <= pack_nodes
    assert pack_nodes - OPTIONAL_NODES <= used, pack_nodes - OPTIONAL_NODES - used


# ---- the checker itself catches what it is there to catch -----------------------------------------------------
@pytest.fixture
def good():
    return json.loads((WF / "moga_multishot_t2v.json").read_text()), \
        json.loads((WF / "api" / "moga_multishot_t2v_api.json").read_text())


def _node(ui, cls):
    return next(n for n in ui["nodes"] if n["type"] == cls)


def test_checker_flags_ui_mistakes(good, info):
    ui, _ = good
    bad = copy.deepcopy(ui)
    _node(bad, "MoGASampler")["widgets_values"].pop()          # a widget value missing: positions shift
    assert any("widget values" in p for p in wc.check_ui(bad, info))
    bad = copy.deepcopy(ui)
    _node(bad, "MoGASampler")["type"] = "MoGASamplerOld"         # a node type the host does not have
    assert any("missing node type" in p for p in wc.check_ui(bad, info))
    bad = copy.deepcopy(ui)
    link = next(l for l in bad["links"] if l[5] == "MOGA_SHOTS")
    link[5] = "LATENT"
    next(n for n in bad["nodes"] if n["id"] == link[3])["inputs"][link[4]]["type"] = "LATENT"
    assert any("MOGA_SHOTS" in p or "LATENT" in p for p in wc.check_ui(bad, info))
    bad = copy.deepcopy(ui)
    sampler = _node(bad, "MoGASampler")
    slot = next(i for i in sampler["inputs"] if i["name"] == "shots")
    bad["links"] = [l for l in bad["links"] if l[0] != slot["link"]]
    slot["link"] = None
    for n in bad["nodes"]:
        for o in n["outputs"]:
            o["links"] = [x for x in o["links"] if any(l[0] == x for l in bad["links"])]
    assert any("'shots'" in p and "not connected" in p for p in wc.check_ui(bad, info))
    bad = copy.deepcopy(ui)
    _node(bad, "MoGASampler")["widgets_values"][0] = 10 ** 9     # width above max
    assert any("above max" in p for p in wc.check_ui(bad, info))


def test_checker_flags_api_mistakes(good, info):
    _, api = good
    bad = copy.deepcopy(api)
    del bad["5"]["inputs"]["steps"]
    assert any("'steps' missing" in p for p in wc.check_api(bad, info))
    bad = copy.deepcopy(api)
    bad["5"]["inputs"]["shots"] = ["1", 0]                       # MOGA_MODEL into MOGA_SHOTS
    assert any("MOGA_SHOTS" in p for p in wc.check_api(bad, info))
    bad = copy.deepcopy(api)
    bad["5"]["inputs"]["solver"] = "dpm++"
    assert any("not in" in p for p in wc.check_api(bad, info))
    bad = copy.deepcopy(api)
    bad["9"]["inputs"]["quality"] = 5
    assert any("unknown input" in p for p in wc.check_api(bad, info))
    bad = copy.deepcopy(api)
    del bad["9"]
    assert any("no output node" in p for p in wc.check_api(bad, info))
