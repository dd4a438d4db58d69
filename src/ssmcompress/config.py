"""Hydra/OmegaConf glue: where the configs live, resolvers, the run key, and the checks of the top-level keys.

Every other config section is checked by the module that uses it (`runner.validate` asks them in data-flow order).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssmcompress.errors import ConfigError, ModelSourceError  # noqa: F401  (re-exported: the checks' one error)

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parents[1]  # the checkout, when the package runs from one (src layout); not used by an installed wheel
CONF_DIR = PACKAGE / "conf"  # shipped with the package: Hydra composes from it in a checkout and in a wheel
EXPERIMENTS = CONF_DIR / "experiment"  # the sweeps: `+experiment=<name>`
ASSETS = PACKAGE / "assets"
# The code's results version: raised whenever a change of the code changes the numbers a run produces (a method's
# result, a metric, the suite). It is part of the run key, so a sweep reruns what an older version computed, and the
# tables leave older records out unless asked. 1: every record before versioning; 2: ToMe/PuMer capped at
# (n - protected) // 2 per layer, stderr and per-document samples recorded, per-token last-word perplexity.
RESULTS_VERSION = 2
# sections that say where and how a run is logged, not what it computes: excluded from the run key
VOLATILE = ("logger", "hydra", "results_dir", "skip_existing", "tag")
# settings that hold file-system paths: the key names bundled files by their place in the package and any other file
# by its content, so the same run has the same key in every checkout and on every machine
PATH_SETTINGS = (("model", "path"), ("model", "tokenizer"), ("benchmark", "include_path"))
BUNDLED = re.compile(r"(?:^|/)ssmcompress/assets/(.+?)/*$")
FINGERPRINT_BYTES = 2 ** 20  # files larger than twice this are fingerprinted by size, head and tail


def register_resolvers() -> None:
    """`${asset:models/mamba2-tiny}` (a bundled file) and `${basename:${model.path}}` (a path's last part)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda sub="": str(ASSETS / sub))
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda path: Path(str(path)).expanduser().name or str(path))


register_resolvers()


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------- run key

# top-level reducer settings newer than the first records, with their defaults (conf/config.yaml)
REDUCER_KEYS = {"schedule": "smooth", "reduce_at": "ssm", "trapezoid": "kept", "rotation": "kept"}


def run_key(cfg: DictConfig | dict, results_version: int = RESULTS_VERSION) -> str:
    """A stable hash of everything that determines a run's numbers, the code's results version included (resume
    and de-duplication use it)."""
    resolved = to_dict(cfg) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg, default=str))
    for name in VOLATILE:
        resolved.pop(name, None)
    dense = resolved.get("method", {}).get("name") == "dense"
    if dense:
        resolved["ratio"], resolved["layers"] = None, None  # dense ignores them: one dense record, not one per ratio
    for key, default in REDUCER_KEYS.items():  # dense ignores them; at their defaults, earlier records keep their keys
        if dense or resolved.get(key) == default:
            resolved.pop(key, None)
    measure = (resolved.get("benchmark") or {}).get("measure") or {}
    if measure.get("capture") is False:  # likewise: eager forwards, as every record before the setting
        measure.pop("capture")
    if not (resolved.get("method") or {}).get("calibration") and isinstance(resolved.get("model"), dict):
        resolved["model"].pop("train_length", None)  # only a method that calibrates reads it; earlier records lack it
    if resolved.get("pruner", {}).get("name") == "none":
        resolved["sparsity"] = None
    if isinstance(resolved.get("pruner"), dict):  # where the pruned weights are written does not change the numbers
        resolved["pruner"] = {k: v for k, v in resolved["pruner"].items() if k != "save_dir"}
    for section, name in PATH_SETTINGS:
        if isinstance(resolved.get(section), dict) and isinstance(resolved[section].get(name), str):
            resolved[section][name] = portable_path(resolved[section][name])
    if results_version != 1:  # version-1 keys had no version in them
        resolved["results_version"] = results_version
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def portable_path(value: str) -> str:
    """A path setting as the run key sees it: `asset:<name>@<digest>` for a bundled file (its place in the package,
    so the same run has the same key in every checkout, install and machine, and the content of this package's file
    of that name, so a retrained bundled model or a rebuilt task is a new run), `content:<digest>` for an existing
    user file or directory, else the text itself (a hub name)."""
    match = BUNDLED.search(value.replace("\\", "/"))
    if match:
        return f"asset:{match.group(1)}@{asset_digest(match.group(1))}"
    path = Path(value).expanduser()
    if path.exists():
        return f"content:{content_digest(path)}"
    return value


@functools.lru_cache(maxsize=None)
def asset_digest(name: str) -> str:
    """content_digest of this package's bundled file or directory `name` ("missing" where it has none): the package's
    files do not change while it runs, so each is read once per process."""
    path = ASSETS / name
    return content_digest(path) if path.exists() else "missing"


def content_digest(path: Path) -> str:
    """sha1 over a file's bytes, or a directory's relative file names and bytes (files larger than 2 MiB, such as
    weights, by their size and their first and last MiB: reading gigabytes per run would cost more than the check
    is worth, and a changed checkpoint changes its size or its ends in practice)."""
    digest = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.name.startswith(".") or "__pycache__" in file.parts:
            continue
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        size = file.stat().st_size
        with open(file, "rb") as f:
            if size <= 2 * FINGERPRINT_BYTES:
                digest.update(f.read())
            else:
                digest.update(str(size).encode() + f.read(FINGERPRINT_BYTES))
                f.seek(-FINGERPRINT_BYTES, 2)
                digest.update(f.read())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- checks

def check(cfg: DictConfig) -> None:
    """The top-level keys: a selected option in every group, protocol, seed, and the types of the run's switches;
    every value set and every interpolation resolvable."""
    try:
        to_dict(cfg)
    except OmegaConfBaseException as error:
        missing = re.search(r"Missing mandatory value: (\S+)", str(error))  # also when reached through ${...}
        if missing:
            raise ConfigError(f"{missing.group(1)} must be set (e.g. {missing.group(1)}=...)") from None
        raise ConfigError(f"the config cannot be resolved: {str(error).splitlines()[0]}") from None
    for group in ("model", "method", "benchmark", "pruner", "logger"):
        section = cfg.get(group)
        if not isinstance(section, DictConfig) or section.get("name") is None:
            raise ConfigError(f"no {group} selected; choose one of: {', '.join(available(group))}")
    if cfg.protocol not in ("exact", "paper"):
        raise ConfigError(f"unknown protocol {cfg.protocol!r}: use exact or paper")
    integer("seed", cfg.get("seed"))
    for name in ("skip_existing",):
        if not isinstance(cfg.get(name), bool):
            raise ConfigError(f"{name} must be true or false, got {cfg.get(name)!r}")


def integer(name: str, value, minimum: int | None = None) -> int:
    """`value` as an int, or a ConfigError naming the setting (Hydra passes `seed=abc` on as the string 'abc')."""
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name} must be an integer{bound}, got {value!r}")
    return value
