"""The operator's command line: `sscq` and jobs/*.py share parsers, jobs are quiet by default
(the libraries' output goes to a log file), and a prefix of split folders gets a hint."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from fault_helpers import assert_one_error_line, job_env

SSCQ = os.path.join(os.path.dirname(sys.executable), "sscq")
PIPELINE = ["ingest", "train", "evaluate", "promote", "reindex", "gc", "search", "serve", "demo"]
# What the quiet default must keep off the terminal (issue 16's list, plus any library log line).
NOISE = [
    r"PlacementGroupCleaner", r"Failed to query Ray Train Controller", r"concurrency",
    r"constructor arguments", r"real_accelerator", r"Setting accelerator", r"CloudPickle",
    r"python_model", r"type hints", r"RayTrainWorker", r"\(raylet\)", r"Warning:",
    r"^\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d",  # a timestamped log record
    r"^\[\d{4}-\d\d-\d\d",  # DeepSpeed / core-worker log lines
    r"Traceback",
]
MAX_LINES = 60


def _quiet_env(**extra) -> dict:
    env = job_env(**extra)
    env.pop("SSCQ_VERBOSE", None)
    return env


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-k)\b", help_text))


def test_sscq_help_lists_the_pipeline_in_order_and_each_job_matches_its_script():
    assert os.path.exists(SSCQ), "the `sscq` console script is not installed (pip install -e .)"
    top = subprocess.run([SSCQ, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    listed = [ln.split()[0] for ln in top.stdout.splitlines() if re.match(r"^    [a-z]+ {2,}", ln)]
    assert listed == PIPELINE, top.stdout
    for job in PIPELINE:
        sub = subprocess.run([SSCQ, job, "--help"], capture_output=True, text=True, timeout=120)
        script = subprocess.run([sys.executable, os.path.join(REPO, "jobs", f"{job}.py"), "--help"],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert sub.returncode == 0 and script.returncode == 0, (sub.stderr, script.stderr)
        assert sub.stdout.startswith(f"usage: sscq {job}") and script.stdout.startswith(f"usage: jobs/{job}.py")
        opts = _options(sub.stdout)
        assert {"--config", "--verbose"} <= opts, (job, opts)
        assert opts == _options(script.stdout), job  # the same flags both ways
    bad = subprocess.run([SSCQ, "trian"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'trian'" in bad.stderr


@pytest.fixture(scope="module")
def split_prefix(tmp_path_factory):
    """What `make demo` ingests: <prefix>/train and <prefix>/test, no shards at the top."""
    from sscq_dist.ingest import ingest

    d = tmp_path_factory.mktemp("splits") / "digits"
    ingest("digits", str(d), rows_per_shard=1000, progress=False)
    return d


def test_a_prefix_of_split_folders_names_them(split_prefix):
    from sscq_dist.data.schema import validate_shards
    from sscq_dist.errors import SchemaError
    from sscq_dist.indexing.plan import list_source_shards
    from sscq_dist.storage import resolve

    want = f"did you mean {split_prefix}/test or {split_prefix}/train?"
    for check in (validate_shards, list_source_shards):  # training/evaluation, and the reindex plan
        with pytest.raises(SchemaError) as e:
            check(resolve(str(split_prefix)))
        assert str(e.value).startswith(f"no image shards (part-*.parquet) under {split_prefix}") and want in str(e.value)
    with pytest.raises(SchemaError) as e:  # an empty folder gets no made-up hint
        validate_shards(resolve(str(split_prefix / "train" / "nothing-here")))
    assert "did you mean" not in str(e.value)


def test_a_quiet_job_error_is_one_line_and_the_log_holds_the_traceback(split_prefix, tmp_path):
    out = subprocess.run([SSCQ, "train", "--config", os.path.join(REPO, "configs", "digits.yaml"),
                          f"data.train_uri={split_prefix}", f"tracking.output_dir={tmp_path}/out"],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=_quiet_env())
    assert_one_error_line(out, "did you mean", f"{split_prefix}/train")
    (log_line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("log: ")]
    log_path = log_line[len("log: "):]
    assert log_path.startswith(f"{tmp_path}/out/logs/train-")
    assert "Traceback" in open(log_path).read()
    verbose = subprocess.run([SSCQ, "train", "--verbose", "--config", os.path.join(REPO, "configs", "digits.yaml"),
                              f"data.train_uri={split_prefix}", f"tracking.output_dir={tmp_path}/v"],
                             capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=_quiet_env())
    assert_one_error_line(verbose, "did you mean")
    assert "log: " not in verbose.stdout and not os.path.exists(tmp_path / "v" / "logs")


def test_demo_is_quiet_and_its_log_file_holds_the_detail(tmp_path, ray_local):
    """The whole demo (1 epoch, on the session's Ray): at most 60 terminal lines,
    none of the libraries' chatter; the log file it names has the workers' lines and Ray's own."""
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    env = _quiet_env(RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo's own store in its working directory, as on a fresh machine
    out = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "demo.py"), "train.epochs=1",
                          "train.checkpoint_every_epochs=1"],
                         capture_output=True, text=True, timeout=900, cwd=str(tmp_path), env=env)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"
    noisy = [ln for ln in lines if any(re.search(p, ln) for p in NOISE)]
    assert not noisy, noisy
    for stage in ("1/7 ingest", "2/7 train", "3/7 evaluate", "4/7 promote", "5/7 reindex", "6/7 search", "7/7 serve"):
        assert any(stage in ln for ln in lines), stage
    assert any(ln.startswith("[train] epoch 1/1 done") for ln in lines), text  # progress relayed from rank 0
    assert "the same top-5 as in process" in text, text
    (log_line,) = [ln for ln in lines if ln.startswith("log: ")]
    detail = open(log_line[len("log: "):]).read()
    for needle in ("Connecting to existing Ray cluster", "[train] epoch 1/1 done", "RayTrainWorker",
                   "Created version '1' of model 'sscq'"):
        assert needle in detail, needle
