"""Checks ComfyUI workflow files against node definitions (GET /object_info entries), both formats.

- API format (what POST /prompt takes): {id: {"class_type", "inputs": {name: value | [src_id, slot]}}}.
- UI format (what the editor saves and the template browser serves): {"nodes": [...], "links": [...], ...}; widget
  values are positional, in the order the frontend makes widgets: every widget input of the node definition
  (required, then optional), and one extra value after each INT with control_after_generate.
- Dynamic combos (COMFY_DYNAMICCOMBO_V3, ComfyUI 0.33+, e.g. Save Video's `format`): the chosen option's own inputs
  follow the combo, named "parent.child" (`format.codec`), in the widget order and in the API graph.

`ui_to_api` turns a UI graph into the API graph the frontend sends for it; `as_sent` fills an API graph's left-out
widget inputs the way a host reads them (defaults); `api_to_ui` lays an API graph out as a UI graph (how the UI
workflows in workflows/ were written); `overlaps` finds nodes drawn over each other. Core node definitions come
from snapshots of real hosts (tests/data/comfyui_v*_core_nodes.json; `python tests/workflow_check.py --snapshot
PORT` writes one from a running server). Used by tests/test_workflows.py and tests/integration.
"""
from __future__ import annotations

import json
import math
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
OLDEST = "0.3.64"  # the UI files are written for the oldest supported ComfyUI; newer ones read them too
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
# Inputs whose options are the files in a model folder: any file name is accepted, since the list depends on
# what the user has downloaded.
FILE_INPUTS = {("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"), ("UNETLoader", "unet_name"),
               ("MoGAModelLoader", "ckpt_name"), ("MoGAModelLoader", "low_noise_model"), ("MoGALora", "lora_name"),
               ("MoGARouterLoader", "routers_name"),
               ("LoraLoaderModelOnly", "lora_name"), ("CLIPVisionLoader", "clip_name"), ("LoadImage", "image")}
CORE_NODE_NAMES = ["CLIPLoader", "VAELoader", "CreateVideo", "SaveVideo", "UNETLoader", "VAEDecode", "KSampler",
                   "ModelSamplingSD3", "LoraLoaderModelOnly", "KSamplerAdvanced", "LoadImage", "CLIPVisionLoader",
                   "CLIPVisionEncode", "WanImageToVideo", "CLIPTextEncode"]
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def snapshot_path(version: str) -> Path:
    return DATA / f"comfyui_v{version}_core_nodes.json"


def snapshot_versions() -> list[str]:
    """The ComfyUI versions with a core-node snapshot, oldest first."""
    found = [re.fullmatch(r"comfyui_v(.+)_core_nodes\.json", p.name) for p in DATA.glob("comfyui_v*_core_nodes.json")]
    return sorted((m.group(1) for m in found if m), key=lambda v: tuple(int(x) for x in v.split(".")))


def core_object_info(version: str = OLDEST) -> dict:
    path = snapshot_path(version)
    if not path.exists():
        raise FileNotFoundError(f"no snapshot of ComfyUI v{version}'s core nodes ({path}): start that host and run "
                                f"python tests/workflow_check.py --snapshot PORT")
    return json.loads(path.read_text())["nodes"]


def _options(t, opts) -> list:
    if t == DYNAMIC_COMBO:
        return [o["key"] for o in opts.get("options", [])]
    return opts.get("options", [])


