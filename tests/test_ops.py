"""The shared normalising math: log_softmax against torch, and the top-k ids' order on ties."""

from __future__ import annotations

import numpy as np
import torch

from gpt2cli.ops import log_softmax, softmax, top_ids
from tests.test_sampling import gpt2_like_logits


def test_log_softmax_of_chosen_ids_equals_torch_log_softmax_of_the_raw_logits():
    x = gpt2_like_logits(9, batch=4)
    ids = np.array([0, 17, 50256, 12345])
    exact = torch.log_softmax(torch.from_numpy(x).double(), dim=-1)  # see reference_probs
    expected = exact[torch.arange(4), ids].numpy()
    got = log_softmax(x)[np.arange(4), ids]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_top_ids_are_largest_first_and_ties_at_the_edge_go_to_the_lower_id():
    x = np.array([[0.5, 3.0, 1.0, 3.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 9.0, 2.0]], np.float32)
    assert top_ids(x, 3).tolist() == [[1, 3, 2], [4, 0, 1]]
    assert top_ids(x, 0).shape == (2, 0)
    wide = gpt2_like_logits(3, batch=2)
    assert top_ids(wide, 5).tolist() == np.argsort(-wide, axis=-1, kind="stable")[:, :5].tolist()


def test_softmax_keeps_float32() -> None:
    x = np.linspace(-4, 4, 64, dtype=np.float32).reshape(2, 32)
    assert softmax(x).dtype == np.float32
