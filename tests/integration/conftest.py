"""Real ComfyUI servers with this pack linked into custom_nodes/, for the integration tests.

Needs hosts that ../shared/tools/comfy-host.sh builds (CI builds v0.3.64 and v0.33.0). Every test here runs once
per host, named by its ComfyUI version ([v0.3.64], [v0.33.0]):
- COMFYUI_PATHS=dir1:dir2 (each a host's ComfyUI/ folder, or the host folder that holds ComfyUI/ and venv/), or
- COMFYUI_PATH=dir for one host (COMFYUI_PYTHON and COMFY_HOST_DIR then name its python and folder).
COMFY_HOST_TOOL names comfy-host.sh (default ../shared/tools/). COMFYUI_UNBUILT="v0.33.0: why; ..." lists hosts
the caller could not build: their tests are skipped with that reason. Without any host every test here is skipped
with the reason.

Each server runs from a private state folder (its pid, port and log files), with symlinks to the host's ComfyUI/
and venv/, so a server someone else started from the same host is left alone; one server runs at a time. Files
this session puts into a host's model and output folders carry a unique name and are removed afterwards.
"""
from __future__ import annotations

import json
import os
import re
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
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-MoGA"
START_TIMEOUT_S = 240
LINK_TIMEOUT_S = 600
NO_HOST = "no ComfyUI host: build one with `comfy-host.sh setup` (see .ci/run) and export " \
          "COMFYUI_PATH=$COMFY_HOST_DIR/ComfyUI (or COMFYUI_PATHS=dir1:dir2) to run the real-ComfyUI tests"


@dataclass
class Host:
    name: str                  # the test id: the ComfyUI version, e.g. "v0.33.0"
    info: dict | None = None   # comfy, python, venv, tool, dir, version
    why_not: str | None = None


def _version(comfy: Path) -> str | None:
    text = (comfy / "comfyui_version.py").read_text() if (comfy / "comfyui_version.py").exists() else ""
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return m.group(1) if m else None


def _host(path: str, python: str | None = None, host_dir: str | None = None) -> Host:
    given = Path(path).resolve()
    comfy = given / "ComfyUI" if (given / "ComfyUI" / "main.py").is_file() else given
    version = _version(comfy) if comfy.is_dir() else None
    name = f"v{version}" if version else comfy.parent.name or str(comfy)
    if not (comfy / "main.py").is_file():
        return Host(name, why_not=f"{path} holds no ComfyUI (main.py missing)")
    host_dir = Path(host_dir or comfy.parent)
    python = Path(python or host_dir / "venv" / "bin" / "python")
    tool = os.environ.get("COMFY_HOST_TOOL") or str(REPO.parent / "shared" / "tools" / "comfy-host.sh")
    if not Path(tool).is_file():
        return Host(name, why_not=f"comfy-host.sh not found at {tool}: export COMFY_HOST_TOOL")
    if not python.is_file():
        return Host(name, why_not=f"the host's python {python} does not exist: export COMFYUI_PYTHON (one host) or "
                                  f"build the host's venv/")
    return Host(name, dict(comfy=comfy, python=python, venv=python.parent.parent, tool=tool, dir=host_dir,
                           version=version))


def _hosts() -> list[Host]:
    paths = [p for p in os.environ.get("COMFYUI_PATHS", "").split(os.pathsep) if p.strip()]
    if paths:
        hosts = [_host(p) for p in paths]
    elif os.environ.get("COMFYUI_PATH"):
        hosts = [_host(os.environ["COMFYUI_PATH"], os.environ.get("COMFYUI_PYTHON"), os.environ.get("COMFY_HOST_DIR"))]
    else:
        hosts = []
    for item in os.environ.get("COMFYUI_UNBUILT", "").split(";"):
        name, _, why = item.partition(":")
        if name.strip():
            hosts.append(Host(name.strip(), why_not=f"the ComfyUI {name.strip()} host could not be built: "
                                                    f"{why.strip() or 'see the CI log'}"))
    seen = {}
    for h in hosts:  # two hosts of one version stay apart in the test ids
        seen[h.name] = seen.get(h.name, 0) + 1
        if seen[h.name] > 1:
            h.name = f"{h.name}-{seen[h.name]}"
    return hosts


