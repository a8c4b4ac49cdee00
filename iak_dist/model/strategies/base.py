"""The one interface of every fine-tuning strategy, and the stacked per-domain layers they share.

A strategy is an `Adapter` (an `nn.Module` holding only its own parameters) plus a rule for which
backbone parameters train. The backbone calls the adapter's hooks in its forward:

* `adapt_preactivation(i, x, y, rows, linear)`: tower layer i (`linear`, frozen) computed `y = W x + b`;
  return (y', aux_loss) (LoRA; IAK's kernel on the tower input, folded through `linear`). For the first
  layer `y` comes from the prefix (`Backbone.prefix`: cached when the backbone is frozen), so nothing
  may change the interaction output before it. y' is `y` itself or a new tensor, never a view of `y`:
  the backbone's ReLU runs in place on any y' that is not the prefix's own tensor.
* `adapt_activation(i, y, rows)`: after layer i's ReLU; return (y', aux_loss) (patch, IAK).
* `head_logits(h, rows)`: per-domain heads, or None to use the backbone's (head).

`rows` (`DomainRows`) is the batch's rows grouped by domain, computed once per forward.
Parallel inference with domain activation: per-domain parameters are stacked `[K, ...]` and each
row goes through its own domain's slice in one pass (`DomainLinear`). A row whose domain is -1
(not known to the adapter) gets no adaptation: it is scored by the plain backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DomainRows(NamedTuple):
    """The rows of a batch grouped by domain: computed once per batch, shared by every kernel.

    A NamedTuple so that TorchRec's train pipeline can fx-trace the backbone that passes it around.

    Attributes:
        domain: [B] each row's domain, -1 where the adapter does not know it.
        index: [B] `domain` with -1 mapped to 0 (such rows are masked out by `known`).
        known: [B, 1] 1.0 where the domain is known, else 0.0.
        order: [B] a permutation that puts the rows of domain 0 first, then domain 1, ...; None where the
            batch already comes so (`group_order`): each domain's rows are read where they lie.
        offsets: [K] int32, the end of each domain's group of rows in `order` (in the batch itself where
            `order` is None).
    """

    domain: torch.Tensor
    index: torch.Tensor  # read per row with `index_select` (its backward is a fast index_add, not a sort)
    known: torch.Tensor
    order: torch.Tensor | None
    offsets: torch.Tensor

    @staticmethod
    def of(domain: torch.Tensor, num_domains: int) -> DomainRows:
        """No host sync: the counts are an `index_add` into K slots (`bincount`'s output size depends
        on the data, so on CUDA it reads the maximum back every forward); `F.grouped_mm` takes the
        offsets on the device."""
        index = domain.clamp(min=0)
        offsets = index.new_zeros(num_domains).index_add(0, index, torch.ones_like(index)).cumsum(0).to(torch.int32)
        known = (domain >= 0).unsqueeze(1).to(torch.get_default_dtype())
        return DomainRows(domain, index, known, group_order(index), offsets)


def group_order(index: torch.Tensor) -> torch.Tensor | None:
    """The permutation that groups a batch's rows by domain, or None where they already are, in domain order.

    Training batches come grouped (`data.sampler.DomainPicks.next_batch`): the per-domain GEMMs then read
    the rows in place, with no gather before them and scatter after (on CPU, a sixth of an IAK step from
    the prefix cache at batch 4096). Looking is a host read, so only CPU tensors are looked at: on CUDA it
    would stall the queue every forward, and the gathers cost little there.
    """
    if index.device.type == "cpu" and bool((index[1:] >= index[:-1]).all()):
        return None
    return torch.argsort(index, stable=True)


# TorchRec's train pipeline fx-traces the model: the look at the data is recorded as one node, not traced into.
# Trap: in the traced graph `order` is a node, never None, so the graph records the gather branch of
# `domain_linear`; TorchRec only reads that graph to find the tables' inputs, the model's own forward runs.
torch.fx.wrap("group_order")


class Overlay(Mapping):
    """`changed[key]` where there is one, else `base[key]`. Trap: in TorchRec's fx-traced train pipeline the
    lookups' dict is a Proxy, which cannot be iterated (copied): it is only ever indexed."""

    def __init__(self, base: Mapping[str, torch.Tensor], changed: dict[str, torch.Tensor]) -> None:
        self.base, self.changed = base, changed

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.changed[key] if key in self.changed else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def grouped_linear(x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows grouped by domain times their domain's map, in one `F.grouped_mm` call.

    `F.grouped_mm` wants rows and pointers aligned to 16 bytes: narrow maps (a head's single
    output), weights that live at an odd offset of a flat buffer (DeepSpeed ZeRO-1/2) and inputs whose
    rows are not (a column slice of a wider matrix, read in place from a grouped batch) are zero-padded
    into a fresh copy first; the padding adds nothing to the product.
    """
    d_in, d_out = weight.shape[1:]
    pad_in, pad_out = -d_in % 8, -d_out % 8
    if pad_in or pad_out or weight.data_ptr() % 16:
        weight = F.pad(weight, (0, pad_out, 0, pad_in))
    if pad_in or not aligned_rows(x_sorted):
        x_sorted = F.pad(x_sorted, (0, pad_in))
    out = F.grouped_mm(x_sorted, weight, offs=offsets)
    return out[:, :d_out] if pad_out else out  # unpadded: the GEMM's own tensor (a caller may add into it)


def aligned_rows(x: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` can read `x` as it is: unit column stride, rows and start at 16-byte multiples."""
    return x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0


# TorchRec's train pipeline fx-traces the model; this call is recorded as one node, not traced
# into (its padding decision reads shapes and pointers, which a trace cannot branch on).
torch.fx.wrap("grouped_linear")


GemmPath = Literal["every_output", "spread", "grouped"]


def gemm_path(num_domains: int, in_features: int, out_features: int, limit: int) -> GemmPath:
    """How K stacked maps `in -> out` are applied to a batch, by size (decided once, not per call: the
    forward has no shape-dependent branch; the one branch on the data, grouped rows or not, reads
    `DomainRows.order`, decided once per batch).

    * `every_output` (`K * out <= limit`): one GEMM computes every domain's output, each row keeps its own;
    * `spread` (`K * in <= limit`): each row's input is placed in its domain's block of a `[B, K * in]`
      matrix (zeros elsewhere), times the maps stacked `[K * in, out]`: one GEMM for a narrow input
      (a decoder from a small code, LoRA's up-projection);
    * `grouped`: the rows, grouped by domain, go through one grouped GEMM (`F.grouped_mm`: each domain's
      rows times its own map), so the work is the batch's rows times one map whatever K is.

    The first two cost `B * K * in * out`, K times one map's work, but in one call: fastest for a few
    tiny maps; the grouped GEMM's cost stays nearly flat in K. On a batch whose rows already come grouped
    by domain (`DomainRows.order is None`, as training batches do) `spread` runs as the grouped GEMM:
    with no gather and scatter around it, that is the cheaper one (IAK's decoder, batch 4096). `limit`
    (`DomainLinear.gemm_limit`, 32) is where they cross on CPU, forward + backward at batch 512 with
    K = 7 (torch 2.13, one thread), rows in any order: K * out = 7 or 28 (heads, a code of 4 from 64-144
    inputs) `every_output` 0.6-0.8x of `grouped`; 56 a tie; 112 (an encoder 144 -> 16) `grouped` 0.4x of
    `every_output`; a decoder 4 -> 128 `spread` 0.9x of `grouped`, 0.35x of `every_output`.
    """
    if num_domains * out_features <= limit:
        return "every_output"
    if num_domains * in_features <= limit:
        return "spread"
    return "grouped"


def domain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: DomainRows,
                  path: GemmPath, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual[b] + x[b] @ weight[domain[b]] + bias[domain[b]]` for every row b (`residual` or zeros for
    rows of domain -1), by `path` (`gemm_path`). `weight` [K, in, out] may be computed (a decoder folded
    through a frozen layer).

    The `spread` path does it in one GEMM: the bias is one more input (a 1 in the row's block), a row of
    an unknown domain has an all-zero block, and `residual` is the GEMM's accumulator (`addmm`): no
    elementwise pass over the [B, out] output (at batch 4096 each cost as much as the GEMM).
    """
    k, d_in, d_out = weight.shape
    if path == "spread" and rows.order is None:  # grouped rows: each domain's rows times its map, in place
        if bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            weight = torch.cat([weight, bias.unsqueeze(1)], dim=1)  # [K, in + 1, out]
        y = grouped_linear(x * rows.known.to(x.dtype), weight, rows.offsets)  # unknown rows: an all-zero input
        # in place: y is the GEMM's fresh output, which its backward does not read (one [B, out] buffer fewer)
        return y if residual is None else y.add_(residual)
    if path == "spread":
        select = F.one_hot(rows.index, k).to(x.dtype) * rows.known.to(x.dtype)  # [B, K]: 0 for unknown rows
        if bias is not None:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            weight = torch.cat([weight, bias.unsqueeze(1)], dim=1)  # [K, in + 1, out]
        blocks = (select.unsqueeze(2) * x.unsqueeze(1)).flatten(1)
        stacked = weight.reshape(-1, d_out)
        return blocks @ stacked if residual is None else torch.addmm(residual, blocks, stacked)
    if path == "every_output":
        every = (x @ weight.permute(1, 0, 2).reshape(d_in, k * d_out)).view(-1, k, d_out)
        y = every.gather(1, rows.index.view(-1, 1, 1).expand(-1, 1, d_out)).squeeze(1)
    elif rows.order is None:
        y = grouped_linear(x, weight, rows.offsets)
    else:
        grouped = grouped_linear(x.index_select(0, rows.order), weight, rows.offsets)
        y = torch.empty_like(grouped).index_copy(0, rows.order, grouped)
    if bias is not None:
        y = y + bias.index_select(0, rows.index)
    y = y * rows.known.to(y.dtype)
    return y if residual is None else residual + y


class DomainLinear(nn.Module):
    """K stacked linear maps; row b uses map `domain[b]`, rows with domain -1 get zeros.

    Applied by one of three equivalent GEMM shapes, picked once by size (`gemm_path`, with
    `gemm_limit`): the batch's cost stays nearly flat in K.

    Args:
        num_domains: K.
        in_features, out_features: shape of each map.
        init_std: std of the Gaussian weight init; 0 gives a zero map (changes nothing at start).
    """

    gemm_limit = 32

    def __init__(self, num_domains: int, in_features: int, out_features: int, init_std: float,
                 bias: bool = True, through_width: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_domains, in_features, out_features) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_domains, out_features)) if bias else None
        self.path = gemm_path(num_domains, in_features, out_features, self.gemm_limit)
        # the path of these maps folded through a linear layer to `through_width` outputs (`forward`'s `through`)
        self.through_path = None if through_width is None else gemm_path(num_domains, in_features, through_width,
                                                                         self.gemm_limit)

    def forward(self, x: torch.Tensor, rows: DomainRows, residual: torch.Tensor | None = None,
                through: torch.Tensor | None = None) -> torch.Tensor:
        """Each row through its domain's map, plus `residual` (see `domain_linear`). With `through` (the
        weight [width, out] of a linear layer these maps feed, built with `through_width=width`), the maps
        folded into it: `x W_d A^T + c_d A^T`, the layer's change for the map's output, without the batch
        ever multiplying by A. The parameters are read here, in this module's forward (ZeRO-3 gathers a
        module's parameters when its forward runs)."""
        if through is None:
            return domain_linear(x, self.weight, self.bias, rows, self.path, residual)
        bias = None if self.bias is None else self.bias @ through.t()
        return domain_linear(x, self.weight @ through.t(), bias, rows, self.through_path, residual)


class Adapter(nn.Module):
    """Base class: no adaptation. Subclasses override the hooks they need.

    Class attributes:
        name: the strategy's key in configs (`finetune.strategies`, and its section `finetune.<name>`).
        config_class: the dataclass of its settings (defaults, docstrings, `problems()`), or None.
        trains_backbone: which backbone parameters train: "none", "heads" or "all".
        per_domain_models: one separate model per domain (fine-tuned and scored domain by domain)
            instead of one adapter holding every domain.
        member_strategy: with `per_domain_models`, the strategy each domain's own model is fine-tuned with.
        grows_domains: every per-domain parameter is stacked `[K, ...]` and a new domain's slice starts at
            the pre-trained model, so `grow_domains` can add a domain to a trained adapter.
        adapts_lookups: it changes embeddings before the interaction (`adapt_lookups`): it is built with
            the backbone's `embedding_dim`, and cannot train from the prefix cache (its prefix changes).
        untrained_domain_is_backbone: a domain without fine-tune rows scores as the plain backbone (its
            per-domain weights start at the pre-trained model and nothing shared trains); False where
            weights shared by the domains train (evaluation's note must not say "plain backbone").
    """

    name: ClassVar[str] = "none"
    config_class: ClassVar[type | None] = None
    trains_backbone: ClassVar[str] = "none"
    per_domain_models: ClassVar[bool] = False
    member_strategy: ClassVar[str | None] = None
    grows_domains: ClassVar[bool] = False
    adapts_lookups: ClassVar[bool] = False
    untrained_domain_is_backbone: ClassVar[bool] = True

    def __init__(self, num_domains: int, tower_widths: list[int], cfg: Any = None) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.tower_widths = tower_widths
        self.cfg = cfg

    def check_schema(self, schema) -> None:
        """Raise UserError when a setting names what the data's schema does not have (before training)."""

    def adapt_lookups(self, pooled: Mapping[str, torch.Tensor], domain: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The pooled embedding of each lookup key, adapted (only with `adapts_lookups`; `domain`: [B]).
        Read by key only: in the fx-traced train pipeline `pooled` cannot be iterated."""
        return pooled

    def adapt_preactivation(self, layer: int, x: torch.Tensor, y: torch.Tensor, rows: DomainRows,
                            linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return y, y.new_zeros(())

    def adapt_activation(self, layer: int, y: torch.Tensor, rows: DomainRows) -> tuple[torch.Tensor, torch.Tensor]:
        return y, y.new_zeros(())

    def head_logits(self, h: torch.Tensor, rows: DomainRows) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def on_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Called before every fine-tune step (schedules); returns scalars worth logging."""
        return {}

    def init_from_backbone(self, backbone: nn.Module) -> None:
        """Copy whatever the adapter starts from out of the pre-trained backbone (e.g. heads)."""

    def set_domain_sizes(self, rows_per_domain: np.ndarray) -> None:
        """Told before fine-tuning: the fine-tune rows of each domain over all ranks ([K] counts)."""

    def grow_domains(self, trained: dict[str, torch.Tensor], trained_domains: int,
                     trained_rows: np.ndarray | None = None) -> None:
        """Start from `trained`, the state of this strategy's adapter for this adapter's first
        `trained_domains` domains, so that only the domains after them train (`--add-domain`).
        `trained_rows`: the fine-tune rows those domains were trained on (a loss that weighs domains
        by size reads them; the grown run counts only the new domains' rows).

        A parameter stacked per domain (`[trained_domains, ...]` there, `[K, ...]` here) takes the
        trained rows, and a gradient hook zeroes those rows' gradient; one of the same shape in both is
        shared by the domains: it takes the trained value and freezes. The new rows keep their own
        initialisation (the pre-trained model, for a zero-initialised decoder).

        Trap: a zero gradient leaves AdamW's rows bitwise unchanged only without weight decay.
        """
        own = self.state_dict()
        if set(own) != set(trained):
            raise ValueError(f"the trained adapter's tensors differ: {sorted(set(own) ^ set(trained))[:4]}")
        params = dict(self.named_parameters())
        for name, value in own.items():
            old = trained[name]
            stacked = (tuple(old.shape[1:]) == tuple(value.shape[1:]) and old.dim() > 0
                       and (old.shape[0], value.shape[0]) == (trained_domains, self.num_domains))
            if tuple(old.shape) != tuple(value.shape) and not stacked:
                raise ValueError(f"{name}: trained shape {tuple(old.shape)} is neither shared nor stacked "
                                 f"per domain with {tuple(value.shape)}")
            with torch.no_grad():
                (value[:trained_domains] if stacked else value).copy_(old)
            if name in params:
                if stacked:
                    params[name].register_hook(_zero_rows_hook(trained_domains))
                else:
                    params[name].requires_grad_(False)


def _zero_rows_hook(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes the first `rows` rows: the trained domains of a grown adapter."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:rows] = 0
        return grad

    return hook


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: makes the strategy known by its `name` (configs, CLI, saved adapters)."""
    _REGISTRY[cls.name] = cls
    return cls


register(Adapter)


def adapter_class(name: str) -> type[Adapter]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def known_strategies() -> list[str]:
    """Registered strategy names, in registration order."""
    return list(_REGISTRY)


def registered_configs() -> dict[str, type | None]:
    """name -> config class (None: no settings) of every registered strategy, in registration order."""
    return {name: cls.config_class for name, cls in _REGISTRY.items()}
