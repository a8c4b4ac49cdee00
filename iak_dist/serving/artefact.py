"""The serving artefact: one folder that scores every domain with no process group, DMP or DeepSpeed.

`export_artefact` writes it from a run's backbone and one strategy's adapter (`Predictor.load` reads it):

    manifest.json        format, provenance (backbone identity + weights hash, strategy, domains, valid
                         metrics, package versions), table dtype, the table shards, every file's hash
    model.json           the schema (what a request needs, and the preprocessing it implies: each sparse
                         ID hashed into its table with `schema.hash_ids`, multi-hot lists pooled by sum,
                         dense columns as float32, the domain name -> its index in `domains`; exactly
                         `data.batch.arrow_to_batch`, which the predictor calls) + the model config
    dense.safetensors    every backbone tensor but the tables (a `full` adapter's own where it has them)
    adapter/             the strategy's adapter: its per-domain kernels stacked `[K, ...]`
    tables/<feature>/rows-<first row>.npy            row shards of each table, fp32 / fp16 / uint8 codes
    tables/<feature>/rows-<first row>.scale_bias.npy int8 only: [rows, 2] float32 (scale, bias) per row

int8 is row-wise quantised in a layout of our own (not FBGEMM's fused rows, whose fp16 scale and bias
sit inside each row): `codes = rint((row - min) / scale)` with `scale = (max - min) / 255` (1 for a
constant row) and `bias = min`, so a row reads back as `codes * scale + bias` (error at most scale / 2
an element). Shards are plain `.npy` so that the predictor memory-maps them (`np.load(mmap_mode="r")`).

Tables are copied row chunk by row chunk (`ShardedWeights.row_chunks`): one shard in memory at a time,
never a whole table. The folder is written under `<out>.partial` and renamed into place once
complete (files 0644, folders 0755); the manifest's hashes are checked again at load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from iak_dist.errors import UserError
from iak_dist.io import atomic_path, atomic_write_json, fsync_tree

FORMAT_VERSION = 1
MANIFEST, MODEL_FILE, DENSE_FILE, ADAPTER_FOLDER, TABLES_FOLDER = (
    "manifest.json", "model.json", "dense.safetensors", "adapter", "tables")
TABLE_DTYPES = ("fp32", "fp16", "int8")
SHARD_BYTES = 64 << 20
"""Most bytes of one table shard (also what the export holds of a table at once)."""
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.uint8}
_VERSIONED = ("torch", "torchrec", "fbgemm_gpu", "fbgemm_gpu-cpu", "numpy", "pyarrow")


TABLE_PREFIX = "embeddings.embedding_bags.t_"
"""The backbone's state-dict names of its tables: `t_<owner>` per table owner (a feature that `shares_table`
looks up its owner's), `t_item_text` with an item tower. The manifest's `tables` are keyed by what follows
`t_` (the table's own name less its prefix)."""


def quantise_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise int8 (uint8 codes) of float rows [n, d]: (codes [n, d] uint8, scale_bias [n, 2] float32)."""
    rows = rows.astype(np.float32, copy=False)
    low, high = rows.min(axis=1), rows.max(axis=1)
    scale = ((high - low) / np.float32(255)).astype(np.float32)
    scale[scale == 0] = 1.0  # a constant row: every code 0, read back as its bias exactly
    codes = np.rint((rows - low[:, None]) / scale[:, None]).clip(0, 255).astype(np.uint8)
    return codes, np.stack([scale, low], axis=1).astype(np.float32)


def dequantise_rows(codes: np.ndarray, scale_bias: np.ndarray) -> np.ndarray:
    """Float32 rows back from `quantise_rows`' codes and (scale, bias)."""
    return codes.astype(np.float32) * scale_bias[:, :1] + scale_bias[:, 1:]


class _HashingWriter:
    """A file object that hashes what goes through it (a shard is hashed as it is written, not read again)."""

    def __init__(self, f) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` as `.npy` atomically; returns its `file_hash` (first 16 hex digits of the SHA-256)."""
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:  # the whole folder is fsynced at the end
        writer = _HashingWriter(f)
        np.save(writer, np.ascontiguousarray(array), allow_pickle=False)
    return writer.digest.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    """Versions of what produced the artefact (a predictor on other versions may score differently)."""
    from iak_dist import __version__

    out = {"iak_dist": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def pick_seed(run_dir: Path, strategy: str) -> int:
    """The lowest seed of `run_dir` with `strategy` fine-tuned."""
    seeds = sorted(int(p.name[4:]) for p in run_dir.glob("seed*") if p.name[4:].isdigit()
                   and (p / "adapters" / strategy / "adapter_config.json").is_file())
    if not seeds:
        raise UserError(f"{run_dir}: no seed has `{strategy}` fine-tuned (seed*/adapters/{strategy}/); "
                        f"fine-tune it first, or name another --strategy")
    return seeds[0]


def _valid_metrics(run_dir: Path, adapter_dir: Path, strategy: str) -> dict[str, Any]:
    """The valid-split metrics of the exported adapter (its seed) and of the strategy over seeds (the report)."""
    out: dict[str, Any] = {"this_seed": None, "mean_over_seeds": None}
    if (adapter_dir / "eval_valid.json").is_file():
        out["this_seed"] = json.loads((adapter_dir / "eval_valid.json").read_text())
    report = run_dir / "report.json"
    if report.is_file():
        out["mean_over_seeds"] = (json.loads(report.read_text()).get("aggregate_valid") or {}).get(strategy)
    return out


def export_artefact(run_dir: Path, strategy: str, out: Path, seed: int | None = None,
                    table_dtype: Literal["fp32", "fp16", "int8"] = "fp32",
                    extra: dict[str, Any] | None = None, json_files: dict[str, Any] | None = None) -> Path:
    """Write the serving artefact of `strategy` (seed `seed`, None: the lowest fine-tuned) of `run_dir` to `out`.

    Every weights file read is checked against its recorded hash first. `extra`: more manifest keys;
    `json_files`: more files {name: content} written as JSON beside the manifest, hashed like the rest
    (the pipeline's export adds what it chose from, as both). An existing `out` is replaced only once the new
    artefact is complete. Returns `out`.
    """
    from iak_dist.distributed.checkpoint import backbone_weights, file_hash, verify_backbone, write_safetensors
    from iak_dist.model.strategies.saving import CONFIG_FILE, WEIGHTS_FILE, is_per_domain, load_adapter, verify_adapter

    run_dir, out = Path(run_dir), Path(out)
    if table_dtype not in TABLE_DTYPES:
        raise UserError(f"--table-dtype {table_dtype}: unknown; known: {', '.join(TABLE_DTYPES)}")
    seed = pick_seed(run_dir, strategy) if seed is None else seed
    backbone_dir = run_dir / f"seed{seed}" / "backbone"
    adapter_dir = run_dir / f"seed{seed}" / "adapters" / strategy
    if not (backbone_dir / "backbone.json").is_file():
        raise UserError(f"{backbone_dir}: no backbone of seed {seed}; pre-train it first")
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise UserError(f"{adapter_dir}: `{strategy}` (seed {seed}) is not fine-tuned yet")
    meta = verify_backbone(backbone_dir)
    config = verify_adapter(adapter_dir, meta, every_file=True)
    if is_per_domain(config):
        raise UserError(f"{adapter_dir}: `{strategy}` keeps one whole model per domain, which one graph cannot "
                        f"serve; export another strategy")
    _, override, _ = load_adapter(adapter_dir, meta)
    weights = backbone_weights(backbone_dir, meta)
    schema = meta["schema_obj"]

    def source(name: str):
        return override if override is not None and name in override.tensors else weights

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / ADAPTER_FOLDER).mkdir(parents=True)
        files: dict[str, str] = {}
        tables: dict[str, Any] = {}
        for name in [n for n in weights.tensors if n.startswith(TABLE_PREFIX)]:  # t_<owner>, t_item_text
            table = name[len(TABLE_PREFIX):-len(".weight")]
            rows, dim = weights.tensors[name]["shape"]
            shard_rows = max(1, SHARD_BYTES // (dim * 4))
            shards = []
            for start, chunk in source(name).row_chunks(name, shard_rows):
                stem = f"{TABLES_FOLDER}/{table}/rows-{start:012d}"
                rows_f32 = chunk.float().numpy()
                shard = {"rows": [start, start + len(rows_f32)], "file": f"{stem}.npy"}
                if table_dtype == "int8":
                    codes, scale_bias = quantise_rows(rows_f32)
                    files[shard["file"]] = _save_npy(staging / shard["file"], codes)
                    shard["scale_bias"] = f"{stem}.scale_bias.npy"
                    files[shard["scale_bias"]] = _save_npy(staging / shard["scale_bias"], scale_bias)
                else:
                    files[shard["file"]] = _save_npy(staging / shard["file"],
                                                     rows_f32.astype(_NUMPY_DTYPES[table_dtype], copy=False))
                shards.append(shard)
                del chunk, rows_f32  # one shard at a time
            tables[table] = {"rows": rows, "dim": dim, "shards": shards}
        dense = {name: source(name).full(name) for name in weights.tensors if not name.startswith("embeddings.")}
        files[DENSE_FILE] = write_safetensors(staging / DENSE_FILE, dense)
        # the adapter as saved, less the backbone shards a `full` one points to (its tensors are above)
        adapter_config = {k: v for k, v in config.items() if k != "backbone_state"}
        atomic_write_json(staging / ADAPTER_FOLDER / CONFIG_FILE, adapter_config, durable=False)
        shutil.copyfile(adapter_dir / WEIGHTS_FILE, staging / ADAPTER_FOLDER / WEIGHTS_FILE)
        atomic_write_json(staging / MODEL_FILE, {k: meta[k] for k in ("schema", "model", "identity", "weights")},
                          durable=False)
        for name, content in (json_files or {}).items():
            atomic_write_json(staging / name, content, durable=False)
        for name in (f"{ADAPTER_FOLDER}/{CONFIG_FILE}", f"{ADAPTER_FOLDER}/{WEIGHTS_FILE}", MODEL_FILE,
                     *(json_files or {})):
            files[name] = file_hash(staging / name)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "strategy": strategy,
            "domains": schema.domains,
            "table_dtype": table_dtype,
            "provenance": {
                "run_dir": str(run_dir.resolve()), "seed": seed, "backbone_identity": meta["identity"],
                "backbone_weights": meta["weights"], "adapter_weights": config["adapter_weights"],
                "valid_metrics": _valid_metrics(run_dir, adapter_dir, strategy), "versions": package_versions(),
            },
            "tables": tables,
            **(extra or {}),
            "files": dict(sorted(files.items())),
        }
        atomic_write_json(staging / MANIFEST, manifest, durable=False)
        _make_readable(staging)
        fsync_tree(staging)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _make_readable(root: Path) -> None:
    """Files 0644, folders 0755: an artefact is read by other users (a serving account), whatever the umask."""
    root.chmod(0o755)
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
        for n in names:
            os.chmod(os.path.join(folder, n), 0o644)


def _replace(staging: Path, out: Path) -> None:
    """Rename the complete `staging` to `out`; an old `out` is moved aside first and removed after."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
