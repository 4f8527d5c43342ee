"""MoGA Model Loader: a Wan2.1-architecture checkpoint from ComfyUI's model folders -> MOGA_MODEL."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import folder_paths
from comfy_api.latest import io

from .common import CATEGORY, MoGAModelHandle, MogaLoras, MogaModel, input_error, lora_entry, split_loras

NODE = "MoGA Model Loader"
MOGA_FOLDER = "moga"
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32")
# The choices a person picks from; moga.attention.config.BACKENDS is the library's full list (tests keep them
# in step). "auto" takes the fastest kernel the machine has.
ATTENTION_BACKENDS = ("auto", "fa4", "flash_attn", "sdpa", "torch")
# Weights are safetensors only: pickle files can run code when loaded.
EXTENSIONS = {".safetensors", ".sft"}
CACHE_SIZE = 1  # a Wan 14B is ~28 GB: keep one model, so switching files frees the old one
NO_LOW = "none"  # low_noise_model: one model, not a Wan2.2 A14B pair


def _library_demo_folder() -> str | None:
    """The folder of the model files shipped inside the moga package (the demo model), if any."""
    import importlib.util
    spec = importlib.util.find_spec("moga")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "demo")


def register_folders() -> None:
    """models/moga/ (and the demo model inside the package) as ComfyUI's model folder type 'moga'."""
    folder_paths.add_model_folder_path(MOGA_FOLDER, os.path.join(folder_paths.models_dir, MOGA_FOLDER))
    demo = _library_demo_folder()
    if demo is not None:
        folder_paths.add_model_folder_path(MOGA_FOLDER, demo)
    paths, extensions = folder_paths.folder_names_and_paths[MOGA_FOLDER]
    extensions.update(EXTENSIONS)


def checkpoint_names() -> list[str]:
    """Every safetensors file under models/moga/ and models/diffusion_models/ (models/unet/), sorted."""
    names = set()
    for folder in (MOGA_FOLDER, "diffusion_models"):
        names.update(n for n in folder_paths.get_filename_list(folder) if os.path.splitext(n)[1].lower() in EXTENSIONS)
    return sorted(names)


def resolve(name: str, input_name: str = "ckpt_name") -> str:
    if not isinstance(name, str) or not name:
        raise input_error(NODE, input_name, "no checkpoint chosen",
                          "put a .safetensors file in ComfyUI/models/diffusion_models/ or models/moga/, then press R "
                          "to refresh the list")
    if os.path.splitext(name)[1].lower() not in EXTENSIONS:
        raise input_error(NODE, input_name, f"{name!r} is not a .safetensors file (pickle checkpoints can run "
                          "code and are not loaded)", "convert it to safetensors or pick a .safetensors file")
    for folder in (MOGA_FOLDER, "diffusion_models"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise input_error(NODE, input_name, f"{name!r} is in neither models/diffusion_models/ nor models/moga/",
                      "put the file there and press R to refresh, or pick one from the list")


def torch_dtype(name: str):
    import torch
    table = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise input_error(NODE, "weight_dtype", f"unknown dtype {name!r}", f"pick one of {', '.join(table)}")
    return table[name]


class _ModelCache:
    """The last few loaded models, keyed by file identity and dtype, so that a file is not loaded twice."""

    def __init__(self, size: int):
        self.size = size
        self.models: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0  # how many times a file was actually read (tests check the cache with it)

    @staticmethod
    def key(path: str, dtype, loras=(), pair=None) -> tuple:
        st = os.stat(path)
        pair_key = None
        if pair is not None:  # (low-noise file, boundary, offload, its LoRAs): another pair is another model
            low, boundary, offload, loras_low = pair
            lst = os.stat(low)
            pair_key = (os.path.realpath(low), lst.st_size, lst.st_mtime_ns, boundary, bool(offload),
                        _lora_key(loras_low))
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns, str(dtype), _lora_key(loras), pair_key)

    def get(self, path: str, dtype, load, loras=(), pair=None):
        key = self.key(path, dtype, loras, pair)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            # drop the oldest before loading, so two big models are not held at once for nothing
            while len(self.models) >= self.size:
                self.models.popitem(last=False)
            model = load(path, dtype, loras) if pair is None else load(path, dtype, loras, pair)
            self.loads += 1
            self.models[key] = model
            return model

    def clear(self):
        with self.lock:
            self.models.clear()


