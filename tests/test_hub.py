"""Hub downloads through the real huggingface_hub client against a loopback server.

Each worker process gets HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE in its environment, as a
user would set them; the server is tests/_hub_server.py.
"""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch

from _hub_server import FakeHub, Worker, state_digest


@pytest.fixture(scope="module")
def weights():
    """Two versions of a random vit_t state dict in MobileSAM's layout, as file bytes."""
    from safetensors.torch import save

    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in mobile_sam.sam_model_registry["vit_t"]().state_dict().items()}
    sd2 = dict(sd)
    sd2["mask_decoder.iou_token.weight"] = sd["mask_decoder.iou_token.weight"] + 1.0
    buf = io.BytesIO()
    torch.save(sd, buf)
    return {
        "v1": save(sd), "v2": save(sd2), "v1_pt": buf.getvalue(),
        "d1": state_digest(sd), "d2": state_digest(sd2), "n": len(sd),
    }


def _populate(hub: FakeHub, w) -> dict:
    c1 = hub.add_commit("acme/mobile", {"model.safetensors": w["v1"]}, tags=("v1",))
    c2 = hub.add_commit("acme/mobile", {"model.safetensors": w["v2"], "README.md": b"# card\n"})
    cfg = json.dumps({"model_type": "vit_t", "weights": "w/vit_t.safetensors"}).encode()
    hub.add_commit("acme/converted", {"config.json": cfg, "w/vit_t.safetensors": w["v1"], "decoy.safetensors": w["v2"]})
    hub.add_commit("acme/single", {"README.md": b"x", "mobile_sam.pt": w["v1_pt"]})
    hub.add_commit("acme/many", {"a.pt": w["v1_pt"], "b.safetensors": w["v2"]})
    hub.add_commit("acme/broken", {"model.safetensors": w["v1"]})
    hub.add_commit("acme/cut", {"model.safetensors": w["v1"]})
    hub.add_commit("acme/hang", {"model.safetensors": w["v1"]})
    hub.add_commit("acme/norange", {"norange.safetensors": w["v1"]})
    # A converted repo whose config.json records the sha256 of other weights than it holds.
    mixed = json.dumps({"model_type": "vit_t", "weights": "w/model.safetensors",
                        "weights_sha256": hashlib.sha256(w["v2"]).hexdigest()}).encode()
    hub.add_commit("acme/mixed", {"config.json": mixed, "w/model.safetensors": w["v1"]})
    good = json.dumps({"model_type": "vit_t", "weights": "w/model.safetensors",
                       "weights_sha256": hashlib.sha256(w["v1"]).hexdigest()}).encode()
    hub.add_commit("acme/hashed", {"config.json": good, "w/model.safetensors": w["v1"]})
    return {"c1": c1, "c2": c2}


@pytest.fixture(scope="module")
def server():
    with FakeHub(lifetime=300) as h:
        yield h


@pytest.fixture(scope="module")
def workers(server, tmp_path_factory):
    # Started before the test weights are built so that their imports overlap.
    home = tmp_path_factory.mktemp("hf_home")
    ws = (Worker(server.url, home), Worker(server.url, home, offline=True))
    yield ws
    for w in ws:
        w.close()


@pytest.fixture(scope="module")
def hub(server, workers, weights):
    server.commits = _populate(server, weights)
    return server


@pytest.fixture(scope="module")
def worker(workers, hub):
    return workers[0]


def _fail(result: dict, *types: str) -> str:
    assert not result["ok"], result
    for t in types:
        assert t in result["types"], result
    return result["message"]


def test_download_and_revision_pinning(worker, hub, weights):
    r = worker.call(op="load", source="hf://acme/mobile/model.safetensors", model_type="vit_t")
    assert r == {"ok": True, "n": weights["n"], "digest": weights["d2"]}
    # A tag and a commit sha both pin the first upload, not main.
    r = worker.call(op="load", source="hf://acme/mobile@v1/model.safetensors", model_type="vit_t")
    assert r["digest"] == weights["d1"]
    r = worker.call(op="load", source=f"hf://acme/mobile@{hub.commits['c1']}/model.safetensors", model_type="vit_t")
    assert r["digest"] == weights["d1"]


def test_second_load_makes_no_request(worker, hub, weights):
    src = "hf://acme/mobile@v1/model.safetensors"
    assert worker.call(op="load", source=src)["ok"]
    before = len(hub.requests)
    assert worker.call(op="load", source=src)["digest"] == weights["d1"]
    assert len(hub.requests) == before


def test_repo_address_picks_the_weights(worker, weights):
    # config.json names the file (and there is a decoy next to it).
    assert worker.call(op="load", source="hf://acme/converted")["digest"] == weights["d1"]
    # No config.json, no model.safetensors: the only weights file, found via the tree API (a pickle here).
    assert worker.call(op="load", source="hf://acme/single", model_type="vit_t")["digest"] == weights["d1"]
    msg = _fail(worker.call(op="load", source="hf://acme/many"), "CheckpointError")
    assert "a.pt" in msg and "b.safetensors" in msg


def test_not_found_names_what_is_missing(worker):
    msg = _fail(worker.call(op="load", source="hf://acme/nothere/model.safetensors"),
                "CheckpointNotFoundError", "FileNotFoundError")
    assert "acme/nothere" in msg
    msg = _fail(worker.call(op="load", source="hf://acme/mobile@nobranch/model.safetensors"),
                "CheckpointNotFoundError")
    assert "nobranch" in msg and "acme/mobile" in msg
    msg = _fail(worker.call(op="load", source="hf://acme/mobile@v1/missing.safetensors"),
                "CheckpointNotFoundError")
    assert "missing.safetensors" in msg and "v1" in msg and "acme/mobile" in msg


