"""Typed configuration: every knob, its default and its meaning, in one place.

A config file is YAML. It is validated at load against the dataclasses below: an unknown key or a
value of the wrong type is a `UserError` naming the key (as a dotted path) and the valid choices.
`--set a.b=v` overrides are applied to the YAML before validation, so they are checked the same way.
Each component receives only its own section.

This module imports nothing heavy (no torch, torchrec, deepspeed or ray) until a config is built:
`iak-dist --help` stays fast. Each strategy's settings live in the strategy's own file and are
found through its registry (`strategy_configs`), which imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from iak_dist.errors import UserError


def at_least(section: Any, **minimum: float) -> dict[str, str]:
    """`{key: message}` for each numeric key of `section` below its minimum (for a section's `problems()`)."""
    return {key: f"must be >= {low:g}, got {getattr(section, key)!r}"
            for key, low in minimum.items() if not getattr(section, key) >= low}


@dataclass
class DataConfig:
    """Where the impressions come from and how MovieLens / synthetic data are prepared."""

    source: Literal["movielens-100k", "synth", "parquet"] = "movielens-100k"
    """`movielens-100k` and `synth` are prepared into `dir`; `parquet` reads existing files there."""
    dir: str = "data/movielens-100k-age"
    """Folder with `schema.yaml`; the splits are `<split>.parquet` beside it, or where its `splits:`
    mapping says (a file, a folder of many files, a glob or a URI: docs/data.md)."""
    domain: Literal["age", "zip", "month"] = "age"
    """MovieLens domain split: user age group, first digit of the zip code, or month of the rating."""
    negatives_per_positive: int = 2
    """Unrated items sampled (by popularity) per rated pair, at the same user and timestamp."""
    history_length: int = 0
    """MovieLens: > 0 adds the sequence feature `hist_items`, the item IDs the user rated strictly before
    the impression's time, oldest first, the last `history_length` of them (docs/data.md, "Sequence
    features"); 0: no such column (the data of before)."""
    item_text: bool = False
    """MovieLens: also embed each item's text (its title and genres) once, at prepare time, with a small
    offline sentence encoder installed at set-up (all-MiniLM-L6-v2), into the data folder beside the
    splits (docs/data.md, "Item text"); false: no text (the data of before)."""
    cold_items: float = 0.0
    """MovieLens: this fraction of the items (drawn from `seed`, widened to every item sharing an item_id
    table slot with one drawn) is left out of the pre-train split only: fine-tune, valid and test keep
    their rows, so evaluation scores items pre-training never saw (zero-shot items; docs/data.md, "Cold
    items"). 0: every item pre-trains (the data of before)."""
    split_fractions: list[float] = field(default_factory=lambda: [0.65, 0.15, 0.05, 0.15])
    """Time quantiles for pre-train / fine-tune / valid / test, taken within each `split_within` group.
    `valid` (between fine-tune and test in time) serves early stopping and every choice of strategy or
    hyper-parameter; `test` is read only for the final report."""
    split_within: Literal["user", "domain"] = "user"
    """`user`: each user's history is split by time (earlier ratings pre-train, the latest test), so
    test users are known users; `domain`: each domain's impressions are split by time (test users
    are then mostly new: a cold-start task)."""
    seed: int = 0
    """Seed of negative sampling and synthetic generation (data is a fixed input across model seeds)."""
    synth_rows: int = 200_000
    """Synthetic data: impressions in total, over all splits."""
    synth_domains: int = 4
    """Synthetic data: number of domains (sizes differ by a factor of up to ~10)."""
    synth_domain_shift: float = 1.0
    """Synthetic data: 0 = every domain has the same click model; larger = domains differ more."""
    synth_id_space: int = 2**62
    """Synthetic data: raw IDs are drawn from [0, synth_id_space) (Zipf ranks scattered by a hash)."""
    row_group_size: int = 16_384
    """Rows per Parquet row group written by `prepare` (the reader streams row groups)."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, negatives_per_positive=0, history_length=0, synth_rows=1, synth_domains=1,
                         synth_id_space=1, row_group_size=1)
        if self.history_length and self.source != "movielens-100k":
            found["history_length"] = (f"only movielens-100k data is prepared with a history, got source "
                                       f"{self.source} (a parquet source lists its sequence features in schema.yaml)")
        if self.item_text and self.source != "movielens-100k":
            found["item_text"] = f"only movielens-100k data is prepared with item text, got source {self.source}"
        if not 0.0 <= self.cold_items < 1.0:
            found["cold_items"] = f"a fraction of the items in [0, 1), got {self.cold_items}"
        elif self.cold_items and self.source != "movielens-100k":
            found["cold_items"] = f"only movielens-100k data is prepared with cold items, got source {self.source}"
        elif self.cold_items and self.history_length:
            found["cold_items"] = ("cannot be combined with data.history_length > 0: hist_items shares item_id's "
                                   "table, so a cold item in a pre-train row's history would train its ID row")
        fr = self.split_fractions
        if len(fr) != 4 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            found["split_fractions"] = (f"need four positive fractions (pretrain, finetune, valid, test) "
                                        f"summing to 1, got {fr}")
        return found


@dataclass
class ModelConfig:
    """The backbone: embeddings -> feature interaction -> MLP tower -> ESMM heads."""

    embedding_dim: int = 16
    """Width of every embedding table."""
    table_dtype: Literal["fp32", "fp16"] = "fp32"
    """Storage precision of the embedding tables (FBGEMM weights precision). `fp16` halves their
    memory; the fused row-wise Adagrad still updates them (its per-row state stays fp32) and the
    pooled embeddings fed to the dense part stay fp32. Part of the backbone's identity."""
    interaction: Literal["dcn", "dot"] = "dcn"
    """`dcn`: DCNv2 cross layers over [embeddings, dense]; `dot`: DLRM pairwise dot products."""
    cross_layers: int = 2
    """Number of DCNv2 cross layers (ignored for `dot`)."""
    cross_rank: int = 16
    """Low rank of each DCNv2 cross layer's weight."""
    tower: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden widths of the MLP tower; the last one is the hidden `h` that kernels adapt."""
    sequence_encoder: Literal["pool", "transformer"] = "pool"
    """How a sequence feature (schema `sequence: true`, e.g. `hist_items`) becomes its one vector:
    `pool`: its items' embeddings summed or averaged (the feature's `pooling`); `transformer`: a small
    causal Transformer over them (learned positions, most recent last), then target attention with the
    embedding of the feature whose table it shares as the query (DIN / BST style). A row without
    history gets a zero vector either way."""
    sequence_layers: int = 1
    """Transformer layers of the `transformer` sequence encoder."""
    sequence_heads: int = 2
    """Attention heads of the `transformer` sequence encoder (must divide `embedding_dim`)."""
    item_tower: Literal["id", "text", "id+text"] = "id"
    """The item feature's vector: `id` its ID embedding; `text` a trained projection of its text vector
    (needs a data folder prepared with `data.item_text: true`; an item never seen in training is scored
    through its text); `id+text` the sum of both (iak_dist/model/item_tower.py, docs/data.md "Item text")."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, embedding_dim=1, cross_layers=0, cross_rank=1, sequence_layers=1, sequence_heads=1)
        if not self.tower or min(self.tower) < 1:
            found["tower"] = f"need at least one layer, every width >= 1, got {self.tower}"
        if self.sequence_heads >= 1 and self.embedding_dim % self.sequence_heads:
            found["sequence_heads"] = (f"must divide embedding_dim {self.embedding_dim}, "
                                       f"got {self.sequence_heads}")
        return found


