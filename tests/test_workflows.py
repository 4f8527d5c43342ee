"""The workflow files in workflows/ against the node definitions (no ComfyUI needed).

Core nodes are checked against every snapshot in tests/data/comfyui_v*_core_nodes.json (GET /object_info of a real
ComfyUI: v0.3.64 and v0.33.0, whose Save Video has a dynamic `format` with a nested `format.codec` and whose Create
Video has `bit_depth`): one set of files serves both. This pack's nodes are checked against their own schemas.
tests/integration checks both against live servers and the real frontend.
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
                # the patch path: core's own model pipeline (in both snapshots)
                "UNETLoader", "LoraLoaderModelOnly", "ModelSamplingSD3", "KSampler",
                # Wan2.2's expert switch and the I2V graph (in both snapshots too)
                "KSamplerAdvanced", "CLIPTextEncode", "LoadImage", "CLIPVisionLoader", "CLIPVisionEncode",
                "WanImageToVideo", "VAEDecode"}
VERSIONS = wc.snapshot_versions()


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"v{v}")
def info(request):
    return mwf.all_object_info(request.param)


@pytest.fixture(scope="module")
def oldest():
    return mwf.all_object_info(wc.OLDEST)


@pytest.fixture(scope="module")
def newer():
    return mwf.all_object_info("0.33.0")


@pytest.fixture(scope="module")
def pack_nodes(oldest):
    return {k for k, v in oldest.items() if v["category"] == "MoGA"}


def test_snapshots_of_both_supported_comfyuis():
    assert wc.OLDEST in VERSIONS and "0.33.0" in VERSIONS, VERSIONS


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
    assert as_run == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wc.as_sent(api, info).items()}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_nodes_do_not_overlap(path):
    assert wc.overlaps(wc.node_boxes(json.loads(path.read_text()))) == []


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
    # a required widget value missing (gpus; the optional schedule, cfg_low and start_image_shots after it may be
    # left out): positions shift
    del _node(bad, "MoGASampler")["widgets_values"][-4:]
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


def test_checker_flags_overlapping_nodes(good):
    ui, _ = good
    bad = copy.deepcopy(ui)
    decode, save = _node(bad, "MoGADecode"), _node(bad, "SaveVideo")
    save["pos"] = [decode["pos"][0] + decode["size"][0] - 20, decode["pos"][1] + 40]
    found = wc.overlaps(wc.node_boxes(bad))
    assert any("MoGA Decode" in p and "Save Video" in p for p in found), found
    bad = copy.deepcopy(ui)
    decode = _node(bad, "MoGADecode")
    decode["title"] = "a title far too long for the node's column: the frontend widens the node over its neighbour"
    assert any("Save Video" in p for p in wc.overlaps(wc.node_boxes(bad)))
    # side by side with no gap: not an overlap
    assert wc.overlaps([("a", 0, 0, 100, 50), ("b", 100, 0, 100, 50), ("c", 0, 50, 100, 10)]) == []
    assert wc.overlaps([("a", 0, 0, 100, 50), ("b", 99, 49, 100, 50)]) == ["node a overlaps node b by 1 x 1 px: "
                                                                            "move or narrow one (tests/make_workflow_"
                                                                            "files.py LAYOUTS)"]


# ---- ComfyUI 0.33: dynamic combos (Save Video's format/format.codec), inputs added since 0.3.64 -----------------
def _save(ui):
    return _node(ui, "SaveVideo")


def test_newer_comfyui_reads_the_older_save_video_values(good, newer):
    """[prefix, format, codec] from a 0.3.64 file: 0.33's frontend gives the third value to the nested
    format.codec (seen in frontend 1.49.6), the hidden old codec and Create Video's new bit_depth take defaults."""
    ui, _ = good
    ui = copy.deepcopy(ui)
    _save(ui)["widgets_values"] = ["p", "mp4", "h264"]
    assert wc.check_ui(ui, newer) == []
    sent = wc.ui_to_api(ui, newer)
    save = next(n for n in sent.values() if n["class_type"] == "SaveVideo")["inputs"]
    assert {k: v for k, v in save.items() if k != "video"} == {
        "filename_prefix": "p", "format": "mp4", "format.codec": "h264", "format.codec.encoding": "auto",
        "codec": "auto"}
    create = next(n for n in sent.values() if n["class_type"] == "CreateVideo")["inputs"]
    assert create["bit_depth"] == 8
    assert wc.widget_slots(newer["SaveVideo"], ["p", "webm", "av1"]) == [
        ("filename_prefix", "value"), ("format", "value"), ("format.codec", "value"),
        ("format.codec.encoding", "value"), ("codec", "value")]
    assert wc.widget_slots(newer["SaveVideo"], ["p", "auto", "auto"]) == [
        ("filename_prefix", "value"), ("format", "value"), ("format.codec", "value"), ("codec", "value")]


def test_checker_flags_dynamic_combo_mistakes(good, newer):
    ui, api = good
    bad = copy.deepcopy(ui)
    _save(bad)["widgets_values"] = ["p", "webm", "h264"]      # webm takes auto or av1 only
    assert any("'format.codec'" in p and "not in" in p for p in wc.check_ui(bad, newer))
    bad = copy.deepcopy(ui)
    _save(bad)["widgets_values"] = ["p", "avi", "auto"]
    assert any("'format'" in p and "not in" in p for p in wc.check_ui(bad, newer))
    bad = copy.deepcopy(ui)
    _save(bad)["widgets_values"] = ["p"]                      # the required format is missing
    assert any("widget values" in p for p in wc.check_ui(bad, newer))
    bad = copy.deepcopy(ui)
    _save(bad)["widgets_values"] += ["auto", "auto", "auto"]  # more values than 0.33 has widgets
    assert any("widget values" in p for p in wc.check_ui(bad, newer))
    bad = copy.deepcopy(api)
    bad["9"]["inputs"]["format.codec"] = "vp9"
    assert any("'format.codec'" in p for p in wc.check_api(bad, newer))
    bad = copy.deepcopy(api)
    bad["9"]["inputs"]["format.quality"] = 5                  # not an input of the chosen option
    assert any("unknown input 'format.quality'" in p for p in wc.check_api(bad, newer))


def test_as_sent_fills_what_a_host_fills(good, newer, oldest):
    _, api = good
    assert wc.as_sent(api, oldest) == api                      # 0.3.64: the file gives every input
    sent = wc.as_sent(api, newer)["9"]["inputs"]
    assert sent["format.codec"] == api["9"]["inputs"]["codec"] and sent["codec"] == "auto"
    assert wc.as_sent(api, newer)["8"]["inputs"]["bit_depth"] == 8
    moved = copy.deepcopy(api)
    moved["9"]["inputs"].update(format="mp4", codec="h264")   # the old codec's value moves into format.codec
    sent = wc.as_sent(moved, newer)["9"]["inputs"]
    assert (sent["format.codec"], sent["format.codec.encoding"], sent["codec"]) == ("h264", "auto", "auto")
    assert wc.check_api(wc.as_sent(api, newer), newer) == []
