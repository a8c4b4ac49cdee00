"""The phase graph of a pipeline: defaults, validation (cycles, unknown names, missing inputs), order."""

from __future__ import annotations

from iak_dist.config import PhaseSpec, PipelineConfig
from iak_dist.errors import UserError


def default_phases(cfg: PipelineConfig) -> list[PhaseSpec]:
    return [
        PhaseSpec("prepare", "prepare"),
        PhaseSpec("pretrain", "pretrain", after=["prepare"]),
        PhaseSpec("finetune", "finetune", after=["pretrain"]),
        PhaseSpec("evaluate", "evaluate", after=["finetune"]),
        PhaseSpec("export", "export", after=["evaluate"]),
    ]


def phases_of(cfg: PipelineConfig, backbones_exist: bool = False, data_exists: bool = False) -> list[PhaseSpec]:
    """The validated phases of `cfg`, in a topological order."""
    phases = cfg.orchestration.phases or default_phases(cfg)
    where = "orchestration.phases"
    by_name: dict[str, PhaseSpec] = {}
    for p in phases:
        if p.name in by_name:
            raise UserError(f"{where}: two phases are named {p.name!r}; names must be unique")
        by_name[p.name] = p
    for p in phases:
        for dep in p.after:
            if dep not in by_name:
                raise UserError(f"{where}.{p.name}.after: no phase named {dep!r}; phases: {', '.join(by_name)}")
        unknown = [s for s in p.strategies if s not in cfg.finetune.strategies]
        if unknown:
            raise UserError(f"{where}.{p.name}.strategies: {unknown[0]!r} is not in finetune.strategies "
                            f"({', '.join(cfg.finetune.strategies)})")
    order = _topological(phases, where)
    needs = {"pretrain": ("prepare",), "finetune": ("pretrain",), "evaluate": ("finetune",), "export": ("evaluate",)}
    have_on_disk = {"prepare": data_exists, "pretrain": backbones_exist}
    for p in order:
        for kind in needs.get(p.type, ()):
            if not _upstream_has(p, kind, by_name) and not have_on_disk.get(kind, False):
                raise UserError(f"{where}.{p.name}: a {p.type} phase needs a {kind} phase before it "
                                f"(in its `after` chain), or its outputs already in the run directory")
    return order


def _upstream_has(phase: PhaseSpec, kind: str, by_name: dict[str, PhaseSpec]) -> bool:
    seen, stack = set(), list(phase.after)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if by_name[name].type == kind:
            return True
        stack.extend(by_name[name].after)
    return False


def _topological(phases: list[PhaseSpec], where: str) -> list[PhaseSpec]:
    by_name = {p.name: p for p in phases}
    state: dict[str, int] = {}
    order: list[PhaseSpec] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise UserError(f"{where}: dependency cycle {' -> '.join(cycle)}")
        state[name] = 1
        for dep in by_name[name].after:
            visit(dep, path + [name])
        state[name] = 2
        order.append(by_name[name])

    for p in phases:
        visit(p.name, [])
    return order
