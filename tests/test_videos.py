"""Video items: clips written as WebM bytes, K frames sampled per clip and decoded (DALI or PyAV), each frame through
the image tower and pooled over time, bad clips skipped or named, three modalities in one model."""
from __future__ import annotations

import dataclasses
import gc
import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from test_bad_data import (assert_shown_blank, assert_skipped_exactly, busy_item, epoch, holding, make_loader,
                           set_content)
from test_models import TINY_RESNET, count_calls, make_batch, model_config
from transrec.batch import IMAGE, TEXT, VIDEO, ItemBatch
from transrec.config import DataConfig, ImageEncoderConfig, VideoEncoderConfig
from transrec.dataloading.dataset_format import DataError, read_manifest
from transrec.dataloading.images import ImageDecoder
from transrec.dataloading.item_store import ItemStore
from transrec.dataloading.loader import TrainLoader
from transrec.dataloading.videos import VideoDecodeError, VideoDecoder, sample_frames
from transrec.models import TransRec
from transrec.models.video_encoder import FRAME_KEY_STRIDE
from transrec.writers.clips import render_clip
from transrec.writers.dataset_writer import choose_modalities

# A catalogue of all three modalities: item % 3 == 0 text, 1 image, 2 video (clips of 8 frames).
_gen = torch.Generator().manual_seed(1)
TITLES = {i: torch.randint(1000, 30000, (2 + i % 4,), generator=_gen) for i in range(0, 24, 3)}
IMAGES = {i: torch.randn(3, 32, 32, generator=_gen) for i in range(1, 24, 3)}
CLIPS = {i: torch.randn(8, 3, 32, 32, generator=_gen) for i in range(2, 24, 3)}


def three_modality_items(ids: list[int], frames: int = 3, seed: tuple[int, ...] | None = None) -> ItemBatch:
    """The ItemBatch of distinct items `ids`, each clip's `frames` frames sampled as the loader samples them."""
    rows = {m: [r for r, i in enumerate(ids) if i % 3 == m] for m in (TEXT, IMAGE, VIDEO)}
    titles = [TITLES[ids[r]] for r in rows[TEXT]]
    width = max((len(t) for t in titles), default=1)
    input_ids = torch.zeros(len(titles), width, dtype=torch.long)
    attention_mask = torch.zeros(len(titles), width, dtype=torch.long)
    for row, title in enumerate(titles):
        input_ids[row, :len(title)], attention_mask[row, :len(title)] = title, 1
    videos = np.array([ids[r] for r in rows[VIDEO]], np.int64)
    frame_indices = torch.from_numpy(sample_frames(np.full(len(videos), 8), frames, videos, seed))
    return ItemBatch(
        ids=torch.tensor(ids), text_rows=torch.tensor(rows[TEXT], dtype=torch.long), input_ids=input_ids,
        attention_mask=attention_mask, image_rows=torch.tensor(rows[IMAGE], dtype=torch.long),
        images=torch.stack([IMAGES[ids[r]] for r in rows[IMAGE]]) if rows[IMAGE] else None,
        video_rows=torch.tensor(rows[VIDEO], dtype=torch.long), frame_indices=frame_indices,
        clips=torch.stack([CLIPS[i][f] for i, f in zip(videos, frame_indices)]) if len(videos) else None)


