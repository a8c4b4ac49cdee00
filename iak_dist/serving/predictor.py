"""`Predictor`: scores raw rows with a serving artefact (`artefact.py`), in one process, on CPU or CUDA.

No process group, DMP or DeepSpeed: the tables are memory-mapped row shards (`np.load(mmap_mode="r")`,
only the looked-up rows are read), pooled per bag with `F.embedding_bag(mode="sum")`, and everything
after the lookup is the model's own code (`Backbone.dense_part` with the strategy's `Adapter`), so a
mixed-domain batch goes through every row's own domain kernel in one pass, as in evaluation.
Requests are preprocessed by `data.batch.arrow_to_batch`, the function training and evaluation use.

fp32 tables score the same rows bit for bit as `iak-dist evaluate` (FBGEMM's CPU pooling sums a bag's
rows in order in fp32, as `embedding_bag` does); fp16 / int8 tables within the drift docs/serving.md
states (measured by tests/test_serving.py).
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from iak_dist.config import ModelConfig, from_dict
from iak_dist.data.batch import arrow_to_batch, domain_indices
from iak_dist.data.schema import Schema
from iak_dist.errors import UserError
from iak_dist.serving.artefact import (
    ADAPTER_FOLDER,
    DENSE_FILE,
    MANIFEST,
    MODEL_FILE,
    dequantise_rows,
)

UnknownDomain = Literal["backbone", "refuse"]
_REEXPORT = "export the artefact again (iak-dist export)"


class RequestError(UserError):
    """A bad request: `.field` names the offending column, the message says what is wrong in one line."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Table:
    """One embedding table as memory-mapped row shards; `rows(ids)` reads only the rows asked for."""

    def __init__(self, root: Path, entry: dict[str, Any]) -> None:
        self.dim = int(entry["dim"])
        self.starts = np.array([s["rows"][0] for s in entry["shards"]], dtype=np.int64)
        self.shards = [np.load(root / s["file"], mmap_mode="r") for s in entry["shards"]]
        self.scale_bias = [np.load(root / s["scale_bias"], mmap_mode="r") if "scale_bias" in s else None
                           for s in entry["shards"]]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), dim]: the rows of `ids` (hashed, in [0, rows)), dequantised."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shard_of):
            at = np.flatnonzero(shard_of == s) if len(self.shards) > 1 else slice(None)
            local = ids[at] - self.starts[s]
            data = self.shards[s][local]  # fancy indexing a memmap copies just these rows
            if self.scale_bias[s] is not None:
                data = dequantise_rows(data, self.scale_bias[s][local])
            out[at] = data
        return out


