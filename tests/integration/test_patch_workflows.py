"""The shipped patch workflows end to end on a real server (see conftest.py), through core's samplers to a saved video,
on random files core's own loaders read; and an interrupt on the patch path.

Each test takes its graph from workflows/api/ and changes only what a CPU cannot hold, so a change to the shipped
file reaches the test:
- the model files point at small random ones: the Wan DiTs (width 256, 2 blocks, tests/integration/run_model.py),
  their LoRAs and router files (each expert's own, with its fingerprint); the Wan2.1 VAE and the CLIP-vision ViT-H
  are random too but at their real sizes (core builds both from fixed configs: tests/integration/host_models.py);
- umT5-XXL (5.7B parameters, a fixed config in core) is replaced by the small text encoder inside the DiT file:
  MoGA Model Loader -> MoGA Shot Prompts (`model` instead of `clip`), and in the I2V graph core's CLIP Text Encode
  by MoGA Shot Prompts (one shot) -> MoGA Shot Conditioning, which gives one plain prompt, as CLIP Text Encode does;
- sizes and lengths shrink (64 x 64 pixels, 9-14 frames) and the shot prompts use the demo world's words.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import workflow_check as wc  # noqa: E402

from .run_model import write_core_model, write_lora, write_router_file  # noqa: E402
from .test_patch_server import FRAMES, SHOTS, _errors, _graph  # noqa: E402

API = REPO / "workflows" / "api"
PATCH_WORKFLOWS = sorted(p.name for p in API.glob("moga_patch_*_api.json"))
SIZE = 64
ONE_SHOT = "a small red circle moves right on a black background [9]"
I2V_FRAMES, I2V_SHOTS = 9, "2,1"  # 9 frames -> 3 latent frames, cut after the second
INTERRUPT_STEPS, AFTER_STEPS, INTERRUPT_SIZE = 200, 5, 256


def _nodes(graph, cls):
    return [k for k, n in graph.items() if n["class_type"] == cls]


def _node(graph, cls, title=None):
    """The one node of class `cls` (whose title contains `title`): fails when the shipped workflow changed."""
    found = [k for k in _nodes(graph, cls) if title is None or title in graph[k].get("_meta", {}).get("title", "")]
    assert len(found) == 1, f"expected one {cls} {title or ''} node in the workflow, found {found}"
    return graph[found[0]]["inputs"]


def _shipped(name):
    return json.loads((API / name).read_text())


@pytest.mark.parametrize("name", PATCH_WORKFLOWS)
def test_the_server_validates_the_patch_workflows_but_for_the_model_files(comfy_server, name):
    """POST /prompt: the server's own validation of every node and input finds nothing wrong but the model files
    this host does not have (tests/integration/test_comfyui_server.py checks the same files against /object_info)."""
    import urllib.error
    import urllib.request
    graph = _shipped(name)
    req = urllib.request.Request(comfy_server.base + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            queued = json.loads(r.read())  # this host has every model file: take the real-size run off again
        comfy_server.post("/queue", {"delete": [queued["prompt_id"]]})
        comfy_server.post("/interrupt", {})
        return
    except urllib.error.HTTPError as e:
        assert e.code == 400, e.code
        answer = json.loads(e.read())
    problems = [(n["class_type"], err["type"], err.get("extra_info", {}).get("input_name"))
                for n in answer["node_errors"].values() for err in n["errors"]]
    # a missing file: not among the folder's files, or (Load Image's own check) not an image file there
    missing = {"value_not_in_list", "custom_validation_failed"}
    assert problems, answer
    assert all(kind in missing and (cls, inp) in wc.FILE_INPUTS for cls, kind, inp in problems), \
        json.dumps(answer["node_errors"])[:4000]


@pytest.fixture(scope="session")
def host_model_dir():
    """Where the big random files are written once a session (1.5 GB; removed at the end)."""
    folder = Path(tempfile.mkdtemp(prefix="moga-itest-host-models-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def host_files(host_model_dir, comfy_server):
    """The random Wan VAE and CLIP-vision ViT-H (tests/integration/host_models.py), written with a host's python;
    the same files serve every host."""
    out = {}
    for kind in ("wan_vae", "clip_vision_h"):
        out[kind] = path = host_model_dir / f"{kind}.safetensors"
        if not path.exists():
            res = subprocess.run([str(comfy_server.python), str(Path(__file__).with_name("host_models.py")), kind,
                                  str(path), str(comfy_server.comfy)], capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "PYTHONPATH": ""})
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def _linked(src):
    def write(path):
        try:
            os.link(src, path)  # the hosts' folders and the cache lie on one disk: no 1.5 GB copies
        except OSError:
            shutil.copyfile(src, path)
    return write


def _video(server, entry):
    import imageio.v3 as iio
    items = [i for out in entry["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    assert len(items) == 1, entry["outputs"]
    path = server.comfy / "output" / items[0]["subfolder"] / items[0]["filename"]
    server.cleanup.append(path.parent)
    return iio.imread(path)


def _progress(messages, node):
    return [m["data"] for m in messages if m.get("type") == "progress" and m["data"].get("node") == node]


def _text_from_model(graph, shots_node, model_file):
    """umT5 -> the DiT file's own small text encoder (MoGA Model Loader), for MoGA Shot Prompts."""
    graph["900"] = {"class_type": "MoGAModelLoader", "inputs": {"ckpt_name": model_file, "weight_dtype": "fp32",
                                                                "attention_backend": "auto"}}
    for clip in _nodes(graph, "CLIPLoader"):
        del graph[clip]
    inputs = graph[shots_node]["inputs"]
    inputs.pop("clip", None)
    inputs["model"] = ["900", 0]


