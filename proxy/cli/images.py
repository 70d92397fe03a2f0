"""`summon images build|rebuild|verify|list|history|diff|gc|push|pull|announce|deploy|rollback`: the image commands.

Why separate: they import the image builder (kernel lookup, cpio packing) that `serve`
never needs. `add_parsers` registers them on the ``images`` sub-command; each parser
gets ``func=`` taking the parsed args and returning an exit code (0 fine, 1 a failed
check or build, 2 bad arguments or config, 3 a rebuild refused: an input is missing).

Where things are: ``--images-dir`` (default images/) and ``--store`` (default
``<images dir>/.store``), or both from a config's ``[images]`` with ``-c``; `gc` also
reads the config's routes for the versions they pin. `deploy` and `rollback` ask the
running summon of the config (`-c`, default summon.toml) through its admin API.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import BuildSetupError, ImageError
from ..images.manifest import built_manifest_file, image_names, load_image, read_manifest_file
from ..images.store import Store


def _where(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--images-dir / --store / -c on `images` and again on each sub-command."""
    default = None if top else argparse.SUPPRESS
    p.add_argument("--images-dir", type=Path, default=default, help="default: images/")
    p.add_argument("--store", type=Path, default=default, help="the image store (default: <images dir>/.store)")
    p.add_argument("-c", "--config", default=default,
                   help="take [images] dir and store (and, for gc and history, the routes' pins) from this config")


def add_parsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    images = subparsers.add_parser("images", help="build, rebuild, verify, list and collect images")
    _where(images, top=True)
    sub = images.add_subparsers(dest="images_command", required=True)

    build = sub.add_parser("build", help="build the microVM (kernel + initramfs) of an image")
    build.add_argument("name", help="image name under the images dir, or a path to an image dir")
    build.add_argument("--arch", default="x86_64", metavar="ARCH",
                       help="x86_64 (default), aarch64 (from Debian's arm64 packages: `make image-arm64` "
                            "or `make test` enables them), a comma list, or all")
    build.add_argument("--kernel", choices=("packaged", "minimal"), default=None,
                       help="x86_64's kernel: packaged (Debian's cloud kernel, the default) or minimal (compiled "
                            "from linux-source-6.1 once, then cached); default: the recipe's "
                            "[targets.x86_64] kernel_source, else packaged")
    _where(build)
    build.set_defaults(func=cmd_build)

    rebuild = sub.add_parser("rebuild", help="recreate a version's artefacts from its manifest, bit for bit")
    rebuild.add_argument("name", help="NAME (its latest build) or NAME@sha256:<version> (from the store)")
    rebuild.add_argument("--manifest", type=Path, help="rebuild what this built image.toml records instead")
    rebuild.add_argument("--check", action="store_true", help="compare the digests and print what differs; "
                         "store nothing")
    rebuild.add_argument("--allow-substitutes", action="store_true",
                         help="when a recorded package version cannot be had, use the one named instead")
    rebuild.add_argument("--arch", default="x86_64", metavar="ARCH",
                         help="the microVM target to rebuild: x86_64 (default), aarch64 (its arm64 packages "
                              "are fetched as .debs), a comma list, or all (every one the manifest has)")
    _where(rebuild)
    rebuild.set_defaults(func=cmd_rebuild)

    pull = sub.add_parser("pull", help="fetch a version another summon node built (its admin API), verified")
    pull.add_argument("ref", help="NAME@sha256:<version>")
    pull.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="the serving node's admin address, e.g. http://10.0.0.5:8081 "
                           "(its token, if it has one, from $SUMMON_ADMIN_TOKEN)")
    _where(pull)
    pull.set_defaults(func=cmd_pull)

    push = sub.add_parser("push", help="upload an image's microVM into a libvirt host's storage pool, verified there")
    push.add_argument("ref", help="NAME (its current version) or NAME@sha256:<version> (from the store)")
    push.add_argument("--host", required=True, help="a libvirt [[host]] of the config (-c): its uri and arch")
    push.add_argument("--pool", help="the host's storage pool (default: the host's pool, else \"summon\")")
    _where(push)
    push.set_defaults(func=cmd_push)

    ann = sub.add_parser("announce", help="tell the fleet's edges (through [cluster] redis) to pull a version "
                         "from this node's store")
    ann.add_argument("ref", help="NAME (its current version) or NAME@sha256:<version> (from the store)")
    ann.add_argument("--url", action="append", metavar="URL",
                     help="where edges pull it from: a summon admin address serving /images/sha256/ "
                          "(repeatable; default: [images] announce_urls, else http://<[proxy] admin>)")
    _where(ann)
    ann.set_defaults(func=cmd_announce)

    history = sub.add_parser("history", help="every version of an image built here, and when each served")
    history.add_argument("name")
    history.add_argument("--events", type=Path, help="the event log (default: the config's [events] path)")
    _where(history)
    history.set_defaults(func=cmd_history)

    diff = sub.add_parser("diff", help="what changed between two versions (packages, files, settings)")
    diff.add_argument("a", help="NAME@sha256:..., sha256:..., or NAME (its current version)")
    diff.add_argument("b")
    _where(diff)
    diff.set_defaults(func=cmd_diff)

    gcp = sub.add_parser("gc", help="remove store objects no pinned, current or recent version needs")
    gcp.add_argument("--keep", type=int, default=3, help="builds of each image to keep (default 3)")
    gcp.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    _where(gcp)
    gcp.set_defaults(func=cmd_gc)

    deploy = sub.add_parser("deploy", help="switch the routes that follow an image to a version, rolling "
                                           "(a running summon, through its admin API)")
    deploy.add_argument("ref", help="NAME@sha256:<version> (in the image store), or NAME: its latest build")
    deploy.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long until the switch is over (deployed or rolled back)")
    deploy.add_argument("-c", "--config", default=argparse.SUPPRESS, help="the running summon's config "
                        "(default summon.toml): its admin address and token")
    deploy.set_defaults(func=cmd_deploy)
    rollback = sub.add_parser("rollback", help="switch the routes that follow an image back to the version they "
                                               "served before, rolling")
    rollback.add_argument("name")
    rollback.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                          help="wait up to this long until the switch is over")
    rollback.add_argument("-c", "--config", default=argparse.SUPPRESS, help="the running summon's config "
                          "(default summon.toml)")
    rollback.set_defaults(func=cmd_rollback)

    verify = sub.add_parser("verify", help="check every artefact of every target against its digest")
    verify.add_argument("names", nargs="*", help="default: every image")
    _where(verify)
    verify.set_defaults(func=cmd_verify)

    lst = sub.add_parser("list", help="list images, their digests and targets")
    _where(lst)
    lst.set_defaults(func=cmd_list)
    return images


