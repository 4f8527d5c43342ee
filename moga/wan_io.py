"""Wan2.1's text encoder (umT5-XXL encoder) and VAE outside ComfyUI, from local files only.

Optional extra: `pip install moga-video[wan]` (transformers for UMT5EncoderModel, diffusers for
AutoencoderKLWan). Nothing here downloads anything: every load passes `local_files_only=True`.
Inside ComfyUI the host's own text encoder and VAE are used instead.

    te = TextEncoder.load("Wan2.1-T2V-1.3B-Diffusers")     # text_encoder/ + tokenizer/ (or one folder)
    emb = te.encode(["a red fox in the snow"])             # [[1, 512, 4096]], zero-padded as Wan
    vae = WanVAE.load("Wan2.1-T2V-1.3B-Diffusers/vae")     # a diffusers folder, or a single .safetensors
    video = decode_shots(vae, latent, shot_frames)         # [1, 3, T, H, W] in [-1, 1], one clip per shot

Both satisfy the contract of `model.text_encoder` / `model.vae` (docs/interfaces.md), so the command line
treats them like the encoders a model brings itself. `save_tiny_text_encoder` / `save_tiny_vae` write
tiny random ones (local folders) for tests.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch

WAN_TEXT_LEN = 512
# Wan2.1's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt), used when a plan gives
# none and the text encoder is umT5 (it is a Chinese list of artefacts: oversaturated, static, blurry, ...).
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
_EXTRA_HINT = "install the optional extra: pip install 'moga-video[wan]' (transformers and diffusers)"


class MissingExtra(ImportError):
    """transformers / diffusers is not installed."""


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise MissingExtra(f"the Wan text encoder/VAE needs the '{module}' package: {_EXTRA_HINT} "
                           f"({e})") from None


def wan_extra_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (html unescape, whitespace collapsed; ftfy's text fixes when installed)."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---- text encoder ------------------------------------------------------------------------------
def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def _find_text_encoder(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) from a diffusers root, a text_encoder folder, or one folder."""
    if not path.exists():
        raise FileNotFoundError(f"text encoder {str(path)!r} does not exist: pass a folder with a UMT5 encoder "
                                f"(config.json + safetensors) and its tokenizer")
    if path.is_file():
        raise ValueError(f"text encoder {str(path)!r} is a file: pass a folder with the UMT5 encoder "
                         f"(config.json + safetensors) and its tokenizer, e.g. a Wan2.1 diffusers folder "
                         f"(text_encoder/ + tokenizer/)")
    model_dir = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json nor text_encoder/config.json: it is not a "
                         f"transformers UMT5 encoder folder")
    for tok in (model_dir, path / "tokenizer", model_dir.parent / "tokenizer"):
        if tok.is_dir() and _has_tokenizer(tok):
            return model_dir, tok
    raise ValueError(f"no tokenizer next to the text encoder in {str(path)!r}: put tokenizer.json / "
                     f"spiece.model in the same folder or in a sibling 'tokenizer' folder")


class TextEncoder:
    """umT5 encoder + tokenizer: `encode(prompts) -> [Tensor [1, text_len, dim]]` (zero-padded as Wan)."""

    def __init__(self, model, tokenizer, text_len: int = WAN_TEXT_LEN, device="cpu", dtype=torch.float32):
        self.model, self.tokenizer = model, tokenizer
        self.text_len, self.device, self.dtype = int(text_len), torch.device(device), dtype
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, path, text_len: int = WAN_TEXT_LEN, device="cpu", dtype=torch.float32) -> "TextEncoder":
        model_dir, tok_dir = _find_text_encoder(Path(path))
        _require("transformers")
        from transformers import AutoTokenizer, UMT5EncoderModel
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, tokenizer, text_len, device, dtype)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.inference_mode()
    def encode(self, prompts) -> list[torch.Tensor]:
        """One [1, text_len, dim] embedding per prompt: the encoder's states for the real tokens, then
        zeros up to text_len (Wan trims at the attention mask and zero-pads). Each distinct prompt is
        encoded once."""
        if isinstance(prompts, str):
            prompts = [prompts]
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            tok = self.tokenizer([clean_prompt(p) for p in todo], padding="max_length", max_length=self.text_len,
                                 truncation=True, add_special_tokens=True, return_attention_mask=True,
                                 return_tensors="pt")
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            for p, s, n in zip(todo, states, mask.sum(1).tolist()):
                out = torch.zeros(1, self.text_len, s.shape[-1])
                out[0, :n] = s[:n].cpu()
                self._cache[p] = out
        return [self._cache[p].clone() for p in prompts]


