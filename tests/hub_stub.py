"""A small stand-in for the Hugging Face Hub API, served on 127.0.0.1 in a thread.

It answers the routes that `huggingface_hub` (0.36 and 2.x) uses to create a repository and commit
files, and records every committed file, so that a test can run the real client code and then
check exactly which files arrived and what they hold. Point the client at it by setting
`HF_ENDPOINT=stub.endpoint` before `huggingface_hub` is imported (in a subprocess).

Routes:
- `POST /api/repos/create` (409 when the repository exists, as the Hub does);
- `POST /api/{type}s/{repo_id}/preupload/{revision}`: every file is `regular` (inline base64);
- `POST /api/{type}s/{repo_id}/commit/{revision}`: NDJSON header + base64 files;
- `POST /api/{type}s/{repo_id}/branch/{branch}`;
- `GET /api/{type}s/{repo_id}` and `.../revision/{revision}`: repository info;
- `POST /api/validate-yaml`: checks that the README's YAML header parses;
- `GET /api/whoami-v2`;
- `HEAD`/`GET /{repo_id}/resolve/{revision}/{path}`: files committed so far, else 404.

With `tokens` given, every route but `validate-yaml` answers 401 to any other bearer token.
Run it by hand with `python tests/hub_stub.py` (it prints the endpoint and serves until Ctrl-C).
`make_run_folder` builds the fake training output folder that the card and push tests share.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

_REPO_TYPES = "models|datasets|spaces"
_API_REPO = re.compile(rf"^/api/({_REPO_TYPES})/([^/]+/[^/]+|[^/]+)/(preupload|commit|branch)/(.+)$")
_API_INFO = re.compile(rf"^/api/({_REPO_TYPES})/([^/]+/[^/]+|[^/]+?)(?:/revision/(.+))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+|[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class StubRepo:
    """One repository on the stand-in: its settings, its files and its commits."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    branches: set[str] = field(default_factory=lambda: {"main"})
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubStub:
    """The Hub stand-in. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(self, tokens: set[str] | None = None, user: str = "stub-user") -> None:
        self.tokens = set(tokens) if tokens else None
        self.user = user
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The base URL to give as `HF_ENDPOINT` (kept after `stop()`, for checking answers)."""
        if self._endpoint is None:
            raise RuntimeError("the stub has not been started")
        return self._endpoint

    def start(self) -> HubStub:
        """Bind an ephemeral port on 127.0.0.1 and serve in a daemon thread."""
        handler = type("Handler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what arrived ----------------------------------------------------------------------
    def files(self, repo_id: str) -> dict[str, bytes]:
        """Every file committed to `repo_id` so far, by path."""
        return dict(self.repos[repo_id].files)

    def committed_paths(self, repo_id: str) -> list[str]:
        """Sorted paths of every file committed to `repo_id` so far."""
        return sorted(self.repos[repo_id].files)

    # -- request handling (called from the server threads) ---------------------------------
    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any], dict]:
        """Answer one request: (status, JSON body, extra headers)."""
        with self._lock:
            self.requests.append((method, path))
            self.auth_headers.append(headers.get("authorization"))
            if path == "/api/validate-yaml":
                return self._validate_yaml(body)
            if self.tokens is not None and not self._authorized(headers):
                return 401, {"error": "Invalid credentials in Authorization header"}, {}
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body or b"{}"))
            if method == "GET" and path == "/api/whoami-v2":
                return 200, {"type": "user", "name": self.user, "auth": {"accessToken": {"role": "write"}}}, {}
            match = _API_REPO.match(path)
            if match and method == "POST":
                return self._repo_action(match.group(2), match.group(3), unquote(match.group(4)), body)
            match = _API_INFO.match(path)
            if match and method == "GET":
                return self._repo_info(match.group(2))
            match = _RESOLVE.match(path)
            if match and method in ("GET", "HEAD"):
                return self._resolve(match.group(2), unquote(match.group(4)))
            return 404, {"error": f"stub: no route for {method} {path}"}, {}

    def _authorized(self, headers: Any) -> bool:
        auth = headers.get("authorization") or ""
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in (self.tokens or set())

    def _validate_yaml(self, body: bytes) -> tuple[int, dict[str, Any], dict]:
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.DOTALL)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any], dict]:
        name, namespace = payload.get("name"), payload.get("organization") or self.user
        repo_id = f"{namespace}/{name}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}, {}
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.repos[repo_id] = StubRepo(repo_id, payload.get("type") or "model", private)
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def _repo_action(self, repo_id: str, action: str, revision: str, body: bytes) -> tuple[int, dict, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if action == "branch":
            repo.branches.add(revision)
            return 200, {}, {}
        if revision not in repo.branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        if action == "preupload":
            files = json.loads(body or b"{}").get("files", [])
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return 200, {"files": answer, "commitOid": self._head(repo)}, {}
        return self._commit(repo, revision, body)

    def _commit(self, repo: StubRepo, revision: str, body: bytes) -> tuple[int, dict[str, Any], dict]:
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                raw = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                added[value["path"]] = raw
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile and anything newer: the stub only ever asks for regular uploads
                return 400, {"error": f"stub: unexpected commit entry {key!r}"}, {}
        for path in deleted:
            repo.files = {p: c for p, c in repo.files.items() if p != path and not p.startswith(path + "/")}
        repo.files.update(added)
        oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{sorted(added)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "revision": revision, "header": header, "files": sorted(added)})
        url = f"{self.endpoint}/{repo.repo_id}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}, {}

    def _repo_info(self, repo_id: str) -> tuple[int, dict[str, Any], dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        siblings = [{"rfilename": path} for path in sorted(repo.files)]
        info = {"id": repo_id, "modelId": repo_id, "sha": self._head(repo), "private": repo.private}
        return 200, {**info, "siblings": siblings}, {}

    def _resolve(self, repo_id: str, path: str) -> tuple[int, dict[str, Any], dict]:
        repo = self.repos.get(repo_id)
        if repo is None or path not in repo.files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        return 200, {"raw": repo.files[path]}, {"X-Repo-Commit": self._head(repo)}

    @staticmethod
    def _head(repo: StubRepo) -> str:
        return repo.commits[-1]["oid"] if repo.commits else "0" * 40


#: A token-shaped string (`hf_` + 34 characters) that the fake run folder "leaks" into its recipe.
LEAKED_TOKEN = "hf_" + "LeakedTokenAbc123" * 2
#: What a push of `make_run_folder`'s folder must upload, and nothing more.
EXPECTED_PUSHED = sorted([
    "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "report.json", "report.md", "report.png",
    "onnx/config.json", "onnx/model.onnx", "onnx/model_quantized.onnx",
])


def make_run_folder(root: Path, *, teacher: str = "google-bert/bert-base-uncased") -> Path:
    """A fake training output folder: student files, card inputs, and everything that must stay local."""
    home = str(Path.home())
    recipe = {
        "hf_distill_version": "0.1.0",
        "task": "sequence-classification",
        "teacher": {"name_or_path": teacher, "fingerprint": "sha256:0123abcd", "num_parameters": 109_483_778,
                    "model_type": "bert"},
        "student": {"name_or_path": f"{home}/work/students/tiny-init", "num_parameters": 4_386_178,
                    "model_type": "bert"},
        "datasets": ["stanfordnlp/sst2", "/data/private/extra_sst2.jsonl"],
        "losses": {"kd": {"weight": 0.7, "divergence": "forward_kl", "temperature": 4.0},
                   "ce": {"weight": 0.3},
                   "hidden": {"weight": 1.5, "loss": "mse", "projection": "linear"}},
        "layer_map": {"hidden": {"0": 1, "1": 3, "2": 5}},
        "arguments": {"output_dir": str(root), "hub_token": LEAKED_TOKEN, "learning_rate": 5e-5,
                      "num_train_epochs": 3.0, "kd_temperature": 4.0, "hidden_weight": 1.5, "seed": 7,
                      "logging_dir": "~/runs/sst2", "run_name": f"resumed from {home}/ckpt/last with {LEAKED_TOKEN}",
                      "max_new_tokens": 32},
    }
    files: dict[str, bytes | str] = {
        "config.json": json.dumps({"model_type": "bert", "num_hidden_layers": 3}),
        "generation_config.json": "{}",
        "model.safetensors": b"student weights",
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "vocab.txt": "[PAD]\n[UNK]\n",
        "all_results.json": json.dumps({"eval_accuracy": 0.874, "eval_teacher_accuracy": 0.912,
                                        "eval_teacher_agreement": 0.93, "eval_loss": 0.41, "epoch": 3.0}),
        "report.json": json.dumps({"threads": 2, "backend": "torch", "rows": [
            {"name": "teacher fp32 (PyTorch)", "accuracy": 0.912, "size_mb": 417.7, "num_parameters": 109_483_778,
             "latency_ms": {"batch_1": {"median": 41.0, "p90": 44.0}, "batch_32": {"median": 980.0, "p90": 1010.0}}},
            {"name": "student fp32 (PyTorch)", "accuracy": 0.874, "size_mb": 16.8, "num_parameters": 4_386_178,
             "latency_ms": {"batch_1": {"median": 3.9, "p90": 4.3}, "batch_32": {"median": 61.0, "p90": 66.0}}},
            {"name": "student int8 (ONNX)", "accuracy": 0.871, "size_mb": 4.6,
             "latency_ms": {"batch_1": {"median": 1.2, "p90": 1.4}, "batch_32": {"median": 21.0, "p90": 23.0}}},
        ]}),
        "report.md": "| model | accuracy |\n|---|---|\n",
        "report.png": b"\x89PNG\r\n\x1a\n fake plot",
        "onnx/model.onnx": b"onnx fp32",
        "onnx/model_quantized.onnx": b"onnx int8",
        "onnx/config.json": "{}",
        "distillation/recipe.json": json.dumps(recipe),
        "distillation/projections.safetensors": b"projection heads",
        "checkpoint-5/model.safetensors": b"checkpoint weights",
        "checkpoint-5/optimizer.pt": b"optimizer state",
        "checkpoint-5/scheduler.pt": b"scheduler state",
        "training_args.bin": b"pickled arguments",
        "teacher.safetensors": b"teacher weights",
        "runs/events.out.tfevents.1": b"tensorboard",
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stub: HubStub

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        status, payload, extra = self.stub.handle(self.command, path, self.headers, self._read_body())
        raw = payload.pop("raw", None) if status == 200 else None
        data = raw if isinstance(raw, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", "stub")
        for key, value in extra.items():
            self.send_header(key, value)
        if status >= 400:
            self.send_header("X-Error-Message", str(payload.get("error", "")))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Stay quiet: the stub records requests itself."""


if __name__ == "__main__":
    with HubStub() as running:
        print(f"Hub stand-in serving at {running.endpoint} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
