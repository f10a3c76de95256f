"""Where a run's checkpoints live, and how a complete one gets there: a directory every node mounts, or object
storage for nodes that share no file system.

Under the store's root (RUN/checkpoints, or URI/NAME/checkpoints with `checkpoint_storage: URI`), <tag>/ holds
DeepSpeed's files, one `rank<r>_state.pt` per rank and `manifest.json` (every other file's size and sha256, the
world size, the ZeRO stage); `latest` names the newest published tag.

A save: every rank writes its own files into a directory of its own, hashes them and hands them to the store
(`put`); rank 0 gathers every rank's list, writes the manifest, publishes the tag and only then moves `latest`.
- A directory: a rank writes under <tag>.tmp/rank<r>/ and moves its files into <tag>.tmp/ (renames); publishing
  renames <tag>.tmp to <tag>, so a tag directory is complete by construction.
- Object storage (s3://, gs://, ... through pyarrow.fs, the file systems of Ray Train's storage_path): a rank
  writes into a local temp directory and uploads into <tag>/. Object stores rename nothing: the manifest,
  written last, is what makes a tag complete. To resume, each rank downloads the tag and checks every file's
  sha256 against the manifest.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from transrec.config import Config, ConfigError
from transrec.dataloading.item_store import file_problems, size_problem
from transrec.fileio import fsync

MANIFEST, LATEST = "manifest.json", "latest"
STAGING, REPLACED = ".tmp", ".old"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step"))


def is_tag(name: str) -> bool:
    return name.startswith("step") and name.removeprefix("step").isdigit()


class CheckpointStore:
    """The checkpoints under `location`: a local path (a directory store) or a URI (object storage; a file://
    URI is a directory store too)."""

    def __init__(self, location: str | Path):
        location = str(location).rstrip("/")
        if "://" in location:
            self.fs, self.root = pafs.FileSystem.from_uri(location)
            self.location = location
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).absolute())
            self.location = self.root
        self.is_directory = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.location

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def where(self, *parts: str) -> str:
        """How messages name a place in the store (with its URI scheme)."""
        return "/".join([self.location, *parts])

    # --- reading

    def _exists(self, relpath: str) -> bool:
        return self.fs.get_file_info(self.path(relpath)).type != pafs.FileType.NotFound

    def _read(self, relpath: str) -> bytes:
        if not self._exists(relpath):
            raise FileNotFoundError(self.where(relpath))
        with self.fs.open_input_stream(self.path(relpath)) as f:
            return f.read()

    def tags(self) -> list[str]:
        """Published-looking tags (stepN directories; not staging or replaced ones), oldest first."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and is_tag(i.base_name)),
                      key=step_of)

    def latest(self) -> str | None:
        try:
            return self._read(LATEST).decode().strip()
        except FileNotFoundError:
            return None

    def read_manifest(self, tag: str) -> dict:
        return json.loads(self._read(f"{tag}/{MANIFEST}"))

    def saved_bytes(self, tag: str) -> int:
        """Size of a checkpoint as saved (its manifest's files: not a universal conversion made later)."""
        return sum(f["bytes"] for f in self.read_manifest(tag)["files"].values())

    def problems(self, tag: str) -> list[str]:
        """What is wrong with `tag`, checked against its manifest; empty when it looks intact. A directory: every
        file's size and sha256, in place. Object storage: sizes (the sha256 are checked on download, `fetch`)."""
        try:
            manifest = self.read_manifest(tag)
        except FileNotFoundError:
            return [f"{MANIFEST}: missing (the save did not finish)"]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return [f"{MANIFEST}: unreadable: {err}"]
        if self.is_directory:
            return [f"{name}: {problem}" for name, problem in file_problems(self.path(tag), manifest)]
        names = list(manifest["files"])
        found = []
        for name, info in zip(names, self.fs.get_file_info([self.path(tag, n) for n in names])):
            if info.type == pafs.FileType.NotFound:
                found.append(f"{name}: missing")
            elif wrong_size := size_problem(info.size, manifest["files"][name]["bytes"]):
                found.append(f"{name}: {wrong_size}")
        return found

    def fetch(self, tag: str) -> tuple[Path, list[str]]:
        """A local directory D with D/<tag> to load from, and what is wrong with it. A directory store: itself
        (checked by `problems`). Object storage: a download into a new temp directory (the caller removes it),
        each file checked against its sha256."""
        if self.is_directory:
            return Path(self.root), []
        local = Path(tempfile.mkdtemp(prefix=f"transrec-{tag}-"))
        (local / tag).mkdir()
        pafs.copy_files(self.path(tag), str(local / tag), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        manifest = json.loads((local / tag / MANIFEST).read_text())
        return local, [f"{name}: {problem}" for name, problem in file_problems(local / tag, manifest)]

    # --- writing (see the module's docstring for the protocol)

    def _write(self, relpath: str, data: bytes) -> None:
        if self.is_directory:  # a whole file or none: written aside, flushed, renamed
            target = Path(self.path(relpath))
            staging = target.with_name(target.name + STAGING)
            staging.write_bytes(data)
            fsync(staging)
            staging.replace(target)
        else:  # an object PUT is all or nothing
            with self.fs.open_output_stream(self.path(relpath)) as f:
                f.write(data)

    def _staging(self, tag: str) -> str:
        return tag + STAGING if self.is_directory else tag

    def begin(self, tag: str) -> None:
        """Rank 0, before any rank writes `tag`: clears what a crashed save left. On object storage a save of
        a tag that exists (the same step saved again after a resume) first takes its manifest away, so that
        the tag counts as incomplete until the new one is whole."""
        if self.is_directory:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.path(self._staging(tag)), ignore_errors=True)
        elif self._exists(f"{tag}/{MANIFEST}"):
            self.fs.delete_file(self.path(tag, MANIFEST))

    def private_dir(self, tag: str, rank: int) -> Path:
        """A directory D for this rank's files of `tag` alone, in D/<tag>/ (DeepSpeed's save_dir and tag)."""
        if self.is_directory:  # on the store's own file system, so that `put` renames
            private = Path(self.path(self._staging(tag), f"rank{rank}"))
        else:
            private = Path(tempfile.mkdtemp(prefix=f"transrec-{tag}-rank{rank}-"))
        (private / tag).mkdir(parents=True, exist_ok=True)
        return private

    def put(self, private: Path, tag: str) -> None:
        """Moves a rank's files of `tag` from its private directory into the tag being saved."""
        source = private / tag
        if self.is_directory:
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                target = Path(self.path(self._staging(tag))) / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
        else:
            pafs.copy_files(str(source), self.path(tag), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        shutil.rmtree(private)

    def publish(self, tag: str, manifest: dict, keep: int, protected: set[str]) -> None:
        """Rank 0, once every rank has put its files: the manifest, the tag, `latest`; then keeps the newest
        `keep` tags (and the protected ones, e.g. the best) and removes what crashed saves left."""
        self._write(f"{self._staging(tag)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        if self.is_directory:
            staging, final = Path(self.path(self._staging(tag))), Path(self.path(tag))
            if final.exists():  # the same step saved again (e.g. an epoch end reached right after a resume)
                replaced = final.with_name(final.name + REPLACED)
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
                staging.rename(final)
                shutil.rmtree(replaced)
            else:
                staging.rename(final)
        self._write(LATEST, tag.encode())
        for old in self.tags()[:-max(keep, 1)]:
            if old not in protected:
                self.fs.delete_dir(self.path(old))
        if self.is_directory:
            for stale in [*Path(self.root).glob(f"step*{STAGING}"), *Path(self.root).glob(f"step*{REPLACED}")]:
                shutil.rmtree(stale, ignore_errors=True)
        else:
            for unfinished in self.tags():
                if not self._exists(f"{unfinished}/{MANIFEST}"):
                    self.fs.delete_dir(self.path(unfinished))

    def check_writable(self, who: str = "") -> None:
        """Fails now, with the reason, when the store cannot be created or written (from `who`'s node)."""
        probe = f".write-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            if self.is_directory:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path(probe)) as f:
                f.write(b"ok")
            self.fs.delete_file(self.path(probe))
        except OSError as err:
            where = f" from {who}" if who else ""
            raise ConfigError(f"checkpoint storage {self} is not writable{where}: {err.strerror or err}") from None


def run_checkpoints(cfg: Config) -> CheckpointStore:
    """The store of run `cfg.name`: CHECKPOINT_STORAGE/NAME/checkpoints, or RUN/checkpoints by default."""
    if cfg.checkpoint_storage:
        return CheckpointStore(f"{cfg.checkpoint_storage.rstrip('/')}/{cfg.name}/checkpoints")
    return CheckpointStore(cfg.run_dir / "checkpoints")
