"""SoftVectorQuantizer against the authors' conformance vectors and their module's conventions."""
from __future__ import annotations

import pytest
import torch
from support.numerics import rel_err
from safetensors.torch import load_file

from softvq_fast.nn import SoftVectorQuantizer

BACKENDS = ("reference", "cpu")


def _quantizer(vectors: dict, l2_norm: bool, backend: str) -> SoftVectorQuantizer:
    num_codebooks, n_e, e_dim = vectors["embedding"].shape
    module = SoftVectorQuantizer(n_e, e_dim, entropy_loss_ratio=0.01, tau=0.07, num_codebooks=num_codebooks,
                                 l2_norm=l2_norm, backend=backend)
    missing, unexpected = module.load_state_dict({"embedding": vectors["embedding"]}, strict=True)
    assert not missing and not unexpected
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l2_norm", [False, True])
def test_reproduces_authors_vectors(reference_dir, l2_norm, backend):
    vectors = load_file(str(reference_dir / "vectors" / f"quantizer_l2norm_{str(l2_norm).lower()}.safetensors"))
    module = _quantizer(vectors, l2_norm, backend).train()
    z = vectors["z"].clone().requires_grad_()
    z_q, (vq_loss, commit_loss, entropy_loss, usage), extras = module(z)
    (z_q * vectors["grad_output"]).sum().add(entropy_loss).backward()
    _, _, indices, avg_probs, max_probs, z_q_detached, z_detached, cos = extras
    assert vq_loss == 0.0 and commit_loss == 0.0 and usage == 0
    assert rel_err(z_q, vectors["train.z_q"]) <= 1e-5
    assert rel_err(entropy_loss.reshape(1), vectors["train.entropy_loss"]) <= 1e-5
    assert rel_err(max_probs.reshape(1), vectors["train.max_probs"]) <= 1e-5
    assert rel_err(avg_probs.reshape(1), vectors["train.avg_probs"]) <= 1e-5
    assert rel_err(cos.reshape(1), vectors["train.zq_z_cos"]) <= 1e-5
    assert torch.equal(indices, vectors["train.indices"])
    assert rel_err(z.grad, vectors["train.grad_z"]) <= 1e-5
    assert rel_err(module.embedding.grad, vectors["train.grad_embedding"]) <= 1e-5
    assert torch.equal(z_q_detached, z_q.detach()) and torch.equal(z_detached, z.detach())

    module.eval()
    with torch.no_grad():
        z_q, (_, _, entropy_loss, _), extras = module(vectors["z"])
    assert entropy_loss is None
    assert rel_err(z_q, vectors["eval.z_q"]) <= 1e-5
    assert torch.equal(extras[2], vectors["eval.indices"])


def test_image_input_is_flattened_like_the_authors():
    module = SoftVectorQuantizer(64, 8, num_codebooks=2)
    image = torch.randn(2, 8, 3, 4)
    z_q, _, extras = module(image)
    tokens = image.permute(0, 2, 3, 1).reshape(2, 12, 8)
    assert z_q.shape == (2, 12, 8)
    assert torch.equal(extras[6], tokens)
    assert extras[2].shape == (2, 2, 6)


def test_usage_tracking_keeps_recent_codes_on_device():
    module = SoftVectorQuantizer(16, 4, num_codebooks=2, show_usage=True, backend="cpu").train()
    z = torch.randn(3, 10, 4)
    _, (_, _, _, usage), extras = module(z)
    codebook_major = extras[2].reshape(2, 15)  # undo the authors' view: (C, B * S // C)
    assert torch.equal(module.codebook_used[:, -15:].long(), codebook_major)
    assert module.codebook_used[:, :-15].eq(0).all()
    distinct = [len(set(row.tolist()) | {0}) for row in codebook_major]  # the zero-filled window counts code 0
    assert usage.item() == pytest.approx(sum(distinct) / (2 * 16))
    module(torch.randn(3, 10, 4))
    assert torch.equal(module.codebook_used[:, -30:-15].long(), codebook_major)


def test_bad_input_names_the_shape():
    module = SoftVectorQuantizer(16, 4, num_codebooks=3)
    with pytest.raises(ValueError, match="divisible by num_codebooks=3"):
        module(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"\(B, S, 4\)"):
        module(torch.randn(2, 9, 5))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_e=0), ValueError, "n_e must be a positive int, got 0"),
        (dict(e_dim=2.5), ValueError, "e_dim must be a positive int, got 2.5"),
        (dict(num_codebooks=True), ValueError, "num_codebooks must be a positive int, got True"),
        (dict(tau=float("inf")), ValueError, "SoftVectorQuantizer: tau must be a finite number in"),
        (dict(tau="0.07"), TypeError, "SoftVectorQuantizer: tau must be a real number"),
        (dict(l2_norm="yes"), TypeError, "l2_norm must be True or False, got 'yes'"),
        (dict(show_usage=1), TypeError, "show_usage must be True or False, got 1"),
        (dict(entropy_loss_ratio=float("nan")), ValueError, "entropy_loss_ratio must be a finite number, got nan"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        SoftVectorQuantizer(**{"n_e": 16, "e_dim": 4, **kwargs})


def test_non_tensor_input_is_refused():
    with pytest.raises(TypeError, match="SoftVectorQuantizer: z must be a torch.Tensor, got list"):
        SoftVectorQuantizer(16, 4)([[0.0] * 4])
