"""Train SSCQ: `python jobs/train.py --config configs/digits.yaml [key.sub=value ...]`.

Without a cluster it starts a local Ray; under `ray job submit` it joins the cluster.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sscq_dist.cli import config_parser, run_main  # noqa: E402
from sscq_dist.config import load_config  # noqa: E402
from sscq_dist.train.driver import run_training  # noqa: E402


def main() -> int:
    p = config_parser(__doc__)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    r = run_training(cfg, a.address)
    m = r.metrics
    print(f"train: registered {r.model_name} version {r.version} (alias challenger), run {r.run_id}; "
          f"{m.get('epoch', -1) + 1} epochs, loss {m.get('loss/total', float('nan')):.4f}, "
          f"{m.get('images_per_s', 0):.0f} img/s, dropped {m.get('dropped_images', 0)}, {r.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