def fields(entry: dict, chosen: dict | None = None) -> dict:
    """{input name: (type, options dict, required, nested)} in the frontend's order. A v1 combo (a list of
    options) becomes COMBO; a dynamic combo is followed by the inputs of its option in `chosen` (else its first),
    named "parent.child". Nested inputs count as not required: a host fills them (from a hidden input of the same
    name where the node keeps one, as Save Video does for `codec`)."""
    chosen = chosen or {}
    out = {}

    def add(inputs: dict, order: dict | None, prefix: str, top: bool):
        order = order or {k: list(v) for k, v in inputs.items()}
        for kind in ("required", "optional"):
            for name in order.get(kind, []):
                item = inputs[kind][name]
                t, opts = item[0], (item[1] if len(item) > 1 else {})
                if isinstance(t, list):
                    t, opts = "COMBO", dict(opts, options=t)
                full = prefix + name
                out[full] = (t, opts, kind == "required" and top, not top)
                if t == DYNAMIC_COMBO and opts.get("options"):
                    key = chosen.get(full, default_value(t, opts))
                    option = next((o for o in opts["options"] if o["key"] == key), None)
                    if option is not None:
                        add(option["inputs"], None, full + ".", False)
    add(entry["input"], entry.get("input_order"), "", True)
    return out


def spec(entry: dict, name: str, chosen: dict | None = None):
    """(type, options dict, required) of one input, or None."""
    f = fields(entry, chosen).get(name)
    return f[:3] if f else None


def input_names(entry: dict, chosen: dict | None = None) -> list[str]:
    return list(fields(entry, chosen))


def default_value(t, opts):
    """The value a frontend gives a new widget."""
    if "default" in opts:
        return opts["default"]
    if t in ("COMBO", DYNAMIC_COMBO):
        options = _options(t, opts)
        return options[0] if options else None
    return {"INT": opts.get("min", 0), "FLOAT": opts.get("min", 0.0), "STRING": "", "BOOLEAN": False}.get(t)


def is_widget(t, opts) -> bool:
    return t in WIDGET_TYPES and not opts.get("forceInput")


def _slots(f: dict) -> list[tuple[str, str]]:
    slots = []
    for name, (t, opts, _, _) in f.items():
        if is_widget(t, opts):
            slots.append((name, "value"))
            if opts.get("control_after_generate"):
                slots.append((name, "control"))
    return slots


def widget_slots(entry: dict, values: list | None = None) -> list[tuple[str, str]]:
    """The positional widgets_values layout: (input name, "value" | "control") per slot. A dynamic combo's nested
    widgets follow it and depend on the option chosen, read from `values` at the combo's slot."""
    values, chosen = values or [], {}
    while True:
        f = fields(entry, chosen)
        slots = _slots(f)
        # the first combo whose value is not yet read: read it and lay out again (its options come after it)
        unread = next(((k, n) for k, (n, kind) in enumerate(slots) if kind == "value" and k < len(values)
                       and f[n][0] == DYNAMIC_COMBO and n not in chosen), None)
        if unread is None:
            return slots
        chosen[unread[1]] = values[unread[0]]


def types_match(out_type: str, in_type: str) -> bool:
    """ComfyUI's rule: '*' matches anything; comma lists match when one is a subset of the other."""
    if out_type == "*" or in_type == "*":
        return True
    a, b = set(str(out_type).split(",")), set(str(in_type).split(","))
    return a <= b or b <= a


def check_value(node: str, cls: str, name: str, t: str, opts: dict, value) -> list[str]:
    where = f"node {node} ({cls}) input '{name}'"
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: {value!r} is not an integer"]
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: {value!r} is not a number"]
    elif t == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    elif t == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not true/false"]
    elif t in ("COMBO", DYNAMIC_COMBO):
        if (cls, name) in FILE_INPUTS:
            return [] if isinstance(value, str) and value else [f"{where}: {value!r} is not a file name"]
        return [] if value in _options(t, opts) else [f"{where}: {value!r} not in {_options(t, opts)}"]
    if t in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return [f"{where}: {value} below min {opts['min']}"]
        if "max" in opts and value > opts["max"]:
            return [f"{where}: {value} above max {opts['max']}"]
    return []