@dataclass
class OptimConfig:
    """One training phase's loop."""

    epochs: float = 2.0
    """Passes over the phase's data (fractional allowed); ignored when `steps` > 0."""
    steps: int = 0
    """Exact number of optimizer steps, if > 0 (overrides `epochs`)."""
    batch_size: int = 512
    """Samples per step (per rank)."""
    lr_dense: float = 1e-3
    """Adam learning rate of the dense parameters (tower, heads, strategy parameters)."""
    lr_sparse: float = 0.05
    """Row-wise Adagrad learning rate of embedding tables (fused into backward by TorchRec)."""
    weight_decay: float = 0.0
    """AdamW-style decoupled weight decay of the dense parameters."""
    log_every: int = 20
    """Steps between TensorBoard scalars."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warm-up, for the dense and the sparse optimizer alike: `constant`, or a
    `linear` / `cosine` decay from the base rate to `min_lr_ratio` x the base rate at the last step."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the base rate (step s trains at (s + 1) / warmup_steps of it)."""
    min_lr_ratio: float = 0.0
    """The decayed schedules end at this fraction of the base rate."""
    validate_every: float = 0.0
    """Epochs between passes over the validation split (0: no validation). Each pass measures the
    validation loss; training ends on the weights of the best pass (early stopping restores them)."""
    patience: int = 0
    """Validation passes without improvement after which training stops early (0: never early)."""
    early_stopping_metric: Literal["loss", "ctr_auc"] = "loss"
    """What each validation pass measures and the best pass is chosen by: `loss` (the ESMM task loss,
    lower is better) or `ctr_auc` (CTR-AUC over the valid rows, higher is better: keeps the best ranker,
    which may be over-confident; pair it with `calibrate` in pre-training)."""
    calibrate: bool = False
    """Pre-training only: after training, fit a scale and a bias of each ESMM head's logit on the valid
    split (Newton steps on the ESMM loss, the backbone fixed) and fold them into the heads' weights, so the
    exported backbone's probabilities are calibrated; rankings within a head do not change."""
    objective: Literal["discriminative", "generative"] = "discriminative"
    """Pre-training only. `discriminative`: the ranker trains on the ESMM loss from fresh tables.
    `generative` (GPSD): first a generative stage (the `generative` section) trains a causal Transformer
    over each row's behaviour sequence to predict the row's item; the ranker then starts from its item
    table (and its Transformer), frozen or trainable (docs/pretraining.md)."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, steps=0, batch_size=1, lr_dense=0.0, lr_sparse=0.0, weight_decay=0.0, log_every=1,
                          warmup_steps=0, min_lr_ratio=0.0, validate_every=0.0, patience=0)
        if self.min_lr_ratio > 1.0:
            found["min_lr_ratio"] = f"must be within [0, 1], got {self.min_lr_ratio}"
        if self.steps == 0 and not self.epochs > 0:  # 0 epochs used to train one step anyway
            found["epochs"] = f"must be > 0 (or give steps > 0), got {self.epochs}"
        return found


def strategy_configs() -> dict[str, type | None]:
    """Every registered strategy's name -> its config class (None: it has no settings), in registration order.

    A strategy's settings live in its own file (iak_dist/model/strategies/<name>.py) and are found
    here through the registry; this imports the strategies, hence torch (about 2 s, once).
    """
    from iak_dist.model.strategies import registered_configs

    return registered_configs()


@dataclass
class FinetuneConfig:
    """Fine-tuning of every domain at once, with the batch-aware domain sampler.

    Besides the keys below, the section holds one sub-section per strategy that has settings, under
    the strategy's name (`finetune.iak.width`, `finetune.lora.rank`): their keys, defaults and meaning
    are the strategy's config class, in the strategy's own file.
    """

    strategies: list[str] = field(default_factory=lambda: list(strategy_configs()))
    """Strategies to fine-tune and compare on the same backbone (default: every registered one)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=3.0, lr_dense=2e-3))
    """Loop settings of each strategy's fine-tune run."""
    sampler_alpha: float = 0.5
    """Domain d is drawn with probability proportional to n_d ** alpha (0: uniform, 1: by size)."""
    prefix_cache: Literal["auto", "on", "off", True, False] = "auto"
    """Fine-tune a frozen-backbone strategy from a cache of the backbone's interaction output (one pass
    over the split, under `<seed dir>/prefix_cache/`, reused while backbone and data are unchanged)
    instead of the embedding lookups at every step. `auto`: for every strategy but `full`/`full_per_domain`
    (which train the backbone); `on`: the same, and an error for those; `off`: never. (YAML reads a bare
    on / off as true / false: those mean on / off.)"""
    hold_out_domains: list[str] = field(default_factory=list)
    """Domains left out of fine-tuning entirely (zero-shot domains): none of their fine-tune rows is
    trained on, so they score as the adapter's untrained domain (the plain backbone, or what its shared
    weights learnt on the other domains) and the report marks them held out. Not with per-domain
    strategies (`full_per_domain`). []: every domain fine-tunes (as before)."""
    settings: dict[str, Any] = field(default_factory=dict, metadata={"sections": strategy_configs})
    """The strategies' sections by name (written in YAML as `finetune.<strategy>`, not under `settings`);
    every registered strategy with settings has one, at its defaults unless the config says otherwise."""

    def problems(self) -> dict[str, str]:
        held = self.hold_out_domains
        if len(set(held)) != len(held) or not all(isinstance(d, str) and d for d in held):
            return {"hold_out_domains": f"distinct domain names, got {held}"}
        return {}

    def __post_init__(self) -> None:
        self.settings = dict(self.settings)  # a copy's own (dataclasses.replace would share the mapping)
        if isinstance(self.prefix_cache, bool):  # `prefix_cache: off` in YAML (1.1) is False
            self.prefix_cache = "on" if self.prefix_cache else "off"
        for name, section_cls in strategy_configs().items():
            if section_cls is not None and name not in self.settings:
                self.settings[name] = section_cls()

    def __getattr__(self, name: str) -> Any:
        """`cfg.iak` is the iak strategy's section (only called for names that are not fields)."""
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or strategy section {name!r}")