def _lora_key(loras) -> tuple:
    return tuple((os.path.realpath(f), s, os.stat(f).st_mtime_ns) for f, s in loras)


CACHE = _ModelCache(CACHE_SIZE)


def _load(path, dtype, loras=()):
    from moga.checkpoint import load_model
    try:  # registers the loader of the demo model's own text encoder and decoder
        import moga.demo  # noqa: F401
    except ImportError:
        pass
    model = load_model(path, device="cpu", dtype=dtype, loras=list(loras))
    model.eval().requires_grad_(False)
    return model


def _load_pair(path, dtype, loras, pair):
    """A Wan2.2 A14B ExpertPair: `path` the high-noise expert with `loras`, pair = (low-noise file, boundary
    or None, offload, the low-noise expert's LoRAs)."""
    from moga.checkpoint import load_experts
    low, boundary, offload, loras_low = pair
    experts = load_experts(path, low, boundary=boundary, offload=offload, device="cpu", dtype=dtype,
                           loras=list(loras), loras_low=list(loras_low))
    for net in (experts.high, experts.low):
        net.eval().requires_grad_(False)
    return experts


class MoGAModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoGAModelLoader",
            display_name=NODE,
            category=CATEGORY,
            description="Loads a Wan2.1/Wan2.2 video DiT (T2V or I2V; a Wan2.2 A14B high + low noise pair as one "
                        "model) whose self-attention runs as Mixture-of-Groups Attention. Accepts Wan-AI originals, "
                        "ComfyUI repackaged files (fp8 scaled too), diffusers files and MoGA checkpoints. A file "
                        "already loaded is reused, not read again.",
            inputs=[
                io.Combo.Input("ckpt_name", options=checkpoint_names(),
                               tooltip="A .safetensors checkpoint from ComfyUI/models/diffusion_models/ or "
                                       "ComfyUI/models/moga/ (the demo model is listed too)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="default: the checkpoint's own dtype (fp8 weights stay fp8 and compute in bf16). "
                                       "bf16 halves memory against fp32; fp32 is the slowest and most exact."),
                io.Combo.Input("attention_backend", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="auto: the fastest variable-length attention kernel this machine has "
                                       "(flash-attn 4 > flash-attn 2 > torch varlen > SDPA per group)."),
                MogaLoras.Input("loras", optional=True,
                                tooltip="LoRAs from MoGA LoRA nodes, merged into the weights as the file loads "
                                        "(the multi-GPU workers load the same); a Wan2.2 pair: each goes to the "
                                        "expert(s) its MoGA LoRA node's 'experts' names."),
                io.Combo.Input("low_noise_model", options=[NO_LOW] + checkpoint_names(), default=NO_LOW,
                               optional=True,
                               tooltip="Wan2.2 A14B: the low-noise expert file (then ckpt_name is the high-noise "
                                       "one). The two run as one model, switching at the boundary."),
                io.Float.Input("boundary", default=0.0, min=0.0, max=0.999, step=0.005, round=0.001,
                               optional=True,
                               tooltip="Wan2.2 A14B: where the low-noise expert takes over, a fraction of the "
                                       "timestep range. 0: Wan2.2's own (0.875 text-to-video, 0.9 image-to-video)."),
                io.Boolean.Input("offload_expert", default=False, optional=True,
                                 tooltip="Wan2.2 A14B: keep the expert not in use on the CPU, so only one is on "
                                         "the GPU (costs one copy of each expert per run)."),
            ],
            outputs=[MogaModel.Output(display_name="model")],
        )

    @classmethod
    def fingerprint_inputs(cls, ckpt_name, weight_dtype, attention_backend, loras=None, low_noise_model=NO_LOW,
                           boundary=0.0, offload_expert=False):
        try:
            path = resolve(ckpt_name)
            low = None if low_noise_model in (None, "", NO_LOW) else resolve(low_noise_model, "low_noise_model")
            return (path, os.path.getmtime(path), weight_dtype, attention_backend,
                    tuple(tuple(x) + (os.path.getmtime(x[0]),) for x in loras or ()),
                    low, low and os.path.getmtime(low), boundary, offload_expert)
        except (ValueError, OSError):
            return float("nan")  # never equal: the error shows again on the next run

    @classmethod
    def execute(cls, ckpt_name, weight_dtype="default", attention_backend="auto", loras=None,
                low_noise_model=NO_LOW, boundary=0.0, offload_expert=False) -> io.NodeOutput:
        path = resolve(ckpt_name)
        pair = None
        try:
            loras = tuple(lora_entry(x) for x in loras or ())
        except (ValueError, TypeError) as e:
            raise input_error(NODE, "loras", f"is not a LoRA list ({e})", "connect the output of a MoGA LoRA node") \
                from e
        loras_high, loras_low = split_loras(loras)
        if low_noise_model not in (None, "", NO_LOW):
            low = resolve(low_noise_model, "low_noise_model")
            if os.path.realpath(low) == os.path.realpath(path):
                raise input_error(NODE, "low_noise_model", "is the same file as ckpt_name",
                                  "pick the high-noise expert in ckpt_name and the low-noise one here")
            if not 0.0 <= float(boundary) < 1.0:
                raise input_error(NODE, "boundary", f"{boundary} is outside 0..1",
                                  "use 0 (Wan2.2's own) or a fraction like 0.875")
            pair = (low, float(boundary) or None, bool(offload_expert), tuple(loras_low))
        else:
            one_expert = [x for x in loras if x[2] != "both"]
            if one_expert:
                name, _, experts = one_expert[0]
                raise input_error(NODE, "loras", f"the LoRA {os.path.basename(name)!r} is for the "
                                  f"{experts.replace('_', '-')} expert of a Wan2.2 A14B pair (its MoGA LoRA node's "
                                  f"experts: {experts}), but {ckpt_name!r} is loaded as one model",
                                  "set that MoGA LoRA node's 'experts' to both, or pick the low-noise expert's "
                                  "file in low_noise_model (then ckpt_name is the high-noise one)")
        dtype = torch_dtype(weight_dtype)
        if attention_backend not in ATTENTION_BACKENDS:
            raise input_error(NODE, "attention_backend", f"unknown backend {attention_backend!r}",
                              f"pick one of {', '.join(ATTENTION_BACKENDS)}")
        try:
            model = CACHE.get(path, dtype, _load_pair if pair else _load, tuple(loras_high), pair)
        except (ValueError, OSError) as e:
            if loras and "LoRA" in str(e):
                into = f"{ckpt_name!r} + {low_noise_model!r}" if pair else repr(ckpt_name)
                raise input_error(NODE, "loras", f"a LoRA could not be merged into {into}: {e}",
                                  "pick a LoRA made for this model (a Wan2.2 pair: set each MoGA LoRA node's "
                                  "'experts' to the expert its file is for), or remove the MoGA LoRA node") from e
            if pair:
                raise input_error(NODE, "low_noise_model", f"{ckpt_name!r} + {low_noise_model!r} could not be "
                                  f"loaded as a Wan2.2 A14B pair: {e}",
                                  "pick the high- and low-noise files of one Wan2.2 A14B model") from e
            raise input_error(NODE, "ckpt_name", f"{ckpt_name!r} could not be loaded: {e}",
                              "pick a Wan2.1/Wan2.2-architecture checkpoint") from e
        first = getattr(model, "high", model)  # an expert pair: the high-noise expert answers shape questions
        # each expert runs with its own routers' settings (group count, window, fusion, capacity)
        moga = first.moga_config.replace(backend=attention_backend)
        moga_low = model.low.moga_config.replace(backend=attention_backend) if pair else None
        # None lets the sampler compute in the checkpoint's dtype (fp8 files: bf16)
        compute = dtype if dtype is not None else getattr(first, "compute_dtype", None)
        return io.NodeOutput(MoGAModelHandle(model=model, name=ckpt_name, path=path, dtype=compute, moga=moga,
                                             moga_low=moga_low,
                                             dense_warmup=float(getattr(first, "dense_warmup", 0.0) or 0.0),
                                             loras=loras))


register_folders()
