"""A local stand-in for the Hub behind `HfApi.create_repo` and `HfApi.upload_folder`."""

import concurrent.futures
import shutil
from pathlib import Path

from huggingface_hub import RepoUrl
from huggingface_hub.utils import filter_repo_objects


class FakeHub:
    """Stands in for the Hub behind `HfApi.create_repo` and `HfApi.upload_folder`: uploads land in a folder."""

    def __init__(self, root: Path):
        self.root = root
        self.created: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.created.append(repo_id)
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, path_in_repo=None, commit_message=None, token=None,
                      run_as_future=False, ignore_patterns=None, allow_patterns=None, **kwargs):
        self.uploads.append({"repo_id": repo_id, "token": token, "message": commit_message})
        target = self.root / repo_id / (path_in_repo or "")
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for relative in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / relative, target / relative)
        result = f"https://huggingface.co/{repo_id}/commit/0"
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(result)
            return future
        return result