# -------------------------------------------------------------------------------------------------------- API format
def check_api(graph: dict, info: dict) -> list[str]:
    problems = []
    if not isinstance(graph, dict) or "nodes" in graph:
        return ["not an API-format graph ({id: {class_type, inputs}})"]
    outputs = []
    for nid, node in graph.items():
        cls = node.get("class_type")
        if cls not in info:
            problems.append(f"node {nid}: unknown class_type {cls!r}")
            continue
        entry = info[cls]
        if entry.get("output_node"):
            outputs.append(nid)
        given = node.get("inputs", {})
        known = fields(entry, given)
        for name in given:
            if name not in known:
                problems.append(f"node {nid} ({cls}): unknown input {name!r}")
        for name, (t, opts, required, _) in known.items():
            if name not in given:
                if required:
                    problems.append(f"node {nid} ({cls}): required input {name!r} missing")
                continue
            value = given[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                if src not in graph:
                    problems.append(f"node {nid} ({cls}) input {name!r}: links to missing node {src}")
                    continue
                src_cls = graph[src].get("class_type")
                if src_cls not in info:
                    continue
                src_out = info[src_cls]["output"]
                if not (isinstance(slot, int) and 0 <= slot < len(src_out)):
                    problems.append(f"node {nid} ({cls}) input {name!r}: {src_cls} has no output {slot}")
                elif not types_match(src_out[slot], t):
                    problems.append(f"node {nid} ({cls}) input {name!r} ({t}) linked to {src_cls} output "
                                    f"{slot} ({src_out[slot]})")
            elif is_widget(t, opts):
                problems += check_value(nid, cls, name, t, opts, value)
            else:
                problems.append(f"node {nid} ({cls}) input {name!r} ({t}) needs a link, got {value!r}")
    if not outputs:
        problems.append("no output node: the server would refuse the prompt")
    return problems


# --------------------------------------------------------------------------------------------------------- UI format
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def check_ui(graph: dict, info: dict) -> list[str]:
    problems = []
    for key in ("nodes", "links", "version"):
        if key not in graph:
            problems.append(f"UI graph has no {key!r}")
    if problems:
        return problems
    nodes = {n["id"]: n for n in graph["nodes"]}
    if len(nodes) != len(graph["nodes"]):
        problems.append("two nodes share an id")
    links = {}
    for link in graph["links"]:
        lid, src, src_slot, dst, dst_slot, t = link
        links[lid] = link
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid} joins missing nodes {src} -> {dst}")
            continue
        s, d = nodes[src], nodes[dst]
        outs, ins = s.get("outputs", []), d.get("inputs", [])
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: node {src} output {src_slot} does not list it")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: node {dst} input {dst_slot} does not hold it")
        elif outs and src_slot < len(outs):
            if not types_match(outs[src_slot]["type"], ins[dst_slot]["type"]) or not types_match(t, ins[dst_slot]["type"]):
                problems.append(f"link {lid}: type {outs[src_slot]['type']} -> {ins[dst_slot]['type']}")
    if graph.get("last_link_id", 0) < max(links, default=0) or graph.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id/last_link_id lower than an id in use (the editor would reuse ids)")
    for nid, node in nodes.items():
        cls = node["type"]
        if cls in FRONTEND_ONLY:
            continue
        if cls not in info:
            problems.append(f"node {nid}: missing node type {cls!r}")
            continue
        entry = info[cls]
        by_name = {i["name"]: i for i in node.get("inputs", [])}
        values = node.get("widgets_values", [])
        slots = widget_slots(entry, values)
        known = fields(entry, dict(zip((n for n, _ in slots), values)))
        for i in node.get("inputs", []):
            sp = known.get(i["name"])
            if sp is None:
                problems.append(f"node {nid} ({cls}): unknown input slot {i['name']!r}")
            elif not types_match(sp[0], i["type"]):
                problems.append(f"node {nid} ({cls}) slot {i['name']!r}: type {i['type']} but the node takes {sp[0]}")
        for k, o in enumerate(node.get("outputs", [])):
            if k >= len(entry["output"]) or not types_match(entry["output"][k], o["type"]):
                problems.append(f"node {nid} ({cls}): output {k} {o.get('type')} not in {entry['output']}")
        # fewer values than widgets is how a newer ComfyUI reads an older file: the widgets it added since (optional
        # or nested inputs) take their defaults; a required one missing shifts every value after it
        short = [n for n, _ in slots[len(values):] if known[n][2]]
        if len(values) > len(slots) or short:
            problems.append(f"node {nid} ({cls}): {len(values)} widget values for {len(slots)} widgets "
                            f"{[n for n, _ in slots]}")
            continue
        for (name, kind), value in zip(slots, values):
            t, opts, _, _ = known[name]
            if kind == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"node {nid} ({cls}) '{name}' control {value!r} not in {CONTROL_VALUES}")
            elif not (name in by_name and by_name[name].get("link") is not None):
                problems += check_value(nid, cls, name, t, opts, value)
        for name, (t, opts, required, _) in known.items():
            if required and not is_widget(t, opts) and (name not in by_name or by_name[name].get("link") is None):
                problems.append(f"node {nid} ({cls}): required input {name!r} ({t}) is not connected")
    return problems


