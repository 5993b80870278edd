"""Shared by the benchmark scripts: interleaved timing, and a results file with its README table."""
import json
import os
import pathlib
import platform
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """The machine and how busy it is: this one is shared, so absolute times are noise."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, load average {load}"


def save(name: str, data: dict, table: str) -> None:
    """Write results/<name>.json and .md, and put the table between the README's markers."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    fill_readme(name, table)
    print(table)


def timed(fns, rounds, *, best=False, which=None):
    """Median (or best) time of each function over `rounds` interleaved rounds, after a warm-up,
    so that the machine's noise hits all of them alike. With a list `which`, it gets per
    function the round (0-based) whose time was picked."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    order = [sorted(range(len(ts)), key=ts.__getitem__) for ts in times]
    picked = [o[0] if best else o[len(o) // 2] for o in order]
    if which is not None:
        which[:] = picked
    return [ts[i] for ts, i in zip(times, picked)]


def fill_readme(name: str, table: str) -> None:
    readme = ROOT / "README.md"
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}")


if __name__ == "__main__":
    # Refresh the README's tables from the latest results files, without re-running anything.
    for md in sorted(RESULTS.glob("*.md")):
        fill_readme(md.stem, md.read_text().strip())