@dataclass
class GenerativeConfig:
    """GPSD-style generative pre-training (`pretrain.objective: generative`, docs/pretraining.md).

    A causal Transformer over each pre-train row's behaviour sequence (the schema's sequence feature, e.g.
    `hist_items`) predicts the row's item: the state at the newest position is scored against the batch's
    target items by a sampled softmax (in-batch negatives; the row's own item is the positive, other rows
    holding the same item are left out), over clicked rows with a non-empty history. The item table and
    the Transformer then seed the discriminative ranker.
    """

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=2.0, lr_dense=1e-3, lr_sparse=0.05))
    """Loop settings of the generative stage (`validate_every`, `patience`, `calibrate` do not apply)."""
    transfer: Literal["items", "items+encoder"] = "items"
    """What the ranker starts from: the item table, or also the Transformer's positions, blocks and final
    norm (needs `model.sequence_encoder: transformer`; its target-attention query is not pre-trained)."""
    freeze_transferred: bool = True
    """Keep the transferred weights as they are during discriminative pre-training (GPSD's finding: the
    frozen pre-trained item table stops the ranker from over-fitting); false: they train on."""

    def problems(self) -> dict[str, str]:
        found = {}
        for key in ("validate_every", "patience"):
            if getattr(self.optim, key):
                found[f"optim.{key}"] = "the generative stage has no validation pass; leave it at 0"
        if self.optim.calibrate:
            found["optim.calibrate"] = "the generative stage has no heads to calibrate; leave it false"
        if self.optim.objective != "discriminative":
            found["optim.objective"] = "applies to pre-training only (pretrain.objective)"
        return found