def test_two_expert_workflow_runs_to_a_video(comfy_server, host_files):
    """moga_patch_t2v_a14b: two Load Diffusion Model -> their LoRAs -> ModelSamplingSD3 -> MoGA Patch Model with
    each expert's own routers -> KSamplerAdvanced steps 0-2 (high noise) then 2-4 (low noise) -> MoGA Decode with
    core's Load VAE -> Save Video."""
    s, tag = comfy_server, comfy_server.tag
    files = {}
    for expert, seed, groups in (("high", 11, 3), ("low", 12, 2)):
        dit = s.place("diffusion_models", f"{tag}-{expert}.safetensors",
                      lambda p, seed=seed, groups=groups: write_core_model(p, seed=seed, num_groups=groups))
        routers = s.place("moga", f"{tag}-{expert}-routers.safetensors", lambda p, dit=dit: write_router_file(p, dit))
        lora = s.place("loras", f"{tag}-{expert}-lora.safetensors", lambda p, seed=seed: write_lora(p, seed))
        files[expert] = dit.name, routers.name, lora.name
    vae = s.place("vae", f"{tag}-wan-vae.safetensors", _linked(host_files["wan_vae"]))

    g = _shipped("moga_patch_t2v_a14b_api.json")
    samplers = {}
    for expert, title in (("high", "high noise"), ("low", "low noise")):
        dit, routers, lora = files[expert]
        _node(g, "UNETLoader", title)["unet_name"] = dit
        _node(g, "LoraLoaderModelOnly", title)["lora_name"] = lora
        _node(g, "MoGARouterLoader", title)["routers_name"] = routers
        samplers[expert] = next(k for k in _nodes(g, "KSamplerAdvanced") if title in g[k]["_meta"]["title"])
    _node(g, "VAELoader")["vae_name"] = vae.name
    shots = _nodes(g, "MoGAShotPrompts")[0]
    g[shots]["inputs"]["shots"] = SHOTS
    _text_from_model(g, shots, files["high"][0])
    _node(g, "MoGAEmptyMultiShotLatent").update(width=SIZE, height=SIZE)
    high, low = _node(g, "KSamplerAdvanced", "high noise"), _node(g, "KSamplerAdvanced", "low noise")
    assert (high["steps"], high["end_at_step"], low["start_at_step"]) == (4, 2, 2), (high, low)
    _node(g, "SaveVideo")["filename_prefix"] = f"{tag}/a14b"

    log_at = s.log_size()
    entry = s.run(g)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    frames = _video(s, entry)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.std() > 1.0, (frames.shape, frames.std())
    # the expert switch: each KSamplerAdvanced ran its own two of the four steps
    for expert in ("high", "low"):
        steps = _progress(s.last_messages, samplers[expert])
        assert steps and steps[-1]["value"] == steps[-1]["max"] == 2, (expert, steps)
    # each expert patched with its own routers (3 and 2 groups), which fit its weights (no fingerprint warning)
    log = s.log_since(log_at)
    assert "MoGA 3/3 groups" in log and files["high"][1] in log, log[-3000:]
    assert "MoGA 2/2 groups" in log and files["low"][1] in log, log[-3000:]
    assert "were made for" not in log, log[-3000:]


