"""The conversion source: a local folder or a Hugging Face Hub repo in the published layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

from .plan import PlanError
from .safetensors_io import SafeTensorsFile

HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
    "model*.safetensors",
]


def resolve(source: str, progress: bool = True) -> Path:
    """A folder for `source`: itself if it is a local folder, else a Hub snapshot.

    Honours HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN (huggingface_hub does); makes no
    network call when the snapshot is already complete in the cache.
    """
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise PlanError(f"{source} is not a folder")
        return p
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise PlanError(f"{source} is neither a folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes"):
        raise PlanError(f"{source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise PlanError(f"could not download {source} from the Hugging Face Hub ({e})") from None


class Source:
    """Headers of every shard of a published checkpoint, opened lazily (memory-mapped)."""

    def __init__(self, folder: Path):
        self.folder = folder
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise PlanError(f"{folder} has no config.json")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{cfg} is not valid JSON ({e})") from None
        if self.config.get("model_type") != "deepseek_v4":
            raise PlanError(
                f"{folder} is not a DeepSeek-V4 checkpoint (model_type is "
                f"{self.config.get('model_type')!r})"
            )
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise PlanError(f"{folder} holds no .safetensors shards")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise PlanError(f"shard {missing[0]} named by the index is missing from {folder}")
        self.files: Dict[str, SafeTensorsFile] = {}
        self.where: Dict[str, str] = {}
        for f in files:
            try:
                st = SafeTensorsFile(folder / f)
            except ValueError as e:
                raise PlanError(str(e)) from None
            self.files[f] = st
            for k in st.keys():
                self.where[k] = f
        for k, f in weight_map.items():
            if self.where.get(k) != f:
                raise PlanError(f"the index puts {k} in {f}, but that shard does not hold it")

    def listing(self) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
        return {k: self.files[f].info(k) for k, f in self.where.items()}

    def get(self, name: str):
        return self.files[self.where[name]].read(name)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)
