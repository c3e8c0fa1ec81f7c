"""Hugging Face hub ids for --pretrained_model_name_or_path and the --*_id flags.

A hub id (`org/name`, an `--*_id` may add `@REVISION`) is resolved once, early (before the model's configs are read),
to a snapshot folder in the standard cache (`HF_HUB_CACHE`, else `HF_HOME/hub`) with huggingface_hub's
`snapshot_download`; the config then names that folder and the rest of ptrain loads it like any local checkpoint.
Only what ptrain reads is downloaded: config / tokenizer files and `.safetensors` weights (of `--variant` if given);
a --dry_run plans from the configs and fetches no weights.

Several processes: rank 0 resolves (downloads) first while the others wait at a broadcast; they then open the
same commit's snapshot from the cache (or download that commit themselves where a node has its own cache).
`HF_HUB_OFFLINE=1` resolves from the cache alone. Every failure is a ConfigError naming the id and what to do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch.distributed as dist

from ptrain.errors import ConfigError

log = logging.getLogger("ptrain")

#: `org/name` (letters, digits, `-`, `_`, `.`), as the hub spells repo ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: --*_id flags: the component each one replaces.
COMPONENT_FLAGS = {
    "transformer": "transformer_id", "vae": "vae_id", "text_encoder": "text_encoder_id",
    "tokenizer": "tokenizer_id", "text_encoder_2": "text_encoder_2_id", "tokenizer_2": "tokenizer_2_id",
}  # fmt: skip
#: Config, tokenizer and processor files (weights are added per --variant).
_SMALL_FILES = ("*.json", "*.txt", "*.model", "*.jinja")
#: Weight variants that are not downloaded unless --variant names them.
_VARIANTS = ("fp16", "bf16", "fp32", "fp8")

#: snapshot folder -> "hub id ORG/NAME at revision R" (for load errors that only know the folder).
_ORIGINS: dict[str, str] = {}


def split_id(value: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); without `@`, the revision is None."""
    repo, _, rev = value.partition("@")
    return repo, rev or None


def is_hub_id(value: str | None) -> bool:
    """Whether `value` names a hub repo rather than a local folder (an existing path always wins)."""
    if not value or Path(value).exists():
        return False
    return bool(HUB_ID.match(split_id(value)[0]))


def cache_dir() -> str:
    """The hub cache folder as huggingface_hub reads it, from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def origin(path: str | Path) -> str:
    """' (hub id ... at revision ...)' if `path` lies in a snapshot ptrain resolved, else ''."""
    for folder, what in _ORIGINS.items():
        if str(path).startswith(folder):
            return f" ({what}; `hf download {what.split()[2]}` fetches it again)"
    return ""


def patterns(prefixes: list[str], variant: str | None, weights: bool = True) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for the files ptrain reads under each prefix ('' = the repo root); without
    `weights` (a dry run) only the small files: configs and tokenizers."""
    files = (f"*.{variant}.safetensors" if variant else "*.safetensors",) if weights else ()
    allow = [f"{p}{pat}" for p in prefixes for pat in (*_SMALL_FILES, *files)]
    ignore = [f"*.{v}.safetensors" for v in _VARIANTS if v != variant]
    return allow, ignore


