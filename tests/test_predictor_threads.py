"""One SamPredictor shared by two threads (issue 17, item 9).

Calls on one predictor hold its RLock, so each result belongs to one image (never one image's
logits with the other's sizes), and a thread that holds ``predictor.lock`` across set_image and
predict gets its own image's result. vit_t at a 256-pixel input keeps each call cheap.

Tolerance: under the lock the calls run one at a time, with the same kernels on the same shapes
as the single-threaded reference, so results are expected bit-identical; atol 1e-5 on logits
leaves room for a thread pool scheduled differently, while the two images' results differ by
orders of magnitude more (asserted).
"""

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import sam_drop_in
from sam_drop_in.build_sam import build_sam_sized

from sam_drop_in.testing import load_image, perturbed_state_dict

PROMPT = dict(point_coords=np.array([[20, 30]]), point_labels=np.array([1]), return_logits=True)
CALLS_PER_THREAD = 20  # 40 set_image + predict pairs in all


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    sam = build_sam_sized("vit_t", image_size=256)
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=3))
    return sam.eval()


@pytest.fixture(scope="module")
def images():
    a = load_image("coffee.jpg")  # 400x600
    b = np.asarray(Image.fromarray(load_image("astronaut.jpg")).resize((150, 220)))  # 220x150
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def references(model, images):
    p = sam_drop_in.SamPredictor(model)
    out = {}
    for name, image in images.items():
        p.set_image(image)
        out[name] = p.predict(**PROMPT)
    # The two images give clearly different results, so a mix cannot pass for either.
    assert out["a"][0].shape != out["b"][0].shape
    assert np.abs(out["a"][2] - out["b"][2]).max() > 1e-2
    return out


def _same(result, ref) -> bool:
    return (
        result[0].shape == ref[0].shape
        and np.allclose(result[0], ref[0], rtol=0, atol=1e-5)
        and np.allclose(result[1], ref[1], rtol=0, atol=1e-5)
        and np.allclose(result[2], ref[2], rtol=0, atol=1e-5)
    )


def _hammer(predictor, images, hold_lock):
    results = {"a": [], "b": []}
    errors = []
    start = threading.Barrier(2)

    def work(name):
        try:
            start.wait()
            for _ in range(CALLS_PER_THREAD):
                if hold_lock:
                    with predictor.lock:
                        predictor.set_image(images[name])
                        results[name].append(predictor.predict(**PROMPT))
                else:
                    predictor.set_image(images[name])
                    results[name].append(predictor.predict(**PROMPT))
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def test_lock_held_across_set_image_and_predict(model, images, references):
    p = sam_drop_in.SamPredictor(model)
    results = _hammer(p, images, hold_lock=True)
    for name in ("a", "b"):
        assert len(results[name]) == CALLS_PER_THREAD
        wrong = [i for i, r in enumerate(results[name]) if not _same(r, references[name])]
        assert not wrong, f"thread {name}: calls {wrong} did not match their own image"


def test_each_call_sees_one_image(model, images, references):
    # Without holding the lock across calls, a thread may predict on the other thread's image,
    # but every result must be wholly one image's: masks, scores and logits together.
    p = sam_drop_in.SamPredictor(model)
    results = _hammer(p, images, hold_lock=False)
    for name in ("a", "b"):
        mixed = [i for i, r in enumerate(results[name]) if not (_same(r, references["a"]) or _same(r, references["b"]))]
        assert not mixed, f"thread {name}: calls {mixed} mixed the two images"


def test_predictor_copies_get_their_own_lock(model, images):
    p = sam_drop_in.SamPredictor(model)
    p.set_image(images["b"])
    for clone in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert clone.lock is not p.lock
        with clone.lock:  # a working RLock, re-entered by the predictor's own calls
            assert clone.predict(**PROMPT)[0].shape == (3, 220, 150)
