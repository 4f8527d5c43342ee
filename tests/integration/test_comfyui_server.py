"""Against a real ComfyUI server (see conftest.py): the pack loads, its nodes and workflows match the live
definitions, the template browser serves the workflows, and the API workflow runs to a video on disk."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import workflow_check as wc  # noqa: E402

PACK_NODES = ["MoGAModelLoader", "MoGALora", "MoGAAttentionSettings", "MoGAShotPrompts", "MoGASampler", "MoGADecode"]


UNSET = (None, False, [], {})


def test_pack_loaded_without_errors(comfy_server):
    log = (comfy_server.state / "server.log").read_text(errors="replace")
    assert "ComfyUI-MoGA" in log
    bad = [line for line in log.splitlines() if "IMPORT FAILED" in line and "MoGA" in line]
    assert not bad, "\n".join(bad)


def test_object_info_lists_every_node_as_defined(object_info, offline_info):
    """The live entries are what the offline fakes build; fields a newer ComfyUI added to every entry (0.33:
    dev_only, search_aliases, essentials_category, ...) are left unset by this pack."""
    for name in PACK_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        live, offline = wc.without_files(object_info[name]), wc.without_files(offline_info[name])
        assert {k: live.get(k) for k in offline} == offline, name
        assert {k: v for k, v in live.items() if k not in offline and v not in UNSET} == {}, name
    assert object_info["MoGASampler"]["output"] == ["LATENT"]
    assert object_info["MoGADecode"]["output"] == ["IMAGE", "FLOAT"]


def test_core_nodes_match_the_snapshot_the_offline_tests_use(comfy_server, object_info):
    """tests/test_workflows.py checks the workflows against a snapshot of this host's version: it must be true."""
    core = wc.core_object_info(comfy_server.version)  # no snapshot: the error says how to write one
    for name, entry in core.items():
        assert wc.without_files(object_info[name]) == wc.without_files(entry), name


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


def test_frontend_loads_the_ui_workflows_without_missing_nodes(comfy_server, object_info, tmp_path):
    """The real frontend (headless Chromium) loads each UI file, turns it into exactly its API twin (as this host
    reads the twin: inputs the host added since at their defaults) and draws no node over another."""
    import subprocess
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium: `apt-get install chromium` (or set CHROMIUM) for the headless frontend check")
    paths = sorted((REPO / "workflows").glob("*.json"))
    out = tmp_path / "frontend.json"
    res = subprocess.run([str(comfy_server.python), str(Path(__file__).parent / "browser_check.py"), chromium,
                          str(comfy_server.port), str(out), str(tmp_path), *map(str, paths)],
                         capture_output=True, text=True, timeout=120 + 60 * len(paths))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    for path in paths:
        seen = report[path.name]
        assert "error" not in seen, (path.name, seen.get("error"))
        assert seen["missing"] == [], path.name
        assert not [d for d in seen["dialogs"] if "missing" in d.lower()], (path.name, seen["dialogs"])
        api = json.loads((REPO / "workflows" / "api" / f"{path.stem}_api.json").read_text())
        # the frontend maps the positional widget values as we meant, and as the offline model of it says
        assert seen["output"] == wc.as_sent(api, object_info), (path.name, seen.get("frontend"))
        as_run = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in seen["output"].items()}
        assert as_run == wc.ui_to_api(json.loads(path.read_text()), object_info), path.name
        boxes = [(f"{n['id']} {n['title']!r}", *n["bounds"]) for n in seen["nodes"]]
        assert wc.overlaps(boxes) == [], (path.name, seen.get("frontend"), f"screenshot: {tmp_path}")


# ---- runs --------------------------------------------------------------------------------------------------------
RUN_SHOTS = "a small red circle moves right on a black background [5]\nit moves left on a black background [9]"  # 14 frames
RUN_FRAMES = 14


def _write_run_model(path):
    """A small checkpoint that brings its own text encoder and decoder, as the demo model does."""
    from .run_model import write_run_model
    return write_run_model(path)


@pytest.fixture(scope="session")
def run_model(comfy_server):
    return comfy_server.place("moga", f"{comfy_server.tag}.safetensors", _write_run_model)


def _run_graph(server, model_name, steps=3, seed=1, size=64, prefix=None):
    """The CPU demo workflow pointed at the test model, with small sizes."""
    graph = json.loads((REPO / "workflows" / "api" / "moga_demo_cpu_api.json").read_text())
    by_class = {n["class_type"]: n for n in graph.values()}
    by_class["MoGAModelLoader"]["inputs"]["ckpt_name"] = model_name
    by_class["MoGAShotPrompts"]["inputs"]["shots"] = RUN_SHOTS
    sampler = by_class["MoGASampler"]["inputs"]
    sampler.update(steps=steps, seed=seed, width=size, height=size)
    by_class["SaveVideo"]["inputs"]["filename_prefix"] = prefix or f"{server.tag}/run"
    return graph


