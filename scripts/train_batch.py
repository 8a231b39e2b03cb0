"""Train a list of `skipnet train` runs in parallel on one machine (e.g. several processes sharing one GPU), each
into its own run folder, with a wall-clock deadline; print and save a table of their final evaluations.

The jobs file holds one run per line, ``NAME AFTER ARGS...``: NAME is the run folder under --runs, AFTER the NAME
of a run that must finish first (``-`` for none; e.g. the SP run an HRL stage starts from), ARGS the arguments of
``skipnet train`` (``{runs}`` is replaced by the --runs folder, so ``--set train.init={runs}/sp20``). Blank lines
and lines starting with ``#`` are skipped. A run that finished already (final.json) is left alone; one that was
interrupted (a checkpoint, no final.json) is resumed with ``--resume`` (--extra is not added to it); a folder
without either (stopped before its first checkpoint) is started again. AFTER names a run of the same file. At
the deadline every run still going gets SIGTERM (the trainer then writes a checkpoint, so a later call resumes
it) and, 30 s later, SIGKILL.

    python scripts/train_batch.py --jobs JOBS --runs /work/runs/search --parallel 8 --deadline 480 \
        [--extra "--set data.root=..."] [--summary summary.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def parse_jobs(text: str, runs: Path) -> list[tuple[str, str | None, list[str]]]:
    jobs, names = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = shlex.split(line.replace("{runs}", str(runs)))
        if len(parts) < 2:
            raise SystemExit(f"jobs line {n}: need NAME AFTER ARGS...; got {line!r}")
        name, after, args = parts[0], parts[1], parts[2:]
        if name in names:
            raise SystemExit(f"jobs line {n}: run name {name!r} given twice")
        if after != "-" and after not in names:
            raise SystemExit(f"jobs line {n}: {name!r} waits for {after!r}, which no earlier line defines")
        names.add(name)
        jobs.append((name, None if after == "-" else after, args))
    return jobs


def final(runs: Path, name: str) -> dict | None:
    path = runs / name / "final.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", required=True, type=Path)
    p.add_argument("--runs", required=True, type=Path)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds from start")
    p.add_argument("--extra", default="", help="arguments added to every `skipnet train` (not to resumed runs)")
    p.add_argument("--summary", type=Path, default=None, help="JSON file for the table (default: RUNS/summary.json)")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel must be at least 1; got {args.parallel}")
    t0 = time.time()
    args.runs.mkdir(parents=True, exist_ok=True)
    jobs = parse_jobs(args.jobs.read_text(), args.runs)
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float, IO]] = {}  # name -> (process, start time, its open log)
    done: dict[str, dict] = {}  # name -> {"rc", "wall_s"}
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    def stop(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
        """SIGTERM (the trainer then writes a checkpoint), SIGKILL after ``grace`` seconds."""
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        end = time.time() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def reap() -> None:
        for name, (proc, start, logf) in list(running.items()):
            if proc.poll() is not None:
                done[name] = {"rc": proc.returncode, "wall_s": round(time.time() - start, 1)}
                del running[name]
                logf.close()
                r = final(args.runs, name)
                log(f"{name} rc={proc.returncode} {time.time() - start:.0f}s "
                    + (f"top-1 {r['accuracy']:.2f} % mac_reduction {r.get('mac_reduction', 0):.1f} %" if r else ""))

    try:
        while pending or running:
            reap()
            if time.time() - t0 >= args.deadline:
                log(f"deadline: stopping {sorted(running)}; not started: {[j[0] for j in pending]}")
                stop([proc for proc, _, _ in running.values()])
                for name, (_, start, logf) in list(running.items()):
                    logf.close()
                    state = "finished in the grace period" if final(args.runs, name) else "stopped at the deadline"
                    done[name] = {"rc": state, "wall_s": round(time.time() - start, 1)}
                running.clear()
                break
            for job in list(pending):
                if len(running) >= args.parallel:
                    break
                name, after, jargs = job
                folder = args.runs / name
                if final(args.runs, name) is not None:  # finished in an earlier call: left alone
                    pending.remove(job)
                    done[name] = {"rc": "finished before", "wall_s": None}
                    continue
                if after is not None:
                    if after in running or any(j[0] == after for j in pending):
                        continue  # not finished yet
                    if final(args.runs, after) is None:
                        pending.remove(job)
                        done[name] = {"rc": f"skipped: {after} did not finish", "wall_s": None}
                        log(f"{name}: skipped ({after} did not finish)")
                        continue
                pending.remove(job)
                if (folder / "checkpoints" / "last.pt").exists():
                    cmd = ["--resume"]
                else:  # a folder without a checkpoint (stopped before its first one) is started again
                    cmd = jargs + shlex.split(args.extra) + (["--overwrite"] if folder.exists() else [])
                cmd = [sys.executable, "-m", "skipnet.cli", "train", *cmd, "--run-dir", str(folder), "--no-progress"]
                logf = open(args.runs / f"{name}.log", "a")  # noqa: SIM115 -- open while the process runs
                logf.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
                logf.flush()
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                running[name] = (proc, time.time(), logf)
                log(f"started {name}")
            time.sleep(2)
    finally:  # this script stopped by an error or a signal: its runs do not go on without a deadline
        if running:
            stop([proc for proc, _, _ in running.values()])

    rows = []
    for name, _, jargs in jobs:
        r = final(args.runs, name) or {}
        rows.append({"name": name, "args": " ".join(jargs), **done.get(name, {"rc": "not started", "wall_s": None}),
                     **{k: r.get(k) for k in ("accuracy", "macs_per_image", "mac_reduction", "tau", "epochs")}})
    out = args.summary or args.runs / "summary.json"
    out.write_text(json.dumps(rows, indent=1))
    for row in rows:
        acc = f"{row['accuracy']:6.2f}" if row.get("accuracy") is not None else "     -"
        red = f"{row['mac_reduction']:5.1f}" if row.get("mac_reduction") is not None else "    -"
        print(f"{row['name']:28s} {acc} {red} rc={row['rc']} wall={row['wall_s']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
