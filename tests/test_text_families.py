"""Any transformers text model as the item tower: each family run layer by layer (packed or padded, frozen bottom
apart) gives the model's own forward; pooling by mean, first or last token, whichever side the padding is on;
the layer list found per family for frozen blocks, adapters and gradient checkpointing."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_models import SEQUENCES, assert_same_loss_and_grads, make_batch, model_config
from transrec.config import TextEncoderConfig
from transrec.models import TransRec
from transrec.models.text_encoder import TextItemEncoder

VOCAB = 300
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=VOCAB)
FAMILIES = {
    "bert": dict(model_type="bert", **LAYERS),
    "roberta": dict(model_type="roberta", pad_token_id=1, max_position_embeddings=64, **LAYERS),
    "xlm-roberta": dict(model_type="xlm-roberta", pad_token_id=1, max_position_embeddings=64, **LAYERS),
    "opt": dict(model_type="opt", num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64),
    # OPT-350M's shape: post-layer norm (no final norm), embeddings narrower than the layers (project_in/out)
    "opt-350m-like": dict(model_type="opt", num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                          vocab_size=VOCAB, word_embed_proj_dim=16, do_layer_norm_before=False,
                          max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64),
    "llama": dict(model_type="llama", num_key_value_heads=2, **LAYERS),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, **LAYERS),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **LAYERS),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, **LAYERS),
}
TITLES = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36], [41]]


def tower(family: str, **fields) -> TextItemEncoder:
    torch.manual_seed(0)
    cfg = TextEncoderConfig(pretrained="", config=dict(FAMILIES[family]), **{"trainable_blocks": 1, **fields})
    return TextItemEncoder(cfg, dim=8).eval()


def padded(titles: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [n, longest]: each title padded (with token 0) on `side`."""
    longest = max(map(len, titles))
    input_ids = torch.zeros(len(titles), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(titles), longest, dtype=torch.long)
    for row, title in enumerate(titles):
        columns = slice(0, len(title)) if side == "right" else slice(longest - len(title), longest)
        input_ids[row, columns] = torch.tensor(title)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pack_width, trainable_blocks", [(0, 1), (8, 1), (8, -1)])