@dataclass
class TablePlan:
    """An explicit placement of one embedding table (the planner still picks the ranks)."""

    sharding_type: str = "table_wise"
    """data_parallel, table_wise, column_wise, table_column_wise; on CUDA also row_wise, table_row_wise."""
    compute_kernel: str = "fused"
    """`fused` (FBGEMM table-batched kernel, optimizer fused into backward) or `dense`; data_parallel
    tables always use `dense` (replicated plain weights, with an optimizer of their own)."""


@dataclass
class ShardingConfig:
    """How TorchRec shards the embedding tables over the ranks."""

    plan: dict[str, TablePlan] = field(default_factory=dict)
    """Per-feature explicit plan, keyed by sparse feature name; features not listed are planned."""
    sharding_types: list[str] = field(default_factory=list)
    """Sharding types the planner may choose for unlisted tables (empty: all the device supports)."""
    memory_budget_gb: float = 0.0
    """Per-rank memory the planner may fill with tables (0: the device's memory)."""
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    """Optimizer fused into the embedding backward (also used for data-parallel tables)."""


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO over the dense modules (tower, heads, strategy parameters)."""

    stage: int = 0
    """ZeRO stage 0-3: 0 replicates everything, 1 shards optimizer state, 2 + gradients, 3 + parameters."""
    bf16: bool = False
    """Train the dense modules in bfloat16. Not supported yet: the embeddings and adapters feed the
    dense part float32 activations, so `true` is refused in one line when the engine is built."""
    gradient_clipping: float = 1.0
    """Clip the dense gradients' global norm to this (0 turns clipping off). 1.0 is DeepSpeed's own
    default, written here so that it is visible; it costs a norm over every dense gradient per step."""
    fused_optimizer: bool = True
    """Use PyTorch's fused AdamW kernel (CPU and CUDA): one kernel over all dense parameters instead
    of a Python loop over them. Same update up to float rounding."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Passed through into the DeepSpeed config (merged over what the keys above set)."""

    def problems(self) -> dict[str, str]:
        found = at_least(self, gradient_clipping=0.0)
        if self.bf16:  # refused before anything runs (distributed/zero.py says why)
            found["bf16"] = ("mixed precision of the dense part is not supported (the embeddings feed it float32 "
                             "activations, which bf16 weights refuse); train in float32: set it to false")
        if self.stage not in (0, 1, 2, 3):
            found["stage"] = f"must be 0, 1, 2 or 3, got {self.stage}"
        return found


