"""A real ComfyUI server with this pack linked into custom_nodes/, for the integration tests.

Needs the host that ../shared/tools/comfy-host.sh builds (CI builds it and exports COMFYUI_PATH, COMFYUI_PYTHON,
COMFY_HOST_TOOL, COMFY_HOST_DIR). Without COMFYUI_PATH every test here is skipped with the reason.

The server runs from a private state folder (its pid, port and log files), with symlinks to the host's ComfyUI/
and venv/, so a server someone else started from the same host is left alone. Files this session puts into the
host's model and output folders carry a unique name and are removed afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-MoGA"
START_TIMEOUT_S = 240
LINK_TIMEOUT_S = 600


def _host():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None, "COMFYUI_PATH is not set: build a host with `comfy-host.sh setup` (see .ci/run) and export " \
                     "COMFYUI_PATH=$COMFY_HOST_DIR/ComfyUI to run the real-ComfyUI tests"
    comfy = Path(path).resolve()
    if not (comfy / "main.py").is_file():
        return None, f"COMFYUI_PATH={path} holds no ComfyUI (main.py missing)"
    host_dir = Path(os.environ.get("COMFY_HOST_DIR") or comfy.parent)
    python = Path(os.environ.get("COMFYUI_PYTHON") or host_dir / "venv" / "bin" / "python")
    tool = os.environ.get("COMFY_HOST_TOOL") or str(REPO.parent / "shared" / "tools" / "comfy-host.sh")
    if not Path(tool).is_file():
        return None, f"comfy-host.sh not found at {tool}: export COMFY_HOST_TOOL"
    if not python.is_file():
        return None, f"the host's python {python} does not exist: export COMFYUI_PYTHON"
    return dict(comfy=comfy, python=python, venv=python.parent.parent, tool=tool, dir=host_dir), None


HOST, WHY_NOT = _host()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            if HOST is None:
                item.add_marker(pytest.mark.skip(reason=WHY_NOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The running server: HTTP helpers with timeouts, and the files this session put into the host."""

    def __init__(self, port, comfy: Path, python: Path, state: Path, tag: str):
        self.port, self.comfy, self.python, self.state, self.tag = port, comfy, python, state, tag
        self.base = f"http://127.0.0.1:{port}"
        self.cleanup: list[Path] = []

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            data = r.read()
            return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def post(self, path, body, timeout=30):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
                return json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode()[:2000]}") from None

    def queue(self, graph, client_id=None) -> str:
        return self.post("/prompt", {"prompt": graph, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id, timeout) -> dict:
        """The prompt's /history entry once it finished (success or not); fails after `timeout` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s; log tail:\n{self.log_tail()}")

    def log_tail(self, n=60) -> str:
        log = self.state / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"

    def place(self, folder: str, name: str, writer) -> Path:
        """Write a model file into the host's models/<folder>/ (removed after the session)."""
        path = self.comfy / "models" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        self.cleanup.append(path)
        return path

    def listen(self, client_id, seconds):
        """A websocket listener (the host's python with aiohttp): returns (messages list, process)."""
        proc = subprocess.Popen([str(self.python), str(Path(__file__).parent / "ws_listen.py"), str(self.port),
                                 client_id, str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        messages, ready = [], threading.Event()

        def pump():
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                msg["_t"] = time.monotonic()
                messages.append(msg)
                if msg.get("type") == "connected":
                    ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30):
            proc.kill()
            raise AssertionError(f"websocket listener did not connect: {proc.stderr.read()[:1000]}")
        return messages, proc


def _run(cmd, env, timeout):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res.stdout


@pytest.fixture(scope="session")
def comfy_server():
    if HOST is None:
        pytest.skip(WHY_NOT)
    state = Path(tempfile.mkdtemp(prefix="moga-itest-host-"))
    (state / "ComfyUI").symlink_to(HOST["comfy"])
    (state / "venv").symlink_to(HOST["venv"])
    env = dict(os.environ, COMFY_HOST_DIR=str(state))
    tool = ["bash", HOST["tool"]]
    # link installs requirements.txt with the host's constraints: run it against the host's own folder
    _run(tool + ["link", str(REPO), PACK_NAME], dict(os.environ, COMFY_HOST_DIR=str(HOST["dir"])), LINK_TIMEOUT_S)
    port = free_port()
    server = Server(port, HOST["comfy"], HOST["python"], state, tag=f"moga-itest-{uuid.uuid4().hex[:8]}")
    try:
        _run(tool + ["start", str(port)], env, START_TIMEOUT_S)
        yield server
    finally:
        try:
            _run(tool + ["stop"], env, 60)
        finally:
            for p in server.cleanup:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def object_info(comfy_server):
    return comfy_server.get("/object_info", timeout=60)


@pytest.fixture(scope="session")
def offline_info():
    """This pack's /object_info entries built offline (through tests/comfy_fakes.py), and the core snapshot."""
    sys.path.insert(0, str(REPO / "tests"))
    import make_workflow_files
    import workflow_check
    return make_workflow_files.pack_object_info(), workflow_check.core_object_info()
