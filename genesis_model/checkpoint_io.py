"""How checkpoint bytes reach the disk and come back: hashed as they are written, verified in parallel as they are
read, and metadata unpickled only into the classes DCP's metadata is made of.

Writing. `HashingWriter` is DCP's `FileSystemWriter` with several writer threads per rank (one file each, so a
rank's shards go to disk in parallel) whose streams hash every byte on its way to the file. Each rank records the
digests of the files it wrote in `hashes/__<rank>.json`; the checkpoint's marker (`COMPLETE.json`) is built from
those, so nothing is read back to be hashed (the reference-scale save spent most of its time doing exactly that).

Digest: xxh3-128 (the `xxhash` package), ~28 GB/s on one core here against sha256's 1.4 GB/s. It guards against
damage (flipped bits, truncation, a copy gone wrong), which is what a checkpoint marker is for; a signature
against tampering would be a different tool. Markers written before it (`sha256`) still verify.

Reading. torch's `FileSystemReader.read_metadata` calls plain `pickle.load` on `.metadata`: a crafted
checkpoint directory would run code on load. `SafeReader` unpickles it with an allow-list of the classes DCP's
metadata consists of, and refuses anything else in one line.

Reading data. DCP's reader `torch.load`s every tensor into a fresh CPU tensor (its pages faulted in as the bytes
arrive), then copies that to the GPU from pageable memory, tensor by tensor. `SafeReader` reads each shard file
in its own thread, front to back, and puts each tensor's bytes straight where they belong: `torch.load` (still
`weights_only`) reads only the small pickled header of a tensor's entry (`map_location="meta"`: shape, dtype,
where the bytes lie), then the bytes go with large positional reads into the destination itself (a CPU tensor)
or into two reused pinned buffers per thread whose copies to the GPU run while the next chunk is read. Any
entry this does not cover (a dtype conversion, a piece or destination that is not contiguous, a file written
through a storage extension, a torch too old to say where a tensor's bytes lie) is read the way DCP reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.checkpoint.utils import _create_file_view
from torch.distributed.checkpoint._traverse import set_element

from genesis.errors import CheckpointError

HASHES_DIR = "hashes"
DIGEST = "xxh3_128"
WRITER_THREADS = 8
CHUNK_BYTES = 1 << 24
READ_CHUNK_BYTES = 1 << 25  # per pinned staging buffer (two per reading thread)


def new_digest():
    return xxhash.xxh3_128()


def file_digest(path: Path, algorithm: str = DIGEST) -> str:
    digest = new_digest() if algorithm == DIGEST else hashlib.new(algorithm)
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------------------
# Writing


class _HashingStream(io.RawIOBase):
    """A binary file that hashes what is written to it. DCP only writes forward (it asks `tell()` for offsets,
    never seeks back), so the digest is that of the file's bytes."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = new_digest()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        written = self.handle.write(view)
        self.size += len(view)
        return written

    def tell(self) -> int:
        return self.handle.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        if (offset, whence) not in ((self.tell(), io.SEEK_SET), (0, io.SEEK_CUR)):
            raise io.UnsupportedOperation("checkpoint streams are written forward only (hashed as written)")
        return self.tell()

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


class _HashingFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.digests: dict[str, dict] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        with path.open(mode) as handle:
            stream = _HashingStream(handle)
            yield stream
            handle.flush()
        with self._lock:
            self.digests[path.name] = {"bytes": stream.size, DIGEST: stream.digest.hexdigest()}


