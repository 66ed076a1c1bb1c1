"""The `comfyui` tier's ComfyUI: one real server, headless on the CPU, with this repository's node pack linked.

`COMFYUI_ROOT` (default ../shared/comfyui beside the repository) is a ComfyUI source tree, used read-only: every
folder ComfyUI writes (base, user, input, output, temp; its database in memory; byte code) is a temporary one.
Where the tree or ComfyUI's requirements are absent the tier skips with the reason; with COMFYUI_TESTS=required
in the environment (.ci/run sets it) that is a failure instead. Workflows are ComfyUI's API format.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "comfyui"
NEEDED = ("aiohttp", "yaml", "alembic", "sqlalchemy", "torchsde", "kornia", "spandrel", "av", "requests",
          "comfyui_frontend_package")  # imported by ComfyUI at start-up (requests: app/frontend_management.py)


def comfyui_root() -> Path:
    return Path(os.environ.get("COMFYUI_ROOT", ROOT.parent / "shared" / "comfyui")).resolve()


def cannot_start() -> str | None:
    root = comfyui_root()
    if not (root / "main.py").is_file():
        return f"no ComfyUI source tree at {root} (set COMFYUI_ROOT)"
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        return (f"ComfyUI's requirements are not installed in {sys.executable} ({', '.join(missing)} missing): "
                "./run.sh comfyui-deps")
    return None


def skip_or_fail(reason: str):
    if os.environ.get("COMFYUI_TESTS") == "required":
        pytest.fail(f"COMFYUI_TESTS=required, but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout(home: Path, env_extra: dict | None = None) -> tuple[list, dict]:
    """Folders under `home`, the pack linked into home/custom_nodes; -> ComfyUI's arguments and environment."""
    for d in ("base/custom_nodes", "base/models/vae", "user", "input", "output", "temp", "pycache"):
        (home / d).mkdir(parents=True, exist_ok=True)
    link = home / "base" / "custom_nodes" / "asymmetric_decoder"
    if not link.exists():
        link.symlink_to(PACK, target_is_directory=True)
    args = ["--cpu", "--base-directory", home / "base", "--user-directory", home / "user",
            "--input-directory", home / "input", "--output-directory", home / "output",
            "--temp-directory", home / "temp", "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(home / "pycache"), **(env_extra or {})}
    return [str(a) for a in args], env


class ComfyServer:
    """`python main.py` of COMFYUI_ROOT on 127.0.0.1:<free port>; run(workflow) -> its /history entry."""

    def __init__(self, home: Path, env_extra: dict | None = None):
        self.home, self.port = Path(home), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args, env = layout(self.home, env_extra)
        self.log = open(self.home / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "main.py", *args, "--listen", "127.0.0.1",
                                      "--port", str(self.port)], cwd=comfyui_root(), env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def input_dir(self) -> Path:
        return self.home / "input"

    @property
    def output_dir(self) -> Path:
        return self.home / "output"

    def models(self, kind: str) -> Path:
        folder = self.home / "base" / "models" / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.home / "server.log").read_text(errors="replace")

    def wait_ready(self, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # a workflow refused at validation: its reasons
            raise AssertionError(f"POST {path}: {err.code} {err.read().decode(errors='replace')[:3000]}") from None

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        """POST the API-format workflow to /prompt, poll /history until it ends; -> its history entry."""
        prompt_id = self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died running a prompt:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def errors_of(entry: dict) -> list:
    """The execution_error messages of a /history entry: (node type, exception message)."""
    return [(m[1].get("node_type"), m[1].get("exception_message", ""))
            for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]


def start(home: Path | None = None, env_extra: dict | None = None) -> ComfyServer:
    server = ComfyServer(Path(home or tempfile.mkdtemp(prefix="comfyui-test-")), env_extra)
    try:
        server.wait_ready()
    except RuntimeError:
        server.stop()
        raise
    return server
