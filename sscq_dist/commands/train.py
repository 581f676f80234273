"""Train SSCQ: `sscq train --config configs/digits.yaml [key.sub=value ...]`.

Without a cluster it starts a local Ray; under `ray job submit` it joins the cluster. A run
killed part-way resumes from its latest checkpoint when the same command runs again.
"""

import argparse

from sscq_dist.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")


def run(a: argparse.Namespace, cfg: Config) -> int:
    from sscq_dist.console import CONSOLE
    from sscq_dist.train.driver import run_training

    r = run_training(cfg, a.address)
    m = r.metrics
    CONSOLE.line(f"train: registered {r.model_name} version {r.version} (alias challenger), run {r.run_id}; "
                 f"{m.get('epoch', -1) + 1} epochs, loss {m.get('loss/total', float('nan')):.4f}, "
                 f"{m.get('images_per_s', 0):.0f} img/s, dropped {m.get('dropped_images', 0)}, {r.seconds:.0f}s")
    return 0
