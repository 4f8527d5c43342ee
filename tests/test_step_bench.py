"""benchmarks/step_profile.py's trace reading (a synthetic Chrome trace with known answers) and
benchmarks/dit.py --variants/--profile on the CPU (every code path of the GPU command, tiny config)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks" / "step_profile.py")
step_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_profile)


def _x(cat, name, ts, dur, tid=1, corr=None):
    e = dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid)
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_kernels_are_filed_under_the_ranges_open_at_their_launch():
    ev = [
        _x("user_annotation", "moga::cross-attn (non-matmul)", 0, 100),
        _x("cpu_op", "aten::linear", 5, 20), _x("cpu_op", "aten::addmm", 6, 18),
        _x("cuda_runtime", "cudaLaunchKernel", 10, 1, corr=1),            # matmul inside cross-attn
        _x("cpu_op", "aten::_scaled_dot_product_flash_attention", 40, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 45, 1, corr=2),            # SDPA inside cross-attn -> cross
        _x("user_annotation", "moga::q/k norm + RoPE", 200, 50),
        _x("cuda_driver", "cuLaunchKernel", 210, 1, corr=3),              # a Triton kernel
        _x("cpu_op", "aten::gelu", 300, 10), _x("cuda_runtime", "cudaLaunchKernel", 302, 1, corr=4),
        _x("cpu_op", "aten::_to_copy", 400, 10), _x("cpu_op", "aten::copy_", 401, 8),
        _x("cuda_runtime", "cudaLaunchKernel", 403, 1, corr=5),
        _x("cuda_runtime", "cudaLaunchKernel", 500, 1, corr=6),           # outside everything
        _x("cuda_runtime", "cudaLaunchKernel", 600, 1, tid=2, corr=7),    # another thread, no ranges
    ]
    for corr, (name, dur) in enumerate([("sm90_xmma_gemm_bf16", 3000), ("flash_fwd", 500), ("rms_rope_kernel", 200),
                                        ("gelu_kernel", 100), ("copy_kernel", 50), ("reduce_kernel", 25),
                                        ("nvjet_tst_128x256", 70)], start=1):
        ev.append(_x("kernel", name, 1000 + corr, dur, tid=7, corr=corr))
    got = step_profile.families({"traceEvents": ev})
    ms = {r["family"]: r["ms"] for r in got["rows"]}
    assert ms == {"matmul": 3.07, "cross-attn (non-matmul)": 0.5, "q/k norm + RoPE": 0.2, "GELU": 0.1,
                  "casts": 0.05, "other": 0.025}
    assert got["kernels_counted"] == 7 and abs(got["total_ms"] - 3.945) < 1e-9
    assert abs(sum(r["share"] for r in got["rows"]) - 1) < 1e-9


def test_dit_variants_smoke(tmp_path):
    out = tmp_path / "dit.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dit.py"), "--smoke", "--variants",
                    "baseline,fused-r1,fused,fp8-r1,fp8", "--blocks", "1", "--groups", "2,3", "--groups-per-size", "--capacity", "1",
                    "--no-dense", "--repeats", "1", "--profile", "--chunks", "16384,32", "--json", str(out)],
                   check=True, cwd=ROOT, timeout=600, capture_output=True)
    info = json.loads(out.read_text())
    rows = info["results"]
    assert {(r["tokens"], r["groups"]) for r in rows} == {(48, 2), (96, 3)}
    assert {r["variant"] for r in rows} == {"baseline", "fused-r1", "fused", "fused chunk 32", "fp8-r1", "fp8"}
    moga = [r for r in rows if r["mode"] != "rest"]
    assert all(r["rel_err_vs_first"] == 0 for r in moga if r["variant"] == "baseline")
    # on the CPU the fused kernels do not run: same output; smaller chunks: same maths
    assert all(r["rel_err_vs_first"] < 1e-6 for r in moga if r["variant"].startswith("fused"))
    assert all(1e-3 < r["rel_err_vs_first"] < 0.1 for r in moga if r["variant"].startswith("fp8"))  # forced reference
    assert "8.9" in info["fp8"]["reason"]
    prof = info["profile"]["variants"]
    assert set(prof) == {"baseline", "fused-r1", "fused", "fp8-r1", "fp8"} and all(p["total_ms"] > 0 for p in prof.values())
    assert "fp8 quantise" in {r["family"] for r in prof["fp8"]["rows"]}