HOSTS = _hosts()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
            if not HOSTS:
                item.add_marker(pytest.mark.skip(reason=NO_HOST))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The running server: HTTP helpers with timeouts, and the files this session put into the host."""

    def __init__(self, port, comfy: Path, python: Path, state: Path, tag: str, version: str | None = None):
        self.port, self.comfy, self.python, self.state, self.tag = port, comfy, python, state, tag
        self.version = version  # ComfyUI's version, e.g. "0.33.0"
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
            entry = self._finished(prompt_id)
            if entry is not None:
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s; log tail:\n{self.log_tail()}")

    def run(self, graph, stall_s=180, cap_s=1800) -> dict:
        """Queue a graph and return its /history entry once it finished. Fails when the server sends no message
        about it for `stall_s` seconds (a hang: a running prompt reports its nodes and steps) or after `cap_s` in
        all; a slow, loaded machine is no failure. The run's websocket messages are kept in `last_messages`."""
        client = uuid.uuid4().hex
        messages, proc = self.listen(client, seconds=cap_s + 60)
        self.last_messages = messages
        try:
            prompt_id = self.queue(graph, client_id=client)
            start = last = time.monotonic()
            count = len(messages)
            while time.monotonic() - start < cap_s:
                entry = self._finished(prompt_id)
                if entry is not None:
                    return entry
                if len(messages) > count:
                    count, last = len(messages), time.monotonic()
                elif time.monotonic() - last > stall_s:
                    raise AssertionError(f"prompt {prompt_id}: no message from the server for {stall_s} s (last: "
                                         f"{messages[-1:]}); log tail:\n{self.log_tail()}")
                time.sleep(0.25)
            raise AssertionError(f"prompt {prompt_id} did not finish within {cap_s} s; log tail:\n{self.log_tail()}")
        finally:
            proc.kill()
            proc.wait(10)

    def interrupt_after_first_step(self, graph, steps: int, timeout=120) -> dict:
        """Queue `graph`, whose sampler runs `steps` steps, POST /interrupt as soon as the websocket brings the
        sampler's first progress message, and report what happened: {"entry": its /history entry, "seen": the
        step reported when the interrupt went out, "values": every step the sampler reported, "stopped_after":
        seconds from the interrupt to the prompt's end}. Every wait is tied to a server event and has a timeout."""
        client = uuid.uuid4().hex
        messages, proc = self.listen(client, seconds=timeout + 120)
        try:
            prompt_id = self.queue(graph, client_id=client)

            def progress():
                return [m["data"]["value"] for m in list(messages) if m.get("type") == "progress"
                        and m["data"].get("prompt_id") == prompt_id and m["data"].get("max") == steps]

            def event(kind):
                return any(m.get("type") == kind and m.get("data", {}).get("prompt_id") == prompt_id
                           for m in list(messages))
            end = time.monotonic() + timeout
            while not progress():
                if event("execution_error") or event("execution_success"):
                    raise AssertionError(f"prompt {prompt_id} ended before its first step was reported: "
                                         f"{json.dumps(self.wait(prompt_id, 30)['status'])[:3000]}")
                if time.monotonic() > end:
                    raise AssertionError(f"no sampler progress within {timeout} s: {messages[-5:]}; log tail:\n"
                                         f"{self.log_tail()}")
                time.sleep(0.02)
            seen = max(progress())
            t0 = time.monotonic()
            self.post("/interrupt", {})
            entry = self.wait(prompt_id, timeout=60)
            stopped_after = time.monotonic() - t0
            # the socket delivers in order: once the interrupt message is in, every progress message sent is too
            end = time.monotonic() + 30
            while not event("execution_interrupted"):
                assert time.monotonic() < end, f"no execution_interrupted message: {messages[-5:]}"
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait(10)
        return {"entry": entry, "seen": seen, "values": progress(), "stopped_after": stopped_after}

    def log_size(self) -> int:
        log = self.state / "server.log"
        return log.stat().st_size if log.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the server logged after `offset` (a log_size() taken before)."""
        with open(self.state / "server.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def place_input(self, name: str, writer) -> Path:
        """Write a file into the host's input/ folder (Load Image reads it; removed after the session)."""
        path = self.comfy / "input" / name
        writer(path)
        self.cleanup.append(path)
        return path

    def _finished(self, prompt_id) -> dict | None:
        hist = self.get(f"/history/{prompt_id}")
        entry = hist.get(prompt_id) if isinstance(hist, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None \
                and entry["status"].get("status_str") in ("success", "error"):
            return entry
        return None

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


@pytest.fixture(scope="session", params=HOSTS or [Host("no-host", why_not=NO_HOST)], ids=lambda h: h.name)
def comfy_host(request) -> dict:
    """One host (no server): comfy, python, venv, tool, dir, version; skipped with the reason if unusable."""
    if request.param.info is None:
        pytest.skip(request.param.why_not)
    return request.param.info


@pytest.fixture(scope="session", params=HOSTS or [Host("no-host", why_not=NO_HOST)], ids=lambda h: h.name)
def comfy_server(request):
    """A running server of one host; pytest runs every test of one host before it starts the next."""
    host = request.param
    if host.info is None:
        pytest.skip(host.why_not)
    info = host.info
    state = Path(tempfile.mkdtemp(prefix="moga-itest-host-"))
    (state / "ComfyUI").symlink_to(info["comfy"])
    (state / "venv").symlink_to(info["venv"])
    env = dict(os.environ, COMFY_HOST_DIR=str(state))
    tool = ["bash", info["tool"]]
    # link installs requirements.txt with the host's constraints: run it against the host's own folder
    _run(tool + ["link", str(REPO), PACK_NAME], dict(os.environ, COMFY_HOST_DIR=str(info["dir"])), LINK_TIMEOUT_S)
    port = free_port()
    server = Server(port, info["comfy"], info["python"], state, tag=f"moga-itest-{uuid.uuid4().hex[:8]}",
                    version=info["version"])
    try:
        _run(tool + ["start", str(port)], env, START_TIMEOUT_S)
        if server.version is None:
            server.version = server.get("/system_stats")["system"].get("comfyui_version")
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
    """This pack's /object_info entries built offline (through tests/comfy_fakes.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    import make_workflow_files
    return make_workflow_files.pack_object_info()
