"""The benchmark scripts' smoke modes, end to end, as a user runs them (subprocess, real Ray,
DeepSpeed, MLflow SQLite and FAISS; the digits, so nothing needs downloading)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

BENCH = os.path.join(REPO, "benchmarks")
# Generous: each smoke takes well under a minute on an idle 2-core machine.
SMOKE_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One digits folder for every script (the first one ingests, the others reuse)."""
    return str(tmp_path_factory.mktemp("bench-data") / "digits")


def run_script(name: str, args: list, cwd, timed: bool = False, ray=None):
    """The script's stdout (and, with timed, the seconds it ran: every time it reports
    was measured inside that wall time). With `ray` the script joins the session's Ray
    (RAY_ADDRESS) instead of starting its own."""
    env = dict(os.environ)
    if ray is not None:
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(BENCH, name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, env=env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return (proc.stdout, wall) if timed else proc.stdout


def test_quality_smoke_trains_evaluates_reports_and_resumes(tmp_path, data_dir, ray_local):
    out = tmp_path / "quality"
    args = ["--smoke", "--source", "digits", "--data-dir", data_dir, "--out", out]
    stdout = run_script("quality_fashion_mnist.py", args, tmp_path, ray=ray_local)
    assert "| method | bits | mAP@100 sqL2 ADC | mAP@100 l2sum |" in stdout
    assert "| sscq | 32 |" in stdout and "| pixel_pq | 32 |" in stdout
    report = json.loads((out / "results.json").read_text())
    res = report["results"]
    sscq, pq = res["sscq/32"], res["pixel_pq/32"]
    assert sscq["epochs"] == 1 and sscq["workers"] == 2 and sscq["zero_stage"] == 1
    for key in ("map_sql2", "map_l2sum", "map_float"):
        assert 0.0 <= sscq[key] <= 1.0, key
    assert 0.5 < pq["map_sql2"] <= 1.0  # raw-pixel PQ on the digits is a strong baseline
    # One epoch of training must move the codes off the collapsed initialisation.
    assert sscq["map_sql2"] > report["untrained"]["32"]["map_sql2"]
    assert sscq["curve"][-1]["epoch"] == 1 and sscq["curve"][-1]["wall_s"] > 0
    assert "| sscq |" in (out / "results.md").read_text()
    assert (out / "map_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlflow.tracking import MlflowClient  # the same plot is an artifact of the plotted run
    logged = MlflowClient(f"sqlite:///{out / 'mlflow.db'}").list_artifacts(sscq["run_id"], "quality")
    assert [a.path for a in logged] == ["quality/map_vs_time.png"]

    # A rerun with the same settings trains nothing: it reports the stored numbers.
    stdout = run_script("quality_fashion_mnist.py", args, tmp_path, ray=ray_local)
    assert "sscq/32: reusing the stored result" in stdout and "pixel_pq/32: reusing the stored result" in stdout
    assert json.loads((out / "results.json").read_text())["results"] == res


def test_train_throughput_smoke(tmp_path, data_dir, ray_local):
    out = tmp_path / "train"
    stdout, wall = run_script("train_throughput.py", ["--smoke", "--data-dir", data_dir, "--out", out], tmp_path,
                              timed=True, ray=ray_local)
    assert "| setup | workers | torch threads / worker | images/s | vs plain PyTorch |" in stdout
    assert "| plain PyTorch, 1 process" in stdout and "| Ray Train + DeepSpeed ZeRO-1" in stdout
    res = json.loads((out / "train_throughput.json").read_text())
    batch, plain = res["global_batch"], res["plain"]
    (ray_run,) = res["ray"]
    assert ray_run["workers"] == 2 and len(ray_run["epoch_images_per_s"]) == 2  # one MLflow value per epoch
    # Each rate is images over a time measured inside the script's run: the timed plain steps,
    # and every 3-step epoch inside the training run, which itself fits in the script's time.
    assert 0 < plain["steps"] * batch / plain["images_per_s"] <= wall
    assert 0 < ray_run["run_wall_s"] <= wall
    for ips in ray_run["epoch_images_per_s"]:
        assert 0 < res["steps"] * batch / ips <= ray_run["run_wall_s"], (ips, ray_run["run_wall_s"])
    assert 0.0 <= ray_run["data_wait_fraction"] <= 1.0
    assert res["overhead_ratio"]["2"] == pytest.approx(ray_run["images_per_s"] / res["plain"]["images_per_s"])
    assert res["pipeline"]["rows"] == 1500 and res["pipeline"]["dropped"] == 0  # the digits train split
    assert 0 < 1500 / res["pipeline"]["images_per_s"] <= wall
    # The stream ships uint8 (C*H*W bytes + 13 of id/ok/shard), the old format two float32 views.
    sb = res["stream_bytes"]
    assert sb["chw"] <= sb["uint8_bytes_per_image"] <= sb["chw"] + 32
    assert sb["float_views_bytes_per_image"] >= 8 * sb["chw"]


def test_encode_throughput_smoke(tmp_path, data_dir, ray_local):
    out = tmp_path / "encode"
    stdout, wall = run_script("encode_throughput.py", ["--smoke", "--data-dir", data_dir, "--out", out], tmp_path,
                              timed=True, ray=ray_local)
    assert "| path | images/s | vs bare forward |" in stdout and "| reindex job end to end" in stdout
    res = json.loads((out / "encode_throughput.json").read_text())
    assert res["reindex"]["rows"] == 2000 and res["stream"]["rows"] == 2000 and res["bare"]["rows"] == 2000
    # 2,000 rows in each measured time, and each time inside the script's run.
    for rate in (res["reindex"]["images_per_s"], res["stream"]["images_per_s"], res["bare"]["forward_images_per_s"]):
        assert 0 < 2000 / rate <= wall, rate
    assert res["stream"]["first_batch_s"] <= res["stream"]["seconds"]
    # The job end to end (actor start-up, decode, FAISS adds, writes) cannot beat the bare
    # forward pass over the same decoded rows in memory.
    assert 0 < res["ratio_reindex_vs_bare"] < 1
    # 32-bit fast-scan codes: 4 bytes of code per image plus the index's per-vector overhead.
    assert 4.0 <= res["reindex"]["bytes_per_image"] < 64.0


def test_stream_passes_smoke(tmp_path, ray_local):
    stdout, wall = run_script("stream_passes.py", ["--smoke"], tmp_path, timed=True, ray=ray_local)
    rows = [[c.strip() for c in line.strip(" |").split("|")] for line in stdout.splitlines()
            if line.startswith("| one ")]
    assert len(rows) == 6  # 3 epochs x (one stream, one execution per epoch)
    # The smoke's 2 consumers pause 0.005 s per batch of 128 rows: no epoch can go faster than
    # those pauses allow; each epoch's rate is its 2,000 rows over its wall time; the epochs,
    # timed inside the script's run, fit in it; the coordinator's CPU fits in its cores.
    ips, cpu, epoch_s = ([float(r[i].replace(",", "")) for r in rows] for i in (2, 3, 4))
    assert all(0 < x <= 2 * 128 / 0.005 for x in ips), ips
    assert all(abs(2000 / x - t) <= 0.05 + 0.01 * t for x, t in zip(ips, epoch_s)), (ips, epoch_s)
    assert sum(epoch_s) <= wall
    assert all(0 <= c <= t * (os.cpu_count() or 1) + 0.1 for c, t in zip(cpu, epoch_s)), (cpu, epoch_s)


def test_augment_speed_smoke(tmp_path):
    stdout = run_script("augment_speed.py", ["--smoke"], tmp_path)
    row = next(line for line in stdout.splitlines() if line.startswith("| 32 | 16 |"))
    assert float(row.split("|")[3].replace(",", "")) > 0 and float(row.split("|")[4].replace(",", "")) > 0


def test_process_cpu_attributes_a_childs_cpu_to_it(tmp_path):
    """The sampler behind BENCHMARKS.md's per-process CPU numbers: a child that spins ~1 CPU-s
    is found under its own name with about that much, and its exit code is passed on."""
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    stdout = run_script("process_cpu.py", ["--out", tmp_path, "--", sys.executable, "-c", spin], tmp_path)
    res = json.loads((tmp_path / "process_cpu.json").read_text())
    by_name = {g["group"]: g for g in res["groups"]}
    child = by_name[os.path.basename(sys.executable)[:15]]
    assert 0.8 <= child["cpu_s"] <= res["wall_s"] + 0.5, res
    assert res["exit_code"] == 0 and "| process group | CPU-s | processes |" in stdout
    failing = subprocess.run([sys.executable, os.path.join(BENCH, "process_cpu.py"), "--out", str(tmp_path), "--",
                              sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, text=True)
    assert failing.returncode == 3


def test_gpu_check_script_is_valid_bash():
    script = os.path.join(BENCH, "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", script], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_serve_bench_smoke(tmp_path, ray_local):
    """The search service benchmark end to end (real Ray Serve over HTTP): the served answers
    equal the in-process Searcher's for 1 and 2 partitions and for 10 and 100 parts, and a
    partition holds exactly codes + ids + a 4-byte id order per row."""
    out = tmp_path / "serve"
    stdout = run_script("serve_bench.py", ["--smoke", "--out", out], tmp_path, ray=ray_local)
    assert "| HTTP service | 1 | 10 |" in stdout and "| HTTP service | 2 | 100 |" in stdout
    res = json.loads((out / "serve_bench.json").read_text())
    assert set(res["http"]) == {"p1/n10", "p2/n100"}
    for key, s in res["http"].items():
        assert s["identical_to_in_process"] == 1.0, key
        assert s["p50_ms"] <= s["p99_ms"] and s["qps_concurrent"] > 0
        # A replica holds its 20,000 rows at 4 B code + 8 B id + 4 B id order (+ block padding).
        assert s["partition0_replica"]["accounted_per_row"] == pytest.approx(16, abs=0.5), key
    assert res["per_part_loop"]["100"]["top1_agreement"] >= 0.99
    mem = res["memory"]
    assert mem["codes_plus_ids_per_row"] == 12 and mem["accounted_per_row"] == pytest.approx(16, abs=0.5)


def test_index_scale_serving_rows_plan_moves_and_swap_reads(tmp_path):
    out = tmp_path / "serving"
    stdout = run_script("index_scale.py", ["--serving-only", "--smoke", "--out", out], tmp_path)
    assert "a one-part append moves 0 existing parts" in stdout
    res = json.loads((out / "index_scale.json").read_text())
    assert res["plan"]["append"]["moved"] == 0 and res["plan"]["append"]["parts"] == 100_001
    assert 0 < res["plan"]["grow"]["moved_fraction"] <= 1 / 9 + 0.01
    sw = res["swap"]
    # The partition that gets the appended part reads its one lean file; every other part stays in memory.
    assert sw["swap_part_files_read"] == 1 and sorted(sw["read_parts"]) == [0, 1]
    assert sum(sw["kept_parts"]) == sw["parts"] and sw["first_load_reads"] >= sw["parts"]
    assert res["new"] == [] and "snapshot" not in res


def test_index_scale_smoke_metadata_flat_and_driver_gets_records_only(tmp_path, ray_local):
    out = tmp_path / "scale"
    stdout = run_script("index_scale.py", ["--smoke", "--out", out], tmp_path, ray=ray_local)
    assert "| snapshots (this) | 24 |" in stdout  # the smoke skips the previous design's run (minutes)
    res = json.loads((out / "index_scale.json").read_text())
    per_shard = [r["bytes"]["metadata"] / r["shards"] for r in res["new"]]
    assert max(per_shard) < 1.2 * min(per_shard), per_shard  # metadata written per shard does not grow with S
    new_bpi = res["new"][0]["build"]["driver_bytes"] / res["new"][0]["build"]["rows"]
    # Part records, not embeddings: far below the embedding bytes the previous design shipped.
    assert new_bpi * 4 < res["embedding_bytes_per_image"], (new_bpi, res["embedding_bytes_per_image"])
    assert all(r["nothing"]["nothing_to_do"] and r["nothing"]["encoded_shards"] == 0 for r in res["new"])
    ap = res["append"]
    assert ap["encoded_shards"] == 2 and ap["rows"] == res["new"][-1]["build"]["rows"] + 2 * res["rows_per_shard"]
    assert res["snapshot"]["parts"] == 1000 and res["snapshot"]["read_s"] < 30
    # A lean part's fixed bytes (20 vs 2,000 parts of the same rows) stay under 4 KB whatever nlist is.
    assert [o["kind"] for o in res["part_overhead"]] == ["flat", "IVF nlist 1,024", "IVF nlist 16,384"]
    assert all(o["fixed_bytes_per_part"] < 4096 for o in res["part_overhead"]), res["part_overhead"]


def test_serve_load_smoke_survives_a_swap_and_a_killed_replica(tmp_path, ray_local):
    """Load with faults (benchmarks/serve_load.py --smoke): no request outlives the deadline,
    every non-2xx is a 503/504 with a reason, the republished generation swaps in without a
    failed request, and QPS is back within 30 s of the SIGKILL."""
    out = tmp_path / "load"
    stdout, wall = run_script("serve_load.py", ["--smoke", "--work", tmp_path / "work", "--out", out], tmp_path,
                              timed=True, ray=ray_local)
    assert "| faults | 4 |" in stdout
    r = json.loads((out / "serve_load_smoke.json").read_text())
    assert r["hangs"] == 0 and r["longest_request_s"] <= r["deadline_s"] + 2.0, r
    assert set(r["statuses"]) <= {"200", "503", "504"} and r["statuses"]["200"] >= 20, r["statuses"]
    assert all(reason.split(": ", 1)[1] and "\n" not in reason for reason in r["non_2xx_reasons"])
    assert r["swap"]["failures_in_swap_window"] == 0 and r["swap"]["answers_by_version"].get(r["swap"]["new"], 0) > 0
    assert r["kill_at_s"] is not None and r["recovery_s"] is not None and r["recovery_s"] <= 30.0, r
    for kind, m in r["rss_mb"].items():  # flat: a few MB, not a leak per request
        assert m["end"] - m["start"] < 50, (kind, m)
    print(f"serve_load smoke: {wall:.0f}s wall; {r['qps']:.1f} QPS, recovery {r['recovery_s']:.1f}s")


def test_recipe_study_smoke(tmp_path):
    """recipe_study.py: its torch ADC mAP equals evaluation.py's, and a candidate trains and is scored."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"  # 5,000 queries are held out, so > 5,000 train images
    np.savez(data, train_x=rng.integers(0, 256, (5300, 28, 28), dtype=np.uint8),
             train_y=rng.integers(0, 10, 5300).astype(np.uint8))
    out = tmp_path / "study"
    run_script("recipe_study.py", ["--data", data, "--device", "cpu", "--check-eval", "--budget-s", "60",
                                   "--max-steps", "1", "--q-limit", "20", "--only", "baseline", "--out", out], tmp_path)
    rows = [json.loads(line) for line in (out / "study.jsonl").read_text().splitlines()]
    check = rows[0]["check_eval"]
    assert check["ok"] and check["gap_adc"] <= 1e-6, check
    final = [r for r in rows[1:] if r.get("fraction") == 1.0]
    assert [r["candidate"] for r in final] == ["baseline"] and final[0]["steps"] == 1
    assert 0 <= final[0]["map_codes"] <= 1 and (out / "map_vs_time.png").stat().st_size > 0


def test_recipe_study_mined_neighbours_are_the_nearest_other_rows_never_the_row_itself():
    """The neighbour-swap candidate's miner: brute-force nearest rows by dot product, across
    chunk borders, and never the row itself even where a duplicate row ties with it."""
    import torch

    sys.path.insert(0, BENCH)
    import recipe_study as rs

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(37, 5, generator=g), dim=1)
    x[7] = x[3]  # a duplicate: each is the other's nearest, and ties with itself
    got = rs.nearest_rows(x, 4, chunk=10)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    assert torch.equal(got, sim.topk(4, dim=1).indices)
    assert not (got == torch.arange(37)[:, None]).any()
    assert got[3, 0] == 7 and got[7, 0] == 3


def test_rerank_study_decodes_never_counts_an_item_as_its_own_neighbour_and_keeps_norms():
    """rerank_study.py's pieces: decoding is the codeword concatenation, a database item is
    never its own neighbour (also when other items share its code and tie with it), and an
    expansion keeps each vector's norm (the scale the codebooks were trained at)."""
    import numpy as np

    sys.path.insert(0, BENCH)
    import rerank_study as rr

    rng = np.random.default_rng(0)
    cb = rng.normal(size=(2, 4, 3)).astype(np.float32)
    codes = np.array([[0, 1], [0, 1], [0, 1], [3, 2]], dtype=np.uint8)
    recon = rr.decode(codes, cb)
    assert np.array_equal(recon[3], np.concatenate([cb[0, 3], cb[1, 2]]))
    f = (recon + 0.01 * rng.normal(size=recon.shape)).astype(np.float32)
    nb = rr.neighbours_without_self(f, codes, cb, 2)
    assert nb.shape == (4, 2) and all(i not in row for i, row in enumerate(nb)), nb
    assert set(nb[0]) == {1, 2} and set(nb[2]) == {0, 1}  # the items sharing its code
    y = rr.expand(f, nb, recon, 2, 1.0)
    assert not np.allclose(y, f)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(f, axis=1), rtol=1e-5)
