"""Ray Data pipeline: uint8 training stream (S3 and local), worker-side views, per-epoch order,
decode-once cache, eval determinism, corrupt-row counting, schema errors."""

import io
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import REPO
from sscq_dist.config import AugmentConfig, load_config
from sscq_dist.data.augment import NORM_MEAN, NORM_STD, sample_params, two_views, view_seed
from sscq_dist.data.decode import decode_image
from sscq_dist.data.pipeline import (DropCounter, cached_train_data, check_drop_ceiling, decoded_images, eval_dataset,
                                     pipeline_pass, read_images, streaming_train_data)
from sscq_dist.data.schema import IMAGE_SCHEMA
from sscq_dist.errors import SchemaError, TrainingError
from sscq_dist.ingest import ingest, png_bytes


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/digits.yaml", ["data.decode_batch_size=64", "data.image_size=28"])


def test_decode_tasks_do_not_import_torch():
    """The training stream's Ray Data functions live in a torch-free module, so a decode task
    pays for PIL and numpy only, not torch's import (seconds of CPU and hundreds of MB in
    every Ray worker that decodes)."""
    from sscq_dist.data import pipeline

    assert pipeline.decode_train_batch.__module__ == pipeline.drop_stats.__module__ == "sscq_dist.data.decode"
    code = "import sys, sscq_dist.data.decode, sscq_dist.config; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_small_read_starts_one_footer_reader_not_ray_datas_32(ray_local, tmp_path, monkeypatch):
    """Ray Data provisions 32 FooterReader actors (one worker process each) for any read;
    our reads size the pool by the file count: 3 files -> 1 actor, and the environment is
    left as it was (a value the user set is kept)."""
    import pyarrow.fs

    from sscq_dist.data.parquet_read import FOOTER_ACTORS_ENV, footer_actors, read_parquet_files

    assert [footer_actors(n) for n in (1, 3, 256, 257, 100_000)] == [1, 1, 1, 2, 32]
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.parquet"))
        pq.write_table(pa.table({"x": list(range(10 * i, 10 * i + 10))}), paths[-1])

    def footer_readers() -> int:
        return sum(a["ActorClassName"] == "FooterReader" for a in ray_local._private.state.actors().values())

    before = footer_readers()
    rows = read_parquet_files(paths, pyarrow.fs.LocalFileSystem()).take_all()
    assert sorted(r["x"] for r in rows) == list(range(30))
    assert footer_readers() - before == 1
    assert FOOTER_ACTORS_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "2")  # the user's own setting wins and stays
    before = footer_readers()
    assert len(read_parquet_files(paths, pyarrow.fs.LocalFileSystem()).take_all()) == 30
    assert footer_readers() - before == 2 and os.environ[FOOTER_ACTORS_ENV] == "2"


def test_train_stream_ships_uint8_nhwc_from_s3(ray_local, s3_bucket, cfg):
    """The object store holds C*H*W bytes per image plus id/ok/shard (13 bytes), not float views."""
    uri = f"s3://{s3_bucket}/digits"
    ingest("digits", uri, rows_per_shard=100, splits=["test"], progress=False)
    ds, shard_uris = decoded_images(uri + "/test", cfg)
    mat = ds.materialize()
    rows = mat.count()
    assert rows == 297 and len(shard_uris) == 3 and all(u.startswith("s3://") for u in shard_uris)
    b = next(iter(mat.iter_batches(batch_size=None, batch_format="numpy")))
    assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (28, 28, 1)
    assert b["ok"].all() and set(b) == {"id", "ok", "shard", "image"}
    per_image = mat.size_bytes() / rows
    chw = 1 * 28 * 28
    print(f"object-store bytes per image: {per_image:.1f} (uint8 C*H*W = {chw}; two float32 views = {8 * chw})")
    assert chw <= per_image <= chw + 32
    # Every row names the source file it came from (the drop-ceiling error needs it).
    shards = np.concatenate([x["shard"] for x in mat.iter_batches(batch_size=100, batch_format="numpy")])
    assert sorted(np.bincount(shards).tolist()) == [97, 100, 100]


def test_two_views_differ_and_are_reproducible():
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 16, 16, 1), dtype=np.uint8))
    aug = AugmentConfig()
    v = two_views(imgs, aug, seed=7, rank=0, step=3)
    assert v.shape == (128, 1, 16, 16) and v.dtype == torch.float32
    a, b = v[:64], v[64:]
    assert (a - b).abs().mean() > 0.05  # the two views of an image differ
    assert torch.equal(v, two_views(imgs, aug, seed=7, rank=0, step=3))  # same (seed, rank, step): same views
    for other in (dict(seed=8, rank=0, step=3), dict(seed=7, rank=1, step=3), dict(seed=7, rank=0, step=4)):
        assert (v - two_views(imgs, aug, **other)).abs().mean() > 0.05, other
    # channels-last output holds the same values (it is only a memory layout).
    cl = two_views(imgs, aug, seed=7, rank=0, step=3, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, v)
    assert view_seed(1, 2, 3) != view_seed(1, 3, 2)


