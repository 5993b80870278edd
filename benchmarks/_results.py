"""Shared by the benchmark scripts: write a results file and its table into the README."""
import json
import pathlib
import platform

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def save(name: str, data: dict, table: str) -> None:
    """Write results/<name>.json and .md, and put the table between the README's markers."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    readme = ROOT / "README.md"
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(f"{head}{begin}\n{table}\n{end}{rest.split(end, 1)[1]}")
    print(table)