@dataclass
class DistributedConfig:
    """Sparse sharding, dense ZeRO, and how ranks split the data."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    data_split: Literal["row_groups", "batch_slices"] = "row_groups"
    """`row_groups`: each rank reads its own row-balanced share of the split (scales); `batch_slices`: a
    test mode: every rank reads every row, the same global batches, and keeps its slice, so N ranks x
    batch B train exactly like 1 x N*B."""
    overlap_input_dist: bool = True
    """Run training through TorchRec's TrainPipelineSparseDist: the next batch's input distribution
    (and loading) overlaps the current batch's compute. Results are identical either way."""
    checkpoint_every: int = 0
    """Steps between distributed checkpoints of a training phase (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept per phase (older ones are deleted once a newer one is complete)."""

    def problems(self) -> dict[str, str]:
        return at_least(self, checkpoint_every=0, keep_checkpoints=1)


PHASE_TYPES = ("prepare", "pretrain", "finetune", "evaluate", "export")


@dataclass
class PhaseSpec:
    """One phase of the Ray-scheduled pipeline."""

    name: str
    """Unique name; other phases name it in `after`."""
    type: Literal["prepare", "pretrain", "finetune", "evaluate", "export"]
    """What it runs. pretrain / finetune / evaluate run as Ray Train `TorchTrainer`s."""
    after: list[str] = field(default_factory=list)
    """Phases that must be done first. Phases with no path between them may run concurrently."""
    strategies: list[str] = field(default_factory=list)
    """finetune: the strategies this phase fine-tunes (empty: all of `finetune.strategies`)."""
    workers: int = 1
    """Ray Train workers (ranks) of a training phase."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU (gloo)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the phase fails (each resumes from the last checkpoint)."""

    def problems(self) -> dict[str, str]:
        return at_least(self, workers=1, max_failures=0)


