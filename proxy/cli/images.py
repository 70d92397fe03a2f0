"""`summon images build|verify|list`: the image commands, kept out of cli.py.

Why separate: they import the image builder (kernel lookup, cpio packing) that `serve`
never needs. `add_parsers` registers them on the ``images`` sub-command; each parser
gets ``func=`` taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ImageError
from ..images.manifest import image_names, load_image


def add_parsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    images = subparsers.add_parser("images", help="build, verify and list images")
    images.add_argument("--images-dir", type=Path, default=Path("images"), help="default: images/")
    sub = images.add_subparsers(dest="images_command", required=True)

    build = sub.add_parser("build", help="build the x86_64 microVM (kernel + initramfs) of an image")
    build.add_argument("name", help="image name under the images dir, or a path to an image dir")
    build.add_argument("--images-dir", type=Path, default=argparse.SUPPRESS)
    build.set_defaults(func=cmd_build)

    verify = sub.add_parser("verify", help="check every artefact of every target against its digest")
    verify.add_argument("names", nargs="*", help="default: every image")
    verify.add_argument("--images-dir", type=Path, default=argparse.SUPPRESS)
    verify.set_defaults(func=cmd_verify)

    lst = sub.add_parser("list", help="list images, their digests and targets")
    lst.add_argument("--images-dir", type=Path, default=argparse.SUPPRESS)
    lst.set_defaults(func=cmd_list)
    return images


def _image_dir(images_dir: Path, ref: str) -> Path:
    return Path(ref) if "/" in ref or ref.startswith(".") else images_dir / ref


def cmd_build(args: argparse.Namespace) -> int:
    from ..images.build import build_image

    t0 = time.monotonic()
    image_dir = _image_dir(args.images_dir, args.name)
    try:
        build_image(image_dir, lambda line: print(f"  {line}", flush=True))
        image = load_image(args.images_dir, args.name)
    except ImageError as exc:
        print(f"summon images build: {exc}", file=sys.stderr)
        return 1
    print(f"built {image.ref} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    names = args.names or image_names(args.images_dir)
    if not names:
        print(f"summon images verify: no images in {args.images_dir}", file=sys.stderr)
        return 1
    failures = 0
    for name in names:
        try:
            image = load_image(args.images_dir, name)
        except ImageError as exc:
            print(f"FAIL {name}: {exc}")
            failures += 1
            continue
        for target in image.targets():
            try:
                image.verify(target)
                print(f"ok   {image.name} [{target}] {len(image.artefacts(target))} artefact(s)")
            except ImageError as exc:
                print(f"FAIL {image.name} [{target}]: {exc}")
                failures += 1
    return 1 if failures else 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in image_names(args.images_dir):
        try:
            image = load_image(args.images_dir, name)
        except ImageError as exc:
            print(f"{name}\t(broken: {exc})")
            continue
        print(f"{image.name}\t{image.digest}\t{','.join(image.targets())}\t{image.manifest.get('description', '')}")
    return 0