class HashingWriter(FileSystemWriter):
    """DCP's file writer, `threads` files per rank written in parallel, each hashed as it is written; the digests
    of this rank's shard files land in `hashes/__<rank>.json` once they are all on disk (and fsynced)."""

    def __init__(self, path: str | Path, threads: int = WRITER_THREADS, cache_staged_state_dict: bool = False):
        super().__init__(str(path), thread_count=threads, sync_files=True,
                         cache_staged_state_dict=cache_staged_state_dict)
        self.fs = _HashingFileSystem()

    def reset(self, checkpoint_id=None) -> None:
        """A writer reused for the next checkpoint (so its pinned staging buffers are too): fresh digests."""
        super().reset(checkpoint_id)
        self.fs.digests.clear()

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)  # synchronous: every file is written when it returns
        shard_digests = {name: entry for name, entry in self.fs.digests.items() if name.endswith(".distcp")}
        directory = Path(self.path) / HASHES_DIR
        directory.mkdir(exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0  # the global rank: unique in any process group
        target = directory / f"__{rank}.json"
        tmp = target.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(shard_digests, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        return future


def digests_for_marker(path: Path) -> dict[str, dict]:
    """Every file of a checkpoint directory with its size and digest: shard files from the digests their writers
    recorded (checked against the size on disk), the rest (metadata, trainer state, meta.json) hashed here:
    they are small."""
    recorded: dict[str, dict] = {}
    for sidecar in sorted((path / HASHES_DIR).glob("__*.json")):
        recorded.update(json.loads(sidecar.read_text()))
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = str(file.relative_to(path))
        entry = recorded.get(name)
        size = file.stat().st_size
        if entry is None or entry["bytes"] != size:
            entry = {"bytes": size, DIGEST: file_digest(file)}
        files[name] = entry
    return files


def verify_files(path: Path, files: dict[str, dict], threads: int = WRITER_THREADS) -> None:
    """Every listed file exists with its size and digest (xxh3-128, or sha256 in older markers), checked in
    parallel threads (reading overlaps hashing)."""
    for name, entry in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file}: missing or truncated; this checkpoint is damaged, resume from another")

    def check(item):
        name, entry = item
        algorithm = DIGEST if DIGEST in entry else "sha256"
        if file_digest(path / name, algorithm) != entry[algorithm]:
            return path / name
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for bad in pool.map(check, sorted(files.items(), key=lambda item: -item[1]["bytes"])):
            if bad is not None:
                raise CheckpointError(f"{bad}: checksum mismatch; this checkpoint is damaged, use another")


# -------------------------------------------------------------------------------------------------------------
# Reading metadata without running code


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source}: checkpoint metadata names {module}.{name}, which DCP metadata never "
                              f"contains; refusing to load it (the directory may be crafted): use a checkpoint you made")