def test_view_parameters_follow_the_config():
    aug = AugmentConfig(hflip_p=0.3, blur_p=0.6, jitter_p=0.8, crop_scale_min=0.4, crop_scale_max=0.9)
    p = sample_params(20_000, aug, torch.Generator().manual_seed(0))
    assert abs(float(p.flip.mean()) - 0.3) < 0.02
    assert abs(float(p.blur.mean()) - 0.6) < 0.02 and abs(float(p.jitter.mean()) - 0.8) < 0.02
    assert 0.4 <= float(p.area.min()) and float(p.area.max()) <= 0.9 and abs(float(p.area.mean()) - 0.65) < 0.01
    assert float(p.sigma.min()) >= aug.blur_sigma_min and float(p.sigma.max()) <= aug.blur_sigma_max


def test_rotation_and_erasing_are_off_by_default_and_leave_the_draws_alone():
    """Without rotation or erasing a view costs one random draw, as before the options existed:
    every config written before them keeps its exact views and resumes on the same draws."""
    g = torch.Generator().manual_seed(5)
    p = sample_params(64, AugmentConfig(), g)
    assert p.angle is None and p.erase is None
    ref = torch.Generator().manual_seed(5)
    torch.rand(64, 12, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_rotation_turns_the_view_by_the_drawn_angle():
    """A full-image window turned by +90 degrees is torch.rot90 of the image (pixel centres map
    onto pixel centres); the drawn angles span [-rotate_deg, rotate_deg]."""
    from sscq_dist.data.augment import random_resized_crop_flip
    aug = AugmentConfig(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, hflip_p=0.0, rotate_deg=15)
    p = sample_params(20_000, aug, torch.Generator().manual_seed(0))
    deg = p.angle * 180 / math.pi
    assert float(deg.min()) >= -15 and float(deg.max()) <= 15 and float(deg.abs().mean()) > 7
    one = sample_params(1, aug, torch.Generator().manual_seed(0))
    one.angle, one.cx, one.cy = torch.tensor([math.pi / 2]), torch.zeros(1), torch.zeros(1)
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.allclose(random_resized_crop_flip(x, one), torch.rot90(x, 1, (2, 3)), atol=1e-4)


def test_erasing_fills_a_rectangle_of_the_drawn_area_at_rate_erase_p():
    """Every other op off: a view differs from its image only inside one rectangle filled with the
    normalised mean (0), whose area lies in [erase_scale_min, erase_scale_max] of the image."""
    aug = AugmentConfig(crop_scale_min=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, hflip_p=0.0,
                        jitter_p=0.0, blur_p=0.0, erase_p=0.4, erase_scale_min=0.05, erase_scale_max=0.2)
    n = 2000
    imgs = torch.full((n, 20, 20, 1), 255, dtype=torch.uint8)  # white: any erased pixel shows
    v = two_views(imgs, aug, seed=0)[:n, 0]
    erased = v == 0.0
    share = erased.flatten(1).float().mean(1)
    hit = share > 0
    assert abs(float(hit.float().mean()) - 0.4) < 0.04
    # whole-pixel rectangles of a drawn area; rounding to pixels widens the bounds a little
    assert float(share[hit].min()) >= 0.02 and float(share[hit].max()) <= 0.3
    rows, cols = erased[hit].any(2), erased[hit].any(1)
    assert torch.equal(rows.sum(1) * cols.sum(1), erased[hit].flatten(1).sum(1))  # one rectangle each
    assert torch.all(v[~erased] == 1.0)


def test_flip_share_of_real_views_matches_hflip_p():
    """Crop, jitter and blur off: every view is its image or the mirror, mirrored at rate hflip_p."""
    aug = AugmentConfig(hflip_p=0.3, jitter_p=0.0, blur_p=0.0, crop_scale_min=1.0, crop_scale_max=1.0,
                        crop_ratio_min=1.0, crop_ratio_max=1.0)
    n = 2000
    imgs = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8))
    v = two_views(imgs, aug, seed=0)[:n]
    x = (imgs.permute(0, 3, 1, 2).float() / 255 - NORM_MEAN) / NORM_STD
    same = (v - x).abs().amax(dim=(1, 2, 3)) < 1e-4
    mirrored = (v - x.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert bool((same | mirrored).all())
    assert abs(float(mirrored.float().mean()) - 0.3) < 0.035


def test_eval_mode_is_deterministic(ray_local, digits_dir, cfg):
    ds = eval_dataset(read_images(digits_dir + "/test", cfg), cfg)
    a = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=128, batch_format="numpy")])
    b = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=128, batch_format="numpy")])
    assert a.shape == (297, 1, 28, 28) and np.array_equal(a, b)


