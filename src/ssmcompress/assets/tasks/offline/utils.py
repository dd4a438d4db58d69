"""Loader for the bundled offline tasks: lm-eval calls `load` through each YAML's `custom_dataset`.

Reading the JSONL beside this file (instead of `dataset_path: json` with a `data_files` path) keeps the tasks
working from any working directory and never touches the Hugging Face hub or its cache.
"""
import json
from pathlib import Path

import datasets


def load(data_file: str, **metadata) -> datasets.DatasetDict:
    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