def read_metadata_safely(path: Path):
    try:
        with open(path, "rb") as handle:
            return _MetadataUnpickler(handle, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; this is not a complete checkpoint") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}); the checkpoint is "
                              f"damaged, use another") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but the non-tensor entries of a checkpoint (optimizer hyper-parameters, stored as
    pickled bytes inside the shard files) are read with `torch.load(weights_only=True)`: the default planner
    reads them with `weights_only=False`, which would run whatever a crafted shard file carries."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} holds more than plain values "
                                  f"({str(err).splitlines()[0][:160]}); refusing to load it: use a checkpoint you "
                                  f"made") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _pread_into(fd: int, offset: int, buffer) -> None:
    """Fill `buffer` (a writable buffer) with the file's bytes from `offset`: positional reads, no shared file
    position, the GIL released while the kernel copies."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise CheckpointError(f"shard file ends at byte {offset + done} but its entry needs {len(view) - done} "
                                  f"more; the checkpoint is damaged, use another")
        done += count


class _GpuStaging:
    """One reading thread's way to the GPU: two pinned buffers, each chunk read from the file into one while the
    other's copy to the device runs on this thread's own stream."""

    def __init__(self, device: torch.device, chunk: int = READ_CHUNK_BYTES):
        self.chunk = chunk
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device=device)
        self.turn = 0

    def fill(self, fd: int, offset: int, destination: torch.Tensor) -> None:
        """Queue the file's bytes from `offset` into `destination` (flat uint8 on the device); `wait()` before
        anything reads it."""
        total = destination.numel()
        done = 0
        with torch.cuda.stream(self.stream):
            while done < total:
                turn, self.turn = self.turn, self.turn ^ 1
                if self.copied[turn] is not None:
                    self.copied[turn].synchronize()  # that buffer's previous copy has left it
                count = min(self.chunk, total - done)
                buffer = self.buffers[turn][:count]
                _pread_into(fd, offset + done, buffer.numpy())
                destination[done:done + count].copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
                self.copied[turn] = event
                done += count

    def wait(self) -> None:
        self.stream.synchronize()


class SafeReader(FileSystemReader):
    """DCP's file reader, its metadata read through the allow-list above, and a rank's files read in parallel
    threads (one file each: the writer split every rank's shards into `WRITER_THREADS` files), each tensor's
    bytes read straight into its destination (see the module's docstring). Through DCP's own per-tensor path
    (`torch.load` to CPU, then a pageable copy), genesis-1b's 11 GiB took 44 s on an H200 with 8 threads and the
    files in the page cache."""

    def __init__(self, path: str | Path, threads: int = WRITER_THREADS):
        super().__init__(str(path))
        self.threads = threads

    def read_data(self, plan, planner):
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        transformed = any(getattr(self.storage_data[item.storage_index], "transform_descriptors", None)
                          for item in plan.items)
        if transformed:  # written through a storage extension (compression, ...): DCP's own path, per file
            read_one = lambda items: super(SafeReader, self).read_data(dataclasses.replace(plan, items=items),  # noqa: E731
                                                                        planner).wait()
        else:
            read_one = lambda items: self._read_file(items, planner)  # noqa: E731
        on_gpu = torch.cuda.is_initialized()  # if not, no destination lives on a GPU
        if on_gpu:
            torch.cuda.synchronize()  # queued work may still write the destinations (DCP's optimizer init does)
        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(per_file)))) as pool:
            list(pool.map(read_one, per_file.values()))
        if on_gpu and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the staging buffers' pinned memory, back to the system
        future = torch.futures.Future()  # what DCP's readers return (it waits on it)
        future.set_result(None)
        return future

    def _read_file(self, items: list, planner) -> None:
        items = sorted(items, key=lambda item: self.storage_data[item.storage_index].offset)  # front to back
        path = self.fs.concat_path(self.path, self.storage_data[items[0].storage_index].relative_path)
        staging: dict[torch.device, _GpuStaging] = {}
        try:
            with open(path, "rb") as stream:
                fd = stream.fileno()
                for item in items:
                    info = self.storage_data[item.storage_index]
                    if item.type == LoadItemType.BYTE_IO:
                        data = bytearray(info.length)
                        _pread_into(fd, info.offset, data)
                        planner.load_bytes(item, io.BytesIO(data))
                        continue
                    target = planner.resolve_tensor(item).detach()
                    if not self._read_tensor_direct(stream, info, item, target, staging):
                        tensor = torch.load(_create_file_view(stream, info.offset, info.length), map_location="cpu",
                                            weights_only=True)
                        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
                        if target.size() != tensor.size():
                            raise CheckpointError(f"checkpoint entry {item.dest_index.fqn}: stored piece "
                                                  f"{tuple(tensor.size())} does not fit {tuple(target.size())}")
                        target.copy_(tensor)
                    for gpu in staging.values():
                        gpu.wait()  # the bytes are on the device before the planner sees the tensor
                    planner.commit_tensor(item, target)
        finally:
            for gpu in staging.values():
                gpu.wait()

    @staticmethod
    def _read_tensor_direct(stream, info, item, target: torch.Tensor, staging: dict) -> bool:
        """Read one tensor entry's bytes into `target` without a CPU tensor of its own; False where this path does
        not apply (the caller then reads it as DCP does)."""
        if target.device.type not in ("cpu", "cuda") or not target.is_contiguous():
            return False
        # weights_only as ever; "meta" reads the entry's pickled header only: shape, dtype, strides and the
        # offset of its bytes inside the entry.
        layout = torch.load(_create_file_view(stream, info.offset, info.length), map_location="meta",
                            weights_only=True)
        if not isinstance(layout, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {item.dest_index.fqn} holds a {type(layout).__name__} where "
                                  f"DCP stores a tensor; the checkpoint is damaged, use another")
        storage = layout.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)
        piece = narrow_tensor_by_index(layout, item.storage_offsets, item.lengths)
        if start is None or not piece.is_contiguous() or piece.dtype != target.dtype:
            return False
        if target.size() != piece.size():
            raise CheckpointError(f"checkpoint entry {item.dest_index.fqn}: stored piece {tuple(piece.size())} "
                                  f"does not fit {tuple(target.size())}")
        if start < 0 or start + storage.nbytes() > info.length:
            raise CheckpointError(f"checkpoint entry {item.dest_index.fqn}: its bytes lie outside the entry; the "
                                  f"checkpoint is damaged, use another")
        offset = info.offset + start + piece.storage_offset() * piece.element_size()
        destination = target.reshape(-1).view(torch.uint8)
        if destination.numel() == 0:
            return True
        if target.device.type == "cpu":
            _pread_into(stream.fileno(), offset, destination.numpy())
            return True
        gpu = staging.get(target.device)
        if gpu is None:
            gpu = staging[target.device] = _GpuStaging(target.device)
        gpu.fill(stream.fileno(), offset, destination)
        return True

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata_safely(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