@dataclass
class OrchestrationConfig:
    """Where and how the phases run."""

    address: str = ""
    """Ray cluster to join ("auto", "ray://host:10001", "host:6379"); empty: start an embedded local Ray."""
    num_cpus: int = 0
    """CPUs of the embedded Ray (0: all of this machine's)."""
    phases: list[PhaseSpec] = field(default_factory=list)
    """The phases and their dependencies; empty: prepare -> pretrain -> finetune -> evaluate -> export."""

    ray_checkpoints_to_keep: int = 1
    """Ray Train's copies of each phase's reported checkpoints kept in `RUN_DIR/ray/` (the phase's own
    checkpoints are kept by `distributed.keep_checkpoints`; Ray's copies only serve its worker restarts)."""

    def problems(self) -> dict[str, str]:
        return at_least(self, num_cpus=0, ray_checkpoints_to_keep=1)


@dataclass
class EvaluateConfig:
    """Per-domain evaluation on the test split."""

    batch_size: int = 4096
    """Samples per scoring batch."""

    def problems(self) -> dict[str, str]:
        return at_least(self, batch_size=1)


@dataclass
class PipelineConfig:
    """A whole run: prepare -> pre-train -> fine-tune (every strategy) -> evaluate -> report."""

    run_dir: str = "runs/movielens-100k-age"
    """Everything a run writes: checkpoints, adapters, metrics, report, TensorBoard events."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Model seeds; each seed pre-trains and fine-tunes anew, the report gives mean and std."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: OptimConfig = field(default_factory=OptimConfig)
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    def __post_init__(self) -> None:
        known = strategy_configs()
        unknown = [s for s in self.finetune.strategies if s not in known]
        if unknown:
            raise UserError(f"finetune.strategies: unknown strategy {unknown[0]!r}; known: {', '.join(known)}")
        if not self.seeds:
            raise UserError("seeds: give at least one seed, e.g. seeds: [0]")
        if self.finetune.optim.calibrate:
            raise UserError("finetune.optim.calibrate: calibration applies to pre-training only "
                            "(pretrain.calibrate); fine-tuned heads are the strategies' own")
        if self.finetune.optim.objective != "discriminative":
            raise UserError("finetune.optim.objective: the objective applies to pre-training only (pretrain.objective)")
        if self.model.item_tower != "id" and self.data.source == "movielens-100k" and not self.data.item_text:
            raise UserError(f"model.item_tower: {self.model.item_tower} reads the items' text; set data.item_text: "
                            f"true (a data.dir prepared with it)")
        if self.pretrain.objective == "generative":
            if self.data.source == "movielens-100k" and self.data.history_length == 0:
                raise UserError("pretrain.objective: generative pre-training needs a behaviour sequence; "
                                "set data.history_length > 0 (e.g. 20)")
            if self.generative.transfer == "items+encoder" and self.model.sequence_encoder != "transformer":
                raise UserError(f"generative.transfer: items+encoder needs model.sequence_encoder: transformer "
                                f"(got {self.model.sequence_encoder}); or transfer: items")


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """`run_dir` and `data.dir` resolved against the current folder, for processes that run elsewhere
    (Ray tasks and workers, Ray jobs, SLURM batch jobs)."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()),
                               data=dataclasses.replace(cfg.data, dir=str(Path(cfg.data.dir).resolve())))


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML `path` (or defaults if None), apply `key.path=value` overrides, validate.

    The file is validated on its own first, so an error names the file only for what the file
    says; what the overrides break is named as `--set`.
    """
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from exc
        except yaml.YAMLError as exc:
            raise UserError(f"config {path}: not valid YAML: {exc}".replace("\n", " ")) from exc
        if loaded is None:
            # an empty file would silently run every default in the current folder
            raise UserError(f"config {path}: the file is empty; start from one in configs/, "
                            "e.g. configs/movielens_age.yaml")
        if not isinstance(loaded, dict):
            raise UserError(f"config {path}: the top level must be a mapping of sections")
        raw = loaded
    cfg = from_dict(PipelineConfig, raw, source)
    for item in overrides or []:  # each checked as it is applied, so an error names its own --set
        apply_override(raw, item)
        cfg = from_dict(PipelineConfig, raw, f"--set {item}")
    return cfg


def apply_override(raw: dict[str, Any], item: str, root: type | None = None) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the raw mapping.

    The key path is checked against the config classes (`root`, default `PipelineConfig`) here,
    so a typo is named as the `--set` that holds it, with the closest valid key.
    """
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. finetune.iak.width=16")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    _check_key_path(root or PipelineConfig, parts, f"--set {item}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc


