"""Preflight: the memory estimate against measured peaks (torch's profiler on the CPU; the H100 figures of
benchmarks/RESULTS.md), the hard limits, and refusals up front in the CLI and the sampler node."""
import sys
from pathlib import Path

import pytest
import torch

from moga.attention import TokenLayout
from moga.model import WanConfig, WanModel
from moga.preflight import (MAX_LATENT_FRAMES, PreflightError, available_bytes, check_run, estimate_memory,
                            preflight, preflight_model)
from moga.testing import random_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _measured_peak(fn) -> int:
    """Peak bytes of CPU tensors created while fn runs (torch profiler's memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _, action, key, size in prof._memory_profile().timeline:
        if key[0].device.type != "cpu":
            continue
        name = str(action)
        cur += size if name.endswith("CREATE") else -size if name.endswith("DESTROY") else 0
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("dim,ffn", [(64, 128), (128, 512)])
def test_estimate_matches_the_measured_cpu_peak_of_a_forward(dense, dim, ffn):
    torch.manual_seed(0)
    model = tiny_model(dim=dim, ffn_dim=ffn, num_groups=4, num_layers=2, seed=3).eval()
    x, t, ctx = random_inputs(model.config, frames=16, height=32, width=32, seed=4)
    cfg = model.moga_config.replace(dense=dense)
    try:
        with torch.inference_mode():
            peak = _measured_peak(lambda: model(x, t, ctx, moga=cfg))
    except (AttributeError, RuntimeError) as e:  # the profiler's memory timeline is a private API
        pytest.skip(f"torch profiler memory timeline unavailable: {e}")
    n = 16 * 16 * 16
    est = estimate_memory(model.config, n, 16, device_type="cpu", dtype=torch.float32, weight_bytes=0,
                          moga=not dense)
    assert peak > 4 * n * dim  # the measure saw at least the residual stream
    assert 0.85 < est.activations / peak < 1.15, (est.activations, peak)


def _weights(cfg, dtype):
    with torch.device("meta"):
        m = WanModel(cfg)
    return sum(p.numel() for p in m.parameters()) * torch.empty((), dtype=dtype).element_size()


# benchmarks/RESULTS.md, "DiT step" on one H100 (torch.cuda.max_memory_allocated, bf16, weights included;
# measured before moga.fused existed, so the plain elementwise path)
H100_PEAKS = [("1.3B", 32760, 3.9), ("1.3B", 131040, 7.4), ("1.3B", 262080, 12.0),
              ("14B", 32760, 30.5), ("14B", 131040, 41.9), ("14B", 262080, 57.0)]
SHAPES = {"1.3B": (1536, 8960, 12, 30), "14B": (5120, 13824, 40, 40)}


@pytest.mark.parametrize("name,tokens,gib", H100_PEAKS)
def test_estimate_matches_the_h100_figures(name, tokens, gib):
    dim, ffn, heads, layers = SHAPES[name]
    cfg = WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, num_groups=16,
                    moga_layers=tuple(range(layers)))
    est = estimate_memory(cfg, tokens, tokens // 1560, device_type="cuda", dtype=torch.bfloat16,
                          weight_bytes=_weights(cfg, torch.bfloat16), fused_elementwise=False)
    assert 0.95 < est.per_device / 2**30 / gib < 1.05, est.describe()


def test_sequence_parallel_shares_the_activations_not_the_weights():
    cfg = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
    w = _weights(cfg, torch.bfloat16)
    one, two = (estimate_memory(cfg, 262080, 168, device_type="cuda", dtype=torch.bfloat16, weight_bytes=w,
                                world_size=p, moga=False, fused_elementwise=False) for p in (1, 2))
    assert two.weights == one.weights == w
    assert 0.45 < two.activations / one.activations < 0.6  # half the tokens, plus the all-to-all buffers
    # RESULTS.md "sequence parallel": 1.3B at 262k on 2 GPUs peaks at 8.2 GiB per GPU (with NCCL's own buffers)
    assert 0.85 < two.per_device / 2**30 / 8.2 < 1.05, two.describe()
    assert "per GPU (2 GPUs)" in two.describe()
    cpu = estimate_memory(cfg, 1000, 1, device_type="cpu", dtype=torch.float32, weight_bytes=w, world_size=2)
    assert "processes" in cpu.describe() and "GPU" not in cpu.describe()


def test_past_the_frame_limit_is_refused_with_the_estimate():
    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6)
    layout = TokenLayout(MAX_LATENT_FRAMES + 1, 30, 52)
    with pytest.raises(PreflightError, match=r"1,025 latent frames.*GiB.*Fix: shorten the shots"):
        preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=10, available=None)
    check_run(estimate_memory(cfg, 30 * 52 * MAX_LATENT_FRAMES, MAX_LATENT_FRAMES, device_type="cpu",
                              dtype=torch.float32, weight_bytes=10), None)  # the limit itself passes


def test_too_little_memory_is_refused_with_the_estimate_and_the_fix():
    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6)
    layout = TokenLayout(21, 30, 52)
    est = preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=2**20, available=None)
    need = est.per_device
    preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=2**20, available=2 * need)
    with pytest.raises(PreflightError) as err:
        preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=2**20, available=need // 2)
    msg = str(err.value)
    assert "in RAM" in msg and "MiB free" in msg and "tokens fit here" in msg and "more processes" in msg
    with pytest.raises(PreflightError, match="weights alone do not fit"):
        preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=2**30, available=2**29)
    # weights already on the device count as free: the run reuses them
    w = 2**28
    need = preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=w, available=None).per_device
    tight = int(need / 0.95) - w + 2**20
    with pytest.raises(PreflightError):
        preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=w, available=tight)
    preflight(cfg, layout, device="cpu", dtype=torch.float32, weight_bytes=w, available=tight, resident=w)


def test_available_bytes_reads_the_system():
    free = available_bytes("cpu")
    assert free is None or free > 2**20


def test_preflight_model_counts_the_loaded_weights():
    model = tiny_model(num_groups=3, seed=1)
    layout = TokenLayout(4, 8, 8)
    est = preflight_model(model, layout, "cpu", available=None)
    assert est.weights == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    with pytest.raises(PreflightError):
        preflight_model(model, layout, "cpu", available=0)  # resident weights are free, activations are not
    pair = preflight_model(model, layout, "cpu", available=None, experts=2)  # an A14B pair without offload
    assert pair.weights == 2 * est.weights


# ---- the command line: refused before any weight is read ---------------------------------------------
@pytest.fixture()
def tiny_own(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_cli import EXTRAS, _own_encoders

    from moga import checkpoint as ckpt
    from moga.testing import write_tiny_checkpoint
    ckpt.register_extras(EXTRAS, _own_encoders)
    return write_tiny_checkpoint(tmp_path / "own.safetensors", num_groups=3, metadata={"moga.extras": EXTRAS})


def _no_load(monkeypatch):
    from moga import checkpoint as ckpt

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the preflight refused the run")

    monkeypatch.setattr(ckpt, "load_model", load_model)


def test_cli_refuses_a_video_past_the_frame_limit_up_front(tiny_own, tmp_path, monkeypatch, capsys):
    from moga.cli import main
    _no_load(monkeypatch)
    rc = main(["generate", "--model", str(tiny_own), "--prompt", "[1601] one", "--prompt", "[1601] two",
               "--prompt", "[1601] three", "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "x.mp4"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "1,203 latent frames" in err and "GiB" in err and "Fix: shorten the shots" in err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_refuses_a_run_beyond_the_free_memory(tiny_own, tmp_path, monkeypatch, capsys):
    import moga.preflight
    from moga.cli import main
    _no_load(monkeypatch)
    monkeypatch.setattr(moga.preflight, "available_bytes", lambda device: 2**20)
    rc = main(["generate", "--model", str(tiny_own), "--prompt", "[81] a shot", "--size", "832x480",
               "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "x.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "needs about" in err and "in RAM" in err and "Fix: fewer frames or a smaller size" in err


def test_a_guidance_batch_doubles_the_activations_where_sample_batches():
    from moga.preflight import guidance_batch
    from moga.sampling import CFG_BATCH_MAX_TOKENS
    assert guidance_batch("cuda", CFG_BATCH_MAX_TOKENS) == 2 and guidance_batch("cuda", CFG_BATCH_MAX_TOKENS + 1) == 1
    assert guidance_batch("cpu", 1000) == 1 and guidance_batch("cuda", 1000, world_size=2) == 1
    assert guidance_batch("cuda", 1000, cfg=1.0) == 1 and guidance_batch("cpu", 10**6, cfg_batch=True) == 2
    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=6)
    one, two = (estimate_memory(cfg, 4096, 4, device_type="cpu", dtype=torch.float32, weight_bytes=0, batch=b)
                for b in (1, 2))
    assert 1.9 < two.activations / one.activations < 2.0  # all but the shared RoPE table doubles
