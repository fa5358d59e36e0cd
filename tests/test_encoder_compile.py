"""torch.compile of the TinyViT encoder (``precision.optimize(model, mode, compile=True)``)
against the same encoder run eagerly.

The compiled encoder sees the whole-tensor code (``common.eager_inference()`` is False while
compiling), so what differs from eager is only what Inductor does: fused element-wise work,
weights frozen and prepacked for oneDNN, BatchNorm folded once. Contracts:

- fp32: the same operations in another order (fused kernels reduce in their own order), so
  the reordering bound of tests/test_encoder.py applies: K * eps * max|value|, K the longest
  reduction (a wrong or missing term is O(0.1-1) away).
- bf16: eager rounds every intermediate to bf16, Inductor keeps fused intermediates in fp32
  and rounds once per kernel, so neither equals the other; both are bf16 approximations of the
  fp32 result. The contract: the compiled encoder is no farther (relative L2 error) from the
  fp32 encoder than 1.5x the eager bf16 encoder is, plus a cosine to eager bf16 >= 0.999.
  A wrong window, a dropped residual or a stale weight is an O(1) relative error.
"""

import warnings

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from sam_drop_in.modeling.tiny_vit import TinyViT
from sam_drop_in.precision import optimize
from sam_drop_in.testing import perturbed_state_dict

EPS = torch.finfo(torch.float32).eps


class _Parts(nn.Module):
    """The three parts optimize() expects; only the encoder is called here."""

    def __init__(self, encoder):
        super().__init__()
        self.image_encoder = encoder
        self.prompt_encoder = nn.Identity()
        self.mask_decoder = nn.Linear(1, 1)


def _tiny_tinyvit(seed=0):
    # Every kind of block (MBConv, merges with stride 2 and 1, padded windows, the neck) at a
    # size that Inductor compiles in about a minute on 2 shared cores. 64 px -> 16x16 tokens,
    # then 8x8, 4x4, 4x4; windows of 5 pad 8x8 to 10x10.
    torch.manual_seed(seed)
    enc = TinyViT(img_size=64, num_classes=0, embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                  num_heads=[1, 2, 2, 2], window_sizes=[5, 5, 3, 3], drop_path_rate=0.0).eval()
    enc.load_state_dict(perturbed_state_dict(enc.state_dict(), seed=seed))
    return enc.requires_grad_(False)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_encoder_traces_as_one_graph(mode):
    """No graph break in the encoder (Dynamo only, no code generation: fast): one graph, and
    with backend='eager' the traced ops give what the eager whole-tensor path gives."""
    model = _Parts(_tiny_tinyvit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16 emulated on this CPU
        optimize(model, mode)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    enc = model.image_encoder
    with torch.no_grad():
        ex = torch._dynamo.explain(enc)(x)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
        traced = torch.compile(enc, backend="eager", fullgraph=True)(x)
        eager = enc(x)
    # Same kernels on the same shapes except where eager takes cache-sized pieces (one thread):
    # the reordering bound; in bf16, within bf16 rounding of eager.
    k = 4 * 64
    tol = k * EPS * float(eager.abs().max()) if mode == "fp32" else 3 * 2**-8 * float(eager.abs().max())
    torch.testing.assert_close(traced, eager, rtol=0, atol=tol)


@pytest.fixture(scope="module")
def fresh_inductor_cache(tmp_path_factory):
    """A new, empty Inductor cache for this module: no stale kernels from elsewhere, while the
    two modes share what does not depend on the graph (both took 66 s with a cache each, 52 s
    sharing one, on the 2-core development machine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_compiled_encoder_equals_eager(mode, fresh_inductor_cache):
    """optimize(compile=True): Inductor with frozen weights against the eager encoder."""
    ref32 = _tiny_tinyvit()
    eager = _Parts(_tiny_tinyvit())
    compiled = _Parts(_tiny_tinyvit())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimize(eager, mode)
        optimize(compiled, mode, compile=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want32 = ref32(x)
        want = eager.image_encoder(x)
        got, code = run_and_get_code(compiled.image_encoder, x)
        again = compiled.image_encoder(x)  # the compiled code, second call
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 256, 4, 4)
    # Freezing took effect: the weights are constants of the generated code (with the
    # per-compile option alone they stayed graph inputs and nothing was frozen).
    assert "_frozen_param" in "\n".join(code)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    if mode == "fp32":
        k = 4 * 64  # longest reduction: the last MLP's hidden width
        torch.testing.assert_close(got, want, rtol=0, atol=k * EPS * float(want.abs().max()))
    else:
        eager_err, got_err = _rel(want, want32), _rel(got, want32)
        assert got_err <= 1.5 * eager_err + 1e-3, (got_err, eager_err)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos >= 0.999, float(cos)
