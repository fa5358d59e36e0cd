"""Distillation pipeline on tiny real data (skimage photographs), CPU only.

Speed: the teacher is a random-weight vit_b and the student a TinyViT, both built for a
128-pixel input instead of 1024 (same architectures and code paths; embeddings are 8x8
instead of 64x64). A TinyViT trained at 128 pixels has exactly the parameter shapes of
the 1024-pixel vit_t, which the export test checks by loading it with the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = 128
REPO = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, names, scale: int = 4) -> None:
    from PIL import Image
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        im = getattr(skimage.data, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        Image.fromarray(im[..., :3]).resize((im.shape[1] // scale, im.shape[0] // scale)).save(folder / f"{name}.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Images, a random vit_b teacher file and its embedding stores (computed once)."""
    from safetensors.torch import save_file

    from sam_drop_in.distill import _models
    from sam_drop_in.distill.embed import embed_folder

    root = tmp_path_factory.mktemp("distill")
    _write_images(root / "all", ["astronaut", "chelsea", "coffee", "rocket"])
    _write_images(root / "pair", ["astronaut", "coffee"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = _models.build_sam_sized("vit_b", SIZE)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(root / "teacher.safetensors"))
    teacher_ck = str(root / "teacher.safetensors")
    info = embed_folder(str(root / "all"), str(root / "store_all"), "vit_b", teacher_ck, image_size=SIZE,
                        batch_size=2, shard_size=3, progress=False)
    assert info == {"total": 4, "computed": 4, "skipped": 0, "out": str(root / "store_all")}
    embed_folder(str(root / "pair"), str(root / "store_pair"), "vit_b", teacher_ck, image_size=SIZE,
                 progress=False)
    return {"root": root, "teacher": teacher_ck, "teacher_model": teacher}


def _cfg(ws, out, **kw):
    from sam_drop_in.distill.train import TrainConfig

    base = dict(embeddings=str(ws["root"] / "store_pair"), out=str(out), progress=False, resume="none",
                batch_size=1, warmup_steps=1, lr=2e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_embed_store_contents_match_teacher_and_resume(ws):
    from sam_drop_in._fileio import sha256_file
    from sam_drop_in.distill import _models
    from sam_drop_in.distill.embed import embed_folder
    from sam_drop_in.distill.store import EmbeddingStore

    root = ws["root"]
    store = EmbeddingStore(str(root / "store_all"))
    assert [r["path"] for r in store.records] == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    assert len({r["shard"] for r in store.records}) == 2  # shard_size 3
    rec = store.records[1]
    assert (rec["height"], rec["width"]) == (75, 112)
    assert rec["sha256"] == sha256_file(str(root / "all" / "chelsea.png"))
    # The stored embedding is the teacher's output for the preprocessed image.
    x, _ = _models.preprocess(_models.load_rgb(str(root / "all" / "chelsea.png")), SIZE)
    with torch.inference_mode():
        ref = ws["teacher_model"].image_encoder(x[None])[0]
    torch.testing.assert_close(store.embedding(1), ref, rtol=1e-4, atol=1e-4)

    # Interrupted run: only the first shard made it to the manifest. A rerun computes the rest.
    part = root / "store_part"
    shutil.copytree(root / "store_all", part)
    lines = (part / "manifest.jsonl").read_text().splitlines()
    (part / "manifest.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # torn last line
    os.remove(part / store.records[3]["shard"])
    info = embed_folder(str(root / "all"), str(part), "vit_b", ws["teacher"], image_size=SIZE, progress=False)
    assert (info["computed"], info["skipped"]) == (1, 3)
    resumed = EmbeddingStore(str(part))
    assert [r["path"] for r in resumed.records] == [r["path"] for r in store.records]
    torch.testing.assert_close(resumed.embedding(3), store.embedding(3), rtol=1e-4, atol=1e-4)
    again = embed_folder(str(root / "all"), str(part), "vit_b", ws["teacher"], image_size=SIZE, progress=False)
    assert again["computed"] == 0

    with pytest.raises(ValueError, match="already holds embeddings"):
        embed_folder(str(root / "all"), str(part), "vit_b", ws["teacher"], image_size=SIZE, dtype="float16",
                     progress=False)


def test_batch_plan_splits_global_batches_like_one_process():
    from sam_drop_in.distill.train import BatchPlan

    single = BatchPlan(10, batch_size=2, grad_accum=2, world_size=1, seed=3)
    ddp = BatchPlan(10, batch_size=2, grad_accum=1, world_size=2, seed=3)
    for step in range(5):
        assert [single.indices(step, 0, a) for a in range(2)] == [ddp.indices(step, r, 0) for r in range(2)]
    # One epoch uses each image at most once; epochs are reshuffled.
    seen = sum((single.indices(s, 0, a) for s in range(2) for a in range(2)), [])
    assert len(set(seen)) == 8
    assert single.indices(0, 0, 0) + single.indices(0, 0, 1) != single.indices(2, 0, 0) + single.indices(2, 0, 1)
    with pytest.raises(ValueError, match="one global batch needs 12"):
        BatchPlan(10, batch_size=3, grad_accum=2, world_size=2, seed=0)


@pytest.fixture(scope="module")
def trained(ws):
    from sam_drop_in.distill.train import train

    out = ws["root"] / "run_main"
    r = train(_cfg(ws, out, steps=40, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=20))
    return out, r


def test_train_lowers_loss_and_exports_registry_vit_t(ws, trained):
    from safetensors.torch import load_file

    from sam_drop_in.build_sam import sam_model_registry

    out, r = trained
    losses = r["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 41))
    assert log[-1]["lr"] < log[5]["lr"]  # cosine decay
    # The export is a normal vit_t checkpoint: the registry's 1024-pixel model loads it strictly.
    sd = load_file(r["export"])
    assert len(sd) == 439
    sam = sam_model_registry["vit_t"](checkpoint=r["export"])
    got = sam.state_dict()
    for k in ("image_encoder.neck.0.weight", "mask_decoder.iou_token.weight"):
        torch.testing.assert_close(got[k], sd[k], rtol=0, atol=0)
    teacher_sd = load_file(ws["teacher"])
    torch.testing.assert_close(sd["mask_decoder.iou_token.weight"], teacher_sd["mask_decoder.iou_token.weight"],
                               rtol=0, atol=0)


def test_eval_trained_student_agrees_better_with_teacher(ws, trained, capsys):
    from sam_drop_in.distill.cli import main
    from sam_drop_in.distill._models import read_head_state
    from sam_drop_in.distill.train import build_student, export_student

    out, r = trained
    init = ws["root"] / "init_vit_t.safetensors"
    export_student(build_student(SIZE, read_head_state(ws["teacher"], "vit_b"), seed=0), str(init))
    common = ["--embeddings", str(ws["root"] / "store_pair"), "--points", "12", "--boxes", "12"]
    assert main(["eval", "--student", str(init), *common]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["eval", "--student", r["export"], *common]) == 0
    after = json.loads(capsys.readouterr().out)
    assert before["prompts"] == after["prompts"] == 48
    assert after["embedding_mse"] < 0.5 * before["embedding_mse"]
    assert after["miou"] > before["miou"] + 0.05, (before, after)


def test_resume_reproduces_uninterrupted_losses(ws):
    from sam_drop_in.distill.train import train

    root = ws["root"]
    full = train(_cfg(ws, root / "run_full", steps=4, checkpoint_every=2))
    first = train(_cfg(ws, root / "run_split", steps=4, checkpoint_every=2, stop_after=2))
    assert first["final_step"] == 2 and first["export"] is None
    # Scramble the global RNG: resume must restore it from the checkpoint.
    torch.manual_seed(12345)
    second = train(_cfg(ws, root / "run_split", steps=4, checkpoint_every=2, resume="auto"))
    assert second["steps"] == [2, 3]
    np.testing.assert_allclose(first["losses"] + second["losses"], full["losses"], rtol=0, atol=1e-6)
    from safetensors.torch import load_file

    # Weights: the same uninterrupted run, repeated, measures this machine's run-to-run noise
    # (Adam turns round-off in near-zero gradients into fractions of a step). The resumed run may
    # differ from the uninterrupted one by no more than that; where training is deterministic the
    # noise is zero and the resumed weights must be identical.
    again = train(_cfg(ws, root / "run_full_again", steps=4, checkpoint_every=2))
    a, b, c = load_file(full["export"]), load_file(second["export"]), load_file(again["export"])
    noise = max(float((a[k].double() - c[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    resumed = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert resumed <= 2 * noise, (resumed, noise)


def test_full_stage_losses_and_decoder_finetuning(ws):
    from safetensors.torch import load_file

    from sam_drop_in.distill.train import train

    out = ws["root"] / "run_full_stage"
    r = train(_cfg(ws, out, steps=2, full_stage=True, train_decoder=True, prompts_per_image=4, hard_rounds=2))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for e in log:
        assert e["tokens"] > 0 and e["masks"] > 0 and np.isfinite(e["loss"])
        assert e["loss"] == pytest.approx(e["embedding"] + e["tokens"] + e["masks"], rel=1e-5)
    sd, teacher = load_file(r["export"]), load_file(ws["teacher"])
    changed = [k for k in sd if k.startswith("mask_decoder.") and not torch.equal(sd[k], teacher[k])]
    assert changed, "mask decoder fine-tuning left the decoder unchanged"
    assert all(torch.equal(sd[k], teacher[k]) for k in sd if k.startswith("prompt_encoder."))

    with pytest.raises(ValueError, match="needs --full-stage"):
        train(_cfg(ws, ws["root"] / "run_bad", steps=1, train_decoder=True))


def test_hard_prompt_sampling_adds_points_in_disagreement(ws):
    from sam_drop_in.distill.losses import decode, hard_prompt_sampling
    from sam_drop_in.distill.store import EmbeddingStore
    from sam_drop_in.distill._models import read_head_state
    from sam_drop_in.distill.train import build_student

    store = EmbeddingStore(str(ws["root"] / "store_pair"))
    head = read_head_state(ws["teacher"], "vit_b")
    teacher = build_student(SIZE, head, seed=1)
    student = build_student(SIZE, head, seed=2)
    t_emb = store.embedding(0)[None]
    s_emb = torch.randn_like(t_emb)
    g = torch.Generator().manual_seed(0)
    coords, labels = hard_prompt_sampling(teacher, student, t_emb, s_emb, 6, (96, 128), 9, g)
    assert coords.shape[0] == 6 and coords.shape[1] == labels.shape[1] and coords.shape[2] == 2
    rounds = coords.shape[1] - 1
    # Seed 0 draws refinement rounds (deterministic); zero rounds would leave nothing to check.
    assert rounds > 0, "hard_prompt_sampling drew no refinement round with seed 0"
    # Labels of refinement points say whether the teacher's mask (given the earlier points) is on there.
    with torch.no_grad():
        t_masks, _, _ = decode(teacher, t_emb, coords[:, :1], labels[:, :1])
    lh = t_masks.shape[-1]
    px = (coords[:, 1, 0] * lh / SIZE).long()
    py = (coords[:, 1, 1] * lh / SIZE).long()
    expect = (t_masks[torch.arange(6), 0, py, px] > 0).float()
    assert torch.equal(labels[:, 1], expect)


def test_torchrun_ddp_matches_single_process(ws):
    from sam_drop_in.distill.train import train

    root = ws["root"]
    single = train(_cfg(ws, root / "run_single", steps=3, batch_size=1, grad_accum=2))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    # --standalone: a local c10d rendezvous on a free port (a static "--master_port 0" never rendezvouses).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sam_drop_in.distill", "train", "--embeddings", str(root / "store_pair"),
           "--out", str(root / "run_ddp"), "--steps", "3", "--batch-size", "1", "--grad-accum", "1",
           "--lr", "2e-3", "--warmup-steps", "1", "--resume", "none", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (root / "run_ddp" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    # Same micro-batches, same BatchNorm statistics; only the gradient summation order differs.
    np.testing.assert_allclose([e["loss"] for e in log], single["losses"], rtol=1e-4, atol=1e-5)
    from safetensors.torch import load_file

    a = load_file(single["export"])
    b = load_file(str(root / "run_ddp" / "student_vit_t.safetensors"))
    keys = [k for k in a if k.startswith("image_encoder.") and a[k].is_floating_point() and "running_" not in k]
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in keys])
    # Gradients are summed in another order, and Adam's normalised step turns a small difference
    # in a near-zero gradient into up to a whole step (lr = 2e-3) for that element. So: all but a
    # rare few weights agree within 1/5 of one step, and none moved further than Adam can in 3 steps.
    # (Observed: ~10% of weights differ by 1e-5..4e-4, more than summation order alone explains;
    # an open question noted on the issue.)
    assert float((diff > 4e-4).double().mean()) < 1e-3, float((diff > 4e-4).double().mean())
    assert float(diff.max()) <= 3 * 2e-3 * 1.01


def test_ray_labels_equal_single_process(ws, tmp_path):
    pytest.importorskip("ray", reason="pip install 'sam-drop-in[ray]' to test the Ray path")
    pytest.importorskip("pycocotools")
    from safetensors.torch import save_file

    from sam_drop_in.distill import _models
    from sam_drop_in.distill.ray_label import label_folder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = _models.build_sam_sized("vit_t", 1024)
    ck = tmp_path / "vit_t.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(ck))
    images = tmp_path / "images"
    _write_images(images, ["chelsea", "coffee"], scale=2)
    amg = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    threads = torch.get_num_threads()
    try:
        local = label_folder(str(images), str(tmp_path / "local.jsonl"), "vit_t", str(ck), amg,
                             num_threads=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = label_folder(str(images), str(tmp_path / "ray.jsonl"), "vit_t", str(ck), amg, use_ray=True,
                              num_actors=1, num_threads=1, progress=False)
    finally:
        ray.shutdown()
    assert local["images"] == remote["images"] == 2
    assert local["masks"] > 0
    a = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert [r["path"] for r in a] == [r["path"] for r in b] == ["chelsea.png", "coffee.png"]
    for ra, rb in zip(a, b):
        assert (ra["height"], ra["width"]) == (rb["height"], rb["width"])
        assert len(ra["annotations"]) == len(rb["annotations"])
        for x, y in zip(ra["annotations"], rb["annotations"]):
            assert x["segmentation"] == y["segmentation"]
            assert set(x["segmentation"]) == {"size", "counts"}
            assert x["area"] == y["area"] and x["bbox"] == y["bbox"] and x["crop_box"] == y["crop_box"]
            assert x["predicted_iou"] == pytest.approx(y["predicted_iou"], abs=1e-5)
            assert x["stability_score"] == pytest.approx(y["stability_score"], abs=1e-5)


def test_label_without_ray_says_how_to_install(monkeypatch):
    from sam_drop_in.distill import ray_label

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"sam-drop-in\[ray\]"):
        ray_label._import_ray()