def test_frame_sampling_is_sorted_in_range_seeded_and_even_at_evaluation():
    counts, items = np.array([1, 3, 4, 16, 100]), np.arange(40, 45)
    even = sample_frames(counts, 4)
    assert even.tolist() == [[0, 0, 0, 0], [0, 1, 2, 2], [0, 1, 2, 3], [2, 6, 10, 14], [12, 37, 62, 87]]
    drawn = sample_frames(counts, 4, items, seed=(7, 0))
    assert drawn.dtype == np.int64 and drawn.shape == (5, 4)
    assert ((drawn >= 0) & (drawn < counts[:, None])).all() and (np.diff(drawn, axis=1) >= 0).all()
    assert np.array_equal(drawn[:3], even[:3])  # K frames or fewer: each shown, the last repeated, nothing drawn
    starts = np.arange(4) * counts[3:, None] // 4
    assert ((drawn[3:] >= starts) & (drawn[3:] < starts + counts[3:, None] // 4)).all()  # one per quarter
    assert np.array_equal(drawn, sample_frames(counts, 4, items, seed=(7, 0)))  # a resumed run draws the same
    assert np.array_equal(drawn[4:], sample_frames(counts[4:], 4, items[4:], seed=(7, 0)))  # whatever else is drawn
    assert len({tuple(sample_frames(counts[4:], 4, items[4:], seed=(7, e))[0]) for e in range(4)}) > 1  # per epoch


def test_prepared_clips_are_deterministic_labelled_and_as_long_as_recorded(tiny_video_dataset):
    manifest = read_manifest(tiny_video_dataset)
    assert manifest["modality_counts"] == {"text": 32, "image": 24, "video": 24}
    assert manifest["synthetic_videos"] and manifest["video_fraction"] == 0.3 and manifest["clip_frames"] == 8
    store = ItemStore(tiny_video_dataset)
    videos = np.flatnonzero(store.modality == VIDEO)
    assert (store.video_frames[videos] == 8).all() and not store.video_frames[store.modality != VIDEO].any()
    with av.open(io.BytesIO(store.clip(videos[0]).tobytes())) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert container.streams.video[0].codec_context.name == "vp9"
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5  # it pans, zooms and changes colour
    assert len(store.clip(np.flatnonzero(store.modality == IMAGE)[0])) == 0
    args = ("Night train", [(200, 30, 30), (30, 30, 200)], "circles", 3, 32, 8)
    assert render_clip(*args) == render_clip(*args)  # bit-exact: the same data set on any machine
    # a video share takes items from the text share only: a seed's image items stay what they were
    assert np.array_equal(choose_modalities(80, 0.3, 0) == IMAGE, choose_modalities(80, 0.3, 0, 0.3) == IMAGE)


def test_a_data_set_written_before_videos_reads_as_one_without(tiny_dataset, tmp_path):
    old = Path(shutil.copytree(tiny_dataset, tmp_path / "old"))
    manifest = read_manifest(old)
    for name in ("video_offsets.npy", "video_frames.npy", "videos.bin"):
        (old / "items" / name).unlink()
        del manifest["files"][f"items/{name}"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    store = ItemStore(old)
    assert not store.video_frames.any()
    items = store.item_batch(np.arange(10), ImageDecoder(16, "pil"), video_decoder=VideoDecoder(16, 2))
    assert items.video_rows.numel() == 0 and items.images.shape[0] == items.image_rows.numel() > 0


def test_video_mode_sends_every_item_to_the_video_tower(tiny_video_dataset):
    store = ItemStore(tiny_video_dataset)
    videos = np.flatnonzero(store.modality == VIDEO)[:5]
    items = store.item_batch(videos, mode="video", video_decoder=VideoDecoder(32, 2, "pyav"))
    assert items.video_rows.tolist() == list(range(5)) and not items.text_rows.numel() + items.image_rows.numel()
    model = TransRec(model_config(item_encoder="video", video=VideoEncoderConfig(frames=2))).eval()
    assert model.item_mode == "video" and model.item_encoder.text is None
    with torch.no_grad():
        assert model.encode_items(items).shape == (5, 16)
    other = int(np.flatnonzero(store.modality != VIDEO)[0])
    with pytest.raises(ValueError, match=rf"item {other} has no video: mode 'video' needs a data set whose items"):
        store.item_batch(np.append(videos, other), mode="video")


@pytest.fixture(scope="module")
def clips(tiny_video_dataset):
    store = ItemStore(tiny_video_dataset)
    ids = np.flatnonzero(store.modality == VIDEO)[:6]
    return ids, [store.clip(i) for i in ids], store.video_frames[ids]


def test_dali_and_pyav_decode_the_same_frames(clips):
    ids, encoded, counts = clips
    every = np.tile(np.arange(8), (len(ids), 1))
    decoded = {backend: VideoDecoder(32, 8, backend).decode(encoded, every, ids) for backend in ("dali", "pyav")}
    assert decoded["dali"].dtype == torch.float32
    assert decoded["dali"].shape == decoded["pyav"].shape == (6, 8, 3, 32, 32)
    # their YUV -> RGB conversions differ by ~2 levels of 255 (more at sharp edges: the titles' letters)
    assert (decoded["dali"] - decoded["pyav"]).abs().mean() < 0.06
    # frame for frame: each DALI frame is nearest the PyAV frame of the same index
    distance = (decoded["dali"][:, :, None] - decoded["pyav"][:, None]).abs().mean((3, 4, 5))  # [clip, dali, pyav]
    assert torch.equal(distance.argmin(2), torch.arange(8).expand(6, 8))
    sampled = sample_frames(counts, 3)
    torch.testing.assert_close(VideoDecoder(32, 3, "dali").decode(encoded, sampled, ids),
                               decoded["dali"][torch.arange(6)[:, None], torch.from_numpy(sampled)])


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_a_clip_that_does_not_decode_names_the_item(clips, backend):
    ids, encoded, counts = clips
    decoder, indices = VideoDecoder(16, 4, backend), sample_frames(counts[:2], 4)
    truncated = encoded[1][:len(encoded[1]) // 3]
    with pytest.raises(VideoDecodeError, match=rf"^item {ids[1]}: cannot decode its clip \({len(truncated)} bytes\)"):
        decoder.decode([encoded[0], truncated], indices, ids[:2])
    noise = np.frombuffer(np.random.default_rng(0).bytes(500), np.uint8)
    with pytest.raises(VideoDecodeError, match=r"^item 9: cannot decode its clip \(500 bytes\)"):
        decoder.decode([noise], indices[:1], [9])
    assert decoder.decode(encoded[:2], indices, ids[:2]).shape == (2, 4, 3, 16, 16)  # usable after an error


@pytest.fixture
def video_data(tiny_video_dataset, tmp_path) -> Path:
    yield Path(shutil.copytree(tiny_video_dataset, tmp_path / "data"))
    gc.collect()  # one live StreamingDataset per directory per process


@pytest.mark.parametrize("clip, kind, problem", [
    (b"", "missing_video", "a video item with no clip"),
    (np.random.default_rng(0).bytes(500), "not_a_clip", r"its clip does not start like a WebM file \(1A 45 DF A3\)"),
], ids=["no clip", "random bytes"])
def test_missing_or_random_clip_stops_or_is_skipped(video_data, clip, kind, problem):
    item = busy_item(video_data, VIDEO)
    set_content(video_data, item, clip, VIDEO)
    with pytest.raises(DataError, match=rf"video.*: item {item}: {problem}(.|\n)*on_bad_record=skip"):
        make_loader(video_data, "stop")
    loader = make_loader(video_data, "skip")
    assert loader.found == {kind: 1}
    batches = epoch(loader)
    assert_skipped_exactly(video_data, batches, holding(video_data, item), loader, kind)
    assert all(item not in batch.items.ids.tolist() for batch in batches)  # nor drawn as a negative


def test_truncated_clip_is_shown_blank_counted_and_named(video_data):
    """A clip whose start is fine but whose frames stop early: only decoding finds it, mid-epoch; no crash."""
    item = busy_item(video_data, VIDEO)
    clip = ItemStore(video_data).clip(item)
    set_content(video_data, item, clip[:len(clip) // 3].tobytes(), VIDEO)
    loader = make_loader(video_data, "stop", video_decoder=VideoDecoder(16, 4, "dali"))
    assert loader.found == {}
    assert_shown_blank(loader, item, "video",
                       f"{video_data / 'items' / 'videos.bin'}: item {item}: cannot decode its clip")


@pytest.mark.parametrize("temporal", ["mean", "transformer"])
def test_video_tower_is_the_image_tower_on_each_frame_then_pooled(temporal):
    torch.manual_seed(0)
    encoder = TransRec(model_config(video=VideoEncoderConfig(frames=3, temporal=temporal))).item_encoder.eval()
    clips = torch.randn(4, 3, 3, 32, 32)
    with torch.no_grad():
        per_frame = torch.stack([encoder.image(clips[:, k]) for k in range(3)], 1)
        torch.testing.assert_close(encoder.video(clips, encoder.image), per_frame.mean(1))  # fresh: the mean
        for parameter in encoder.video.temporal.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        moved = encoder.video(clips, encoder.image)
        torch.testing.assert_close(moved, encoder.video.temporal(per_frame))
    assert (temporal == "transformer") != torch.allclose(moved, per_frame.mean(1))


def test_adapters_follow_the_image_tower_s_top_block_and_every_temporal_layer():
    torch.manual_seed(0)
    model = TransRec(model_config(video=VideoEncoderConfig(frames=3, temporal="transformer", temporal_layers=2)))
    batch = make_batch([[0, 1, 2, 5, 4], [8, 11, 3, 14]], T=5, k=0)
    batch = dataclasses.replace(batch, items=three_modality_items(batch.row_ids.tolist()))
    before = model(batch).loss
    adapters = model.add_adapters(blocks=1, dim=4)
    assert len(adapters) == 2 + 1 + 1 + 2  # user-encoder layers, the text and image towers' top blocks, temporal
    torch.testing.assert_close(model(batch).loss, before)  # new adapters change nothing
    model(batch).loss.backward()
    assert all(p.grad is not None for p in adapters.parameters())


def test_frozen_frame_cache_gives_identical_loss_and_grads():
    resnet = ImageEncoderConfig(name="resnet18", kwargs=dict(TINY_RESNET), image_size=32, trainable_blocks=2)

    def run(cache: bool):
        torch.manual_seed(0)
        model = TransRec(model_config(image=dataclasses.replace(resnet, cache_frozen=cache),
                                      video=VideoEncoderConfig(frames=3)))
        frozen_rows = count_calls(model.item_encoder.image.body.layer1)
        losses, grads = [], []
        for step in range(2):  # other frames on step 2, some of them cached on step 1
            batch = make_batch([[0, 1, 2, 5, 4], [8, 11, 3, 14]], T=5, k=0)
            batch = dataclasses.replace(batch, items=three_modality_items(batch.row_ids.tolist(), seed=(0, step)))
            model.zero_grad()
            loss = model(batch).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        return losses, grads, frozen_rows, model.item_encoder.video.frame_cache.outputs

    plain_losses, plain_grads, plain_rows, _ = run(cache=False)
    cached_losses, cached_grads, cached_rows, cached = run(cache=True)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, cached_losses))
    for step_a, step_b in zip(plain_grads, cached_grads):
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
    seen = {(i, int(f)) for step in range(2) for i in (2, 5, 8, 11, 14)
            for f in sample_frames(np.array([8]), 3, np.array([i]), (0, step))[0]}
    assert set(cached) == {i * FRAME_KEY_STRIDE + f for i, f in seen}  # per (item, frame), apart from the images'
    assert sum(plain_rows) == 2 * (2 + 5 * 3)  # per step: 2 images, 5 clips of 3 frames
    assert sum(cached_rows) == 2 + len(seen)  # each image's and each frame's frozen part once


def test_three_modalities_each_vector_in_its_place_and_select_keeps_content():
    torch.manual_seed(0)
    model = TransRec(model_config(video=VideoEncoderConfig(frames=3, temporal="transformer"))).eval()
    ids = [0, 1, 2, 3, 5, 7, 8, 9, 14, 17]
    items = three_modality_items(ids)
    image_calls = count_calls(model.item_encoder.image)
    with torch.no_grad():
        vectors = model.encode_items(items)
        assert image_calls == [2, 5 * 3]  # the images, then every clip's frames: each item encoded once
        for row, item in enumerate(ids):
            torch.testing.assert_close(vectors[row], model.encode_items(three_modality_items([item]))[0])
        # what a rank encodes when ranks share their items (trainer/item_sharing.py)
        rows = torch.tensor([8, 0, 4, 1, 6])
        torch.testing.assert_close(model.encode_items(items.select(rows)), vectors[rows])
    chosen = items.select(rows)
    assert chosen.video_rows.tolist() == [0, 2, 4] and torch.equal(chosen.frame_indices, items.frame_indices[[3, 1, 2]])


def test_a_three_modality_model_trains_on_decoded_batches(tiny_video_dataset):
    loader = TrainLoader(DataConfig(loader_workers=0), tiny_video_dataset, batch_size=16, max_seq_len=6,
                         num_negatives=0, seed=0, rank=0, world_size=1, decoder=ImageDecoder(32, "dali"),
                         video_decoder=VideoDecoder(32, 3, "dali"))
    torch.manual_seed(0)
    model = TransRec(model_config(video=VideoEncoderConfig(frames=3, temporal="transformer")))
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1e-3, 0.0))
    temporal = model.item_encoder.video.temporal.blocks[0].linear2.weight
    for _, batch in zip(range(2), loader):
        items = batch.items
        assert items.text_rows.numel() and items.image_rows.numel() and items.video_rows.numel()
        assert items.clips.shape == (items.video_rows.numel(), 3, 3, 32, 32) and items.clips.abs().sum() > 0
        optimizer.zero_grad()
        loss = model(batch).loss
        loss.backward()
        assert torch.isfinite(loss) and temporal.grad.any()
        optimizer.step()
    loader.close()
    assert temporal.any()  # the temporal Transformer left its (zero) start
