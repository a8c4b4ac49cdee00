"""`Batch`: the one currency between data and model (TorchRec `KeyedJaggedTensor` for sparse IDs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from iak_dist.data.schema import Schema, hash_ids


@dataclass
class Batch(Pipelineable):
    """One batch of impressions.

    `sparse` holds hashed IDs keyed by feature name (read it by name: sharded embedding
    collections return features in plan order, not config order). `domain` is the index of the
    row's domain in the schema's `domains` list, -1 for a domain the schema does not know.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor  # [B, max(n_dense, 1)] float32
    click: torch.Tensor  # [B] float32
    conversion: torch.Tensor  # [B] float32 (click AND converted); zeros when the data has none
    domain: torch.Tensor  # [B] int64
    user: torch.Tensor  # [B] int64 raw user id (GAUC groups); zeros when the schema names none
    sequence_lengths: torch.Tensor | None = None
    """[B, S] int64: the items each row holds of each of the schema's S sequence features (at most its
    max_length), None without sequence features: which positions a sequence encoder may read."""

    def __len__(self) -> int:
        return int(self.click.shape[0])

    def record_stream(self, stream) -> None:
        """Keep the tensors alive until `stream` (a CUDA stream of the train pipeline) is done with them."""
        self.sparse.record_stream(stream)
        for t in (self.dense, self.click, self.conversion, self.domain, self.user, self.sequence_lengths):
            if t is not None:
                t.record_stream(stream)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            click=self.click.to(device, non_blocking=non_blocking),
            conversion=self.conversion.to(device, non_blocking=non_blocking),
            domain=self.domain.to(device, non_blocking=non_blocking),
            user=self.user.to(device, non_blocking=non_blocking),
            sequence_lengths=None if self.sequence_lengths is None
            else self.sequence_lengths.to(device, non_blocking=non_blocking),
        )


def arrow_to_batch(table: pa.Table, schema: Schema) -> Batch:
    """Convert validated Arrow rows to a `Batch`, hashing raw IDs into each table's size."""
    n = table.num_rows
    values, lengths, sequence_lengths = [], [], []
    for feature in schema.sparse:
        col = table.column(feature.name)
        if feature.sequence:
            keyed_values, keyed_lengths, kept = positions(col, feature.max_length)
            lengths.append(keyed_lengths)
            values.append(hash_ids(keyed_values, feature.table_size))
            sequence_lengths.append(kept)
            continue
        if feature.multi_hot:
            lengths.append(pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int32))
            raw = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        else:
            lengths.append(np.ones(n, dtype=np.int32))
            raw = col.to_numpy(zero_copy_only=False)
        values.append(hash_ids(raw, feature.table_size))
    sparse = KeyedJaggedTensor(
        keys=schema.lookup_keys,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
    )
    if schema.dense:
        dense = np.stack(
            [table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in schema.dense], axis=1
        )
    else:  # one constant column: the model's dense input is never empty (no shape branch to trace)
        dense = np.zeros((n, 1), dtype=np.float32)
    conversion = (
        _label(table, schema.conversion) if schema.conversion else np.zeros(n, dtype=np.float32)
    )
    user = (
        table.column(schema.user).to_numpy(zero_copy_only=False).astype(np.int64)
        if schema.user else np.zeros(n, dtype=np.int64)
    )
    return Batch(
        sparse=sparse,
        dense=torch.from_numpy(dense),
        click=torch.from_numpy(_label(table, schema.click)),
        conversion=torch.from_numpy(conversion),
        domain=torch.from_numpy(domain_indices(table.column(schema.domain), schema.domains)),
        user=torch.from_numpy(user),
        sequence_lengths=torch.from_numpy(np.stack(sequence_lengths, axis=1)) if sequence_lengths else None,
    )


def positions(column: pa.ChunkedArray | pa.Array, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as `length` position keys, right-aligned (each row's most recent item, its last,
    at position `length - 1`; a row of n < length items leaves positions 0 .. length - n - 1 empty; a
    longer list keeps its last `length`): (raw IDs key by key, each key's bag lengths (0 or 1) key by key,
    the items kept per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n_items = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    starts = column.offsets.to_numpy()[:-1].astype(np.int64) - column.offsets[0].as_py()
    kept = np.minimum(n_items, length)
    slot = np.arange(length)
    present = slot[None, :] >= (length - kept)[:, None]  # [B, length]
    index = starts[:, None] + n_items[:, None] - length + slot[None, :]  # where position p's item is in `flat`
    by_key = present.T  # key-major, as the KeyedJaggedTensor lays out its values
    return flat[index.T[by_key]], by_key.reshape(-1).astype(np.int32), kept


def domain_indices(column: pa.ChunkedArray | pa.Array, domains: list[str]) -> np.ndarray:
    """Index of each row's domain in `domains`; -1 where the domain is not in the list.

    A dictionary column whose dictionary is `domains` itself (the prefix cache's, `CachedSplit.read`)
    is its indices: no round trip through the names (at batch 4096 that was ~1.3 ms of a cached batch)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if pa.types.is_dictionary(column.type) and all(c.dictionary.to_pylist() == list(domains) for c in chunks):
        return np.concatenate([pc.fill_null(c.indices.cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
                               for c in chunks]) if chunks else np.zeros(0, np.int64)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    as_str = pc.cast(column, pa.string())
    idx = pc.index_in(as_str, value_set=pa.array(domains, pa.string()))
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _label(table: pa.Table, column: str) -> np.ndarray:
    return pc.cast(table.column(column), pa.float32()).to_numpy(zero_copy_only=False).copy()