def _check_key_path(cls: type, parts: list[str], where: str) -> None:
    """Every part of a dotted key must name a field of the section it is in (mappings take any key)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict or tp is Any:
                return  # a free mapping (sharding.plan, zero.deepspeed): its keys are data
            raise UserError(f"{where}: {'.'.join(parts[:i])} is not a section")
        sections = _open_sections(tp)
        names = [f.name for f in dataclasses.fields(tp) if f.name != sections[0]]
        names += [name for name, section in sections[1].items() if section is not None]
        if part not in names and part not in sections[1]:
            raise UserError(f"{where}: unknown key {'.'.join(parts[:i + 1])}{_did_you_mean(part, names)}; "
                            f"valid keys here: {', '.join(names)}")
        if part in sections[1]:
            tp = sections[1][part]
            if tp is None:
                raise UserError(f"{where}: strategy {part} has no settings")
            continue
        tp = typing.get_type_hints(tp)[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _open_sections(cls: type) -> tuple[str, dict[str, type | None]]:
    """(field, {key: section class}) of a dataclass whose field is marked `metadata={"sections": registry}`:
    its sub-sections are written at the dataclass's own level (`finetune.iak`, not `finetune.settings.iak`)
    and found through the registry. ("", {}) for an ordinary dataclass."""
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            return f.name, f.metadata["sections"]()
    return "", {}


def to_dict(cfg: Any) -> Any:
    """The config as plain data (for saving next to results and for stamping adapters); open sections are
    written at their parent's level, as a config file says them."""
    if dataclasses.is_dataclass(cfg):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if "sections" in f.metadata:
                out.update({name: to_dict(section) for name, section in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Any, source: str, prefix: str = "", base: Any = None) -> T:
    """Build dataclass `cls` from `data`; errors name `source` and the dotted key of the problem.

    Keys not given keep their defaults, and the default of a nested section is the one its field
    declares (`finetune.optim` starts from `OptimConfig(epochs=3.0, lr_dense=2e-3)`, not from a
    plain `OptimConfig()`), so overriding one key of a section never changes its other keys.
    `base` is that starting instance (None: the class's own defaults). After building, the
    section's `problems()` (if it has one) are raised with their dotted keys.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"{_where(source, prefix)}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    open_field, sections = _open_sections(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != open_field}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in sections:  # a registered section (a strategy's settings), written at this level
            if sections[key] is None:
                raise UserError(f"{_where(source, dotted)}: strategy {key} has no settings")
            given = kwargs.setdefault(open_field, dict(getattr(base, open_field)) if base is not None else {})
            given[key] = _coerce(sections[key], value, source, dotted, given.get(key))
            continue
        if key not in fields:
            valid = [*fields, *(name for name, section in sections.items() if section is not None)]
            raise UserError(f"{_where(source, dotted)}: unknown key{_did_you_mean(str(key), valid)}; "
                            f"valid keys here: {', '.join(valid)}")
        default = getattr(base, key) if base is not None else _field_default(fields[key])
        kwargs[key] = _coerce(hints[key], value, source, dotted, default)
    obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    for key, message in getattr(obj, "problems", lambda: {})().items():
        raise UserError(f"{_where(source, f'{prefix}.{key}' if prefix else key)}: {message}")
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _where(source: str, key: str) -> str:
    return f"{source}: key {key}" if key else source


def _coerce(tp: Any, value: Any, source: str, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = _where(source, key)
    if dataclasses.is_dataclass(tp):
        base = default if dataclasses.is_dataclass(default) else None
        return from_dict(tp, value if value is not None else {}, source, key, base)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")