def ui_to_api(graph: dict, info: dict) -> dict:
    """The API graph a UI graph runs as (what the frontend's Queue sends and 'Export (API)' writes): widgets the
    file has no value for (added by a newer ComfyUI) at their defaults."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {l[0]: l for l in graph["links"]}
    api = {}
    for nid, node in nodes.items():
        cls = node["type"]
        if cls in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed nodes do not run
            continue
        entry = info[cls]
        inputs, values = {}, node.get("widgets_values", [])
        slots = widget_slots(entry, values)
        known = fields(entry, dict(zip((n for n, _ in slots), values)))
        for k, (name, kind) in enumerate(slots):
            if kind == "value":
                inputs[name] = values[k] if k < len(values) else default_value(*known[name][:2])
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, _, _, _ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        api[str(nid)] = {"class_type": cls, "inputs": inputs}
    return api


def as_sent(graph: dict, info: dict) -> dict:
    """An API graph as a host reads it: every widget input it leaves out at its default, as ComfyUI runs it. A
    dynamic combo's nested input that is left out takes the value of the hidden input of the same name where the
    node keeps one (Save Video's old `codec` for 0.33's `format.codec`), which then takes its default: what the
    frontend does with an older file's value, and what the node does with the old input."""
    out = {}
    for nid, node in graph.items():
        entry, given = info.get(node.get("class_type")), node.get("inputs", {})
        inputs, moved = dict(given), set()
        while entry is not None:
            known = fields(entry, inputs)
            todo = [n for n, (t, o, _, _) in known.items() if n not in inputs and is_widget(t, o)]
            if not todo:
                break
            name = todo[0]
            t, opts, _, nested = known[name]
            old = name.rsplit(".", 1)[-1]
            if nested and old in given and old in known and known[old][1].get("hidden") and old not in moved:
                inputs[name] = given[old]
                inputs[old] = default_value(*known[old][:2])
                moved.add(old)
            else:
                inputs[name] = default_value(t, opts)
        out[nid] = dict(node, inputs=inputs)
    return out


def api_to_ui(api: dict, info: dict, layout: dict, titles: dict | None = None) -> dict:
    """Lay an API graph out as a UI graph. layout: {node id: (x, y, width, height)}."""
    titles = titles or {}
    nodes, links = {}, []
    for nid, node in api.items():
        entry = info[node["class_type"]]
        ins, known = [], fields(entry, node["inputs"])
        for name, (t, opts, _, _) in known.items():
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if not is_widget(t, opts):
                ins.append({"name": name, "type": t, "link": None})
            elif linked:
                ins.append({"name": name, "type": t, "widget": {"name": name}, "link": None})
        outs = [{"name": entry["output_name"][k], "type": t, "links": [], "slot_index": k}
                for k, t in enumerate(entry["output"])]
        values = []
        for name, kind in _slots(known):
            t, opts, _, _ = known[name]
            v = node["inputs"].get(name, default_value(t, opts))
            if kind == "control":
                values.append("fixed")
            elif isinstance(v, list):  # linked widget: the editor keeps a value in its slot
                values.append(opts.get("default"))
            else:
                values.append(v)
        x, y, w, h = layout[nid]
        nodes[nid] = {"id": int(nid), "type": node["class_type"], "pos": [x, y], "size": [w, h], "flags": {},
                      "order": 0, "mode": 0, "inputs": ins, "outputs": outs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values}
        if nid in titles:
            nodes[nid]["title"] = titles[nid]
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                lid = len(links) + 1
                t = nodes[src]["outputs"][slot]["type"]
                dst_slot = next(k for k, i in enumerate(nodes[nid]["inputs"]) if i["name"] == name)
                links.append([lid, int(src), slot, int(nid), dst_slot, t])
                nodes[src]["outputs"][slot]["links"].append(lid)
                nodes[nid]["inputs"][dst_slot]["link"] = lid
    # execution order: a node after everything it reads from
    order, done = [], set()

    def visit(n):
        if n in done:
            return
        for v in api[n]["inputs"].values():
            if isinstance(v, list):
                visit(v[0])
        done.add(n)
        order.append(n)
    for n in api:
        visit(n)
    for k, n in enumerate(order):
        nodes[n]["order"] = k
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links),
            "nodes": [nodes[n] for n in sorted(nodes, key=int)], "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


