"""The HTTP contract's input checks and the serve settings, without a running service (the
end-to-end HTTP checks are in tests/test_serving.py)."""

import io

import numpy as np
import pytest
from PIL import Image

from sscq_dist.config import load_config
from sscq_dist.errors import ConfigError, SSCQError
from sscq_dist.serving.api import BadRequest, decode_query_image, parse_json_query, parse_k
from sscq_dist.serving.rows import thumbnail_png


def png(w, h, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def refused(fn, *args):
    with pytest.raises(BadRequest) as exc:
        fn(*args)
    return exc.value.status, exc.value.reason


def test_k_is_an_integer_in_range():
    assert parse_k(None, 10, 100) == 10 and parse_k("7", 10, 100) == 7 and parse_k(100, 10, 100) == 100
    for bad in ("0", 0, 101, "-3", "ten", 2.5, True, "1e3"):
        status, reason = refused(parse_k, bad, 10, 100)
        assert status == 422 and "k" in reason, bad


def test_query_images_decode_or_get_a_reason():
    arr = decode_query_image(png(40, 30, "RGB"), 8, 1, 10_000, 10**6)
    assert arr.shape == (1, 8, 8) and arr.dtype == np.uint8
    assert refused(decode_query_image, b"", 8, 1, 10_000, 10**6)[0] == 400
    assert refused(decode_query_image, b"GIF89a not really", 8, 1, 10_000, 10**6) == \
        (400, "the upload is not an image this service can decode")
    assert refused(decode_query_image, png(200, 100), 8, 1, 10_000, 10**6)[0] == 413  # 20,000 px > 10,000
    assert refused(decode_query_image, png(20, 20), 8, 1, 10_000, 20)[0] == 413  # bytes above the limit
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(noisy, format="PNG")
    cut = noisy.getvalue()[: len(noisy.getvalue()) // 2]
    assert refused(decode_query_image, cut, 8, 1, 10_000, 10**6) == (400, "the image does not decode (truncated or corrupt)")


def test_json_queries():
    q, k = parse_json_query(b'{"embedding": [1, 2.5, 3], "k": 4}', 3, 10, 100)
    assert q.shape == (1, 3) and q.dtype == np.float32 and k == 4
    assert parse_json_query(b'{"embedding": [1, 2, 3]}', 3, 10, 100, "5")[1] == 5
    for body, status in [(b"nope", 400), (b"[1, 2]", 400), (b'{"embedding": [1, 2]}', 422),
                         (b'{"embedding": [1, "a", 3]}', 422), (b'{"embedding": [1, NaN, 3]}', 422),
                         (b'{"embedding": [1, 2, 3], "k": 0}', 422)]:
        assert refused(parse_json_query, body, 3, 10, 100)[0] == status, body


def test_serve_settings_validate_and_reconfigure_by_key():
    from sscq_dist.serving.app import RUNTIME_FIELDS, apply_runtime, runtime_settings

    cfg = load_config(None, ["serve.partitions=3", "serve.watch_interval_s=2.5"])
    assert cfg.serve.partitions == 3 and cfg.serve.watch_interval_s == 2.5
    for bad, key in [("serve.partitions=0", "serve.partitions"), ("serve.max_k=5", "serve.default_k"),
                     ("serve.nprobe=0", "serve.nprobe"), ("serve.port=70000", "serve.port")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
    assert set(runtime_settings(cfg.serve)) == set(RUNTIME_FIELDS)
    assert apply_runtime(cfg.serve, {"max_k": 50, "nprobe": 16}).max_k == 50
    with pytest.raises(SSCQError, match="unknown key"):
        apply_runtime(cfg.serve, {"partitions": 4})  # not a run-time setting: needs a redeploy
    with pytest.raises(ConfigError, match="serve.default_k"):
        apply_runtime(cfg.serve, {"max_k": 3})


def test_replica_settings_reach_every_deployment(tmp_path):
    """Health-check and graceful-shutdown settings go to the ingress and every partition."""
    from sscq_dist.serving.app import build_application

    cfg = load_config(None, ["serve.partitions=2", "serve.graceful_shutdown_wait_loop_s=0.25",
                             "serve.graceful_shutdown_timeout_s=7", "serve.health_check_period_s=1.5",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    ingress = build_application(str(tmp_path / "index"), cfg)._bound_deployment
    parts = [a for a in ingress.init_args if isinstance(a, list)][0]
    assert len(parts) == 2
    for d in [ingress, *(p._bound_deployment if hasattr(p, "_bound_deployment") else p for p in parts)]:
        dc = d._deployment_config
        assert (dc.graceful_shutdown_wait_loop_s, dc.graceful_shutdown_timeout_s, dc.health_check_period_s) == \
            (0.25, 7.0, 1.5), d.name
    with pytest.raises(ConfigError, match="serve.graceful_shutdown_wait_loop_s"):
        load_config(None, ["serve.graceful_shutdown_wait_loop_s=-1"])


def test_thumbnails_are_bounded_pngs():
    imgs = [png(300, 200, "RGB"), png(8, 8)]
    thumb = Image.open(io.BytesIO(thumbnail_png(imgs[0], 64, 10**6)))
    assert thumb.size == (64, 43) and thumb.format == "PNG"
    assert Image.open(io.BytesIO(thumbnail_png(imgs[1], 64, 10**6))).size == (8, 8)  # never upscaled
    with pytest.raises(SSCQError, match="does not decode"):
        thumbnail_png(b"junk", 64, 10**6)
