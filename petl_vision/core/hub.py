"""Local path or Hugging Face Hub repo id -> local file: one resolution rule for every loader.

    from petl_vision.core.hub import resolve_file
    path = resolve_file("runs/spm", "spm.safetensors")       # a local folder: runs/spm/spm.safetensors
    path = resolve_file("runs/spm/spm.safetensors")          # a local file: itself
    path = resolve_file("user/erase-dog", "spm.safetensors") # a Hub repo: hf_hub_download

A local path always wins: a string is looked up on the Hub only when nothing of that name exists
locally and it has the form ``namespace/name``. Downloads go through huggingface_hub, so its cache
(``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` (cache only) and ``revision=`` (branch, tag or commit)
work as for any Hub library. Failures raise FileNotFoundError naming the path / repo and the file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# namespace/name, each [A-Za-z0-9_.-], not starting with "." or "-" (huggingface_hub validates the rest).
_REPO_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def is_repo_id(path_or_repo_id: str | os.PathLike) -> bool:
    """True when `path_or_repo_id` names no local path and looks like a Hub repo id ``namespace/name``."""
    if not isinstance(path_or_repo_id, str) or Path(path_or_repo_id).exists():
        return False
    return bool(_REPO_ID.match(path_or_repo_id)) and ".." not in path_or_repo_id and "--" not in path_or_repo_id


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str | None = None, revision: str | None = None) -> Path:
    """Local path of `filename` in a local folder or Hub repo, or of a local file given directly.

    Args:
        path_or_repo_id: a local file, a local folder (then `filename` in it), or a Hub repo id.
        filename: the file inside the folder / repo; required for folders and repo ids.
        revision: Hub branch, tag or commit (repo ids only; default: main).
    """
    path = Path(path_or_repo_id)
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None:
            raise IsADirectoryError(f"{path}: is a folder; name the file in it")
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path / filename}: no such file in the folder {path}")
        return path / filename
    if not is_repo_id(path_or_repo_id):
        raise FileNotFoundError(f"{path}: no such file or folder (nor a Hub repo id of the form 'namespace/name')")
    if filename is None:
        raise ValueError(f"{path_or_repo_id}: a Hub repo id needs the file name inside the repo")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path_or_repo_id), filename, revision=revision))
    except Exception as e:  # huggingface_hub: missing repo / file / revision, offline with no cache, network
        raise FileNotFoundError(_hub_failure(path_or_repo_id, filename, revision, e)) from e


def resolve_dir(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or the snapshot folder of a Hub repo (snapshot_download of `allow_patterns`)."""
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    if not is_repo_id(path_or_repo_id):
        raise FileNotFoundError(f"{path}: no such file or folder (nor a Hub repo id of the form 'namespace/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=allow_patterns))
    except Exception as e:
        cached = _cached_snapshot(str(path_or_repo_id), revision)
        if cached is not None:  # offline with a commit hash: older huggingface_hub asks the network first
            return cached
        raise FileNotFoundError(_hub_failure(path_or_repo_id, None, revision, e)) from e


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo_id` at a full commit hash, or None."""
    if revision is None or re.fullmatch(r"[0-9a-f]{40}", revision) is None:
        return None
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
    return folder if folder.is_dir() else None


def upload_folder(directory: str | os.PathLike, repo_id: str, *, revision: str | None = None,
                  commit_message: str | None = None, private: bool | None = None,
                  token: str | bool | None = None, create_pr: bool = False,
                  ignore_patterns: list[str] | None = None) -> str:
    """Create `repo_id` if needed and upload the files of `directory` to it (huggingface_hub's
    `create_repo` and `upload_folder`). Returns the commit url."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:  # uploading to a branch needs the branch
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), revision=revision,
                             commit_message=commit_message or "Upload petl_vision adapter", create_pr=create_pr,
                             ignore_patterns=ignore_patterns)
    return str(getattr(info, "commit_url", info))


def _hub_failure(repo_id, filename, revision, error: Exception) -> str:
    what = f"{filename!r} of Hub repo {repo_id!r}" if filename else f"Hub repo {repo_id!r}"
    rev = f" at revision {revision!r}" if revision else ""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if _offline() else ""
    return f"{repo_id}: no local file or folder of that name, and {what}{rev} could not be fetched{offline}: {type(error).__name__}: {reason}"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
