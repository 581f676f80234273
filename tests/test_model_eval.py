"""Evaluation of a trained model on digits, through the job that logs to MLflow."""

import json
import os

from sscq_dist.evaluate_job import run_evaluation


def test_trained_model_beats_raw_pixel_pq_at_32_bits(trained, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, r = trained["cfg"], trained["result"]
    out = run_evaluation(f"models:/sscq/{r.version}", cfg, topk=100, out_dir=str(tmp_path))
    pixel = out.baselines["pixel_pq"]["map"]
    print(f"digits mAP@100 32-bit: SSCQ {out.map:.4f} (l2sum {out.result['map_l2sum']:.4f}, float "
          f"{out.result['map_float_embedding']:.4f}) vs raw-pixel IndexPQ {pixel:.4f}, exact pixels "
          f"{out.baselines['pixel_float']['map']:.4f}")
    assert out.map > pixel
    assert os.path.exists(out.plot_path) and os.path.getsize(out.plot_path) > 1000
    report = json.load(open(out.report_path))
    assert report["model"]["map_sql2"] == out.map
    mv = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri).get_model_version("sscq", r.version)
    assert float(mv.tags["eval.map_at_100"]) == round(out.map, 6) or abs(float(mv.tags["eval.map_at_100"]) - out.map) < 1e-6
    run = MlflowClient(cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri).get_run(mv.tags["eval.run_id"])
    assert "sscq/map" in run.data.metrics and "pixel_pq/map" in run.data.metrics
