"""Security (SPEC section 8): safe formats, the URI allow-list, no password echoed from a URI.

No credential in logs, MLflow or index files: the end-to-end run through the real servers
scans every byte its jobs wrote for the secret values
(tests/test_cluster.py::test_end_to_end_through_real_servers), so the pipeline runs once.
"""

import ast
from pathlib import Path

import pytest

from conftest import FAKE_KEY_ID, FAKE_SECRET, REPO
from fault_helpers import assert_one_error_line, leaks, run_job

SECRETS = (FAKE_KEY_ID, FAKE_SECRET)


def _python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in Path(REPO, d).rglob("*.py")]


def test_torch_load_is_weights_only_and_no_pickle():
    """Every torch.load in the package and jobs passes weights_only=True; nothing unpickles."""
    calls = 0
    for path in _python_files("sscq_dist", "jobs"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "cloudpickle", "dill") for n in names), \
                    f"{path}:{node.lineno} imports a pickle module"
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 2  # the registry's model loader and the neighbour-bank restore


@pytest.mark.parametrize("script,args,scheme", [
    ("reindex.py", ["--images", "http://example.invalid/imgs", "--index-root", "/tmp/never"], "http://"),
    ("reindex.py", ["--images", "/tmp/never", "--index-root", "ftp://example.invalid/idx"], "ftp://"),
    ("ingest.py", ["--source", "digits", "--dest", "gs://bucket/x"], "gs://"),
])
def test_uri_scheme_allow_list_on_the_command_line(script, args, scheme, tmp_path):
    out = run_job(script, *args, cwd=str(tmp_path))
    line = assert_one_error_line(out, scheme, "allowed")
    assert "example.invalid" in line or "bucket" in line


def test_credentials_in_a_uri_are_not_echoed(tmp_path):
    """A URI that carries user:password is named in the error without its password."""
    uri = f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@example.invalid/imgs"
    out = run_job("reindex.py", "--images", uri, "--index-root", str(tmp_path / "idx"), cwd=str(tmp_path))
    line = assert_one_error_line(out, "http://", "example.invalid/imgs")
    assert not leaks(out.stdout + out.stderr, SECRETS), line
