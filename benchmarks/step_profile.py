"""Where a DiT step's device time goes, by op family: torch.profiler + labelled ranges, read from the trace.

`labelled(model)` wraps the functions a step calls (attention, varlen kernel, router, q/k norm+RoPE,
modulation, norm3, cross-attention, fp8 quantisation) in `record_function("moga::<family>")` ranges;
`profile_step(fn)` runs fn under the profiler and returns the Chrome trace (a dict); `families(trace)` maps
every GPU kernel to the launch that queued it (correlation id), takes the CPU ranges open at that launch,
and files the kernel's time under: matmul (any aten mm/addmm/_scaled_mm around it), else the innermost
moga:: label, else by the aten op (casts, residual adds, GELU), else "other". On a CPU (no kernels) the
leaf CPU ops stand in for kernels.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear")
OP_FAMILIES = {  # the innermost aten op -> family, when no moga:: label applies
    "aten::to": "casts", "aten::_to_copy": "casts", "aten::copy_": "casts", "aten::type_as": "casts",
    "aten::addcmul": "residual adds", "aten::addcmul_": "residual adds", "aten::add": "residual adds",
    "aten::add_": "residual adds", "aten::gelu": "GELU",
}
SDPA_PREFIXES = ("aten::scaled_dot_product", "aten::_scaled_dot_product", "aten::_flash", "aten::_efficient",
                 "aten::_cudnn")
LABELS = {  # family -> (module, attribute) wrapped by `labelled`
    "attention varlen": [("moga.attention.mixture", "varlen_attention")],
    "MoGA gathers/scatters/merge": [("moga.attention.layer", "_moga_attention")],
    "dense self-attention": [("moga.attention.layer", "dense_attention")],
    "router": [("moga.attention.layer", "_route")],
    "q/k norm + RoPE": [("moga.attention.layer", "norm_rope"), ("moga.model", "norm_rope")],
    "norms/modulation": [("moga.fused", "modulate_cast"), ("moga.fused", "layer_norm_cast")],
    "fp8 quantise": [("moga.fp8", "quantize_activation")],
    "residual + norm (fused)": [("moga.fused", "residual_norm")],
    "GELU + fp8 quantise (fused)": [("moga.fused", "gelu_quant")],
}
CROSS = "cross-attn (non-matmul)"
ORDER = ("matmul", "attention varlen", "dense self-attention", "MoGA gathers/scatters/merge", "router",
         "q/k norm + RoPE", "norms/modulation", "fp8 quantise", "residual + norm (fused)",
         "GELU + fp8 quantise (fused)", CROSS, "GELU", "residual adds", "casts",
         "attention (SDPA)", "other")


def _wrap(fn, label):
    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)
    wrapped.__wrapped__ = fn
    return wrapped


@contextlib.contextmanager
def labelled():
    """Label the step's parts for the profiler (undone on exit)."""
    import importlib

    from moga.model import WanCrossAttention
    saved = []
    for family, targets in LABELS.items():
        for mod_name, attr in targets:
            mod = importlib.import_module(mod_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, _wrap(getattr(mod, attr), f"moga::{family}"))
    saved.append((WanCrossAttention, "forward", WanCrossAttention.forward))
    WanCrossAttention.forward = _wrap(WanCrossAttention.forward, f"moga::{CROSS}")
    try:
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


def profile_step(fn, device) -> dict:
    """Run fn() once under torch.profiler (with the labels); the Chrome trace as a dict."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with labelled(), torch.profiler.profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


def _classify(stack: list[str], kernel: str) -> str:
    if any(n in MATMUL_OPS for n in stack):
        return "matmul"
    for n in reversed(stack):
        if n.startswith("moga::"):
            return n[len("moga::"):]
    for n in reversed(stack):
        if n in OP_FAMILIES:
            return OP_FAMILIES[n]
        if n.startswith(SDPA_PREFIXES):
            return "attention (SDPA)"
    if any(s in kernel.lower() for s in ("gemm", "nvjet", "xmma")):
        return "matmul"
    return "other"


def families(trace: dict) -> dict:
    """{family: device ms} plus the top kernels, from a Chrome trace of one step."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    ranges, launches, kernels = {}, {}, []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("cpu_op", "user_annotation"):
            ranges.setdefault(e.get("tid"), []).append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)),
                                                        e["name"]))
        elif cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e.get("tid"), float(e["ts"]))
        elif cat == "kernel":
            kernels.append(e)
    stacks = _stacks_at(ranges, launches)
    out, top = {}, {}
    if kernels:
        for k in kernels:
            stack = stacks.get(k.get("args", {}).get("correlation"), [])
            fam = _classify(stack, k["name"])
            ms = float(k.get("dur", 0)) / 1e3
            out[fam] = out.get(fam, 0.0) + ms
            top[(fam, k["name"][:90])] = top.get((fam, k["name"][:90]), 0.0) + ms
    else:  # CPU: leaf ops (no op inside them) stand in for kernels
        for tid, rs in ranges.items():
            rs = sorted(rs, key=lambda r: (r[0], -r[1]))
            for i, (a, b, name) in enumerate(rs):
                if name.startswith("moga::") or (i + 1 < len(rs) and rs[i + 1][0] < b):
                    continue
                stack = [n for (x, y, n) in rs if x <= a and b <= y]
                fam = _classify(stack, name)
                out[fam] = out.get(fam, 0.0) + (b - a) / 1e3
    total = sum(out.values())
    rows = [dict(family=f, ms=out[f], share=out[f] / total if total else 0.0)
            for f in sorted(out, key=lambda f: ORDER.index(f) if f in ORDER else len(ORDER))]
    kern = [dict(family=f, kernel=n, ms=v) for (f, n), v in sorted(top.items(), key=lambda kv: -kv[1])[:25]]
    return dict(total_ms=total, kernels_counted=len(kernels), rows=rows, top_kernels=kern)


def _stacks_at(ranges: dict, launches: dict) -> dict:
    """correlation id -> names of the CPU ranges open at its launch (outermost first), per thread."""
    by_tid: dict = {}
    for corr, (tid, ts) in launches.items():
        by_tid.setdefault(tid, []).append((ts, corr))
    out = {}
    for tid, ls in by_tid.items():
        rs = sorted(ranges.get(tid, []), key=lambda r: (r[0], -r[1]))
        ls.sort()
        stack, i = [], 0
        for ts, corr in ls:
            while i < len(rs) and rs[i][0] <= ts:
                while stack and stack[-1][1] < rs[i][0]:
                    stack.pop()
                stack.append(rs[i])
                i += 1
            while stack and stack[-1][1] < ts:
                stack.pop()
            out[corr] = [r[2] for r in stack if r[0] <= ts <= r[1]]
    return out


def table(prof: dict, title: str) -> str:
    lines = [f"\n{title}: {prof['total_ms']:.1f} ms of device time", "| op family | ms | share |", "|---|---|---|"]
    for r in prof["rows"]:
        lines.append(f"| {r['family']} | {r['ms']:.1f} | {r['share']:.1%} |")
    return "\n".join(lines)
