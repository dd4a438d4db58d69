"""Re-key schema-2 records of a results store for schema 3, where the run key names a bundled model or task with its
content digest (ssmcompress.config.portable_path). A schema-2 record does not say which content it ran on; its git
commit does: each bundled file a record's config names is digested as it was at that commit (`git archive`), or,
where that commit lacks it (a run from a working tree ahead of its commit), at the first commit that has it.

    python experiments/maintenance/migrate_asset_keys.py results/records.jsonl     # rewrites the store in place
"""
from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ssmcompress import config

REPO = Path(__file__).resolve().parents[2]
PREFIX = "src/ssmcompress/assets/"


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


@functools.lru_cache(maxsize=None)
def digest_at(commit: str, name: str) -> str:
    if not git("ls-tree", commit, "--", PREFIX + name).strip():
        first = git("log", "--reverse", "--format=%H", "--diff-filter=A", "--", PREFIX + name).split()
        if not first:
            return "missing"
        commit = first[0].decode()
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=io.BytesIO(git("archive", commit, PREFIX + name))).extractall(tmp, filter="data")
        return config.content_digest(Path(tmp) / PREFIX / name)


def migrate(record: dict) -> dict:
    if record.get("schema") != 2:
        return record
    commit = (record.get("git") or {}).get("commit")
    if not commit:
        raise SystemExit(f"record {record['run_id']}: no git commit, so its bundled files cannot be digested")
    config.asset_digest = functools.partial(digest_at, commit)  # the key as the record's checkout would make it
    return dict(record, schema=3, key=config.run_key(record["config"], results_version=record["results_version"]))


def main(path: str) -> None:
    store = Path(path)
    records = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    migrated = [migrate(r) for r in records]
    changed = sum(a["key"] != b["key"] for a, b in zip(records, migrated))
    store.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in migrated))
    print(f"{store}: {len(records)} records, {sum(r.get('schema') == 2 for r in records)} of schema 2 re-keyed "
          f"({changed} keys changed)")


if __name__ == "__main__":
    main(sys.argv[1])