class Predictor:
    """The backbone with every domain's kernel, loaded from an artefact; `score` takes raw rows.

    Example::

        predictor = Predictor.load("artefact/")
        scores = predictor.score([{"domain": "d0", "user_id": 7, "item_id": 42, ...}])
        scores["p_ctcvr"]  # float32 [1]
    """

    def __init__(self, path: Path, manifest: dict, schema: Schema, backbone: torch.nn.Module,
                 adapter: torch.nn.Module | None, tables: dict[str, _Table], device: torch.device,
                 unknown_domain: UnknownDomain) -> None:
        self.path = path
        self.manifest = manifest
        self.schema = schema
        self.domains = list(schema.domains)
        self.backbone = backbone
        self.adapter = adapter
        self.tables = tables
        """Each table of `backbone.table_configs` by its name, with its lookups' keys (as TorchRec names them:
        `<key>@<table>` for a key two tables read, e.g. the item feature with an item tower) and pooling."""
        self.lookups = [(config.name, list(zip(config.feature_names, names, strict=True)),
                         config.pooling == PoolingType.MEAN)
                        for config, names in zip(backbone.table_configs, get_embedding_names_by_table(
                            backbone.table_configs), strict=True)]
        self.device = device
        self.unknown_domain = unknown_domain
        self.unknown_rows = 0
        """Rows of domains the artefact does not know, scored so far (by the backbone alone)."""
        self._lock = threading.Lock()  # guards `unknown_rows`, the only state `score` changes

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", unknown_domain: UnknownDomain = "backbone") -> Predictor:
        """Read and verify the artefact in `path` (every file against the manifest's hash)."""
        from iak_dist.distributed.checkpoint import (
            LEGACY_TEXT_BUFFER,
            LEGACY_TEXT_REFUSAL,
            SafetensorsFile,
            check_weights_hash,
        )
        from iak_dist.model.backbone import Backbone
        from iak_dist.model.strategies.saving import load_adapter

        path = Path(path)
        if unknown_domain not in ("backbone", "refuse"):
            raise UserError(f"unknown_domain={unknown_domain!r}: must be 'backbone' or 'refuse'")
        if not (path / MANIFEST).is_file():
            raise UserError(f"{path}: no {MANIFEST}; not a serving artefact ({_REEXPORT})")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path / MANIFEST}: not valid JSON ({str(exc).splitlines()[0]}); {_REEXPORT}") from None
        for name, expected in manifest["files"].items():
            check_weights_hash(path / name, expected, path / MANIFEST, _REEXPORT)
        model = json.loads((path / MODEL_FILE).read_text())
        schema = from_dict(Schema, model["schema"], str(path / MODEL_FILE))
        torch_device = torch.device(device)
        backbone = Backbone(schema, from_dict(ModelConfig, model["model"], str(path / MODEL_FILE)),
                            device=torch.device("meta"))  # tables on meta: they are the memory-mapped shards
        dense_file = SafetensorsFile(path / DENSE_FILE, _REEXPORT)
        dense = {k: dense_file.read(k, 0, shape[0] if shape else 1).view(shape)
                 for k, (_, shape, _) in dense_file.entries.items()}
        if LEGACY_TEXT_BUFFER in dense:
            raise UserError(LEGACY_TEXT_REFUSAL.format(path=path))
        missing, unexpected = backbone.load_state_dict(dense, strict=False)
        missing = [k for k in missing if not k.startswith("embeddings.")]
        if missing or unexpected:
            raise UserError(f"{path / DENSE_FILE}: tensors do not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); {_REEXPORT}")
        del backbone.embeddings  # never called: `_embed` pools from the shards
        stamps = {"identity": model["identity"], "weights": model["weights"]}  # what the adapter was tuned on
        adapter, _, _ = load_adapter(path / ADAPTER_FOLDER, stamps)
        backbone.to(torch_device).eval()
        adapter.to(torch_device).eval()
        tables = {t.name: _Table(path, manifest["tables"][t.name[len("t_"):]]) for t in backbone.table_configs}
        return cls(path, manifest, schema, backbone, adapter, tables, torch_device, unknown_domain)

    # -- requests -------------------------------------------------------------------------------

    def request_columns(self) -> list[str]:
        """The columns a request needs: the domain, every sparse feature, every dense column."""
        return [self.schema.domain, *self.schema.feature_names, *self.schema.dense]

    def check_rows(self, rows: list[dict]) -> None:
        """Raise `RequestError` naming the first bad field of `rows` (JSON-like dicts)."""
        multi_hot = {f.name: f.multi_hot for f in self.schema.sparse}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RequestError("rows", f"row {i}: expected an object of columns, got {type(row).__name__}")
            for column in self.request_columns():
                if column not in row:
                    raise RequestError(column, f"row {i}: missing column {column!r}")
                value = row[column]
                if column == self.schema.domain:
                    ok = isinstance(value, (str, int)) and not isinstance(value, bool)
                    want = "a domain name (string)"
                elif column in multi_hot and multi_hot[column]:
                    ok = isinstance(value, list) and all(_is_int(v) for v in value)
                    want = "a list of integer IDs"
                elif column in multi_hot:
                    ok, want = _is_int(value), "an integer ID"
                else:
                    ok, want = _is_finite_number(value), "a finite number"
                if not ok:
                    raise RequestError(column, f"row {i}: column {column!r} must be {want}, got {value!r}")
        if self.unknown_domain == "refuse":
            for i, row in enumerate(rows):
                if str(row[self.schema.domain]) not in self.domains:
                    raise self._unknown_domain_error(str(row[self.schema.domain]), i)

    def _unknown_domain_error(self, domain: str, row: int) -> RequestError:
        return RequestError(self.schema.domain, f"row {row}: unknown domain {domain!r} in column "
                                                f"{self.schema.domain!r} (known: {', '.join(self.domains)})")

    def to_table(self, rows: pa.Table | Any | list[dict]) -> pa.Table:
        """The request as an Arrow table of the columns `arrow_to_batch` reads, types checked."""
        if isinstance(rows, list):
            self.check_rows(rows)
            rows = pa.table({c: pa.array([str(r[c]) if c == self.schema.domain else r[c] for r in rows],
                                         self._arrow_type(c)) for c in self.request_columns()})
        elif not isinstance(rows, pa.Table):
            try:
                import pandas as pd
            except ImportError:  # pragma: no cover
                pd = None
            if pd is None or not isinstance(rows, pd.DataFrame):
                raise RequestError("rows", f"expected a pyarrow Table, pandas DataFrame or list of dicts, "
                                           f"got {type(rows).__name__}")
            rows = pa.Table.from_pandas(rows, preserve_index=False)
        columns = {}
        for column in self.request_columns():
            if column not in rows.column_names:
                raise RequestError(column, f"missing column {column!r}")
            values = rows.column(column)
            if values.null_count:
                raise RequestError(column, f"column {column!r} has {values.null_count} missing value(s)")
            want = self._arrow_type(column)
            if column != self.schema.domain:
                try:
                    values = values.cast(want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise RequestError(column, f"column {column!r} must be {want}, got {values.type}") from None
            columns[column] = values
        for f in self.schema.sparse:  # as training's data check: a list longer than its max_length is refused
            if f.max_length is not None:
                lengths = pc.list_value_length(columns[f.name]).to_numpy(zero_copy_only=False)
                if len(lengths) and lengths.max() > f.max_length:
                    row = int(np.argmax(lengths > f.max_length))
                    raise RequestError(f.name, f"column {f.name!r} row {row}: the list holds {int(lengths[row])} IDs, "
                                               f"more than the schema's max_length {f.max_length}")
        n = rows.num_rows
        zeros = pa.array(np.zeros(n, dtype=np.int64))
        for label in (self.schema.click, self.schema.conversion, self.schema.user):  # not needed to score
            if label and label not in columns:
                columns[label] = rows.column(label) if label in rows.column_names else zeros
        return pa.table(columns)

    def _arrow_type(self, column: str) -> pa.DataType:
        for f in self.schema.sparse:
            if f.name == column:
                return pa.list_(pa.int64()) if f.multi_hot else pa.int64()
        return pa.string() if column == self.schema.domain else pa.float64()

    # -- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, rows: pa.Table | Any | list[dict]) -> dict[str, np.ndarray]:
        """p_ctr, p_cvr, p_ctcvr (float32 [N]) of raw rows: a pyarrow Table, a pandas DataFrame or a list of dicts.

        Rows of a domain the artefact does not know are scored by the backbone alone and counted
        (`unknown_rows`), or refused (`RequestError`) with `unknown_domain="refuse"`. Thread-safe.
        """
        table = self.to_table(rows)
        domain = domain_indices(table.column(self.schema.domain), self.domains)
        unknown = int((domain < 0).sum())
        if unknown and self.unknown_domain == "refuse":
            first = int(np.flatnonzero(domain < 0)[0])
            raise self._unknown_domain_error(str(pc.cast(table.column(self.schema.domain), pa.string())[first]), first)
        batch = arrow_to_batch(table, self.schema)  # the preprocessing of training and evaluation
        embedded = self._embed(batch.sparse, batch.sequence_lengths, batch.domain.to(self.device))
        out = self.backbone.dense_part(embedded, batch.dense.to(self.device), self.adapter,
                                       batch.domain.to(self.device))
        if unknown:
            with self._lock:
                self.unknown_rows += unknown
        return {"p_ctr": out.p_ctr.cpu().numpy(), "p_cvr": torch.sigmoid(out.cvr_logit).cpu().numpy(),
                "p_ctcvr": out.p_ctcvr.cpu().numpy()}

    def _embed(self, sparse, sequence_lengths: torch.Tensor | None, domain: torch.Tensor) -> torch.Tensor:
        """[B, F, d]: every lookup key's bag summed in order (as FBGEMM's CPU kernel does), divided by its
        length where its table pools by mean, adapted where the adapter `adapts_lookups`, then the
        backbone's own `feature_vectors` (sequence encoders)."""
        pooled = {}
        by_key = sparse.to_dict()
        for table, keys, by_mean in self.lookups:
            for key, name in keys:
                ids = by_key[key]
                gathered = torch.from_numpy(self.tables[table].rows(ids.values().numpy())).to(self.device)
                bags = F.embedding_bag(torch.arange(len(gathered), device=self.device), gathered,
                                       ids.offsets().to(self.device), mode="sum", include_last_offset=True)
                if by_mean:
                    bags = bags / ids.lengths().to(self.device, bags.dtype).clamp(min=1.0).unsqueeze(1)
                pooled[name] = bags
        pooled = self.backbone.items_by_text(pooled)
        if self.adapter is not None and self.adapter.adapts_lookups:
            pooled = self.adapter.adapt_lookups(pooled, domain)
        lengths = None if sequence_lengths is None else sequence_lengths.to(self.device)
        return self.backbone.feature_vectors(pooled, lengths)


def _is_int(value: Any) -> bool:
    """An int64 ID (JSON has no int64: a bigger integer is refused here, not as an overflow later)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 63)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range
        return False


__all__ = ["Predictor", "RequestError"]
