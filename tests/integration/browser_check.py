"""Load a UI workflow into the real ComfyUI frontend in headless Chromium and report what the frontend made of it.

    python browser_check.py CHROMIUM PORT OUT.json SCREENSHOT_DIR WORKFLOW.json [WORKFLOW.json...]

Run with the host's python (it has aiohttp, used as the DevTools-protocol client). Starts Chromium headless with
a fresh profile on http://127.0.0.1:PORT/, waits for the frontend, then in the page:
- lists the workflow's node types the frontend has not registered (what its "missing nodes" dialog shows),
- loads the workflow with app.loadGraphData (as drag-and-drop does) and collects any dialog text,
- converts the loaded graph with app.graphToPrompt (what Queue would send: the positional widget values mapped to
  input names by the frontend itself), and the widgets and drawn bounds (x, y, width, height, title bar included)
  of every node.
Writes {workflow file name: that} as JSON to OUT.json, and a screenshot of each loaded graph into SCREENSHOT_DIR.
One browser serves all the workflows, one after the other. Every wait has a timeout.
"""
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1700,900",
         "--remote-debugging-port=0"]

PAGE_JS = """
(async () => {
  const t0 = Date.now();
  const ready = () => window.app && window.app.graph && window.LiteGraph &&
                      Object.keys(window.LiteGraph.registered_node_types || {}).length > 20;
  while (!ready()) {
    if (Date.now() - t0 > 90000) return {error: "the frontend did not come up within 90 s"};
    await new Promise(r => setTimeout(r, 250));
  }
  // close whatever the first start shows (templates, release notes), so that only our dialogs remain
  document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
  await new Promise(r => setTimeout(r, 500));
  const wf = __WORKFLOW__;
  const registered = window.LiteGraph.registered_node_types;
  const missing = wf.nodes.map(n => n.type).filter(t => !(t in registered));
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 1500));
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText);
  document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
  window.app.canvas.setDirty(true, true);
  await new Promise(r => setTimeout(r, 800));
  const prompt = await window.app.graphToPrompt();
  // where each node is drawn (title bar included), after the frontend widened it for its title and widgets
  const bounds = n => n.getBounding ? Array.from(n.getBounding()).slice(0, 4)
      : [n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.size[0],
         n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT];
  const nodes = window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title, bounds: bounds(n),
      widgets: (n.widgets || []).map(w => [w.name, w.value])}));
  return {missing, dialogs, output: prompt.output, nodes,
          frontend: window.__COMFYUI_FRONTEND_VERSION__ || null};
})()
"""


async def cdp(ws_url, scripts, screenshots):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 10 ** 6))

            async def call(method, **params):
                mid = next(ids)
                await ws.send_json({"id": mid, "method": method, "params": params})
                while True:
                    msg = await asyncio.wait_for(ws.receive_json(), 150)
                    if msg.get("id") == mid:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            values = []
            for script, screenshot in zip(scripts, screenshots):
                for attempt in range(60):  # the page may still be navigating (its first context goes away)
                    try:
                        res = await call("Runtime.evaluate", expression=script, awaitPromise=True,
                                         returnByValue=True, timeout=140000)
                        break
                    except RuntimeError as e:
                        if "context" not in str(e) or attempt == 59:
                            raise
                        await asyncio.sleep(1)
                if "exceptionDetails" in res:
                    raise RuntimeError(json.dumps(res["exceptionDetails"])[:2000])
                values.append(res["result"].get("value"))
                shot = await call("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            return values


def main(chromium, port, out, screenshot_dir, *workflows):
    profile = tempfile.mkdtemp(prefix="moga-chromium-")
    proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", f"http://127.0.0.1:{port}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = Path(profile) / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not active.exists() or not active.read_text().strip():
            if time.monotonic() > end or proc.poll() is not None:
                raise SystemExit("chromium did not open its DevTools port")
            time.sleep(0.2)
        dport = active.read_text().split()[0]

        async def page_ws():
            async with aiohttp.ClientSession() as s:
                for _ in range(100):
                    async with s.get(f"http://127.0.0.1:{dport}/json") as r:
                        pages = [t for t in await r.json() if t.get("type") == "page"]
                    if pages:
                        return pages[0]["webSocketDebuggerUrl"]
                    await asyncio.sleep(0.2)
            raise SystemExit("chromium shows no page")

        scripts = [PAGE_JS.replace("__WORKFLOW__", Path(w).read_text()) for w in workflows]
        shots = [str(Path(screenshot_dir) / (Path(w).stem + ".png")) for w in workflows]
        values = asyncio.run(asyncio.wait_for(_run(page_ws, scripts, shots), 120 + 60 * len(workflows)))
        Path(out).write_text(json.dumps({Path(w).name: v for w, v in zip(workflows, values)}, indent=1,
                                        ensure_ascii=False))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def _run(page_ws, scripts, screenshots):
    return await cdp(await page_ws(), scripts, screenshots)


if __name__ == "__main__":
    main(*sys.argv[1:])
