"""`iak-dist`: the verbs. Each parses its arguments, loads the config and calls one function.

Bad input (data, config, checkpoints) exits with code 2 and a one-line `error:` message.
`--help` and config validation import nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from iak_dist.config import DataConfig, PipelineConfig, apply_override, from_dict, load_config
from iak_dist.errors import UserError
from iak_dist.runtime import configure_environment, describe_stack, say


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="pipeline config (YAML), see configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set finetune.iak.width=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iak-dist", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="prepare, synthesise or validate Parquet impressions")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    prep = data_verbs.add_parser("prepare", help="fetch a public data set and write schema + splits")
    prep.add_argument("source", choices=["movielens-100k"])
    prep.add_argument("--out", help="output folder (default: data.dir of the config / defaults)")
    prep.add_argument("--domain", choices=["age", "zip", "month"], help="MovieLens domain split")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data.* override")
    synth = data_verbs.add_parser("synth", help="write synthetic multi-domain impressions as many Parquet files "
                                                 "in day partitions (streamed: any number of rows)")
    synth.add_argument("out", help="new folder: <split>/dt=<day>/part-<n>.parquet, schema.yaml, stats.json")
    synth.add_argument("--rows", type=lambda s: int(float(s)), help="impressions in all, e.g. 1e8 "
                                                                     "(default: data.synth_rows)")
    synth.add_argument("--files", type=int, default=64, help="Parquet files in all (at least 4: one per split)")
    synth.add_argument("--files-per-day", type=int, default=4, help="files in each dt=<day> folder")
    synth.add_argument("--domains", type=int, help="number of domains (default: data.synth_domains)")
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="data.* override, e.g. --set synth_domain_shift=2 --set row_group_size=65536")
    val = data_verbs.add_parser("validate", help="report every problem of Parquet files against a schema")
    val.add_argument("path", help="a data folder (checks every split), or one split: a Parquet file, a folder, "
                                   "a glob or a URI")
    val.add_argument("--schema", help="schema file (default: schema.yaml in or beside the data; required for a URI)")

    pipe = verbs.add_parser("pipeline", help="run the whole pipeline")
    pipe_verbs = pipe.add_subparsers(dest="pipeline_verb", required=True)
    run = pipe_verbs.add_parser("run", help="prepare -> pre-train -> fine-tune all strategies -> evaluate -> export")
    _add_config(run)
    run.add_argument("--address", help="Ray cluster to run on (default: orchestration.address, else an embedded Ray)")
    run.add_argument("--no-ray", action="store_true",
                     help="run every phase in this process (or under torchrun) instead of as Ray tasks")
    status = pipe_verbs.add_parser("status", help="the phases of a run as a table, with the running one's progress")
    status.add_argument("run_dir")

    pre = verbs.add_parser("pretrain", help="pre-train the backbone of one seed")
    _add_config(pre)
    pre.add_argument("--seed", type=int, default=None)

    fin = verbs.add_parser("finetune", help="fine-tune every domain with one strategy")
    _add_config(fin)
    fin.add_argument("--strategy", required=True)
    fin.add_argument("--seed", type=int, default=None)
    fin.add_argument("--add-domain", metavar="NAME",
                     help="grow the adapter of --from by domain NAME (the schema's last), training only its kernel")
    fin.add_argument("--from", dest="from_adapter", metavar="ADAPTER_DIR",
                     help="with --add-domain: the trained adapter to grow")
    fin.add_argument("--out", help="with --add-domain: where the grown adapter goes "
                                   "(default: <run_dir>/seed<seed>/adapters/<strategy>+<NAME>)")

    ev = verbs.add_parser("evaluate", help="evaluate what is fine-tuned; writes the report as JSON, Markdown and PNG")
    _add_config(ev)
    ev.add_argument("--seed", type=int, action="append", help="only this seed (repeatable; default: the config's)")
    ev.add_argument("--strategy", action="append",
                    help="only this strategy (repeatable; default: finetune.strategies of the config)")

    exp = verbs.add_parser("export", help="write the serving artefact of one strategy of a run (what `score` and "
                                          "`serve` read)")
    exp.add_argument("run_dir", help="a run folder (seed<N>/backbone, seed<N>/adapters/<strategy>)")
    exp.add_argument("--strategy", required=True, help="the fine-tuned strategy whose domain kernels are served")
    exp.add_argument("--seed", type=int, help="which seed's backbone and adapter (default: the lowest fine-tuned)")
    exp.add_argument("--out", required=True, help="the artefact folder (replaced once the new one is complete)")
    exp.add_argument("--table-dtype", choices=["fp32", "fp16", "int8"], default="fp32",
                     help="embedding tables as stored and served: fp32 (scores equal evaluate's), fp16 or int8 "
                          "row-wise quantised")

    sco = verbs.add_parser("score", help="score a Parquet file or folder with a serving artefact")
    sco.add_argument("artefact", help="a folder written by `iak-dist export`")
    sco.add_argument("data", help="a Parquet file or folder with the schema's columns (labels not needed)")
    sco.add_argument("--out", required=True, help="Parquet file: the input's key columns + p_ctr, p_cvr, p_ctcvr")
    sco.add_argument("--batch-size", type=int, default=65536, help="rows scored at a time (bounds the memory)")

    from iak_dist.serving.service import ServeConfig  # light: Ray is imported only when the service starts

    srv = verbs.add_parser("serve", help="an HTTP scoring service over a serving artefact on Ray Serve (POST /score, "
                                         "GET /healthz, GET /ready); runs until Ctrl-C")
    srv.add_argument("artefact", help="a folder written by `iak-dist export`")
    srv.add_argument("--host", default=ServeConfig.host, help="interface to bind (default %(default)s; 0.0.0.0: every "
                                                              "interface, i.e. the network)")
    srv.add_argument("--port", type=int, default=ServeConfig.port, help="HTTP port (default %(default)s)")
    srv.add_argument("--address", default=ServeConfig.address,
                     help="Ray cluster to serve on (HOST:PORT, ray://HOST:PORT, auto); default: an embedded Ray "
                          "of its own")
    srv.add_argument("--replicas", type=int, default=ServeConfig.replicas, help="replicas (default %(default)s)")
    srv.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size,
                     help="most rows one scoring call coalesces from concurrent requests (default %(default)s)")
    srv.add_argument("--batch-wait-ms", type=float, default=ServeConfig.batch_wait_timeout_s * 1000,
                     help="how long a replica waits for more requests to batch (default %(default)g ms)")
    srv.add_argument("--max-request-rows", type=int, default=ServeConfig.max_request_rows,
                     help="most rows one request may carry, 413 above (default: --max-batch-size)")
    srv.add_argument("--unknown-domain", choices=["backbone", "refuse"], default=ServeConfig.unknown_domain,
                     help="a row of a domain the artefact does not know: scored by the plain backbone (default) "
                          "or refused (400)")
    srv.add_argument("--device", default=ServeConfig.device, help="cpu (default) or cuda (one GPU per replica)")

    match = verbs.add_parser("match-items", help="write a backbone whose items unseen in pre-training get ID rows "
                                                 "mapped from their text (IDP-style ridge map; docs/data.md)")
    match.add_argument("backbone", help="exported backbone folder (e.g. runs/x/seed0/backbone)")
    match.add_argument("--data", required=True, help="its data folder, prepared with data.item_text: true")
    match.add_argument("--out", required=True, help="the new backbone folder (new or empty)")
    match.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the text -> ID map (default 1)")

    plan = verbs.add_parser("plan", help="print the sharding plan and per-rank memory without allocating tables")
    _add_config(plan)
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    plan.add_argument("--schema", help="schema file (default: schema.yaml in data.dir)")

    prof = verbs.add_parser("profile", help="throughput: step breakdown and plain baselines side by side")
    _add_config(prof)
    prof.add_argument("--steps", type=int, default=60)
    prof.add_argument("--trace", action="store_true", help="also write a Chrome trace of a few steps")
    prof.add_argument("--nproc", type=int, default=1,
                      help="ranks on this machine: with more than 1, re-runs itself under torchrun")

    sub = verbs.add_parser("submit", help="submit the pipeline as a Ray job to a cluster and stream its logs")
    _add_config(sub)
    sub.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")
    sub.add_argument("--no-follow", action="store_true", help="return once submitted")

    slurm = verbs.add_parser("slurm", help="write SLURM sbatch launchers for the pipeline (and submit them)")
    _add_config(slurm)
    slurm.add_argument("--out", required=True, help="folder for the scripts and the resolved config")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--cpus-per-task", type=int, default=2)
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--time", default="01:00:00")
    slurm.add_argument("--phase", default="pretrain", help="torchrun launcher: pretrain, finetune or pipeline")
    slurm.add_argument("--strategy", default="iak", help="torchrun launcher with --phase finetune")
    slurm.add_argument("--procs-per-node", type=int, default=1, help="torchrun launcher: ranks per node")
    slurm.add_argument("--gres", default="", help="generic resources per node, e.g. gpu:4")
    slurm.add_argument("--mem", default="", help="memory per node, e.g. 64G")
    slurm.add_argument("--account", default="", help="account to charge")
    slurm.add_argument("--signal", default="", help="warning signal before the time limit, e.g. B:TERM@120")
    slurm.add_argument("--requeue", action="store_true", help="requeue the job when preempted (it resumes)")
    slurm.add_argument("--submit", choices=["ray", "torchrun"], help="sbatch this launcher and wait for the job")

    sweep = verbs.add_parser("sweep", help="run the pipeline over a grid of overrides; tabulate results")
    _add_config(sweep)
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a swept key and its values, e.g. --grid finetune.iak.beta_matching=0,0.01,0.1")
    sweep.add_argument("--strategies", help="comma-separated strategies to run at each point (default: config's)")
    return parser


def _data_config(overrides: list[str]) -> DataConfig:
    raw: dict = {}
    for item in overrides:
        apply_override(raw, item, root=DataConfig)
    return from_dict(DataConfig, raw, "--set")


def _validate(location: str, schema_path: str | None) -> int:
    """Stream every split named by `location` through the checks; print each problem, then a summary."""
    from iak_dist.data.schema import Schema
    from iak_dist.data.source import SPLITS, split_location, split_locations, validate

    local = "://" not in location
    if local and Path(location, "schema.yaml").is_file():  # a data folder: every split
        folder = Path(location)
        listed = split_locations(folder / "schema.yaml")
        targets = [split_location(folder, s) for s in (listed or SPLITS)]
        schema_path = schema_path or str(folder / "schema.yaml")
    else:
        targets = [location]
    if schema_path is None:
        if not local:
            raise UserError(f"{location}: give the schema file with --schema (a URI has no folder to look in)")
        static = Path(re.split(r"[*?\[]", location, maxsplit=1)[0] or ".")  # a glob's folder part
        near = static if static.is_dir() else static.parent
        beside = [f / "schema.yaml" for f in (near, near.parent) if (f / "schema.yaml").is_file()]
        schema_path = str(beside[0] if beside else near / "schema.yaml")  # (Schema.load names what is missing)
    schema = Schema.load(schema_path)
    files = rows = 0
    problems: list[str] = []
    for target in targets:
        split, split_problems = validate(target, schema, progress=True)
        problems.extend(split_problems)
        if split is not None:
            files, rows = files + len(split.files), rows + split.num_rows
    for p in problems:
        print(p)
    print(f"{files} file(s), {rows} row(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _plan(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    import torch

    from iak_dist.data.schema import Schema
    from iak_dist.distributed.sharding import dry_run_plan
    from iak_dist.model.backbone import Backbone
    from iak_dist.model.ranker import Ranker

    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be at least 1")
    schema = Schema.load(args.schema or Path(cfg.data.dir) / "schema.yaml")
    ranker = Ranker(Backbone(schema, cfg.model, device=torch.device("meta")))
    frozen = []  # the item table generative pre-training transfers frozen: never data-parallel
    if cfg.pretrain.objective == "generative" and cfg.generative.freeze_transferred:
        from iak_dist.phases.pretrain_generative import sequence_feature

        frozen = [f"t_{schema.table_owner(sequence_feature(schema, Path(cfg.data.dir)).name)}"]
    _, report = dry_run_plan(ranker, cfg.distributed.sharding, args.world_size, args.device, cfg.pretrain.batch_size,
                             frozen)
    print(report)
    return 0


def _profile(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from iak_dist.distributed.context import torchrun_command
    from iak_dist.runtime import is_launched_rank

    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: must be at least 1")
    if args.nproc > 1 and not is_launched_rank():
        import subprocess

        argv, skip = [], False
        for arg in args.argv:  # the same command, less --nproc, for every rank
            if not skip and not arg.startswith("--nproc"):
                argv.append(arg)
            skip = arg == "--nproc"
        return subprocess.call(torchrun_command(args.nproc, "iak_dist.cli", argv))
    from profiling.throughput import run_profile

    out = run_profile(cfg, steps=args.steps, trace=args.trace)
    if int(os.environ.get("RANK", "0")) == 0:
        print((out / "report.md").read_text())
    return 0


def run(args: argparse.Namespace) -> int:
    configure_environment()
    if args.verb == "data":
        if args.data_verb == "validate":
            return _validate(args.path, args.schema)
        if args.data_verb == "synth":
            from iak_dist.data.synth import write_synthetic

            extra = [f"synth_rows={args.rows}"] if args.rows is not None else []
            extra += [f"synth_domains={args.domains}"] if args.domains is not None else []
            stats = write_synthetic(_data_config([*args.set, *extra]), args.out, args.files, args.files_per_day)
            rows = sum(s["rows"] for s in stats["splits"].values())
            print(f"wrote {args.out}: {rows:,} rows in {args.files} files")
            return 0
        from iak_dist.data.prepare import prepare

        cfg = _data_config(args.set)
        cfg.source = args.source
        if args.domain:
            cfg.domain = args.domain
        out = prepare(cfg, args.out)
        print(f"wrote {out}")
        return 0

    if args.verb == "pipeline" and args.pipeline_verb == "status":
        from iak_dist.orchestration.status import format_status

        print(format_status(args.run_dir))
        return 0
    if args.verb == "export":
        from iak_dist.model.strategies import known_strategies
        from iak_dist.serving.artefact import export_artefact

        if args.strategy not in known_strategies():
            raise UserError(f"--strategy {args.strategy}: unknown; known: {', '.join(known_strategies())}")
        out = export_artefact(Path(args.run_dir), args.strategy, Path(args.out), args.seed, args.table_dtype)
        print(f"wrote {out}")
        return 0
    if args.verb == "score":
        from iak_dist.serving.score import score_parquet

        rows = score_parquet(Path(args.artefact), Path(args.data), Path(args.out), args.batch_size)
        print(f"wrote {args.out}: {rows:,} rows")
        return 0
    if args.verb == "match-items":
        from iak_dist.model.id_matcher import match_items

        record = match_items(args.backbone, args.data, args.out, args.ridge)
        print(f"{args.out}: {len(record['matched_slots'])} item rows matched from their text "
              f"(fitted on {record['warm_slots']} warm slots, R^2 {record['fit_r2']:.3f})")
        return 0
    if args.verb == "serve":
        from iak_dist.serving.service import ServeConfig, serve

        serve(Path(args.artefact), ServeConfig(
            host=args.host, port=args.port, address=args.address, replicas=args.replicas,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
            max_request_rows=args.max_request_rows, unknown_domain=args.unknown_domain, device=args.device))
        return 0
    cfg: PipelineConfig = load_config(args.config, args.set)
    if args.verb == "plan":
        return _plan(cfg, args)
    if args.verb == "slurm":
        from launchers.slurm import SlurmOptions, submit_and_wait, write_scripts

        opts = SlurmOptions(nodes=args.nodes, cpus_per_task=args.cpus_per_task, partition=args.partition,
                            time_limit=args.time, procs_per_node=args.procs_per_node, phase=args.phase,
                            strategy=args.strategy, gres=args.gres, mem=args.mem, account=args.account,
                            signal=args.signal, requeue=args.requeue)
        scripts = write_scripts(cfg, args.out, opts)
        for kind, path in scripts.items():
            print(f"{kind}: sbatch {path}")
        if not args.submit:
            return 0
        job, state = submit_and_wait(scripts[args.submit], args.partition, requeue=args.requeue)
        print(f"[slurm] job {job}: {state}", file=sys.stderr)
        return 0 if state == "COMPLETED" else 1
    if args.verb == "profile":
        return _profile(cfg, args)
    if args.verb == "submit":
        from launchers.submit import submit

        return submit(args.address, cfg, follow=not args.no_follow)
    print(f"[iak-dist] {describe_stack()}", file=sys.stderr)
    if args.verb == "pipeline":
        from iak_dist.orchestration.driver import run_pipeline
        from iak_dist.runtime import is_launched_rank

        # under torchrun / srun the launcher made the ranks: phases run in each of them
        run_pipeline(cfg, use_ray=not (args.no_ray or is_launched_rank()), address=args.address)
        return 0
    if args.verb == "sweep":
        from iak_dist.orchestration.sweep import run_sweep

        run_sweep(args.config, args.set, args.grid, args.strategies.split(",") if args.strategies else None)
        return 0
    from iak_dist.distributed.context import close_distributed, init_distributed

    run_dir = Path(cfg.run_dir)
    seed = args.seed if isinstance(getattr(args, "seed", None), int) else cfg.seeds[0]  # pretrain, finetune
    ctx = init_distributed()
    try:
        if args.verb == "pretrain":
            from iak_dist.phases.pretrain import pretrain

            pretrain(cfg.data.dir, cfg.model, cfg.pretrain, cfg.distributed, seed, run_dir / f"seed{seed}", ctx,
                     generative=cfg.generative)
        elif args.verb == "finetune":
            from iak_dist.model.strategies import known_strategies
            from iak_dist.phases.finetune import finetune

            if args.strategy not in known_strategies():
                raise UserError(f"--strategy {args.strategy}: unknown; known: {', '.join(known_strategies())}")
            if (args.add_domain is None) != (args.from_adapter is None) or (args.out and args.add_domain is None):
                raise UserError("--add-domain NAME and --from ADAPTER_DIR go together (--out only with them)")
            from iak_dist.phases.common import check_model_matches

            seed_dir = run_dir / f"seed{seed}"
            check_model_matches(cfg.model, seed_dir / "backbone")
            if args.add_domain is not None:
                from iak_dist.phases.add_domain import add_domain

                out = args.out or seed_dir / "adapters" / f"{args.strategy}+{args.add_domain}"
                add_domain(cfg.data.dir, seed_dir / "backbone", args.strategy, cfg.finetune, seed,
                           args.from_adapter, args.add_domain, out, ctx, dist_cfg=cfg.distributed)
            else:
                finetune(cfg.data.dir, seed_dir / "backbone", args.strategy, cfg.finetune, seed,
                         seed_dir / "adapters" / args.strategy, ctx, dist_cfg=cfg.distributed)
        elif args.verb == "evaluate":
            from iak_dist.model.strategies import known_strategies
            from iak_dist.orchestration.local import evaluate_and_report

            unknown = [s for s in args.strategy or [] if s not in known_strategies()]
            if unknown:
                raise UserError(f"--strategy {unknown[0]}: unknown; known: {', '.join(known_strategies())}")
            evaluate_and_report(cfg, ctx, seeds=args.seed, strategies=args.strategy, require_all=False,
                                say_line=lambda line: say(f"[evaluate] {line}", ctx.rank))
    finally:
        close_distributed(ctx)
    return 0


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so that the error starts a line of its own.

    Trap: a bar held by the traceback's frames is closed only when the exception is freed, after
    the message: `data ...: 0%| | 0/82error: <file> row 2: ...` (a bad row found while streaming).
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    from iak_dist.orchestration.outcome import Interrupted

    try:
        code = run(args)
    except UserError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Interrupted as exc:  # SIGTERM / SIGINT in a pipeline or a sweep: the manifest says what to resume
        say(f"error: {exc.message}")
        code = exc.exit_code
    from iak_dist.runtime import exit_launched_rank, is_launched_rank

    if is_launched_rank():
        exit_launched_rank(code)  # see there: a gloo thread can abort Python's teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
