"""Loader for the long-context tasks: lm-eval calls `load` through each YAML's `custom_dataset`.

The documents are stored as references into the haystack beside them (haystack.json, the held-out plays); `load`
expands each into its text (ssmcompress.suite.long.expand), never touching the Hugging Face hub or its cache.
"""
import json
from pathlib import Path

import datasets

from ssmcompress.suite import long


def load(data_file: str, **metadata) -> datasets.DatasetDict:
    folder = Path(__file__).resolve().parent
    lines = long.haystack(folder)
    rows = []
    for line in (folder / data_file).read_text().splitlines():
        doc = json.loads(line)
        doc["context"] = long.expand(doc.pop("segments"), lines) + doc["question"]
        rows.append(doc)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
