"""HF checkpoint directories: a lazy tensor reader and a streaming, atomic safetensors writer."""

import json
import os
import shutil
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megalong.atomic import atomic_directory
from megalong.config.hf_config import arch_from_hf_config
from megalong.errors import MegalongError
from megalong.log import ProgressPrinter
from megalong.records import read_json_object


# Weight layouts in the order we look for them: (index file, single file).
_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointReader:
    """Tensors of an HF checkpoint directory, read one at a time (a 70B model is never in RAM at once).

    Reads model.safetensors, sharded safetensors with model.safetensors.index.json,
    pytorch_model.bin, or sharded .bin with pytorch_model.bin.index.json.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise MegalongError(f"HF checkpoint directory {self.path} does not exist")
        self.config_path = os.path.join(self.path, "config.json")
        self.config = read_json_object(self.config_path, "an HF checkpoint directory needs a config.json")
        self._handles = {}  # file name -> safe_open handle or a (mmapped) state dict
        self._file_of = self._find_weights()  # tensor name -> file name in self.path

    def _find_weights(self) -> dict[str, str]:
        for index_name, single_name in _LAYOUTS:
            index_path = os.path.join(self.path, index_name)
            if os.path.exists(index_path):
                weight_map = read_json_object(index_path, "").get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise MegalongError(f"{index_path} has no weight_map")
                for file in dict.fromkeys(weight_map.values()):
                    if not os.path.isfile(os.path.join(self.path, file)):
                        raise MegalongError(f"{index_path} names shard {file}, which is missing from {self.path}")
                return dict(weight_map)
            if os.path.isfile(os.path.join(self.path, single_name)):
                return {name: single_name for name in self._open(single_name).keys()}
        raise MegalongError(
            f"no weights in {self.path}: expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _open(self, file: str):
        if file not in self._handles:
            path = os.path.join(self.path, file)
            try:
                if file.endswith(".safetensors"):
                    handle = safe_open(path, framework="pt", device="cpu")
                else:
                    handle = _load_bin(path)
            except Exception as e:  # safetensors and torch.load raise assorted types on corrupt files
                raise MegalongError(f"cannot read weights file {path}: {e}") from None
            self._handles[file] = handle
        return self._handles[file]

    def names(self) -> list[str]:
        """Tensor names: in the index's order, or a single file's own order."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise MegalongError(f"tensor {name} not found in HF checkpoint {self.path}")
        handle = self._open(file)
        try:
            return handle.get_tensor(name) if file.endswith(".safetensors") else handle[name]
        except Exception as e:
            raise MegalongError(f"cannot read tensor {name} from {os.path.join(self.path, file)}: {e}") from None

    def arch(self):
        """(LlamaArch, linear interpolation factor or None) from this checkpoint's config.json."""
        return arch_from_hf_config(self.config, source=self.config_path)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_bin(path: str) -> dict:
    try:  # zip-format files map lazily; legacy ones load whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise MegalongError(f"{path} does not hold a state dict")
    return state


# ---------------------------------------------------------------------------------------------


def print_progress(tensors_written: int, bytes_written: int) -> None:
    """A `progress` callable for write_hf_checkpoint: one line per shard on stderr (a shard is
    gigabytes, so every one is worth a line)."""
    ProgressPrinter(interval_s=0, updating=False).update(
        f"wrote {tensors_written} tensors, {bytes_written / 2**30:.2f} GiB")


def write_hf_checkpoint(
    out_dir,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    copy_from=None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Stream (name, tensor) pairs into an HF checkpoint directory, all or nothing.

    Writes safetensors shards (model.safetensors, or model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json, as transformers does), config.json, and copies
    generation_config.json and tokenizer files from `copy_from`. Everything goes into a temp
    dir beside out_dir that is renamed into place at the end; on any error it is removed.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if copy_from is not None and not os.path.isdir(copy_from):
        raise MegalongError(f"directory {copy_from} to copy tokenizer files from does not exist")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _write_shards(tmp, tensors, max_shard_bytes, progress)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)


def _write_shards(dir_: str, tensors, max_shard_bytes: int, progress) -> None:
    shard_files, weight_map = [], {}  # weight_map: name -> index into shard_files
    pending, pending_bytes = {}, 0
    written_tensors = written_bytes = total_params = 0

    def flush():
        nonlocal pending, pending_bytes, written_tensors, written_bytes
        file = f"shard-{len(shard_files)}.tmp"
        save_file(pending, os.path.join(dir_, file), metadata={"format": "pt"})
        for name in pending:
            weight_map[name] = len(shard_files)
        shard_files.append(file)
        written_tensors += len(pending)
        written_bytes += pending_bytes
        pending, pending_bytes = {}, 0
        if progress is not None:
            progress(written_tensors, written_bytes)

    for name, tensor in tensors:
        if name in weight_map or name in pending:
            raise MegalongError(f"tensor {name} given twice while writing {dir_}")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()  # a view of a larger tensor: safetensors stores whole storages
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += nbytes
        total_params += tensor.numel()
    if pending:
        flush()
    if not shard_files:
        raise MegalongError("no tensors to write")

    n = len(shard_files)
    final = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for tmp_name, final_name in zip(shard_files, final):
        os.rename(os.path.join(dir_, tmp_name), os.path.join(dir_, final_name))
    if n > 1:
        index = {
            "metadata": {"total_parameters": total_params, "total_size": written_bytes},
            "weight_map": {name: final[k] for name, k in weight_map.items()},
        }
        with open(os.path.join(dir_, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def copy_tokenizer_files(source: str, target: str) -> None:
    """generation_config.json and the tokenizer files present in `source`, into `target`."""
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
