"""Checks ComfyUI workflow files against node definitions (GET /object_info entries), both formats.

- API format (what POST /prompt takes): {id: {"class_type", "inputs": {name: value | [src_id, slot]}}}.
- UI format (what the editor saves and the template browser serves): {"nodes": [...], "links": [...], ...}; widget
  values are positional, in the order the frontend makes widgets: every widget input of the node definition
  (required, then optional), and one extra value after each INT with control_after_generate.

`ui_to_api` turns a UI graph into the API graph it runs as; `api_to_ui` lays an API graph out as a UI graph (how
the UI workflows in workflows/ were written). Used by tests/test_workflows.py and tests/integration.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_NODES = ROOT / "tests" / "data" / "comfyui_v0.3.64_core_nodes.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs whose options are the files in a model folder: any file name is accepted, since the list depends on
# what the user has downloaded.
FILE_INPUTS = {("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"), ("UNETLoader", "unet_name"),
               ("MoGAModelLoader", "ckpt_name"), ("MoGALora", "lora_name"), ("MoGARouterLoader", "routers_name"),
               ("LoraLoaderModelOnly", "lora_name")}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def core_object_info() -> dict:
    return json.loads(CORE_NODES.read_text())["nodes"]


def spec(entry: dict, name: str):
    """(type, options dict, required) of one input; a v1 combo (a list of options) becomes COMBO."""
    for kind in ("required", "optional"):
        if name in entry["input"].get(kind, {}):
            item = entry["input"][kind][name]
            t, opts = item[0], (item[1] if len(item) > 1 else {})
            if isinstance(t, list):
                t, opts = "COMBO", dict(opts, options=t)
            return t, opts, kind == "required"
    return None


def input_names(entry: dict) -> list[str]:
    order = entry.get("input_order") or {k: list(v) for k, v in entry["input"].items()}
    return [n for kind in ("required", "optional") for n in order.get(kind, [])]


def is_widget(t, opts) -> bool:
    return t in WIDGET_TYPES and not opts.get("forceInput")


def widget_slots(entry: dict) -> list[tuple[str, str]]:
    """The positional widgets_values layout: (input name, "value" | "control") per slot."""
    slots = []
    for name in input_names(entry):
        t, opts, _ = spec(entry, name)
        if is_widget(t, opts):
            slots.append((name, "value"))
            if opts.get("control_after_generate"):
                slots.append((name, "control"))
    return slots


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
    elif t == "COMBO":
        if (cls, name) in FILE_INPUTS:
            return [] if isinstance(value, str) and value else [f"{where}: {value!r} is not a file name"]
        return [] if value in opts.get("options", []) else [f"{where}: {value!r} not in {opts.get('options')}"]
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
        for name in given:
            if spec(entry, name) is None:
                problems.append(f"node {nid} ({cls}): unknown input {name!r}")
        for name in input_names(entry):
            t, opts, required = spec(entry, name)
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
        for i in node.get("inputs", []):
            sp = spec(entry, i["name"])
            if sp is None:
                problems.append(f"node {nid} ({cls}): unknown input slot {i['name']!r}")
            elif not types_match(sp[0], i["type"]):
                problems.append(f"node {nid} ({cls}) slot {i['name']!r}: type {i['type']} but the node takes {sp[0]}")
        for k, o in enumerate(node.get("outputs", [])):
            if k >= len(entry["output"]) or not types_match(entry["output"][k], o["type"]):
                problems.append(f"node {nid} ({cls}): output {k} {o.get('type')} not in {entry['output']}")
        slots = widget_slots(entry)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"node {nid} ({cls}): {len(values)} widget values for {len(slots)} widgets "
                            f"{[n for n, _ in slots]}")
            continue
        for (name, kind), value in zip(slots, values):
            t, opts, _ = spec(entry, name)
            if kind == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"node {nid} ({cls}) '{name}' control {value!r} not in {CONTROL_VALUES}")
            elif not (name in by_name and by_name[name].get("link") is not None):
                problems += check_value(nid, cls, name, t, opts, value)
        for name in input_names(entry):
            t, opts, required = spec(entry, name)
            if required and not is_widget(t, opts) and (name not in by_name or by_name[name].get("link") is None):
                problems.append(f"node {nid} ({cls}): required input {name!r} ({t}) is not connected")
    return problems


def ui_to_api(graph: dict, info: dict) -> dict:
    """The API graph a UI graph runs as (what the editor's 'Export (API)' writes)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    links = {l[0]: l for l in graph["links"]}
    api = {}
    for nid, node in nodes.items():
        cls = node["type"]
        if cls in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed nodes do not run
            continue
        entry = info[cls]
        inputs = {}
        for (name, kind), value in zip(widget_slots(entry), node.get("widgets_values", [])):
            if kind == "value":
                inputs[name] = value
        for i in node.get("inputs", []):
            if i.get("link") is not None:
                _, src, slot, _, _, _ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        api[str(nid)] = {"class_type": cls, "inputs": inputs}
    return api


def api_to_ui(api: dict, info: dict, layout: dict, titles: dict | None = None) -> dict:
    """Lay an API graph out as a UI graph. layout: {node id: (x, y, width, height)}."""
    titles = titles or {}
    nodes, links = {}, []
    for nid, node in api.items():
        entry = info[node["class_type"]]
        ins = []
        for name in input_names(entry):
            t, opts, _ = spec(entry, name)
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if not is_widget(t, opts):
                ins.append({"name": name, "type": t, "link": None})
            elif linked:
                ins.append({"name": name, "type": t, "widget": {"name": name}, "link": None})
        outs = [{"name": entry["output_name"][k], "type": t, "links": [], "slot_index": k}
                for k, t in enumerate(entry["output"])]
        values = []
        for name, kind in widget_slots(entry):
            t, opts, _ = spec(entry, name)
            v = node["inputs"].get(name, opts.get("default"))
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
