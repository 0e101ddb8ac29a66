"""Reaching a dataset on the Hub: `load_hub_dataset` downloads only the splits a run needs and turns every way of
not reaching the dataset (offline, gated, private, misspelt, a loading script) into one `DatasetUnavailableError`.

`hub_dataset_path` is the one place where a Hub id becomes what `datasets` loads. `load_hub_dataset` looks it up
on the package (`hf_gam.vision.hub_dataset_path`), so a test can point it at a local folder laid out like the
Hub repository by replacing that one attribute.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from .errors import DatasetUnavailableError


@contextlib.contextmanager
def _quiet_hub_retries() -> Iterator[None]:
    """Silence the Hub client's per-retry warnings; the error that follows says what happened."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _unavailable(dataset_name: str, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Cannot load dataset {dataset_name!r}: {reason}. If it is gated (ImageNet-1k is), accept its terms on "
        f"https://huggingface.co/datasets/{dataset_name} and log in with `hf auth login` (or set HF_TOKEN). If this "
        "machine is offline, download it once where the Hub is reachable and run with HF_HUB_OFFLINE=1 and the same "
        "cache (`--cache_dir` / HF_HOME), or use local folders with `--train_dir/--validation_dir`."
    )


def hub_dataset_path(dataset_name: str) -> str:
    """What `datasets` is given for the Hub id `dataset_name`: the id itself.

    The one place where a Hub id becomes a path; tests point `hf_gam.vision.hub_dataset_path` at a local folder laid
    out like the Hub repository.
    """
    return dataset_name


@contextlib.contextmanager
def _hub_errors(dataset_name: str) -> Iterator[None]:
    """Turn every way of not reaching `dataset_name` into one `DatasetUnavailableError`."""
    import datasets
    from huggingface_hub import errors as hub_errors

    try:
        with _quiet_hub_retries():
            yield
    except hub_errors.GatedRepoError:
        raise _unavailable(dataset_name, "it is gated and this account has no access (or no token was found)") from None
    except datasets.exceptions.DatasetNotFoundError as error:
        gated = "gated" in str(error).lower()
        reason = "it is gated and no valid token was found" if gated else "it does not exist or is private"
        raise _unavailable(dataset_name, reason) from None
    except hub_errors.OfflineModeIsEnabled:
        raise _unavailable(dataset_name, "HF_HUB_OFFLINE is set and it is not in the local cache") from None
    except ConnectionError as error:  # datasets' own ConnectionError subclasses this builtin
        if "OfflineModeIsEnabled" in str(error) or datasets.config.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        else:
            reason = "the Hub cannot be reached (no network, or a proxy/firewall blocks huggingface.co)"
        raise _unavailable(dataset_name, reason) from None
    except RuntimeError as error:
        if "scripts are no longer supported" in str(error):
            raise DatasetUnavailableError(
                f"Dataset {dataset_name!r} is published with a loading script, which this version of `datasets` "
                "does not run. Try the Hub's Parquet conversion: `--dataset_revision refs/convert/parquet`."
            ) from None
        raise


def load_hub_dataset(
    dataset_name: str,
    config_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    splits: Callable[[list[str]], list[str]] | None = None,
):
    """`datasets.load_dataset` on a Hub id, downloading only the splits the run needs.

    `splits` receives the dataset's split names (read from its card and file list, before any data file is
    downloaded) and returns the ones to load; `None` loads every split. Every way of not reaching the dataset
    becomes one `DatasetUnavailableError`.
    """
    import datasets

    import hf_gam.vision  # `hub_dataset_path` is read from the package, where tests replace it

    path = hf_gam.vision.hub_dataset_path(dataset_name)
    with _hub_errors(dataset_name):
        builder = datasets.load_dataset_builder(path, config_name, revision=revision, cache_dir=cache_dir)
        files = builder.config.data_files
        if splits is None or not files:
            return datasets.load_dataset(path, config_name, revision=revision, cache_dir=cache_dir)
        wanted = splits(list(files))
        data_files = {split: list(files[split]) for split in wanted}
        return datasets.load_dataset(path, config_name, data_files=data_files, revision=revision, cache_dir=cache_dir)
