"""FLTrust's aggregation rule (Cao et al., NDSS 2021) on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.cloud.federation.fltrust import fltrust_aggregate


def vec(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def test_an_update_against_the_server_direction_gets_no_trust() -> None:
    out = fltrust_aggregate(vec(0, 0), vec(1, 0), [vec(1, 0), vec(-1, 0)])
    assert out.trust_scores == [1.0, 0.0]
    np.testing.assert_allclose(out.arrays["w"], [1, 0])
    assert not out.kept_global


def test_a_scaled_up_update_is_normalised_to_the_server_update_norm() -> None:
    out = fltrust_aggregate(vec(0, 0), vec(2, 0), [vec(100, 0)])
    assert out.trust_scores == [1.0]
    np.testing.assert_allclose(out.arrays["w"], [2, 0])


def test_trust_is_the_cosine_and_weights_the_normalised_updates() -> None:
    # client 1 along g0 (cos 1), client 2 at 60° (cos 0.5), client 3 orthogonal (cos 0)
    c60 = (np.cos(np.pi / 3), np.sin(np.pi / 3))
    out = fltrust_aggregate(
        vec(1, 1), vec(2, 1), [vec(3, 1), vec(1 + 5 * c60[0], 1 + 5 * c60[1]), vec(1, 4)]
    )
    np.testing.assert_allclose(out.trust_scores, [1.0, 0.5, 0.0], atol=1e-6)
    expected = np.array([1, 1]) + (1.0 * np.array([1, 0]) + 0.5 * np.array(c60)) / 1.5
    np.testing.assert_allclose(out.arrays["w"], expected, atol=1e-6)
    assert out.arrays["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("root", "clients"),
    [(vec(1, 1), [vec(2, 1)]), (vec(2, 1), [vec(0, 1), vec(1, 1)])],
    ids=["no-server-direction", "nobody-trusted"],
)
def test_without_trust_the_global_model_is_kept(
    root: dict[str, np.ndarray], clients: list[dict[str, np.ndarray]]
) -> None:
    out = fltrust_aggregate(vec(1, 1), root, clients)
    assert out.kept_global
    np.testing.assert_array_equal(out.arrays["w"], [1, 1])
