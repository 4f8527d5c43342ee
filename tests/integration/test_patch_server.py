"""MoGA on core's own pipeline, against a real ComfyUI server (see conftest.py): the patch nodes are in /object_info,
and an API graph of core nodes (Load Diffusion Model -> ModelSamplingSD3 -> MoGA Patch Model -> KSampler) plus the
shot nodes runs on a tiny checkpoint to a saved video with one frame per planned frame."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from .run_model import write_core_model  # noqa: E402

PATCH_NODES = {"MoGARouterLoader": ["MOGA_ROUTERS"], "MoGAPatchModel": ["MODEL"],
               "MoGAShotConditioning": ["CONDITIONING", "CONDITIONING"], "MoGAEmptyMultiShotLatent": ["LATENT"]}
# the demo model's world words (its text encoder knows no others); 5 + 9 frames -> 2 + 3 latent frames
SHOTS = "a small red circle moves right on a black background [5]\nit moves left on a black background [9]"
FRAMES = 14


def _errors(entry) -> str:
    msgs = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    return json.dumps([{k: m.get(k) for k in ("node_type", "exception_message", "traceback")} for m in msgs])[:4000]


def test_patch_nodes_are_listed(object_info, offline_info):
    pack = offline_info
    for name, outputs in PATCH_NODES.items():
        assert name in object_info, f"{name} missing from /object_info"
        assert object_info[name]["output"] == outputs
        assert set(object_info[name]["input"]["required"]) == set(pack[name]["input"]["required"]), name


def _graph(model_name, prefix):
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 5.0}},
        "3": {"class_type": "MoGARouterLoader", "inputs": {"routers_name": model_name}},
        "4": {"class_type": "MoGAPatchModel", "inputs": {
            "model": ["2", 0], "routers": ["3", 0], "groups": 0, "window": "", "window_branch": True,
            "frame_branch": True, "routed_layers": "all", "fusion": "routers", "dense_warmup": 0.3,
            "capacity": 1.0, "shot_frames": ""}},
        "5": {"class_type": "MoGAModelLoader", "inputs": {"ckpt_name": model_name, "weight_dtype": "fp32",
                                                         "attention_backend": "auto"}},
        "6": {"class_type": "MoGAShotPrompts", "inputs": {"shots": SHOTS, "story": "", "negative": "",
                                                         "default_seconds": 1.0, "fps": 8, "model": ["5", 0]}},
        "7": {"class_type": "MoGAShotConditioning", "inputs": {"shots": ["6", 0]}},
        "8": {"class_type": "MoGAEmptyMultiShotLatent", "inputs": {"shots": ["6", 0], "width": 64, "height": 64,
                                                                  "batch_size": 1,
                                                                  "latent_format": "wan2.1 (16 ch, /8)"}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 3, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["7", 0], "negative": ["7", 1], "latent_image": ["8", 0], "denoise": 1.0}},
        "10": {"class_type": "MoGADecode", "inputs": {"samples": ["9", 0], "model": ["5", 0]}},
        "11": {"class_type": "CreateVideo", "inputs": {"images": ["10", 0], "fps": ["10", 1]}},
        "12": {"class_type": "SaveVideo", "inputs": {"video": ["11", 0], "filename_prefix": prefix, "format": "auto",
                                                     "codec": "auto"}},
    }
    return g


def test_core_ksampler_runs_a_patched_model_to_a_video(comfy_server):
    import imageio.v3 as iio
    model = comfy_server.place("diffusion_models", f"{comfy_server.tag}-core.safetensors", write_core_model)
    entry = comfy_server.wait(comfy_server.queue(_graph(model.name, f"{comfy_server.tag}/patch")), timeout=300)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    items = [i for out in entry["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    assert len(items) == 1, entry["outputs"]
    path = comfy_server.comfy / "output" / items[0]["subfolder"] / items[0]["filename"]
    comfy_server.cleanup.append(path.parent)
    frames = iio.imread(path)
    assert frames.shape == (FRAMES, 64, 64, 3) and frames.std() > 1.0
    log = (comfy_server.state / "server.log").read_text(errors="replace")
    assert "were made for" not in log  # the checkpoint's own routers: no mismatch warning


def test_a_bad_patch_setting_is_an_error_naming_the_node(comfy_server):
    model = comfy_server.place("diffusion_models", f"{comfy_server.tag}-core2.safetensors", write_core_model)
    g = _graph(model.name, f"{comfy_server.tag}/bad")
    g["4"]["inputs"]["window"] = "0,0,2"  # rows 0: an invalid window
    entry = comfy_server.wait(comfy_server.queue(g), timeout=300)
    assert entry["status"]["status_str"] == "error"
    text = _errors(entry)
    assert "MoGA Patch Model" in text and "window" in text, text
