"""The validation's token budget follows the model's positions: a small student (a federated one
with 64 positions, say) is measured at 64 tokens instead of failing at 128."""

from __future__ import annotations

from transformers import BertConfig, GPT2Config, RobertaConfig

from edgefed.cloud.compress.pipeline import token_budget


def test_a_model_with_fewer_positions_gets_fewer_tokens() -> None:
    assert token_budget(BertConfig(max_position_embeddings=64)) == 64
    assert token_budget(GPT2Config(n_positions=32)) == 32


def test_roberta_loses_the_positions_before_its_padding_index() -> None:
    assert token_budget(RobertaConfig(max_position_embeddings=66)) == 64


def test_large_models_stay_at_128_tokens() -> None:
    assert token_budget(BertConfig(max_position_embeddings=512)) == 128
    assert token_budget(object()) == 128