# ---- VAE ---------------------------------------------------------------------------------------
class WanVAE:
    """AutoencoderKLWan with Wan's latent normalisation: `decode(latent) -> video in [-1, 1]`,
    `encode(video) -> latent` (normalised: (z - mean) / std per channel, as diffusers' Wan pipeline)."""

    temporal_ratio = 4
    spatial_ratio = 8

    def __init__(self, vae, device="cpu", dtype=torch.float32):
        self.vae, self.device, self.dtype = vae, torch.device(device), dtype
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.z_dim = int(cfg.z_dim)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> "WanVAE":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"VAE {str(path)!r} does not exist: pass a diffusers AutoencoderKLWan folder "
                                    f"or a Wan2.1 VAE .safetensors file")
        _require("diffusers")
        from diffusers import AutoencoderKLWan
        if path.is_dir():
            folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
            if not (folder / "config.json").is_file():
                raise ValueError(f"{str(path)!r} has no config.json (nor vae/config.json): not an AutoencoderKLWan "
                                 f"folder")
            vae = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                   low_cpu_mem_usage=False)
        else:
            vae = _vae_from_file(path, AutoencoderKLWan).to(dtype=dtype)
        return cls(vae.to(device=device).eval().requires_grad_(False), device, dtype)

    def _norm(self, t):
        return self.mean.to(t.device), self.std.to(t.device)

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, z, F, h, w] (normalised) -> video [B, 3, 4(F-1)+1, 8h, 8w] in [-1, 1], float32."""
        if latent.dim() != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"latent must be [B, {self.z_dim}, F, h, w], got {tuple(latent.shape)}")
        z = latent.to(self.device, torch.float32)
        mean, std = self._norm(z)
        z = (z * std + mean).to(self.dtype)
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latent (the posterior mean)."""
        x = video.to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode().float()
        mean, std = self._norm(z)
        return (z - mean) / std


def _vae_from_file(path: Path, cls):
    """A single .safetensors: Wan's original key names (ComfyUI's wan_2.1_vae) or diffusers names. The
    config is a config.json next to the file if there is one, else Wan2.1's VAE (the class defaults)."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"VAE file {str(path)!r} is not .safetensors (pickled .pth files are never loaded): "
                         f"use the .safetensors release (e.g. ComfyUI's wan_2.1_vae.safetensors)")
    from safetensors.torch import load_file
    sd = load_file(str(path))
    side = path.with_suffix(".json") if path.with_suffix(".json").is_file() else path.parent / "config.json"
    config = json.loads(side.read_text()) if side.is_file() else {}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = cls(**config)
    if not any(k.startswith(("encoder.conv_in.", "decoder.conv_in.")) for k in sd):
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        sd = convert_wan_vae_to_diffusers(sd)
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match a Wan2.1 VAE: {len(missing)} missing tensors "
                         f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    return vae


def decode_shots(vae, latent: torch.Tensor, shot_frames, progress=None) -> torch.Tensor:
    """Decode each shot's latent frames as its own clip and join them in time, so every cut is a clean cut.
    Works with any `vae.decode(latent) -> [B, 3, T, H, W]` (WanVAE, or a model's own VAE).
    progress(done, num_shots): after every shot."""
    shot_frames = [int(f) for f in shot_frames]
    if sum(shot_frames) != latent.shape[2]:
        raise ValueError(f"shot lengths {shot_frames} do not add up to the latent's {latent.shape[2]} frames")
    clips, start = [], 0
    for i, n in enumerate(shot_frames, 1):
        clips.append(vae.decode(latent[:, :, start:start + n]).float().cpu())
        start += n
        if progress is not None:
            progress(i, len(shot_frames))
    return torch.cat(clips, dim=2)


# ---- tiny random ones for tests ------------------------------------------------------------------
_TINY_CORPUS = (
    "a red circle moves left on a grey background . the knight rides through a forest and reaches a castle ; "
    "she opens the gate , a close-up of a blue square , cinematic light , shot one two three four five"
)


def save_tiny_text_encoder(folder, text_dim: int = 32, seed: int = 0, layers: int = 2, heads: int = 4) -> Path:
    """A tiny random UMT5 encoder (d_model = text_dim) and a small byte-level BPE tokenizer trained on a
    fixed sentence (so any text tokenizes), saved as a local folder that `TextEncoder.load` reads."""
    _require("transformers")
    _require("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=tok.get_vocab_size(), d_model=text_dim, d_kv=text_dim // heads, d_ff=2 * text_dim,
                     num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                     relative_attention_max_distance=32, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_vae_config(z_dim: int = 16) -> dict:
    g = torch.Generator().manual_seed(123)
    return dict(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True],
                latents_mean=(torch.randn(z_dim, generator=g) * 0.5).tolist(),
                latents_std=(0.5 + torch.rand(z_dim, generator=g)).tolist())


def save_tiny_vae(folder, z_dim: int = 16, seed: int = 0, single_file: bool = False) -> Path:
    """A tiny random AutoencoderKLWan (8x spatial, 4x temporal, like Wan's) saved as a diffusers folder, or
    with `single_file` as `folder/vae.safetensors` (+ its config.json beside it). Returns the path to load."""
    _require("diffusers")
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_vae_config(z_dim)
    vae = AutoencoderKLWan(**cfg).eval()
    if not single_file:
        vae.save_pretrained(str(folder), safe_serialization=True)
        return folder
    from safetensors.torch import save_file
    path = folder / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    (folder / "config.json").write_text(json.dumps(cfg))
    return path
