"""Pooling and the sentence-embedding loss: hand-computed values, padding invariance, zero on identical inputs."""

from __future__ import annotations

import pytest
import torch

from hf_distill.losses.embeddings import cls_pool, embedding_loss, max_pool, mean_pool, pool

POOLS = [mean_pool, cls_pool, max_pool]

# One sentence of two real tokens followed by a padded position holding garbage.
HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
RIGHT_PADDED = torch.tensor([[1, 1, 0]])


def test_pooled_values_by_hand():
    assert torch.equal(mean_pool(HIDDEN, RIGHT_PADDED), torch.tensor([[2.0, 3.0]]))  # (1+3)/2, (2+4)/2
    assert torch.equal(cls_pool(HIDDEN, RIGHT_PADDED), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(max_pool(HIDDEN, RIGHT_PADDED), torch.tensor([[3.0, 4.0]]))
    # No mask: every position is real.
    assert torch.allclose(mean_pool(HIDDEN), torch.tensor([[104.0 / 3, -94.0 / 3]]))
    assert torch.equal(max_pool(HIDDEN), torch.tensor([[100.0, 4.0]]))


def test_left_padding_cls_is_first_real_token():
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 5.0], [3.0, -2.0]]])
    mask = torch.tensor([[0, 1, 1]])
    assert torch.equal(cls_pool(hidden, mask), torch.tensor([[1.0, 5.0]]))
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 1.5]]))
    assert torch.equal(max_pool(hidden, mask), torch.tensor([[3.0, 5.0]]))


def test_max_pool_of_negative_values_ignores_zeroed_padding():
    """A mask that zeroes padded vectors would make 0 win the max; the masked max must not."""
    hidden = torch.tensor([[[-1.0, -2.0], [-3.0, -0.5], [0.0, 0.0]]])
    assert torch.equal(max_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[-1.0, -0.5]]))


@pytest.mark.parametrize("pool_fn", POOLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
def test_padding_invariance(pool_fn, garbage):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    hidden_padded = torch.cat([hidden, torch.full((3, 4, 8), garbage)], 1)
    mask_padded = torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], 1)
    reference = pool_fn(hidden, mask)
    assert torch.isfinite(reference).all()
    assert torch.equal(pool_fn(hidden_padded, mask_padded), reference)
    # Garbage already inside the padded positions of the short rows changes nothing either.
    hidden_dirty = torch.where(mask.bool().unsqueeze(-1), hidden, torch.full_like(hidden, garbage))
    assert torch.equal(pool_fn(hidden_dirty, mask), reference)


def test_example_with_no_real_token_pools_to_zero():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    for pool_fn in POOLS:
        assert torch.equal(pool_fn(hidden, mask)[1], torch.zeros(4)), pool_fn.__name__


def test_pool_normalize_gives_unit_vectors():
    out = pool(HIDDEN, RIGHT_PADDED, "mean", normalize=True)
    assert torch.allclose(out, torch.tensor([[2.0, 3.0]]) / 13**0.5)
    with pytest.raises(ValueError, match="pooling mode must be one of"):
        pool(HIDDEN, RIGHT_PADDED, "weightedmean")


def test_embedding_loss_values_by_hand():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 5.0]])
    assert torch.allclose(embedding_loss(s, t, "mse"), torch.tensor([5.0]))  # (3² + 1²) / 2
    assert torch.allclose(embedding_loss(s, t, "cosine"), torch.tensor([0.2]))  # 1 - 20 / (5 · 5)
    # Normalised: s -> (0.6, 0.8), t -> (0, 1): MSE (0.36 + 0.04) / 2; the cosine does not change.
    assert torch.allclose(embedding_loss(s, t, "mse", normalize=True), torch.tensor([0.2]))
    assert torch.allclose(embedding_loss(s, t, "cosine", normalize=True), torch.tensor([0.2]))
    assert torch.allclose(embedding_loss(7 * s, t, "cosine"), torch.tensor([0.2]))


def test_embedding_loss_is_per_example():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    assert torch.allclose(embedding_loss(s, t, "mse"), torch.tensor([5.0, 1.0]))
    assert torch.allclose(embedding_loss(s, t, "cosine"), torch.tensor([0.2, 1.0]))


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_identical_embeddings_give_zero_and_gradients_flow(loss, normalize):
    torch.manual_seed(1)
    t = torch.randn(4, 6)
    assert torch.allclose(embedding_loss(t.clone(), t, loss, normalize), torch.zeros(4), atol=1e-6)
    s = torch.randn(4, 6, requires_grad=True)
    embedding_loss(s, t, loss, normalize).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_embedding_loss_bad_input():
    with pytest.raises(ValueError, match="EmbeddingProjection"):
        embedding_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="must be one of"):
        embedding_loss(torch.randn(2, 3), torch.randn(2, 3), loss="kl")
