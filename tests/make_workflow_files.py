"""Writes workflows/<name>.json (UI format) from workflows/api/<name>_api.json, and its .jpg thumbnail.

    python tests/make_workflow_files.py            # every workflow with a layout below
    python tests/make_workflow_files.py --check    # exit 1 if a UI file differs from what would be written

    python tests/make_workflow_files.py --thumbnail moga_demo_cpu=demo.mp4       # a frame strip of a render
    python tests/make_workflow_files.py --thumbnail moga_multishot_t2v=graph.png # a picture (e.g. a screenshot)

The API file is the source of truth for the graph; this lays it out for the editor (positions, sizes, titles).
Thumbnails: a frame strip of a video, or a given picture (the multi-shot one is a screenshot of the workflow in the
real frontend, made by tests/integration/browser_check.py); a missing thumbnail is drawn as a diagram of the graph.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_fakes  # noqa: E402
import workflow_check as wc  # noqa: E402

ROOT = wc.ROOT
WORKFLOWS = ROOT / "workflows"

# node id -> (x, y, width, height)
LAYOUTS = {
    "moga_multishot_t2v": {
        "1": (40, 60, 330, 200), "2": (40, 320, 330, 330), "3": (40, 720, 330, 110),
        "4": (410, 60, 440, 560), "5": (890, 60, 330, 450), "6": (890, 570, 330, 60),
        "7": (1260, 60, 250, 100), "8": (1260, 210, 250, 80), "9": (1550, 60, 440, 480),
    },
    "moga_patch_t2v_14b": {
        "1": (40, 60, 330, 90), "2": (40, 200, 330, 110), "3": (40, 360, 330, 60), "4": (40, 470, 330, 60),
        "5": (410, 60, 330, 360), "6": (40, 580, 330, 110), "7": (410, 470, 440, 480), "8": (890, 470, 250, 60),
        "9": (890, 580, 300, 170), "10": (1230, 60, 330, 270), "11": (1230, 380, 330, 60),
        "12": (1600, 60, 250, 60), "13": (1600, 170, 250, 80), "14": (1890, 60, 440, 480),
    },
    "moga_patch_t2v_a14b": {  # the high-noise expert's row on top, the low-noise one below it
        "1": (40, 60, 330, 90), "3": (410, 60, 330, 110), "5": (780, 60, 300, 60), "7": (40, 200, 330, 60),
        "9": (1120, 60, 330, 360),
        "2": (40, 480, 330, 90), "4": (410, 480, 330, 110), "6": (780, 480, 300, 60), "8": (40, 620, 330, 60),
        "10": (1120, 480, 330, 360),
        "11": (40, 900, 330, 110), "12": (410, 900, 440, 480), "13": (890, 900, 250, 60),
        "14": (890, 1010, 300, 170),
        "15": (1490, 60, 330, 400), "16": (1490, 520, 330, 400), "17": (1490, 980, 330, 60),
        "18": (1860, 60, 250, 60), "19": (1860, 170, 250, 80), "20": (2150, 60, 440, 480),
    },
    "moga_patch_i2v_14b": {
        "1": (40, 60, 330, 90), "2": (40, 200, 330, 110), "3": (40, 360, 330, 60), "4": (40, 470, 330, 60),
        "5": (410, 60, 330, 360), "6": (40, 580, 330, 110), "7": (410, 470, 400, 200), "8": (410, 720, 400, 200),
        "9": (40, 740, 330, 360), "10": (40, 1150, 330, 60), "11": (850, 720, 300, 80), "12": (850, 850, 300, 60),
        "13": (850, 470, 300, 200), "14": (1190, 60, 330, 270), "15": (1560, 60, 250, 60),
        "16": (1560, 170, 250, 80), "17": (1850, 60, 440, 480),
    },
    # the decoder's long title widens its node to ~320 px in the frontend: its column is 360 wide
    "moga_demo_cpu": {
        "1": (40, 60, 330, 130), "4": (410, 60, 440, 480), "5": (890, 60, 330, 330),
        "7": (1260, 60, 360, 100), "8": (1260, 210, 360, 80), "9": (1660, 60, 440, 400),
    },
}


def pack_object_info() -> dict:
    """GET /object_info entries of this pack's nodes, built from their schemas (through the fakes)."""
    with tempfile.TemporaryDirectory() as tmp, comfy_fakes.installed(tmp, str(ROOT)) as env:
        return {n.define_schema().node_id: env.io.object_info(n) for n in env.nodes.NODES}


def all_object_info(version: str = wc.OLDEST) -> dict:
    """Core nodes of ComfyUI `version` (a snapshot in tests/data) and this pack's nodes."""
    return wc.core_object_info(version) | pack_object_info()


def build_ui(name: str, info: dict) -> dict:
    api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    titles = {k: v["_meta"]["title"] for k, v in api.items() if "_meta" in v}
    return wc.api_to_ui(api, info, LAYOUTS[name], titles)


