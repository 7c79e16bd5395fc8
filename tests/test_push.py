"""`butler-zoo push`: the repo folder, the upload requests, the early refusals, the local-hub target.

No writable Hub server exists offline, so uploads go to `FakeHubUploadServer`, a TEST DOUBLE of the
Hub's write routes on loopback; what it checks is what `huggingface_hub` sends (routes, files, bytes,
commit message), not how the real Hub answers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from butler_zoo import push as push_mod
from butler_zoo.cli import main
from butler_zoo.errors import ButlerError
from butler_zoo.hub import local_hub_repo_dir
from butler_zoo.push import PushError, push_predictor

REPO_ID = "test-org/tiny-butler"
TRAINING_LOG = {"command": "TEST FIXTURE (no training ran)", "machine": "test", "versions": {"git_commit": "c0ffee1"},
                "wall_time_s": 1.0, "tokens_seen": 10, "peak_memory_bytes": 0,
                "steps": [{"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0}], "data": {}}


class FakeHubUploadServer:
    """TEST DOUBLE of the Hugging Face Hub's *write* API on loopback: not a Hub.

    It implements only the routes that ``huggingface_hub`` 2.x calls for ``create_repo``,
    ``create_branch`` and ``upload_folder`` (``POST /api/repos/create``, ``/api/validate-yaml`` (the
    README's metadata, sent before upload), ``/api/models/ORG/NAME/branch/B``, ``/preupload/REV``
    and ``/commit/REV``, as read in huggingface_hub's ``hf_api.py`` / ``_commit_api.py``), records
    every request, and answers each file as a *regular* (non-LFS) upload so the commit's NDJSON
    payload carries the file contents for the test to compare. It accepts any metadata: the Hub's
    real YAML validation is not reproduced. The real Hub would send ``*.safetensors`` through LFS/Xet
    storage; that path is not exercised. Any other request gets no handler and fails the test.
    """

    def __init__(self):
        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.preuploads: list[tuple[str, list[str]]] = []
        self.validated: list[str] = []
        self.commits: list[dict] = []
        self.authorization: set[str] = set()
        repo = r"/api/models/(?P<repo>[^/]+/[^/]+)"
        for pattern, handler in ((r"/api/repos/create", self._create), (r"/api/validate-yaml", self._validate_yaml), (repo + r"/branch/(?P<rev>[^/]+)", self._branch),
                                 (repo + r"/preupload/(?P<rev>[^/]+)", self._preupload), (repo + r"/commit/(?P<rev>[^/]+)", self._commit)):
            self.server.expect_request(re.compile("^" + pattern + "$"), method="POST").respond_with_handler(self._recorded(pattern, handler))

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def _recorded(self, pattern, handler):
        def respond(request: Request) -> Response:
            self.requests.append((request.method, request.path))
            self.authorization.add(request.headers.get("authorization", ""))
            return handler(request, **re.match(pattern, request.path).groupdict())

        return respond

    @staticmethod
    def _json(data, status=200) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json")

    def _create(self, request):
        body = request.get_json()
        self.created.append(body)
        return self._json({"url": f"{self.url}/{body['organization']}/{body['name']}", "name": f"{body['organization']}/{body['name']}"})

    def _validate_yaml(self, request):
        body = request.get_json()
        assert body["repoType"] == "model"
        self.validated.append(body["content"])
        return self._json({"errors": [], "warnings": []})

    def _branch(self, request, repo, rev):
        self.branches.append((repo, rev))
        return self._json({})

    def _preupload(self, request, repo, rev):
        files = request.get_json()["files"]
        self.preuploads.append((rev, [f["path"] for f in files]))
        return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})

    def _commit(self, request, repo, rev):
        lines = [json.loads(line) for line in request.get_data().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        oid = hashlib.sha1(request.get_data()).hexdigest()
        self.commits.append({"repo": repo, "revision": rev, "summary": header["summary"], "files": files,
                             "content_type": request.headers.get("content-type"), "other_keys": sorted({x["key"] for x in lines} - {"header", "file"})})
        return self._json({"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        try:
            self.server.check_assertions()  # no unexpected request
        finally:
            self.server.stop()


@pytest.fixture
def fake_hub():
    with FakeHubUploadServer() as server:
        yield server


@pytest.fixture
def trained_dir(tiny_predictor_dir) -> Path:
    (tiny_predictor_dir / "training_log.json").write_text(json.dumps(TRAINING_LOG))
    (tiny_predictor_dir / "loss.png").write_bytes(b"\x89PNG test fixture, not a real plot")
    return tiny_predictor_dir


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


# ----- upload through huggingface_hub --------------------------------------------------------------------


def test_push_sends_exact_files_and_commit_message(fake_hub, trained_dir, tmp_path):
    result = push_predictor(trained_dir, REPO_ID, token="hf_test_token", endpoint=fake_hub.url, out_dir=tmp_path / "repo")
    expected = ["README.md", "config.json", "loss.png", "model.safetensors", "training_log.json"]
    assert fake_hub.requests == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                                 ("POST", f"/api/models/{REPO_ID}/preupload/main"), ("POST", f"/api/models/{REPO_ID}/commit/main")]
    assert fake_hub.created == [{"name": "tiny-butler", "organization": "test-org", "visibility": "public", "type": "model"}]
    assert fake_hub.authorization == {"Bearer hf_test_token"}
    assert sorted(fake_hub.preuploads[0][1]) == expected
    (commit,) = fake_hub.commits
    assert commit["summary"] == "Upload tiny-butler: TokenButler predictor for test-org/tiny-llama (training commit c0ffee1)"
    assert commit["content_type"] == "application/x-ndjson" and commit["other_keys"] == []
    assert sorted(commit["files"]) == expected
    for name in ("config.json", "model.safetensors", "training_log.json", "loss.png"):
        assert commit["files"][name] == (trained_dir / name).read_bytes(), name
    assert commit["files"]["README.md"] == (tmp_path / "repo" / "README.md").read_bytes()
    assert fake_hub.validated == [commit["files"]["README.md"].decode()]
    assert b"base_model: test-org/tiny-llama" in commit["files"]["README.md"]
    assert result.target == "hub" and result.commit_oid and result.folder.files == expected


def test_push_to_a_branch_creates_it_private(fake_hub, trained_dir):
    push_predictor(trained_dir, REPO_ID, token="hf_test_token", endpoint=fake_hub.url, revision="v1", private=True)
    assert fake_hub.created == [{"name": "tiny-butler", "organization": "test-org", "visibility": "private", "type": "model"}]
    assert fake_hub.branches == [(REPO_ID, "v1")]
    assert [c["revision"] for c in fake_hub.commits] == ["v1"]


def test_cli_push_uploads_with_hf_endpoint(fake_hub, trained_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    result = CliRunner().invoke(main, ["push", str(trained_dir), "--repo-id", REPO_ID, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["target"] == "hub" and out["commit_url"].startswith(fake_hub.url)
    assert fake_hub.authorization == {"Bearer hf_env_token"}
    assert fake_hub.commits[0]["summary"] == out["commit_message"]


# ----- refusals before anything is built ------------------------------------------------------------------


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the repo folder was built before the refusal")

    monkeypatch.setattr(push_mod, "build_repo_folder", refuse)


def test_push_without_token_refuses_before_building(no_token, nothing_built, trained_dir, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(PushError, match="no Hugging Face token.*hf auth login"):
        push_predictor(trained_dir, REPO_ID, out_dir=out, endpoint="http://127.0.0.1:9")
    assert not out.exists()
    result = CliRunner().invoke(main, ["push", str(trained_dir), "--repo-id", REPO_ID, "--out-dir", str(out)])
    assert result.exit_code == 1 and "no Hugging Face token" in result.output and not out.exists()


def test_push_offline_refuses_before_building(monkeypatch, nothing_built, trained_dir, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "repo"
    with pytest.raises(PushError, match="offline mode"):
        push_predictor(trained_dir, REPO_ID, token="hf_test_token", out_dir=out)
    assert not out.exists()


def test_push_refuses_bad_inputs(trained_dir, tmp_path, tiny_llama_dir):
    with pytest.raises(ButlerError, match="not a valid Hub repo id|ORG/NAME"):
        push_predictor(trained_dir, "no-slash", dry_run=True)
    with pytest.raises(PushError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (trained_dir / "config.json").replace(tmp_path / "empty" / "config.json")
        push_predictor(tmp_path / "empty", REPO_ID, dry_run=True)


def test_push_refuses_a_local_base_path(tmp_path, tiny_llama_dir):
    from conftest import make_tiny_predictor

    make_tiny_predictor(str(tiny_llama_dir)).save_pretrained(tmp_path / "p")
    with pytest.raises(PushError, match="not a Hub repo id"):
        push_predictor(tmp_path / "p", REPO_ID, dry_run=True)


# ----- dry run and the repo folder ------------------------------------------------------------------------


def test_dry_run_builds_folder_and_prints_plan(trained_dir, tmp_path, no_token):
    out = tmp_path / "repo"
    result = CliRunner().invoke(main, ["push", str(trained_dir), "--repo-id", REPO_ID, "--dry-run", "--out-dir", str(out), "--export"])
    assert result.exit_code == 0, result.output
    files = ["README.md", "config.json", "loss.png", "model.safetensors", "predictor-score.pt2", "predictor.pt2", "training_log.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert "dry run: nothing uploaded" in result.output
    for name in files:
        assert name in result.output
    assert "commit message: Upload tiny-butler: TokenButler predictor for test-org/tiny-llama (training commit c0ffee1)" in result.output
    assert "`predictor.pt2` / `predictor-score.pt2` are `torch.export` programs" in (out / "README.md").read_text()


def test_training_commit_comes_from_config_then_log(tmp_path):
    from butler_zoo.config import ButlerConfig
    from conftest import make_tiny_predictor

    config: ButlerConfig = make_tiny_predictor("a/b").config
    config.training = {"code_commit": "abc1234"}
    assert push_mod.training_commit(config, {"versions": {"git_commit": "other"}}) == "abc1234"
    config.training = {}
    assert push_mod.training_commit(config, {"versions": {"git_commit": "def5678"}}) == "def5678"
    assert push_mod.training_commit(config, None) is None


# ----- local hub (git) --------------------------------------------------------------------------------------


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_push_to_local_hub_commits_branches(trained_dir, tmp_path, no_token):
    hub = tmp_path / "hub"
    first = push_predictor(trained_dir, REPO_ID, to_local_hub=hub)
    repo = local_hub_repo_dir(hub, REPO_ID)
    assert repo == hub / "models" / "test-org" / "tiny-butler"
    assert _git(repo, "rev-parse", "main") == first.commit_oid
    assert _git(repo, "log", "-1", "--format=%s") == "Upload tiny-butler: TokenButler predictor for test-org/tiny-llama (training commit c0ffee1)"
    assert sorted(_git(repo, "ls-tree", "--name-only", "main").split()) == first.folder.files
    second = push_predictor(trained_dir, REPO_ID, to_local_hub=hub, revision="exp")
    assert _git(repo, "rev-parse", "exp") == second.commit_oid != first.commit_oid
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"  # the work tree stays on main
    (repo / "stray.txt").write_text("x")
    with pytest.raises(PushError, match="uncommitted changes"):
        push_predictor(trained_dir, REPO_ID, to_local_hub=hub)