# ------------------------------------------------------------------------------------------------------------ layout
def title_width(title: str) -> float:
    """A generous guess of the width the frontend widens a node to for its title (14 px sans-serif: about 7.5 px
    a character, plus the title bar's dot and margins; "MoGA Decode (the model's own decoder)" measured 318 px in
    frontend 1.49.6). The live check (tests/integration) measures the real width."""
    return 8.0 * len(title) + 40.0


def node_boxes(graph: dict) -> list[tuple[str, float, float, float, float]]:
    """(label, x, y, width, height) of every node as drawn: the title bar above pos included, and the node at
    least as wide as its title."""
    boxes = []
    for n in graph["nodes"]:
        title = n.get("title") or n["type"]
        (x, y), (w, h) = n["pos"], n["size"]
        boxes.append((f"{n['id']} {title!r}", x, y - TITLE_HEIGHT, max(w, title_width(title)), h + TITLE_HEIGHT))
    return boxes


def overlaps(boxes) -> list[str]:
    """Every pair of boxes (label, x, y, width, height) drawn over each other."""
    problems = []
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1:]:
            dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                problems.append(f"node {a} overlaps node {b} by {dx:.0f} x {dy:.0f} px: move or narrow one "
                                f"(tests/make_workflow_files.py LAYOUTS)")
    return problems


# ------------------------------------------------------------------------------------------------------ snapshots
def without_files(entry: dict) -> dict:
    """An /object_info entry with the model-file lists emptied and python_module dropped (both depend on the host)."""
    e = json.loads(json.dumps(entry))
    e.pop("python_module", None)
    for kind in e["input"].values():
        for name, item in kind.items():
            if (e["name"], name) in FILE_INPUTS:
                if isinstance(item[0], list):
                    item[0] = []
                else:
                    item[1]["options"] = []
    return e


def write_snapshot(port: int, comfy_dir: str) -> Path:
    """tests/data/comfyui_v<version>_core_nodes.json from a running server: the core nodes the workflows use."""
    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
            return json.loads(r.read())
    version = get("/system_stats")["system"]["comfyui_version"]
    info = get("/object_info")
    commit_file = Path(comfy_dir) / ".commit"
    commit = commit_file.read_text().strip() if commit_file.exists() else "unknown"
    body = {"comfyui_version": version, "comfyui_commit": commit,
            "note": f"GET /object_info of a real ComfyUI v{version} (CPU), core nodes the workflows use; model file "
                    f"lists emptied",
            "nodes": {name: dict(without_files(info[name]), python_module=info[name].get("python_module"))
                      for name in CORE_NODE_NAMES}}
    path = snapshot_path(version)
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--snapshot":
        sys.exit("usage: python tests/workflow_check.py --snapshot PORT COMFYUI_DIR  (a server running on PORT)")
    print("wrote", write_snapshot(int(sys.argv[2]), sys.argv[3]))
