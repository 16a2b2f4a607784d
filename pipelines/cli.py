"""The `fedward` command (also `python -m fedward.pipelines`, which a Ray job runs from its working dir)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedward.errors import ConfigError, FedwardError


def _demo_data(args) -> None:
    from fedward.data_adapters.demo import write_demo_data

    truth = write_demo_data(Path(args.out), hospitals=args.hospitals, seed=args.seed, renal_units=args.renal_unit)
    print(f"wrote {len(truth['hospitals'])} demo hospitals to {args.out}")
    for task in ("images", "ehr"):
        print(f"  {task}: best achievable AUROC (pooled) {truth[task]['best_auroc']['pooled']:.3f}")
    print(f"  images, graded finding: best achievable macro AUROC (pooled) {truth['images']['grade']['best_macro_auroc']['pooled']:.3f}")
    print(f"  ehr, length of stay: best achievable R² (pooled) {truth['ehr']['stay']['best_r2']['pooled']:.3f}")


def _simulate(args) -> None:
    from fedward.config import load_config

    _start(load_config(args.config, args.set), args, address=None)


def _run(args) -> None:
    from fedward.config import load_config
    from fedward.pipelines.submit import require_cluster_paths

    config = load_config(args.config, args.set)
    require_cluster_paths(config)
    _start(config, args, address=args.address)


def _start(config, args, address: str | None) -> None:
    from fedward.pipelines.run import Pipeline

    Pipeline(config, address=address, progress=not args.no_progress).run()
    _print_status(config.run_dir)


def _submit(args) -> None:
    from fedward.pipelines.submit import submit

    print(f"job {submit(Path(args.config), args.address, args.set, follow=not args.no_follow)}")


def _print_status(run_dir: Path) -> None:
    from fedward.pipelines.status import run_status

    print(run_status(Path(run_dir)))


def _compare(args) -> None:
    from fedward.config import load_config
    from fedward.pipelines.baselines import compare, format_comparison
    from fedward.files import atomic_write_json

    config = load_config(args.config, args.set)
    result = compare(config)
    atomic_write_json(config.run_dir / "baselines.json", result)
    print(format_comparison(config, result))


def _certs(args) -> None:
    from fedward.certificates import write_certificates

    nodes = {}
    for given in args.node:
        name, _, addresses = given.partition("=")
        nodes[name] = [a for a in addresses.split(",") if a]
    for path in write_certificates(Path(args.out), nodes):
        print(f"wrote {path}")


def _authority(args) -> None:
    from fedward.certificates import create_authority, revoke, sign_request

    if args.action != "init" and not args.file:
        raise ConfigError(f"fedward authority {args.action}: name the {'request (NAME.csr)' if args.action == 'sign' else 'certificate'}")
    if args.action == "init":
        written = create_authority(Path(args.folder))
    elif args.action == "sign":
        written = [sign_request(Path(args.folder), Path(args.file), args.days)]
    else:
        written = [revoke(Path(args.folder), Path(args.file))]
    for path in written:
        print(f"wrote {path}")


def _request(args) -> None:
    from fedward.certificates import write_request

    for path in write_request(Path(args.out), args.name, [a for a in args.address.split(",") if a], rotate=args.rotate):
        print(f"wrote {path}")


def _approve(args) -> None:
    from fedward.approval import approve
    from fedward.policy import POLICY_ENV

    policy = args.policy or os.environ.get(POLICY_ENV)
    if not policy:
        raise ConfigError(f"fedward approve: name the hospital's policy file with --policy, or set {POLICY_ENV} as its node does")
    print(f"approved {args.digest} in {approve(Path(policy).expanduser(), args.digest, args.note)}")


def _serve(args) -> None:
    import signal
    import threading

    from fedward.actors.site import SiteSettings, serve_hospital

    settings = SiteSettings(
        name=args.name, identity=Path(args.identity), data=Path(args.data), work_dir=Path(args.work_dir), policy=Path(args.policy),
        study=Path(args.study) if args.study else None, driver=args.driver, hosting=args.hosting, gpus=args.gpus,
    )
    server, port = serve_hospital(settings, args.address)
    host = args.address.rsplit(":", 1)[0]
    print(f"{args.name} serving on {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


def _audit(args) -> None:
    from fedward.audit import read

    certificate = Path(args.certificate).read_bytes() if args.certificate else None
    entries = read(Path(args.log), certificate)
    for e in entries:
        round = "" if e["round"] is None else f"round {e['round']}"
        print(f"{e['time']}  {e['run']}  {round:>9}  {e['what']} -> {e['to']}: {e['protection']} ({e['bytes']} bytes, blake3 {e['blake3'][:16]})")
    signed = "each line signed by the certificate's key" if certificate else "signatures not checked (pass --certificate)"
    print(f"{len(entries)} entries; the chain is unbroken; {signed}")


def _report(args) -> None:
    from fedward.explain.report import write_consortium_report

    print(f"wrote {write_consortium_report(Path(args.run_dir))}")


def _explain_patient(args) -> None:
    from fedward.pipelines.patient import explain_patient_at_hospital

    for path in explain_patient_at_hospital(Path(args.run_dir), args.hospital, args.patient):
        print(f"wrote {path}")


def _predict(args) -> None:
    from fedward.pipelines.predict import predict

    done = predict(Path(args.model_dir), Path(args.data), Path(args.out))
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"scored {done.scored} samples; skipped per reason: {done.skipped or 'none'}")
    print(f"wrote {done.out}" + (f"; the inputs not scored, and why: {done.skipped_file}" if done.skipped else ""))


def _settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config setting, e.g. --set privacy.masking.enabled=true (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedward", description="Federated learning across hospitals, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write synthetic demo hospitals (DICOM images and EHR tables)")
    p.add_argument("--out", required=True, help="folder to write the hospitals into")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--renal-unit", action="append", default=[], metavar="HOSPITAL",
        help="make HOSPITAL's EHR cohort dialysis patients, whose outcome depends on creatinine unlike elsewhere (repeatable)",
    )
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("simulate", help="run CONFIG as a local simulation on an embedded Ray")
    p.add_argument("config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _settings(p)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("run", help="run CONFIG on an existing Ray cluster")
    p.add_argument("config")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _settings(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("submit", help="submit CONFIG as a Ray job to a cluster and follow its logs")
    p.add_argument("config", help="a config inside this project folder, which the job ships as its working directory")
    p.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's dashboard (default: http://127.0.0.1:8265)")
    p.add_argument("--no-follow", action="store_true", help="return once submitted")
    _settings(p)
    p.set_defaults(func=_submit)

    p = sub.add_parser("certs", help="write TLS certificates for a consortium's Ray cluster: an authority and one per machine")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key and NAME.crt, NAME.key; an authority already there signs")
    p.add_argument("--node", action="append", default=[], metavar="NAME=ADDRESS[,ADDRESS...]",
                   help="a machine and the addresses (IPs or host names) others reach it at (repeatable)")
    p.set_defaults(func=_certs)

    p = sub.add_parser("authority", help="cross-site mode: the consortium's authority creates itself, signs hospitals' requests, revokes")
    p.add_argument("action", choices=["init", "sign", "revoke"])
    p.add_argument("folder", help="the authority's folder (ca.key, ca.crt, crl.pem, issued.json); keep it off the hospitals' machines")
    p.add_argument("file", nargs="?", help="sign: a hospital's NAME.csr (NAME.crt is written beside it); revoke: a certificate it issued")
    p.add_argument("--days", type=int, default=365, help="sign: how long the certificate is valid (default 365)")
    p.set_defaults(func=_authority)

    p = sub.add_parser("request", help="cross-site mode, at a hospital: make its own private key and a certificate request for the authority")
    p.add_argument("--name", required=True, help="the hospital's name, as the consortium's configs name it")
    p.add_argument("--address", required=True, metavar="ADDRESS[,ADDRESS...]", help="the addresses (IPs or host names) its service is reached at")
    p.add_argument("--out", required=True, help="the hospital's own folder for NAME.key (stays there) and NAME.csr (goes to the authority)")
    p.add_argument("--rotate", action="store_true", help="a new key; the old key and certificate are kept as NAME.old.key and NAME.old.crt")
    p.set_defaults(func=_request)

    p = sub.add_parser("approve", help="cross-site mode, at a hospital: approve study code by the digest a refused run named")
    p.add_argument("digest", help="sha256:... as the hospital's refusal names it (what it covers: study_code.json in its run folder)")
    p.add_argument("--policy", help="the hospital's policy file; approvals are kept beside it (default: $FEDWARD_POLICY)")
    p.add_argument("--note", default="", help="why, or who reviewed it; kept with the approval")
    p.set_defaults(func=_approve)

    p = sub.add_parser("serve", help="cross-site mode, at a hospital: run its own service, which a driver reaches over mutual TLS")
    p.add_argument("--name", required=True, help="the hospital's name, as its certificate and the consortium's configs name it")
    p.add_argument("--identity", required=True, help="its folder of NAME.key, NAME.crt, ca.crt and crl.pem (fedward request)")
    p.add_argument("--address", required=True, help="host:port to listen on (port 0: any free one, printed)")
    p.add_argument("--data", required=True, help="its data folder: whatever a run's config says")
    p.add_argument("--work-dir", required=True, help="its own area for caches, state, reports and its audit log")
    p.add_argument("--policy", required=True, help="its policy file, with a consortium section (roster, fewest_hospitals)")
    p.add_argument("--study", help="the folder it imports approved study code from (fedward approve)")
    p.add_argument("--driver", default="driver", help="the certified name of the only driver it answers")
    p.add_argument("--hosting", choices=["ray", "in_process"], default="ray", help="its hospital a Ray actor on its own Ray (default), or in this process")
    p.add_argument("--gpus", type=float, default=0, help="GPUs its hospital trains on (it uses the first); default 0: the CPU")
    p.set_defaults(func=_serve)

    p = sub.add_parser("audit", help="at a hospital: check and print its own audit log of what it released (audit.jsonl in its work area)")
    p.add_argument("log", help="the hospital's audit.jsonl")
    p.add_argument("--certificate", help="the hospital's certificate (NAME.crt): check that every line was signed with its key")
    p.set_defaults(func=_audit)

    p = sub.add_parser("status", help="show where a run directory stands")
    p.add_argument("run_dir")
    p.set_defaults(func=lambda a: _print_status(Path(a.run_dir)))

    p = sub.add_parser("report", help="write the consortium's HTML report of a run (report.html in RUN_DIR)")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)

    p = sub.add_parser("explain-patient", help="explain one patient's prediction, at their hospital (run on its node)")
    p.add_argument("run_dir")
    p.add_argument("--hospital", required=True)
    p.add_argument("--patient", required=True, help="the patient's id in the hospital's data")
    p.set_defaults(func=_explain_patient)

    p = sub.add_parser("predict", help="score new patients with an exported model, at their hospital (run on its node)")
    p.add_argument("model_dir", help="an exported model: RUN_DIR/model, or a hospital's runs/NAME-HASH/model")
    p.add_argument("--data", required=True, help="a table file (CSV, Parquet, Arrow) or a folder of DICOM files")
    p.add_argument("--out", required=True, help="the predictions: .csv or .parquet, one row per table row or image")
    p.set_defaults(func=_predict)

    p = sub.add_parser("compare", help="train central and local-only baselines on CONFIG's hospitals (demo data)")
    p.add_argument("config")
    _settings(p)
    p.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FedwardError as e:
        print(f"fedward: error: {e}", file=sys.stderr)
        return 2
    return 0
