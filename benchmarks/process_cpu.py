"""Where a command's CPU goes, by process: run it while sampling every process's CPU time.

Every 0.5 s it reads /proc/<pid>/stat of every process (Linux only) and keeps each process's
latest CPU time and title; Ray workers retitle themselves (`ray::IDLE`, `ray::RayTrainWorker`,
`ray::FooterReader...`), so processes group by what they became. A process that exits between
two samples loses at most its last 0.5 s. Processes that were running before the command
count only what they used during it (kernel threads, other services: the host's share).

    python benchmarks/process_cpu.py -- .venv/bin/python -m pytest tests -q -p no:cacheprovider
    python benchmarks/process_cpu.py --ray-workers 8 --runtime-env    # a Ray worker's start-up cost
    python benchmarks/process_cpu.py --ray-workers 8                  # the same without a runtime env

Prints CPU seconds per group (and the process count), largest first; writes <out>/process_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")
GROUPS = ("raylet", "gcs_server", "log_monitor", "dashboard", "mlflow", "huey", "chromium", "cc1plus",
          "moto", "jobs/", "benchmarks/", "pytest")


def _read(pid: str) -> tuple[str, str, float]:
    """(start time, title, CPU seconds) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    rest = st[st.rfind(")") + 2:].split()
    return rest[19], st[st.find("(") + 1:st.rfind(")")], (int(rest[11]) + int(rest[12])) / TICK


class Sampler(threading.Thread):
    """Per process (pid, start time): title, first command line, CPU at first sight and latest."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop, self.seen, self.first = interval, threading.Event(), {}, True

    def sample(self) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                start, title, cpu = _read(pid)
                entry = self.seen.get((pid, start))
                if entry is None:
                    with open(f"/proc/{pid}/cmdline") as f:
                        cmd = f.read().replace("\0", " ")[:300]
                    self.seen[(pid, start)] = {"title": title, "cmd": cmd, "cpu0": cpu if self.first else 0.0,
                                               "cpu": cpu}
                else:
                    entry["cpu"], entry["title"] = cpu, title
            except (OSError, IndexError, ValueError):
                pass  # the process exited while being read
        self.first = False

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()


def group(title: str, cmd: str) -> str:
    if title.startswith("ray::"):
        return title
    if "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "ray worker (untitled)"
    return next((g for g in GROUPS if g in cmd or g in title), title)


def summarize(seen: dict) -> list[dict]:
    cpu, n = collections.Counter(), collections.Counter()
    for e in seen.values():
        g = group(e["title"], e["cmd"])
        cpu[g] += e["cpu"] - e["cpu0"]
        n[g] += 1
    return [{"group": g, "cpu_s": round(c, 1), "processes": n[g]} for g, c in cpu.most_common()]


def ray_workers(n: int, runtime_env: bool) -> list[int]:
    """Start a local Ray, run n short tasks at once, return the worker pids (kept alive)."""
    import ray

    kw = {"runtime_env": {"env_vars": {"SSCQ_PROBE": "1"}}} if runtime_env else {}
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, **kw)

    @ray.remote
    def pid() -> int:
        time.sleep(1.0)  # every task on its own worker
        return os.getpid()

    return sorted(set(ray.get([pid.remote() for _ in range(n)])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ray-workers", type=int, default=0, help="measure N fresh Ray workers instead of a command")
    p.add_argument("--runtime-env", action="store_true", help="with --ray-workers: a job runtime_env (env_vars)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="outputs/process_cpu")
    p.add_argument("command", nargs="*", help="the command to run (after --)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.ray_workers:
        pids = ray_workers(a.ray_workers, a.runtime_env)
        time.sleep(2.0)  # start-up done, workers idle
        per = [_read(str(pid))[2] for pid in pids]
        res = {"workers": len(pids), "runtime_env": a.runtime_env, "cpu_s_per_worker": round(sum(per) / len(per), 2)}
        print(f"{len(pids)} Ray workers, runtime_env={'yes' if a.runtime_env else 'no'}: "
              f"{res['cpu_s_per_worker']:.2f} CPU-s each")
    else:
        if not a.command:
            p.error("give a command after --, or --ray-workers N")
        sampler = Sampler()
        sampler.sample()
        sampler.start()
        t0 = time.perf_counter()
        rc = subprocess.call(a.command)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        groups = summarize(sampler.seen)
        res = {"command": a.command, "exit_code": rc, "wall_s": round(wall, 1),
               "cpu_s": round(sum(g["cpu_s"] for g in groups), 1), "groups": groups}
        print(f"\n{wall:.0f} s wall, {res['cpu_s']:.0f} CPU-s in all (exit code {rc})\n")
        print("| process group | CPU-s | processes |\n|---|---:|---:|")
        for g in groups[:a.top]:
            print(f"| {g['group']} | {g['cpu_s']:.1f} | {g['processes']} |")
    with open(os.path.join(a.out, "process_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    if not a.ray_workers and res["exit_code"]:
        sys.exit(res["exit_code"])


if __name__ == "__main__":
    main()