def _image_dir(images_dir: Path, ref: str) -> Path:
    return Path(ref) if "/" in ref or ref.startswith(".") else images_dir / ref


def _resolve_where(args: argparse.Namespace) -> int:
    """Fill args.images_dir and args.store from the flags, the config, or the defaults
    (0, or 2 after printing a config problem)."""
    args.routes_config = None
    if args.config:
        from .common import load_or_report

        config = load_or_report(args.config)
        if config is None:
            return 2
        args.routes_config = config
        args.images_dir = args.images_dir or config.images_dir
        args.store = args.store or config.images_store
    args.images_dir = args.images_dir or Path("images")
    args.store = args.store or args.images_dir / ".store"
    return 0


def _source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH (reproducible-builds.org), read here at the entry point only."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    return int(raw) if raw.isdigit() else None


def cmd_build(args: argparse.Namespace) -> int:
    from ..images.build import build_image, parse_arches

    if rc := _resolve_where(args):
        return rc
    try:
        arches = parse_arches(args.arch)
    except ValueError as exc:
        print(f"summon images build: --arch: {exc}", file=sys.stderr)
        return 2
    epoch = _source_date_epoch()
    if epoch is None:
        print(f"summon images build: SOURCE_DATE_EPOCH={os.environ['SOURCE_DATE_EPOCH']!r} is not a whole number "
              "of seconds", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    image_dir = _image_dir(args.images_dir, args.name)
    try:
        build_image(image_dir, lambda line: print(f"  {line}", flush=True), store=args.store, source_date_epoch=epoch,
                    arches=arches, kernel_source=args.kernel)
        image = load_image(args.images_dir, args.name, store=args.store)
    except BuildSetupError as exc:  # fix the recipe or the machine first
        print(f"summon images build: {exc}", file=sys.stderr)
        return 2
    except ImageError as exc:
        print(f"summon images build: {exc}", file=sys.stderr)
        return 1
    print(f"built {image.ref} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if rc := _resolve_where(args):
        return rc
    names = args.names or image_names(args.images_dir)
    if not names:
        print(f"summon images verify: no images in {args.images_dir}", file=sys.stderr)
        return 1
    failures = 0
    for name in names:
        try:
            image = load_image(args.images_dir, name, store=args.store)
        except ImageError as exc:
            print(f"FAIL {name}: {exc}")
            failures += 1
            continue
        for target in image.targets():
            try:
                image.verify(target)
                problems, notes = _verify_inputs(image, target)
            except ImageError as exc:
                print(f"FAIL {image.name} [{target}]: {exc}")
                failures += 1
                continue
            for note in notes:
                print(f"note {image.name} [{target}]: {note}")
            if problems:
                for problem in problems:
                    print(f"FAIL {image.name} [{target}]: {problem}")
                failures += 1
            else:
                print(f"ok   {image.name} [{target}] {len(image.artefacts(target))} artefact(s)"
                      f"{' and the minimal kernel inputs' if _is_minimal(image, target) else ''}")
    return 1 if failures else 0


def _is_minimal(image: object, target: str) -> bool:
    b = getattr(image, "manifest", {}).get("build")
    return target == "x86_64" and isinstance(b, dict) and b.get("kernel_source") == "minimal"


def _verify_inputs(image: object, target: str) -> tuple[list[str], list[str]]:
    """(problems, notes) about what [build] records of a minimal kernel (nothing otherwise):
    checked against the kernel's own embedded .config and the initramfs's entries."""
    if not _is_minimal(image, target):
        return [], []
    import hashlib

    from ..images import minimal as mk
    from ..images.rebuild import read_newc

    b = image.manifest["build"]  # type: ignore[attr-defined]
    record = b.get("minimal_kernel")
    if not isinstance(record, dict):
        return ["[build] says kernel_source = \"minimal\" but has no minimal_kernel table"], []
    kernel = image.path(target, "kernel").read_bytes()  # type: ignore[attr-defined]
    initrd = read_newc(image.path(target, "initrd").read_bytes())  # type: ignore[attr-defined]
    try:
        committed = mk.FRAGMENT.read_text()
    except OSError:
        committed = None
    same = committed is not None and hashlib.sha256(committed.encode()).hexdigest() == record.get(
        "config_fragment_sha256")
    packages = b.get("packages") if isinstance(b.get("packages"), dict) else {}
    problems, notes = mk.check_record(record, packages, kernel, list(initrd), committed if same else None)
    if b.get("modules"):
        problems.append(f"[build].modules lists {b['modules']}: the minimal kernel loads none")
    return problems, notes


def cmd_list(args: argparse.Namespace) -> int:
    if rc := _resolve_where(args):
        return rc
    for name in image_names(args.images_dir):
        try:
            image = load_image(args.images_dir, name, store=args.store)
        except ImageError as exc:
            print(f"{name}\t(broken: {exc})")
            continue
        print(f"{image.name}\t{image.digest}\t{','.join(image.targets())}\t{image.manifest.get('description', '')}")
    return 0


def _version(args: argparse.Namespace, ref: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    """(digest, manifest) of NAME (its current version), NAME@sha256:... or sha256:... (the store)."""
    store = Store(args.store)
    if ref.startswith("sha256:"):
        return ref, store.manifest(ref)
    image = load_image(args.images_dir, ref, store=args.store)
    return image.digest, image.manifest


def cmd_rebuild(args: argparse.Namespace) -> int:
    from ..images.rebuild import keep, rebuild, scratch_dir
    from ..images.store import Build

    if rc := _resolve_where(args):
        return rc
    store = Store(args.store)
    name = args.name.split("@", 1)[0]
    image_dir = _image_dir(args.images_dir, name)
    try:
        if args.manifest is not None:
            manifest = read_manifest_file(args.manifest)
            source = str(args.manifest)
        elif "@" in args.name:
            digest, manifest = _version(args, args.name)
            source = f"the image store {args.store}"
        else:
            built = built_manifest_file(image_dir)
            if not built.is_file():
                print(f"summon images rebuild: {name} has no build ({built} is missing): `summon images build {name}` "
                      f"first, or pass --manifest FILE or {name}@sha256:<version>", file=sys.stderr)
                return 3
            manifest, source = read_manifest_file(built), str(built)
    except ImageError as exc:
        print(f"summon images rebuild: {exc}", file=sys.stderr)
        return 3
    from ..images.build import parse_arches
    from ..images.manifest import manifest_digest
    from ..images.rebuild import vm_targets

    digest = manifest_digest(manifest)
    try:
        targets = vm_targets(manifest) if args.arch == "all" else parse_arches(args.arch)
    except ValueError as exc:
        print(f"summon images rebuild: --arch: {exc}", file=sys.stderr)
        return 2
    if not targets:
        print(f"summon images rebuild: {manifest['name']}@{digest} has no microVM target", file=sys.stderr)
        return 3
    print(f"rebuilding {manifest['name']}@{digest} [{', '.join(targets)}] from {source}")
    t0 = time.monotonic()
    with scratch_dir() as tmp:
        outs = []
        for target in targets:
            try:
                out = rebuild(manifest, image_dir, store, Path(tmp) / target, allow_substitutes=args.allow_substitutes,
                              target=target, progress=lambda line: print(f"  {line}", flush=True))
            except ImageError as exc:
                print(f"summon images rebuild: {exc}", file=sys.stderr)
                return 3
            for line in out.lines:
                print(f"  {line}")
            for u in out.unavailable:
                print(f"  UNAVAILABLE {u}", file=sys.stderr)
            for r in out.refused:
                print(f"  CANNOT {r}", file=sys.stderr)
            if out.refused or (out.unavailable and not args.allow_substitutes):
                hint = " (--allow-substitutes to rebuild with the versions named, and see what differs)" \
                    if out.unavailable and not out.refused else ""
                print(f"refused: {manifest['name']}@{digest} cannot be rebuilt as recorded ({target}){hint}",
                      file=sys.stderr)
                return 3
            if out.artefacts is None:
                return 3
            if out.differences:
                print(f"DIFFERS: {manifest['name']}@{digest} did not rebuild bit for bit ({target}):")
                for d in out.differences:
                    print(f"  {d}")
                return 1
            if out.unavailable:
                print(f"the digests match, but only with substituted packages ({'; '.join(map(str, out.unavailable))}): "
                      f"{manifest['name']}@{digest} is not rebuildable as recorded; nothing stored")
                return 1
            outs.append(out)
        if args.check:
            print(f"ok: {manifest['name']}@{digest} rebuilds bit for bit ({', '.join(targets)}; "
                  f"{time.monotonic() - t0:.1f}s)")
            return 0
        try:
            for out in outs:
                keep(out, store)
            if _has_site(manifest, image_dir, skip=tuple(targets)):
                store.put_artefacts(manifest, image_dir, skip=tuple(targets))  # keep() stored the rebuilt ones
            version = store.put_manifest(manifest)
            store.record(Build(manifest["name"], version, str(manifest.get("build", {}).get("recipe_digest", "")),
                               time.time(), "rebuild"))
            store.materialize(version)
            for target in targets:
                _relink_build(manifest, version, image_dir, store, target)
        except ImageError as exc:
            print(f"summon images rebuild: {exc}", file=sys.stderr)
            return 1
    print(f"rebuilt {manifest['name']}@{digest} bit for bit into {args.store} ({', '.join(targets)}; "
          f"{time.monotonic() - t0:.1f}s)")
    return 0


def _relink_build(manifest: dict, version: str, image_dir: Path, store: Store,  # type: ignore[type-arg]
                  target: str = "x86_64") -> None:
    """When build/image.toml records this version, put back any of its artefacts that are
    missing or damaged there (a rebuild repairs the latest build in place)."""
    from ..images.manifest import artefact_digest, manifest_digest
    from ..images.store import link_into

    built = built_manifest_file(image_dir)
    if not built.is_file() or manifest_digest(read_manifest_file(built)) != version:
        return
    t = manifest["targets"][target]
    for key in ("kernel", "initrd"):
        p = image_dir / t[key]
        try:
            ok = artefact_digest(p) == t[f"{key}_sha256"]
        except ImageError:
            ok = False
        if not ok:
            p.parent.mkdir(parents=True, exist_ok=True)
            link_into(store.object_path(t[f"{key}_sha256"]), p)
            print(f"  restored {p}")


def _has_site(manifest: dict, image_dir: Path, skip: tuple[str, ...] = ("x86_64",)) -> bool:  # type: ignore[type-arg]
    """True when every artefact the manifest names outside the rebuilt targets (`skip`) is
    on disk as recorded (the site, another arch's build); else the store must hold it."""
    from ..images.manifest import artefact_digest
    from ..images.store import artefact_refs

    for target, _key, rel, want in artefact_refs(manifest):
        if target not in skip:
            p = image_dir / rel
            if not p.exists() or artefact_digest(p) != want:
                return False
    return True


def cmd_history(args: argparse.Namespace) -> int:
    if rc := _resolve_where(args):
        return rc
    store = Store(args.store)
    builds = store.builds(args.name)
    if not builds:
        print(f"summon images history: no builds of {args.name!r} in {args.store}", file=sys.stderr)
        return 1
    try:
        current = load_image(args.images_dir, args.name, store=args.store).digest
    except ImageError:
        current = ""
    served = _served(args)
    pins = _pins(args)
    from ..images.deployed import read_deployed

    try:
        deployed = read_deployed(args.store, args.name)
    except ImageError as exc:
        print(f"  ({exc})", file=sys.stderr)
        deployed = None
    print(f"{'built (UTC)':20} {'how':8} {'version':24} {'recipe':24} served")
    for b in builds:
        marks = []
        if b.digest == current:
            marks.append("current")
        if deployed is not None and b.digest == deployed.version:
            marks.append(f"deployed ({deployed.how} {_utc(deployed.at)})")
        if b.digest in pins:
            marks.append("pinned by " + ", ".join(sorted(pins[b.digest])))
        if not store.has(b.digest):
            marks.append("collected")
        span = served.get(b.digest)
        when = (", ".join(f"{_utc(a)} .. {_utc(z)}" for a, z in span[0]) + f" ({span[1]} instance(s))"
                if span else "-")
        print(f"{_utc(b.built_at):20} {b.how:8} {b.digest[:24]} {b.recipe_digest[:24]:24} {when}"
              + (f"  [{'; '.join(marks)}]" if marks else ""))
    return 0


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _served(args: argparse.Namespace) -> dict[str, tuple[list[tuple[float, float]], int]]:
    """version -> (the time ranges its instances served, how many instances) from the event
    log: each instance from `ready` to `stopped` or `failed`, overlapping ones (or a second
    apart) merged, so a version deployed, replaced and rolled back to shows two ranges."""
    path = args.events or (args.routes_config.events_path if args.routes_config is not None else None)
    if path is None:
        return {}
    from ..observe.events import open_readonly

    try:
        events = open_readonly(path).query(kinds=("ready", "stopped", "failed"))
    except (FileNotFoundError, OSError) as exc:
        print(f"  (no event log: {exc})", file=sys.stderr)
        return {}
    lives: dict[tuple[str, str], list[float]] = {}  # (version, instance) -> [first, last]
    for e in events:
        if not e.image_digest:  # `summoned` comes before the image is resolved: `ready` has it
            continue
        span = lives.setdefault((e.image_digest, e.instance), [e.ts, e.ts])
        span[0], span[1] = min(span[0], e.ts), max(span[1], e.ts)
    by_version: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, int] = {}
    for (version, _instance), (a, z) in lives.items():
        by_version.setdefault(version, []).append((a, z))
        counts[version] = counts.get(version, 0) + 1
    out: dict[str, tuple[list[tuple[float, float]], int]] = {}
    for version, spans in by_version.items():
        merged: list[tuple[float, float]] = []
        for a, z in sorted(spans):
            if merged and a <= merged[-1][1] + 1.0:  # a second apart reads as one range (the output's resolution)
                merged[-1] = (merged[-1][0], max(merged[-1][1], z))
            else:
                merged.append((a, z))
        out[version] = (merged, counts[version])
    return out


def _pins(args: argparse.Namespace) -> dict[str, set[str]]:
    """version -> routes pinning it, from the config given with -c."""
    out: dict[str, set[str]] = {}
    config = args.routes_config
    if config is None:
        return out
    for route in config.routes:
        if route.image and "@sha256:" in route.image:
            out.setdefault(route.image.split("@", 1)[1], set()).add(route.name)
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    from ..images.versions import diff_manifests

    if rc := _resolve_where(args):
        return rc
    try:
        da, a = _version(args, args.a)
        db, b = _version(args, args.b)
    except ImageError as exc:
        print(f"summon images diff: {exc}", file=sys.stderr)
        return 2
    lines = diff_manifests(a, b, Store(args.store))
    print(f"--- {a.get('name')}@{da}\n+++ {b.get('name')}@{db}")
    for line in lines:
        print(line)
    if not lines:
        print("(identical)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ..images.versions import gc

    if rc := _resolve_where(args):
        return rc
    store = Store(args.store)
    current: set[str] = set()
    for name in image_names(args.images_dir):
        try:
            current.add(load_image(args.images_dir, name, store=args.store).digest)
        except ImageError:
            continue
    pinned = set(_pins(args))
    from ..images.deployed import all_deployed

    for rec in all_deployed(args.store):  # what routes following an image serve, and where rollback goes
        pinned.update(v for v in (rec.version, rec.previous) if v)
    if args.config is None:
        print("summon images gc: no -c CONFIG: keeping only the current and the last "
              f"{args.keep} build(s) of each image (pins in routes are not known)", file=sys.stderr)
    try:
        result = gc(store, pinned, current, args.keep, dry_run=args.dry_run)
    except ImageError as exc:
        print(f"summon images gc: {exc}", file=sys.stderr)
        return 2
    verb = "would remove" if args.dry_run else "removed"
    for v in result.removed_versions:
        print(f"{verb} version {v}")
    print(f"{verb} {result.removed_objects} object(s), {result.removed_bytes // 1024} KiB, "
          f"{result.removed_trees} tree(s); kept {len(result.kept_versions)} version(s)")
    for v in result.kept_versions:
        why = [w for w, s in (("pinned", pinned), ("current", current)) if v in s]
        print(f"  kept {v}" + (f" ({', '.join(why)})" if why else " (recent)"))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ..backends.libvirt_pool import push
    from ..errors import SummonError

    if rc := _resolve_where(args):
        return rc
    config = args.routes_config
    if config is None:
        print("summon images push: give the config holding the host: -c summon.toml", file=sys.stderr)
        return 2
    host = next((h for h in config.hosts if h.name == args.host), None)
    if host is None or host.backend != "libvirt":
        known = ", ".join(h.name for h in config.hosts if h.backend == "libvirt") or "none"
        print(f"{config.path}: --host {args.host!r}: no libvirt [[host]] of that name (libvirt hosts: {known})",
              file=sys.stderr)
        return 2
    pool = args.pool or host.pool or "summon"
    t0 = time.monotonic()
    try:
        image = load_image(args.images_dir, args.ref, store=args.store)
        image.verify(host.arch)  # never send what does not match its digest here
        artefacts = [(path, hexd) for _key, path, hexd in image.artefacts(host.arch)]
        pushed = push(host.uri, pool, artefacts, lambda line: print(f"  {line}", flush=True))
    except SummonError as exc:
        print(f"summon images push: {exc.detail}", file=sys.stderr)
        return 1
    sent = sum(p.size for p in pushed if p.uploaded)
    took = time.monotonic() - t0
    print(f"pushed {image.ref} [{host.arch}] to {host.name} ({host.uri}, pool {pool}): "
          f"{sum(p.uploaded for p in pushed)} of {len(pushed)} artefact(s) uploaded, {sent // 1024} KiB in {took:.1f}s"
          + (f" ({sent / max(took, 1e-6) / 1e6:.0f} MB/s, read back and verified)" if sent else
             ", every volume already there and intact"))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ..images.distribute import http_fetch, pull

    if rc := _resolve_where(args):
        return rc
    name, sep, version = args.ref.partition("@")
    if not sep or not version.startswith("sha256:"):
        print(f"summon images pull: {args.ref!r}: give NAME@sha256:<version>", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        got = pull(args.source, name, version, Store(args.store), http_fetch(os.environ.get("SUMMON_ADMIN_TOKEN")))
    except ImageError as exc:
        print(f"summon images pull: {exc}", file=sys.stderr)
        return 1
    print(f"pulled {name}@{got.version} from {args.source}: {got.objects} object(s), {got.bytes // 1024} KiB, "
          f"every digest checked ({time.monotonic() - t0:.1f}s); a route can pin image = \"{name}@{got.version}\"")
    return 0


def cmd_announce(args: argparse.Namespace) -> int:
    """Put the version in this node's store (what edges pull from), then announce it."""
    from redis.exceptions import RedisError

    from ..cluster.redis_store import sync_client
    from ..config import parse_base_urls
    from ..images.announce import ANNOUNCED, Announcement, announce
    from ..serve.preflight import redis_password

    if rc := _resolve_where(args):
        return rc
    config = args.routes_config
    if config is None or config.cluster is None:
        print("summon images announce: give the centre's config, with [cluster] redis = ...: -c summon.toml",
              file=sys.stderr)
        return 2
    if args.url:
        try:
            urls = parse_base_urls(args.url)
        except ValueError as exc:
            print(f"summon images announce: --url: {exc}", file=sys.stderr)
            return 2
    elif config.announce_urls:
        urls = config.announce_urls
    elif config.proxy.admin is not None:
        urls = (f"http://{config.proxy.admin}",)
    else:
        print(f"{config.path}: no URL to announce: set [images] announce_urls (or [proxy] admin), or give --url",
              file=sys.stderr)
        return 2
    store = Store(args.store)
    try:
        image = load_image(args.images_dir, args.ref, store=args.store)
        if not store.has(image.digest):  # an edge asks this store for it: all of it must be there
            store.put_version(image.manifest, image.dir)
    except ImageError as exc:
        print(f"summon images announce: {exc}", file=sys.stderr)
        return 1
    a = Announcement(image.name, image.digest, urls, config.cluster.node, time.time())
    try:
        announce(sync_client(config.cluster.redis, redis_password(config)), a)
    except (RedisError, OSError) as exc:
        print(f"summon images announce: {config.cluster.redis}: {exc}", file=sys.stderr)
        return 1
    print(f"announced {image.ref} in {ANNOUNCED} ({config.cluster.redis}); edges following {image.name} "
          f"pull it from {', '.join(urls)}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    name, sep, version = args.ref.partition("@")
    if sep and not (version.startswith("sha256:") and len(version) == 71
                    and all(c in "0123456789abcdef" for c in version[7:])):
        print(f"summon images deploy: {args.ref!r}: give NAME@sha256:<version> or NAME", file=sys.stderr)
        return 2
    return _switch(args, "deploy", {"image": name, **({"version": version} if sep else {})})


def cmd_rollback(args: argparse.Namespace) -> int:
    return _switch(args, "rollback", {"image": args.name})


def _switch(args: argparse.Namespace, action: str, body: dict) -> int:  # type: ignore[type-arg]
    """POST /images/<action> to the running summon; with --wait, follow /status until the
    routes serve one version again."""
    import json
    import urllib.error
    import urllib.request

    from .common import admin_request, admin_target, refusal

    config_path = getattr(args, "config", None) or "summon.toml"
    target = admin_target(config_path, f"/images/{action}")
    if isinstance(target, int):
        return target
    config, url = target
    try:
        with urllib.request.urlopen(admin_request(config, url, json_body=body), timeout=30) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        said, text = refusal(exc)
        error = said.get("error", "") if isinstance(said, dict) else text
        print(f"summon images {action}: {error} ({exc.code})", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"summon images {action}: cannot reach the admin API at {url}: {exc} (is `summon serve` running?)",
              file=sys.stderr)
        return 1
    routes = ", ".join(answer.get("routes", []))
    print(f"{action} {answer['image']}: {answer.get('from') or '?'} -> {answer['to']} on route(s) {routes}")
    if answer.get("pinned"):
        print(f"  not switched (their config pins a version): {', '.join(answer['pinned'])}")
    if args.wait <= 0:
        print("  rolling: the old instances serve until one of the new version is ready "
              "(`summon events` shows deploy_started, deployed or rolled_back)")
        return 0
    status_url = url.rsplit("/images/", 1)[0] + "/status"
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with urllib.request.urlopen(admin_request(config, status_url), timeout=5) as resp:
                status = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        mine = [r for r in status.get("routes", []) if r.get("name") in answer.get("routes", [])]
        if mine and all(_settled(r) for r in mine):
            if all(r.get("version") == answer["to"] for r in mine):
                print(f"  deployed: every instance of {routes} serves {answer['to']}")
                return 0
            print(f"  rolled back: {routes} serve(s) {mine[0].get('version')} again "
                  "(`summon events` says why)", file=sys.stderr)
            return 1
    print(f"  still switching after {args.wait:g}s (see `summon status`)", file=sys.stderr)
    return 1


def _settled(route: dict) -> bool:  # type: ignore[type-arg]
    """Every live instance is of the route's version (none of another left to drain; a
    cold route switches at once, its next boot is of the new version)."""
    live = [i for i in route.get("instances", []) if i.get("state") in ("booting", "ready", "draining")]
    return all(i.get("version") == route.get("version") for i in live)
