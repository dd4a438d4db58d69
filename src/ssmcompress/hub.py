"""The Hugging Face hub, through huggingface_hub's own endpoint, proxy, cache and offline handling, with errors of one
line that say what to do.

What huggingface_hub does for us: HF_ENDPOINT (a mirror, with its port), HTTP(S)_PROXY / NO_PROXY, the cache
(HF_HOME / HF_HUB_CACHE), offline mode (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE, which huggingface_hub honours too).
What it does not do: fail fast. A download it cannot start is retried five times with back-off (about 25 s) before it
falls back to the cache and raises. So a file that is not cached is first asked for with one metadata request, which
huggingface_hub sends without retries; only when that answers is the file downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

from ssmcompress.errors import ConfigError, ModelSourceError

TIMEOUT_S = 10.0  # one metadata request (huggingface_hub's own HF_HUB_ETAG_TIMEOUT default)


class Unreachable(Exception):
    """The hub did not answer, or offline mode forbids asking it; str() says which."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")


def offline() -> bool:
    """huggingface_hub's offline mode, by its own rule (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read at call time."""
    import huggingface_hub.constants

    return huggingface_hub.constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def datasets_offline() -> bool:
    """datasets' offline mode, by its own rule: HF_DATASETS_OFFLINE when set, else the hub's."""
    if os.environ.get("HF_DATASETS_OFFLINE") is not None:
        return _env_true("HF_DATASETS_OFFLINE")
    return offline()


def endpoint() -> str:
    import huggingface_hub.constants

    return os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT


def _unreachable(error: BaseException) -> Unreachable:
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return Unreachable(f"the Hugging Face hub at {endpoint()} did not answer ({type(error).__name__}: {first})")


def offline_message(name: str, reason: str) -> str:
    return (f"cannot fetch {name!r}: {reason}, and it is not in the local cache. On a machine with hub access run "
            f"`hf download {name} --local-dir DIR`, copy DIR here and pass model.path=DIR (or model.tokenizer=DIR)")


def probe(repo_id: str, filename: str | None = None, repo_type: str = "model") -> None:
    """One request, without retries: returns if the repository (and `filename` in it) exists on the hub.
    ModelSourceError where the hub answers no (not found, gated); Unreachable where it does not answer."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if offline() or (repo_type == "dataset" and datasets_offline()):
        raise Unreachable("offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        if filename is None:
            HfApi().repo_info(repo_id, repo_type=repo_type, timeout=TIMEOUT_S)
        else:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type), timeout=TIMEOUT_S)
    except OfflineModeIsEnabled:
        raise Unreachable("offline mode is set (HF_HUB_OFFLINE)") from None
    except GatedRepoError:
        raise ModelSourceError(f"{repo_id!r} is gated on the hub: accept its terms there and log in "
                               f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{repo_id!r} is not a {repo_type} repository on {endpoint()} (or it is private: "
                               f"log in with `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError as error:
        raise ModelSourceError(f"{repo_id!r}: {str(error).splitlines()[0]}") from None
    except EntryNotFoundError:
        raise ModelSourceError(f"hub repository {repo_id!r} has no file {filename!r}") from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code < 500:
            raise ModelSourceError(f"the hub refused {repo_id!r}: {str(error).splitlines()[0]}") from None
        raise _unreachable(error) from None
    except Exception as error:  # connection, DNS, proxy, timeout errors of the HTTP client
        raise _unreachable(error) from None


def cached_file(repo_id: str, filename: str, repo_type: str = "model") -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return cached if isinstance(cached, str) else None


def file(repo_id: str, filename: str, repo_type: str = "model") -> str:
    """A local path to a hub file: the cached copy, else a download once the hub has answered `probe`."""
    cached = cached_file(repo_id, filename, repo_type)
    if cached is not None:
        return cached
    from huggingface_hub import hf_hub_download

    try:
        probe(repo_id, filename, repo_type)
        return hf_hub_download(repo_id, filename, repo_type=repo_type)
    except Unreachable as reason:
        raise ModelSourceError(offline_message(repo_id, str(reason))) from None
    except ModelSourceError:
        raise
    except Exception as error:  # the connection broke between the probe and the download
        raise ModelSourceError(offline_message(repo_id, str(_unreachable(error)))) from None


def require(repo_id: str, filename: str | None = None) -> None:
    """A hub model or tokenizer is cached (`filename` in it) or the hub answers for it; else ModelSourceError."""
    if filename is not None and cached_file(repo_id, filename) is not None:
        return
    try:
        probe(repo_id, filename)
    except Unreachable as reason:
        raise ModelSourceError(offline_message(repo_id, str(reason))) from None


# ---------------------------------------------------------------------------------------------------- datasets

def datasets_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def dataset_cached(path: str, name: str | None, cache: Path) -> bool:
    """Whether `datasets` can load (path, config name) offline: it reads <cache>/<org>___<name>/<config>/<version>/
    (a dataset read through data_files gets a config `default-<hash>`)."""
    return any(p.is_dir() for p in (cache / path.replace("/", "___")).glob(f"{name or 'default'}*/*/*"))


def require_datasets(needed: list[tuple[str, str | None]], what: str) -> None:
    """Before any work: every (dataset, config) is cached or the hub answers for it, else one ConfigError line.
    With everything cached and the hub silent, this process switches to offline mode, so that `datasets` reads the
    cache instead of retrying the hub for every dataset."""
    needed = sorted(set(needed), key=str)
    if not needed:
        return
    cache = datasets_cache()
    missing = [(p, n) for p, n in needed if not dataset_cached(p, n, cache)]
    try:
        for path in dict.fromkeys(p for p, _ in (missing or needed[:1])):
            probe(path, repo_type="dataset")
        return
    except ModelSourceError as error:
        raise ConfigError(f"{what}: {error}") from None
    except Unreachable as reason:
        if not missing:
            use_cached_datasets_only()
            return
        names = ", ".join(p if n is None else f"{p} ({n})" for p, n in missing)
        raise ConfigError(f"{what} needs the datasets {names}, but {reason}, and they are not in the datasets cache "
                          f"{cache}: run it once with hub access (or copy that machine's HF_HOME here and set HF_HOME "
                          f"/ HF_DATASETS_CACHE), or use benchmark=offline") from None


def use_cached_datasets_only() -> None:
    """Offline mode for this process, also for modules that read the environment at import."""
    import datasets
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