def _saved_video(server, entry):
    items = [i for out in entry["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    assert len(items) == 1, entry["outputs"]
    path = server.comfy / "output" / items[0]["subfolder"] / items[0]["filename"]
    server.cleanup.append(path.parent if items[0]["subfolder"].startswith(server.tag) else path)
    return path


def test_api_workflow_runs_to_a_video_with_the_planned_frames(comfy_server, run_model):
    import imageio.v3 as iio
    graph = _run_graph(comfy_server, run_model.name)
    fps = next(n for n in graph.values() if n["class_type"] == "MoGAShotPrompts")["inputs"]["fps"]
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    path = _saved_video(comfy_server, entry)
    frames = iio.imread(path)
    assert frames.shape == (RUN_FRAMES, 64, 64, 3)
    assert frames.std() > 1.0  # a picture, not a blank
    meta = iio.immeta(path)
    assert abs(float(meta.get("fps", 0)) - fps) < 0.01, meta  # the shot plan's fps reached Save Video


def test_interrupt_stops_within_one_step_and_the_next_run_works(comfy_server, run_model):
    import time
    import uuid
    client = uuid.uuid4().hex
    messages, proc = comfy_server.listen(client, seconds=240)
    try:
        long_run = _run_graph(comfy_server, run_model.name, steps=400, seed=2, size=128)
        pid = comfy_server.queue(long_run, client_id=client)

        def progress(times=False):
            return [(m["data"]["value"], m["_t"]) if times else m["data"]["value"] for m in list(messages)
                    if m.get("type") == "progress" and m["data"].get("prompt_id") == pid
                    and m["data"].get("max") == 400]
        end = time.monotonic() + 120
        while len(progress()) < 3:
            assert time.monotonic() < end, f"no sampler progress within 120 s: {messages[-5:]}"
            time.sleep(0.05)
        seen_at_interrupt = max(progress())
        # ComfyUI 0.33 throttles progress messages (one per 100 ms and 0.5 % of the steps, the first and last
        # always): a message may stand for several steps, up to the widest gap between two messages seen
        before = sorted(set(progress()))
        gap = max(b - a for a, b in zip(before, before[1:]))
        t0 = time.monotonic()
        comfy_server.post("/interrupt", {})
        entry = comfy_server.wait(pid, timeout=60)
        stopped_after = time.monotonic() - t0
        statuses = [m[0] for m in entry["status"]["messages"]]
        assert "execution_interrupted" in statuses, statuses
        done = max(progress())
        # the step that was running may finish; no further step starts (0.3.64 reports every step: gap 1)
        assert done <= seen_at_interrupt + gap, (seen_at_interrupt, done, gap)
        assert done < 400
        reports = progress(times=True)
        per_step = sorted((tb - ta) / (vb - va) for (va, ta), (vb, tb) in zip(reports, reports[1:]) if vb > va)
        step_s = per_step[(len(per_step) - 1) // 2]
        print(f"interrupt: saw step {seen_at_interrupt}, stopped at {done} (messages every <= {gap} steps), "
              f"{stopped_after:.2f} s after; step {step_s:.2f} s")
        assert stopped_after < 2 * step_s + 2.0, (stopped_after, step_s)
    finally:
        proc.kill()
    entry = comfy_server.run(_run_graph(comfy_server, run_model.name, seed=3))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    assert _saved_video(comfy_server, entry).exists()


def test_demo_workflow_runs_unchanged_on_a_cpu_server(comfy_server):
    """The shipped CPU demo workflow with the shipped demo model (listed by the loader from the package)."""
    import imageio.v3 as iio
    from moga.shots import ShotPlan
    demo = REPO / "moga" / "demo" / "moga-demo.safetensors"
    if not demo.exists():
        pytest.skip(f"{demo} is not in this checkout (the trained demo model ships with the package)")
    graph = json.loads((REPO / "workflows" / "api" / "moga_demo_cpu_api.json").read_text())
    by_class = {n["class_type"]: n for n in graph.values()}
    by_class["SaveVideo"]["inputs"]["filename_prefix"] = f"{comfy_server.tag}/demo"
    shots = by_class["MoGAShotPrompts"]["inputs"]
    plan = ShotPlan.parse_text(shots["shots"], shots["default_seconds"], shots["fps"])
    entry = comfy_server.run(graph)  # minutes on a loaded 2-core machine: fails on a stall, not on slowness
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    frames = iio.imread(_saved_video(comfy_server, entry))
    size = by_class["MoGASampler"]["inputs"]
    assert frames.shape == (plan.total_frames, size["height"], size["width"], 3)