def _image(seed):
    def write(path):
        import imageio.v3 as iio
        import numpy as np
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        cy, cx = rng.integers(16, SIZE - 16, 2)
        img = np.zeros((SIZE, SIZE, 3), np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = rng.integers(64, 256, 3)
        iio.imwrite(path, img)
    return write


def test_i2v_workflow_runs_to_a_video_that_starts_from_the_image(comfy_server, host_files):
    """moga_patch_i2v_14b: Load Image -> Load CLIP Vision + CLIP Vision Encode and core's WanImageToVideo (core's
    VAE encodes the start image) -> KSampler on the patched Wan2.1 I2V model (two shots by shot_frames) -> VAE
    Decode -> Save Video. Run with two start images (the video follows the image) and once without the cut."""
    s, tag = comfy_server, comfy_server.tag
    dit = s.place("diffusion_models", f"{tag}-i2v.safetensors", lambda p: write_core_model(p, seed=21, image=True))
    routers = s.place("moga", f"{tag}-i2v-routers.safetensors", lambda p: write_router_file(p, dit))
    lora = s.place("loras", f"{tag}-i2v-lora.safetensors", lambda p: write_lora(p, 21))
    vae = s.place("vae", f"{tag}-i2v-vae.safetensors", _linked(host_files["wan_vae"]))
    vision = s.place("clip_vision", f"{tag}-vit-h.safetensors", _linked(host_files["clip_vision_h"]))
    images = [s.place_input(f"{tag}-start{i}.png", _image(i)) for i in (1, 2)]

    g = _shipped("moga_patch_i2v_14b_api.json")
    _node(g, "UNETLoader")["unet_name"] = dit.name
    _node(g, "LoraLoaderModelOnly")["lora_name"] = lora.name
    _node(g, "MoGARouterLoader")["routers_name"] = routers.name
    _node(g, "MoGAPatchModel")["shot_frames"] = I2V_SHOTS
    _node(g, "VAELoader")["vae_name"] = vae.name
    _node(g, "CLIPVisionLoader")["clip_name"] = vision.name
    to_video = _node(g, "WanImageToVideo")
    to_video.update(width=SIZE, height=SIZE, length=I2V_FRAMES)
    # CLIP Text Encode (umT5) -> one shot of MoGA Shot Prompts with the DiT file's text encoder
    for text in _nodes(g, "CLIPTextEncode"):
        del g[text]
    g["901"] = {"class_type": "MoGAShotPrompts", "inputs": {"shots": ONE_SHOT, "story": "", "negative": "",
                                                           "default_seconds": 1.0, "fps": 16}}
    g["902"] = {"class_type": "MoGAShotConditioning", "inputs": {"shots": ["901", 0]}}
    _text_from_model(g, "901", dit.name)
    to_video.update(positive=["902", 0], negative=["902", 1])
    _node(g, "SaveVideo")["filename_prefix"] = f"{tag}/i2v"

    videos, log_at = [], s.log_size()
    for image in images:
        _node(g, "LoadImage")["image"] = image.name
        entry = s.run(g)
        assert entry["status"]["status_str"] == "success", _errors(entry)
        frames = _video(s, entry)
        assert frames.shape == (I2V_FRAMES, SIZE, SIZE, 3) and frames.std() > 1.0, (frames.shape, frames.std())
        videos.append(frames.astype(float))
    log = s.log_since(log_at)
    assert "missing clip vision" not in log and "were made for" not in log, log[-3000:]
    assert "MoGA 8/8 groups" in log and routers.name in log, log[-3000:]
    # the start image reached the model (its CLIP features, its VAE latent as the first frame): another image, another
    # video
    assert abs(videos[0] - videos[1]).mean() > 1.0, abs(videos[0] - videos[1]).mean()
    # the patch's shot_frames cut the video under a one-shot MoGA Shot Conditioning: without the cut, another video
    _node(g, "LoadImage")["image"] = images[0].name
    _node(g, "MoGAPatchModel")["shot_frames"] = ""
    entry = s.run(g)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    uncut = _video(s, entry).astype(float)
    assert abs(videos[0] - uncut).mean() > 0.1, abs(videos[0] - uncut).mean()


def _long_graph(model_name, prefix, steps):
    """The T2V patch graph with MoGA from the first step (no dense warm-up) and a latent big enough for steps of
    well over 100 ms (ComfyUI 0.33 reports a step only 100 ms after the last report)."""
    g = _graph(model_name, prefix)
    g["4"]["inputs"]["dense_warmup"] = 0.0
    g["8"]["inputs"].update(width=INTERRUPT_SIZE, height=INTERRUPT_SIZE)
    g["9"]["inputs"]["steps"] = steps
    return g


def test_interrupt_stops_the_patched_sampler_within_a_step(comfy_server):
    """A long KSampler run on a patched model; /interrupt once the first step is reported: the prompt ends
    interrupted, at most the step that was running finishes, and the server runs the next prompt (the same graph,
    a few steps, to its video)."""
    s = comfy_server
    model = s.place("diffusion_models", f"{s.tag}-interrupt.safetensors", write_core_model)
    r = s.interrupt_after_first_step(_long_graph(model.name, f"{s.tag}/interrupted", INTERRUPT_STEPS),
                                     INTERRUPT_STEPS)
    statuses = [m[0] for m in r["entry"]["status"]["messages"]]
    assert r["entry"]["status"]["status_str"] == "error" and "execution_interrupted" in statuses, statuses
    assert "execution_success" not in statuses and not r["entry"]["outputs"], r["entry"]["outputs"]
    values, seen = r["values"], r["seen"]
    # the step that was running may finish; no step after it (the reports count the steps, see below)
    assert values == list(range(1, max(values) + 1)) and max(values) <= seen + 1, (seen, values)

    entry = s.run(_long_graph(model.name, f"{s.tag}/after-interrupt", AFTER_STEPS))
    assert entry["status"]["status_str"] == "success", _errors(entry)
    assert _video(s, entry).shape == (FRAMES, INTERRUPT_SIZE, INTERRUPT_SIZE, 3)
    reports = [(m["data"]["value"], m["_t"]) for m in s.last_messages if m.get("type") == "progress"
               and m["data"].get("node") == "9" and m["data"].get("max") == AFTER_STEPS]
    # every step of this graph is reported on this host (no throttled step), so the counts above are the steps run
    assert [v for v, _ in reports] == list(range(1, AFTER_STEPS + 1)), reports
    step_s = sorted(tb - ta for (_, ta), (_, tb) in zip(reports, reports[1:]))[(AFTER_STEPS - 2) // 2]
    print(f"interrupt on the patch path: saw step {seen}, steps reported {values}, stopped "
          f"{r['stopped_after']:.2f} s after; a step takes {step_s:.2f} s")
    # and no long tail after it (the ~198 steps left would take minutes); loose: the runner is shared and busy
    assert r["stopped_after"] < 3 * step_s + 5.0, (r["stopped_after"], step_s)