COLOURS = {"MoGA": (70, 110, 200), "loaders": (90, 150, 90), "image/video": (190, 120, 60)}


def diagram(ui: dict, info: dict, size=(640, 360)) -> np.ndarray:
    """A drawn picture of the graph: one box per node, one line per link, the node names."""
    from PIL import Image, ImageDraw
    W, H = size
    xs = [n["pos"][0] for n in ui["nodes"]] + [n["pos"][0] + n["size"][0] for n in ui["nodes"]]
    ys = [n["pos"][1] for n in ui["nodes"]] + [n["pos"][1] + n["size"][1] for n in ui["nodes"]]
    x0, y0, x1, y1 = min(xs) - 30, min(ys) - 60, max(xs) + 30, max(ys) + 30
    s = min(W / (x1 - x0), H / (y1 - y0))

    def p(x, y):
        return (x - x0) * s, (y - y0) * s
    img = Image.new("RGB", size, (32, 33, 38))
    d = ImageDraw.Draw(img)
    d.text((10, 8), "ComfyUI-MoGA: " + " ".join(w for w in ui.get("_name", "").split("_") if w), fill=(230, 230, 230))
    boxes = {n["id"]: n for n in ui["nodes"]}
    for lid, src, ss, dst, ds, t in ui["links"]:
        a, b = boxes[src], boxes[dst]
        d.line([p(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * ss), p(b["pos"][0], b["pos"][1] + 30 + 20 * ds)],
               fill=(200, 200, 120), width=2)
    for n in ui["nodes"]:
        cat = info[n["type"]]["category"]
        colour = next((c for k, c in COLOURS.items() if k in cat), (120, 120, 120))
        (ax, ay), (bx, by) = p(*n["pos"]), p(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        d.rectangle([ax, ay, bx, by], fill=(50, 52, 60), outline=colour, width=2)
        d.rectangle([ax, ay, bx, ay + 14], fill=colour)
        d.text((ax + 3, ay + 2), n.get("title", n["type"])[:int((bx - ax) / 6)], fill=(255, 255, 255))
    return np.asarray(img)


def frame_strip(video: str, size=(640, 360), count: int = 4) -> np.ndarray:
    """`count` frames spread over a video, side by side on two rows (what the workflow makes)."""
    import imageio.v3 as iio
    frames = iio.imread(video)
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    W, H = size
    cols, rows = 2, (count + 1) // 2
    out = np.zeros((H, W, 3), np.uint8)
    from PIL import Image
    for k, i in enumerate(picks):
        tile = np.asarray(Image.fromarray(frames[i][..., :3]).resize((W // cols, H // rows), Image.NEAREST))
        r, c = divmod(k, cols)
        out[r * (H // rows):(r + 1) * (H // rows), c * (W // cols):(c + 1) * (W // cols)] = tile
    return out


def fit(picture, size=(640, 360), crop=None) -> np.ndarray:
    """A picture cropped (left, top, right, bottom), letterboxed onto size with the editor's background."""
    from PIL import Image
    img = Image.open(picture).convert("RGB")
    if crop:
        img = img.crop(crop)
    W, H = size
    scale = min(W / img.width, H / img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", size, (32, 33, 38))
    canvas.paste(img, ((W - img.width) // 2, (H - img.height) // 2))
    return np.asarray(canvas)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--thumbnail", action="append", default=[],
                    help="NAME=PATH: thumbnail from a video (frame strip) or a picture")
    ap.add_argument("--crop", help="left,top,right,bottom crop of a picture thumbnail")
    args = ap.parse_args(argv)
    sources = dict(v.split("=", 1) for v in args.thumbnail)
    crop = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
    info = all_object_info()
    status = 0
    for name in LAYOUTS:
        if not (WORKFLOWS / "api" / f"{name}_api.json").exists():
            continue
        ui = build_ui(name, info)
        text = json.dumps(ui, indent=2, ensure_ascii=False) + "\n"
        target = WORKFLOWS / f"{name}.json"
        if args.check:
            if not target.exists() or target.read_text() != text:
                print(f"{target} is out of date: run python tests/make_workflow_files.py")
                status = 1
            continue
        target.write_text(text)
        print(f"wrote {target}")
        thumb = WORKFLOWS / f"{name}.jpg"
        src = sources.get(name)
        if src is None and thumb.exists():
            continue
        import imageio.v3 as iio
        if src is None:
            picture = diagram(dict(ui, _name=name), info)
        elif Path(src).suffix.lower() in (".png", ".jpg", ".jpeg"):
            picture = fit(src, crop=crop)
        else:
            picture = frame_strip(src)
        iio.imwrite(thumb, picture, quality=90)
        print(f"wrote {thumb}")
    return status


if __name__ == "__main__":
    sys.exit(main())