def test_server_error(worker, hub):
    hub.faults["model.safetensors"] = "500"
    try:
        r = worker.call(op="load", source="hf://acme/broken/model.safetensors")
    finally:
        hub.faults.pop("model.safetensors", None)
    msg = _fail(r, "CheckpointError")
    assert "FileNotFoundError" not in r["types"]
    assert "500" in msg and "acme/broken" in msg
    assert worker.call(op="cached", repo="acme/broken", file="model.safetensors") == {"ok": True, "cached": False}


def test_transfer_cut_short_is_not_cached(worker, hub, weights):
    hub.faults["model.safetensors"] = "truncate"
    try:
        r = worker.call(op="load", source="hf://acme/cut/model.safetensors")
    finally:
        hub.faults.pop("model.safetensors", None)
    msg = _fail(r, "CheckpointError")
    assert "model.safetensors" in msg and "acme/cut" in msg
    assert worker.call(op="cached", repo="acme/cut", file="model.safetensors") == {"ok": True, "cached": False}
    # Server healthy again: the next load completes and yields the true tensors.
    hub._truncated.clear()
    assert worker.call(op="load", source="hf://acme/cut/model.safetensors")["digest"] == weights["d1"]


def test_weights_sha256_of_a_converted_repo_is_checked(worker, weights):
    assert worker.call(op="load", source="hf://acme/hashed")["digest"] == weights["d1"]
    msg = _fail(worker.call(op="load", source="hf://acme/mixed"), "CheckpointError")
    assert "does not match its config.json" in msg and "acme/mixed" in msg, msg


def test_endpoint_that_never_answers_fails_within_the_deadline(worker, hub):
    """A resolve request that is read and never answered: the load fails at the deadline, not after
    huggingface_hub's minutes of retries, and says how to raise the limit."""
    hub.faults["model.safetensors"] = "hang"
    try:
        by_argument = worker.call(op="load", source="hf://acme/hang/model.safetensors", download_timeout=2)
        by_env = worker.call(op="load", source="hf://acme/hang/model.safetensors",
                             env={"SAM_DROP_IN_DOWNLOAD_TIMEOUT": "1.5"})
    finally:
        hub.faults.pop("model.safetensors", None)
    for r, limit in ((by_argument, 2.0), (by_env, 1.5)):
        msg = _fail(r, "CheckpointError")
        assert "FileNotFoundError" not in r["types"]
        assert f"did not answer within {limit:g} s" in msg and "SAM_DROP_IN_DOWNLOAD_TIMEOUT" in msg, msg
        assert "acme/hang" in msg
        # The deadline plus the worker's own overhead (thread wake-up on a shared machine); far
        # below the 5 s etag timeout x retries that huggingface_hub alone takes (over 60 s here).
        assert limit - 0.1 <= r["seconds"] < limit + 3.0, r


def test_server_that_ignores_range_does_not_restart_forever(worker, hub):
    """Every GET ignores Range and cuts the body in half: the download stops after a few restarts
    with a message that says so, instead of looping until the server gives up."""
    hub.faults["norange.safetensors"] = "norange"
    before = len(hub.requests)
    try:
        r = worker.call(op="load", source="hf://acme/norange/norange.safetensors")
    finally:
        hub.faults.pop("norange.safetensors", None)
    msg = _fail(r, "CheckpointError")
    assert "Range" in msg and "acme/norange" in msg, msg
    gets = [p for m, p in hub.requests[before:] if m == "GET" and "norange.safetensors" in p]
    assert len(gets) <= 4, gets  # the first GET and at most three ignored-Range restarts
    assert worker.call(op="cached", repo="acme/norange", file="norange.safetensors") == {"ok": True, "cached": False}


def test_download_timeout_must_be_a_positive_number(worker):
    for value in ("0", "-3", "soon", "nan"):
        r = worker.call(op="load", source="hf://acme/mobile/model.safetensors",
                        env={"SAM_DROP_IN_DOWNLOAD_TIMEOUT": value})
        msg = _fail(r, "CheckpointError")
        assert "SAM_DROP_IN_DOWNLOAD_TIMEOUT" in msg and "positive number of seconds" in msg, msg


@pytest.fixture(scope="module")
def offline_worker(workers, hub):
    # Same HF_HOME as `worker`, with HF_HUB_OFFLINE=1.
    return workers[1]


def test_cache_reuse_offline_and_unreachable(worker, offline_worker, hub, weights):
    """Runs last: it stops the module's server."""
    src = "hf://acme/mobile/model.safetensors"
    assert worker.call(op="load", source=src)["digest"] == weights["d2"]
    # HF_HUB_OFFLINE=1: a file address and a repo address both resolve from the cache.
    assert offline_worker.call(op="load", source=src)["digest"] == weights["d2"]
    assert offline_worker.call(op="load", source="hf://acme/mobile")["digest"] == weights["d2"]
    msg = _fail(offline_worker.call(op="load", source="hf://acme/single/README.md"), "CheckpointError")
    assert "HF_HUB_OFFLINE" in msg and "cache" in msg
    hub.stop()
    # Server gone (connection refused): the cached file is still used ...
    assert worker.call(op="load", source=src)["digest"] == weights["d2"]
    # ... and an uncached one fails with a message that says what to do.
    msg = _fail(worker.call(op="load", source="hf://acme/many/a.pt"), "CheckpointError")
    assert "could not reach the Hub" in msg and "cache" in msg and "local path" in msg
    assert "FileNotFoundError" not in msg
