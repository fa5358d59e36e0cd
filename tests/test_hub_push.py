"""``convert(..., push_to_hub=...)`` through the real huggingface_hub client against a loopback Hub.

The worker runs with ``HF_HUB_DISABLE_XET=1``, so ``upload_folder`` takes the git-LFS path:
create repo, validate README metadata, preupload (upload modes), LFS batch, PUT of the
weights, LFS verify, NDJSON commit. The server (tests/_hub_server.py) keeps what was
committed and serves it on its download routes, so ``hf://OWNER/REPO`` loads it back.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from _hub_server import FakeHub, Worker, state_digest

TOKEN = "hf_loopback_write_token"
FOLDER = ["README.md", "config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def server():
    with FakeHub(lifetime=120, max_requests=200, token=TOKEN) as h:
        yield h


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory):
    # Started before the source checkpoint is built so that its imports overlap.
    w = Worker(server.url, tmp_path_factory.mktemp("hf_home"), token=TOKEN)
    yield w
    w.close()


@pytest.fixture(scope="module")
def source(worker, tmp_path_factory):
    """A random vit_t state dict saved with torch.save (MobileSAM's layout and file format)."""
    from sam_drop_in.build_sam import sam_model_registry

    torch.manual_seed(0)
    sd = sam_model_registry["vit_t"]().state_dict()
    path = tmp_path_factory.mktemp("src") / "mobile_sam.pt"
    torch.save(sd, path)
    return {"path": str(path), "n": len(sd), "digest": state_digest(sd)}


def _fail(result: dict, *types: str) -> str:
    assert not result["ok"], result
    for t in types:
        assert t in result["types"], result
    return result["message"]


def _head_files(server: FakeHub, repo_id: str) -> dict[str, bytes]:
    repo = server.repos[repo_id]
    return repo["commits"][repo["refs"]["main"]]


def _assert_intact(dst, source, worker) -> None:
    """The converted folder is complete, has no temporary files, and loads to the source tensors."""
    assert sorted(p.name for p in dst.iterdir()) == FOLDER
    config = json.loads((dst / "config.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256((dst / "model.safetensors").read_bytes()).hexdigest()
    r = worker.call(op="load", source=str(dst / "model.safetensors"), model_type="vit_t")
    assert r == {"ok": True, "n": source["n"], "digest": source["digest"]}


def test_push_then_load_back(worker, server, source, tmp_path):
    dst = tmp_path / "out"
    r = worker.call(op="convert", src=source["path"], dst=str(dst), push_to_hub="me/vit-t-sa")
    assert r == {"ok": True, "path": str(dst / "model.safetensors")}

    # The Hub holds exactly the local folder, byte for byte, in one commit on main.
    files = _head_files(server, "me/vit-t-sa")
    assert sorted(files) == FOLDER
    for name in FOLDER:
        assert files[name] == (dst / name).read_bytes(), name
    assert json.loads(files["config.json"])["model_type"] == "vit_t"
    assert "me/vit-t-sa" in files["README.md"].decode()  # the card names the repo it was pushed to
    assert server.repos["me/vit-t-sa"]["private"] is False
    (log,) = [c for c in server.commit_log if c["repo"] == "me/vit-t-sa"]
    # Weights went through LFS (batch + PUT + verify), the small files inline.
    assert log["ops"] == {"model.safetensors": "lfsFile", "config.json": "file", "README.md": "file"}
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert ("PUT", f"/api/_loopback/lfs-upload/me/vit-t-sa/{sha}") in server.requests
    assert ("POST", "/me/vit-t-sa.git/info/lfs/objects/verify") in server.requests

    # Loaded back through the builder from the repo address: the same tensors as the source.
    before = len(server.requests)
    r = worker.call(op="build", model_type="vit_t", checkpoint="hf://me/vit-t-sa")
    assert r == {"ok": True, "n": source["n"], "digest": source["digest"]}
    got = server.requests[before:]
    assert ("GET", "/me/vit-t-sa/resolve/main/config.json") in got
    assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in got), got


def test_failed_commit_keeps_local_folder(worker, server, source, tmp_path):
    dst = tmp_path / "out"
    server.route_faults["commit"] = 500
    try:
        r = worker.call(op="convert", src=source["path"], dst=str(dst), push_to_hub="me/broken-push")
    finally:
        server.route_faults.pop("commit", None)
    msg = _fail(r, "CheckpointError")
    assert "me/broken-push" in msg and "500" in msg and str(dst) in msg
    assert "hf auth login" not in msg  # a server error is not a login problem
    assert server.repos["me/broken-push"]["refs"] == {}  # nothing was committed
    _assert_intact(dst, source, worker)

    # The Hub is healthy again: the same call completes the upload.
    r = worker.call(op="convert", src=source["path"], dst=str(dst), push_to_hub="me/broken-push")
    assert r["ok"], r["message"]
    assert sorted(_head_files(server, "me/broken-push")) == FOLDER


def test_rejected_token_says_to_log_in(worker, server, source, tmp_path):
    dst = tmp_path / "out"
    server.token = "hf_someone_else"
    try:
        r = worker.call(op="convert", src=source["path"], dst=str(dst), push_to_hub="me/denied")
    finally:
        server.token = TOKEN
    msg = _fail(r, "CheckpointError")
    assert "me/denied" in msg and "401" in msg and "hf auth login" in msg
    assert "me/denied" not in server.repos
    _assert_intact(dst, source, worker)


def test_cli_convert_push_to_hub_private(worker, server, source, tmp_path):
    dst = tmp_path / "out"
    r = worker.call(op="cli", argv=["convert", source["path"], str(dst), "--push-to-hub", "me/cli-push", "--private"])
    assert r["ok"] and r["rc"] == 0, r
    assert "me/cli-push" in r["stdout"]
    assert server.repos["me/cli-push"]["private"] is True
    files = _head_files(server, "me/cli-push")
    assert sorted(files) == FOLDER
    assert files["model.safetensors"] == (dst / "model.safetensors").read_bytes()

    server.route_faults["lfs-upload"] = 500
    try:
        r = worker.call(op="cli", argv=["convert", source["path"], str(tmp_path / "out2"),
                                        "--push-to-hub", "me/cli-fail"])
    finally:
        server.route_faults.pop("lfs-upload", None)
    assert r["ok"] and r["rc"] != 0, r
    assert "me/cli-fail" in r["stderr"] and "500" in r["stderr"]
    assert server.repos["me/cli-fail"]["refs"] == {}