def test_layer_by_layer_states_are_the_model_s_own_forward(family, pack_width, trainable_blocks):
    """Padded (one title per row) or packed (titles side by side, attention kept within each), the frozen layer
    run apart from the trainable one or not: every real token's last state is the one AutoModel's forward gives."""
    encoder = tower(family, pack_width=pack_width, trainable_blocks=trainable_blocks)
    input_ids, attention_mask = padded(TITLES)
    with torch.no_grad():
        expected = encoder.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        states, layout = encoder.token_states(input_ids, attention_mask)
    assert (layout.rows < len(TITLES)) == (pack_width > 0)
    torch.testing.assert_close(states, expected[attention_mask.bool()], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
def test_each_pooling_mode_on_a_hand_made_batch_padded_on_either_side(family):
    """mean of an item's token states, its first token's, its last token's: as the model's forward gives them on
    the title alone, whether the batch pads on the right or on the left (decoder-only tokenizers often do)."""
    alone = []
    for title in TITLES:
        with torch.no_grad():
            alone.append(tower(family).transformer(input_ids=torch.tensor([title])).last_hidden_state[0])
    expected = {"mean": torch.stack([s.mean(0) for s in alone]), "cls": torch.stack([s[0] for s in alone]),
                "last": torch.stack([s[-1] for s in alone])}
    for pooling, vectors in expected.items():
        encoder = tower(family, pooling=pooling, pack_width=8)
        for side in ("right", "left"):
            with torch.no_grad():
                pooled = encoder.features(*padded(TITLES, side))
            torch.testing.assert_close(pooled, vectors, atol=1e-5, rtol=1e-4, msg=f"{pooling}, padded {side}")
    assert not torch.allclose(expected["last"], expected["cls"])  # (the modes do differ)


def test_item_token_is_appended_to_every_item_and_its_state_pooled():
    """HLLM: an item token after each item's text; `last` pooling takes its state, which sees the whole item."""
    encoder = tower("llama", pooling="last", item_token=7, pack_width=8)
    with torch.no_grad():
        vectors = encoder.features(*padded(TITLES, "left"))
        expected = [encoder.transformer(input_ids=torch.tensor([title + [7]])).last_hidden_state[0, -1]
                    for title in TITLES]
    torch.testing.assert_close(vectors, torch.stack(expected), atol=1e-5, rtol=1e-4)


NO_DROPOUT = {"opt": dict(dropout=0.0), "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": {}}


def test_cached_frozen_layers_give_the_uncached_vectors_and_run_once_per_item():
    plain = tower("llama", pack_width=8, pooling="last", item_token=7)
    cached = tower("llama", pack_width=8, pooling="last", item_token=7, cache_frozen=True)
    embedded = []  # the real tokens of each call of the embeddings
    embeddings = cached.transformer.embed_tokens
    embeddings.register_forward_pre_hook(lambda _, args: embedded.append(int(args[0].ne(0).sum())))
    item_ids = torch.arange(len(TITLES))
    for side in ("right", "left"):  # the second call finds every item in the cache
        with torch.no_grad():
            torch.testing.assert_close(cached.features(*padded(TITLES, side), item_ids),
                                       plain.features(*padded(TITLES, side)))
    assert embedded == [sum(map(len, TITLES)) + len(TITLES)]  # every item's tokens and its item token, once


def decoder_model_config(family: str, **overrides):
    """A TransRec whose text tower is a tiny `family` decoder over the test catalogue's vocabulary, no dropout."""
    cfg = model_config(item_encoder="text")
    fields = {**FAMILIES[family], **NO_DROPOUT[family], "vocab_size": 30522}
    text = TextEncoderConfig(pretrained="", config=fields, trainable_blocks=1, pooling="last")
    return dataclasses.replace(cfg, text=text, **overrides)


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_frozen_bottom_layer_and_embeddings_get_no_grad_and_adapters_hook_the_top_layer(family):
    torch.manual_seed(0)
    model = TransRec(decoder_model_config(family))
    text = model.item_encoder.text
    batch = make_batch(SEQUENCES, T=6, as_text=True)
    model(batch).loss.backward()
    frozen = text.family.embedding_modules(text.transformer) + [text.layers[0]]
    trainable = [text.layers[1], *text.family.final_modules(text.transformer), text.proj]
    assert all(p.grad is None and not p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.grad is not None for module in trainable for p in module.parameters())
    before = model(batch).loss
    adapters = model.add_adapters(blocks=1, dim=4)
    assert len(adapters) == len(model.user_encoder.blocks) + 1  # and one after the tower's top layer
    torch.testing.assert_close(model(batch).loss, before)  # a new adapter is the identity
    torch.nn.init.normal_(adapters[-1].up.weight)  # (now it changes the tower's top layer's output)
    assert not torch.allclose(model(batch).loss, before)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_gradient_checkpointing_through_transformers_gives_same_loss_and_grads(family):
    torch.manual_seed(0)
    plain = TransRec(decoder_model_config(family))
    checkpointed = TransRec(decoder_model_config(family, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    top = checkpointed.item_encoder.text.layers[1]
    calls = []
    top.register_forward_pre_hook(lambda *_: calls.append(1))
    assert_same_loss_and_grads(plain, checkpointed, make_batch(SEQUENCES, T=6, as_text=True))
    assert len(calls) == 2  # the checkpointed top layer runs again in backward


def test_an_unknown_family_is_refused_by_name():
    cfg = TextEncoderConfig(pretrained="", config={"model_type": "t5", "d_model": 32})
    with pytest.raises(KeyError, match="transformers text model family 't5'; known: bert, gpt2, llama"):
        TextItemEncoder(cfg, dim=8)