def _advice(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    mode = "HF_HUB_OFFLINE=1 reads the cache only: unset it, or " if offline() else ""
    return (
        f"{mode}run `hf download {repo}{rev}` (or `huggingface-cli download {repo}{rev}`) where there is network "
        f"with the same HF_HOME / HF_HUB_CACHE (now {cache_dir()}), or pass a local diffusers folder"
    )


def download(flag: str, repo: str, revision: str | None, allow: list[str], ignore: list[str], cache_only: bool) -> str:
    """snapshot_download with ptrain's error messages; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore, cache_dir=cache_dir(),
            local_files_only=cache_only or offline(),
        )  # fmt: skip
    except Exception as e:  # every hub failure (not found, gated, offline, network) says what to do
        kind = type(e).__name__
        what = {
            "RepositoryNotFoundError": "no such repo on the hub (or it is private: `hf auth login`)",
            "GatedRepoError": "the repo is gated: accept its terms on the hub and `hf auth login`",
            "RevisionNotFoundError": f"no revision {revision!r} in this repo",
            "LocalEntryNotFoundError": "not in the hub cache" + (" and HF_HUB_OFFLINE=1" if offline() else ""),
        }.get(kind, f"{kind}: {str(e).splitlines()[0] if str(e) else ''}")
        local = ""
        if kind in ("RepositoryNotFoundError", "LocalEntryNotFoundError", "HFValidationError"):
            local = f" There is no local folder {repo} either (relative to {Path.cwd()})."
        raise ConfigError(
            f"{flag} {repo}{'@' + revision if revision else ''}: {what}.{local} {_advice(repo, revision)}"
        ) from e


def _resolve_one(flag: str, value: str, name: str | None, revision: str | None, variant: str | None,
                 components: list[str], cache_only: bool, weights: bool = True) -> str:  # fmt: skip
    """The snapshot folder of one hub id: the whole pipeline (name None: model_index.json and `components`'
    subfolders) or one component (its `name/` subfolder if the repo has one, else the repo root)."""
    repo = split_id(value)[0]
    if name is None:
        allow, ignore = patterns([f"{c}/" for c in components], variant, weights)
        folder = download(flag, repo, revision, ["model_index.json", *allow], ignore, cache_only)
        if not (Path(folder) / "model_index.json").is_file():
            raise ConfigError(
                f"{flag} {repo}: not a diffusers pipeline repo (no model_index.json in {folder}); name a diffusers "
                f"repo (e.g. `...-Diffusers`) or a local folder"
            )
        return folder
    # A component repo: a small first pass finds whether it has a `name/` subfolder (a full pipeline repo).
    folder = download(flag, repo, revision, ["*.json"], [], cache_only)
    prefix = f"{name}/" if (Path(folder) / name).is_dir() else ""
    allow, ignore = patterns([prefix], variant, weights)
    return download(flag, repo, revision, allow, ignore, cache_only)


def _jobs(m) -> list[tuple[str, str, str | None, str | None]]:
    """(flag, value, component name or None for the pipeline, revision) of every hub id in ModelArgs `m`."""
    jobs = []
    if is_hub_id(m.pretrained_model_name_or_path):
        value = m.pretrained_model_name_or_path
        jobs.append(("--pretrained_model_name_or_path", value, None, split_id(value)[1] or m.revision))
    for name, attr in COMPONENT_FLAGS.items():
        value = getattr(m, attr)
        if is_hub_id(value):
            jobs.append((f"--{attr}", value, name, split_id(value)[1]))
    return jobs


def check_snapshot(flag: str, value: str, folder: str, needed: list[str], overridden: set[str]) -> None:
    """The pipeline snapshot has a subfolder for every component ptrain loads from it."""
    missing = [c for c in needed if c not in overridden and not (Path(folder) / c).is_dir()]
    if missing:
        raise ConfigError(
            f"{flag} {value}: the snapshot {folder} has no {', '.join(c + '/' for c in missing)} folder (the repo "
            f"lacks it or the cached copy is partial). {_advice(value, None)}"
        )


def peek_checkpoint(m) -> str:
    """The snapshot folder of the --pretrained_model_name_or_path hub id with only its model_index.json and
    transformer config (small files: every rank may read them from the cache or fetch them), to tell its model
    family before the components are fetched."""
    value = m.pretrained_model_name_or_path
    repo, rev = split_id(value)
    return download("--pretrained_model_name_or_path", repo, rev or m.revision,
                    ["model_index.json", "transformer/config.json"], [], False)  # fmt: skip


def resolve_model_sources(m, needed: list[str], optional: list[str] = (), weights: bool = True) -> dict[str, str]:
    """Replace the hub ids in ModelArgs `m` with their snapshot folders (in place); returns {flag: original id}.

    `needed`: the components the model loads (their subfolders are fetched from the pipeline repo unless an
    --*_id replaces them); `optional`: ones fetched if the repo has them; `weights` False (--dry_run, which
    plans from the configs): configs and tokenizer files only, no weights. Collective when several processes
    run and any id is given: rank 0 first, then the others from the commits rank 0 resolved."""
    jobs = _jobs(m)
    if not jobs:
        return {}
    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if multi else 0
    overridden = {n for n, a in COMPONENT_FLAGS.items() if getattr(m, a)}
    subfolders = [c for c in (*needed, *optional) if c not in overridden]
    payload: list = [None, None]
    if rank == 0:
        try:
            payload[1] = [_resolve_one(f, v, n, r, m.variant, subfolders, False, weights) for f, v, n, r in jobs]
        except ConfigError as e:
            payload[0] = str(e)
    if multi:  # the other ranks wait here while rank 0 downloads
        dist.broadcast_object_list(payload, src=0)
    if payload[0] is not None:
        raise ConfigError(payload[0])
    folders = payload[1]
    if rank != 0:  # the same commits (a snapshot folder is named by its commit), from this node's cache if there
        folders = []
        for (f, v, n, _), done in zip(jobs, payload[1]):
            commit = Path(done).name
            try:
                try:
                    folders.append(_resolve_one(f, v, n, commit, m.variant, subfolders, True, weights))
                except ConfigError:  # not in this node's cache: download that commit
                    folders.append(_resolve_one(f, v, n, commit, m.variant, subfolders, False, weights))
            except ConfigError as e:  # only rank 0 prints ConfigErrors: say it here
                log.error("rank %d: %s", rank, e)
                raise
    originals = {}
    for (flag, value, name, rev), folder in zip(jobs, folders):
        what = f"hub id {split_id(value)[0]} at revision {rev or 'main'} (commit {Path(folder).name})"
        _ORIGINS[folder] = what
        log.info("%s %s -> %s", flag, value, folder)
        originals[flag] = value
        if name is None:
            check_snapshot(flag, value, folder, list(needed), overridden)
            m.pretrained_model_name_or_path = folder
        else:
            setattr(m, COMPONENT_FLAGS[name], folder)
    return originals