def _split_epochs(ds, epochs: int) -> list[list[int]]:
    """Ids in arrival order per epoch through a 2-way streaming split, as Ray Train's workers read."""
    its = ds.streaming_split(2, equal=False)
    seen = [[[] for _ in range(epochs)] for _ in its]

    def consume(k, it):
        for e in range(epochs):
            for b in it.iter_batches(batch_size=16, batch_format="numpy"):
                seen[k][e].extend(b["id"].tolist())
    threads = [threading.Thread(target=consume, args=(k, it)) for k, it in enumerate(its)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [seen[0][e] + seen[1][e] for e in range(epochs)]


@pytest.fixture
def small_shards(tmp_path):
    """The digits test split (297 rows) in 8 shards of 40 rows."""
    ingest("digits", str(tmp_path / "d"), rows_per_shard=40, splits=["test"], progress=False)
    return str(tmp_path / "d" / "test")


def _file_orders(uri, cfg, seed, executions: int) -> list[list[int]]:
    """Source-file order of each execution of one consumer, with Ray Data's output order kept
    (otherwise read tasks finishing in varying order reorder blocks even without a shuffle)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = decoded_images(uri, cfg, shuffle_seed=seed)[0] if seed is None else \
            streaming_train_data(uri, cfg, seed=seed).dataset
        orders = []
        for _ in range(executions):
            shards = np.concatenate([b["shard"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
            starts = np.flatnonzero(np.diff(shards, prepend=-1))  # where a new source file begins
            orders.append(shards[starts].tolist())
        return orders
    finally:
        ctx.execution_options.preserve_order = before


def test_streaming_epochs_see_different_orders(ray_local, small_shards, cfg):
    td = streaming_train_data(small_shards, cfg, seed=0)
    assert not td.cached
    ids = _split_epochs(td.dataset, 1)[0]
    assert len(ids) == len(set(ids)) == 297  # every row once through the split
    # The file order of each execution (one per epoch): a permutation of the 8 files, a new one per
    # epoch, the same sequence again for the same seed; without a seed, the listed order.
    first, second = _file_orders(small_shards, cfg, 0, 2)
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    assert _file_orders(small_shards, cfg, 0, 1)[0] == first
    assert _file_orders(small_shards, cfg, None, 1) == [list(range(8))]


def test_cached_path_decodes_once_and_deals_every_epoch_anew(ray_local, small_shards, cfg):
    """The cached set's blocks are read from the object store only: each epoch deals every rank
    an equal, disjoint share in a new order, and a resumed epoch skips exactly what was trained."""
    from sscq_dist.data.cached_shard import epoch_batches

    td = cached_train_data(small_shards, cfg, seed=0)
    assert td.cached and td.rows == 297 and td.dropped == 0
    assert td.blocks is not None and td.blocks.total_rows == 297 and len(td.blocks.refs) >= 4  # ~64-row blocks
    # The observable: the source files are gone, so any epoch that read or decoded again would fail.
    for name in os.listdir(small_shards):
        os.remove(os.path.join(small_shards, name))

    def ids(epoch, rank, world, skip=0):
        return np.concatenate([b["id"] for b in epoch_batches(td.blocks, epoch, rank, world, 16, skip)])

    (b,) = list(epoch_batches(td.blocks, 0, 0, 18, 16))  # 297 // 18 rows: one batch of the columns the loop reads
    assert b["image"].dtype == np.uint8 and b["image"].shape == (16, 28, 28, 1)
    assert b["ok"].dtype == bool and b["shard"].dtype == np.int32 and b["id"].dtype == np.int64
    epochs = [[ids(e, r, 2) for r in range(2)] for e in range(3)]
    for r0, r1 in epochs:
        assert len(r0) == len(r1) == 144  # 148 rows each: 9 full batches of 16
        assert not set(r0) & set(r1) and len(set(r0)) == 144
    assert len({tuple(r0) for r0, _ in epochs}) == 3  # a new order every epoch
    assert len({frozenset(r0) for r0, _ in epochs}) == 3  # and a new share of the set
    assert np.array_equal(ids(1, 0, 2), epochs[1][0])  # a function of (seed, epoch, rank, world)
    assert np.array_equal(ids(1, 0, 2, skip=3), epochs[1][0][48:])  # a resumed epoch: the rest, exactly
    one = ids(0, 0, 1)
    assert len(one) == len(set(one)) == 288  # one rank: 18 full batches of the 297 rows
    # The same files removed under the streaming path: its next epoch must read them, and fails.
    with pytest.raises(Exception):
        list(decoded_images(small_shards, cfg)[0].iter_batches())


def test_cached_fallback_reshuffles_every_execution(ray_local, small_shards, cfg, monkeypatch):
    """A materialised set whose blocks cannot be dealt out (a partial block) goes to Ray Train as
    a dataset instead: every execution (epoch) sees all rows in a new block order."""
    from sscq_dist.data import cached_shard

    monkeypatch.setattr(cached_shard, "cached_blocks", lambda ds, seed: None)
    td = cached_train_data(small_shards, cfg, seed=0)
    assert td.cached and td.blocks is None and td.rows == 297
    orders = [np.concatenate([b["id"] for b in td.dataset.iter_batches(batch_size=64, batch_format="numpy")])
              for _ in range(3)]
    assert all(sorted(o) == sorted(orders[0]) and len(o) == 297 for o in orders)
    assert len({tuple(o) for o in orders}) == 3


def _shard_with_corrupt(path, n_valid=20):
    rng = np.random.default_rng(1)
    imgs = [png_bytes(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(n_valid)]
    bad = [b"", b"not an image at all", imgs[0][: len(imgs[0]) // 2]]  # empty, junk, truncated PNG
    table = pa.Table.from_pydict({"id": list(range(n_valid + 3)), "image": imgs + bad,
                                  "uri": [None] * (n_valid + 3), "label": [[0]] * (n_valid + 3)},
                                 schema=IMAGE_SCHEMA)
    pq.write_table(table, path)


def test_corrupt_rows_are_dropped_and_counted_per_file(ray_local, tmp_path, cfg):
    d = tmp_path / "bad"
    d.mkdir()
    _shard_with_corrupt(d / "part-00000.parquet")
    stats = pipeline_pass(str(d), cfg, batch_size=8, progress=False)
    assert stats.rows == 23 and stats.dropped == 3
    counter = DropCounter()
    ds, shard_uris = decoded_images(str(d), cfg)
    kept = sum(len(counter.filter(b)["id"]) for b in ds.iter_batches(batch_size=8, batch_format="numpy"))
    assert kept == 20 and counter.dropped == 3 and sorted(counter.dropped_ids) == [20, 21, 22]
    assert {shard_uris[s]: c for s, c in counter.by_shard.items()} == {str(d / "part-00000.parquet"): 3}
    # 3 of 23 rows is 13 %: above a 5 % ceiling, one line naming the count and the file; below 20 %, fine.
    with pytest.raises(TrainingError, match=r"^3 of 23 training images \(13\.0%\) did not decode, above "
                                            r"data\.max_drop_fraction=0\.05; e\.g\. .*part-00000\.parquet \(3\)$"):
        check_drop_ceiling(counter.rows, counter.dropped, dict(counter.by_shard), shard_uris, 0.05)
    check_drop_ceiling(counter.rows, counter.dropped, dict(counter.by_shard), shard_uris, 0.2)


def test_schema_errors_name_file_and_column(tmp_path, cfg):
    d1 = tmp_path / "noimage"
    d1.mkdir()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "uri": ["x"]}), d1 / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"part-00000\.parquet.*'image'"):
        read_images(str(d1), cfg)
    d2 = tmp_path / "strid"
    d2.mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), d2 / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"column 'id' has type string"):
        read_images(str(d2), cfg)
    d3 = tmp_path / "trunc"
    d3.mkdir()
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "image": [b"x"]}), d3 / "part-00000.parquet")
    data = (d3 / "part-00000.parquet").read_bytes()
    (d3 / "part-00000.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_images(str(d3), cfg)
    with pytest.raises(SchemaError, match="no image shards"):
        read_images(str(tmp_path / "empty"), cfg)


def _encode(im, fmt="PNG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_handles_modes_and_bombs():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    variants = {
        "L": rgb.convert("L"), "RGB": rgb, "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P"),
        "I;16": Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
    }
    for mode, im in variants.items():
        for ch in (1, 3):
            out = decode_image(_encode(im), 16, ch, 10**6)
            assert out is not None and out.shape == (ch, 16, 16) and out.dtype == np.uint8, mode
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG"), 16, 3, 10**6)
    assert cmyk is not None and cmyk.shape == (3, 16, 16)
    # Declared dimensions above the pixel budget are refused before decoding.
    assert decode_image(_encode(Image.new("L", (400, 400))), 16, 1, max_pixels=10_000) is None
    assert decode_image(b"", 16, 1, 10**6) is None
