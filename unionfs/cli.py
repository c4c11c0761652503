"""Command line: parse, call the library, print. Every failure is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from . import __version__, api, mountopts
from .errors import LayermountError, NetworkError, UsageError
from .mount import MountOptions, check_mountpoint, unmount
from .progress import PullProgress, human_size
from .provenance import cut_stack, explain_lines, explain_path
from .textsafe import shown

SUBCOMMANDS = ("unpack", "umount", "store", "inspect", "which", "explain", "diff", "commit", "history", "run",
               "lint", "pull", "push")

MOUNT_USAGE = """\
layermount IMAGE MOUNTPOINT [options]          mount an image (docker save, OCI, or a registry REF) as one root
layermount pull REF                            pull an image from a registry into the layer store
layermount push IMAGE docker://HOST/REPO:TAG   upload an image to a registry
layermount -o lowerdir=L3:L2:L1 MOUNTPOINT     mount layer directories, top first
layermount unpack IMAGE | LAYER.tar...         unpack into the layer store
layermount run [--upper DIR] IMAGE [CMD ...]   run a command in the image (a toy container runtime)
layermount umount MOUNTPOINT                   unmount and wait for the daemon
layermount which MOUNTPOINT/PATH               which layer provides a path, and what hides what
layermount explain MOUNTPOINT/PATH             the lookup of a path told step by step
layermount diff UPPER|MOUNTPOINT [--json]      what the upper layer changed (A/C/D, as docker diff)
layermount commit IMAGE UPPER -o NEW.tar       a new image: IMAGE plus the upper as one more layer
                       [--push docker://REF]  ... and/or pushed to a registry
layermount inspect IMAGE [--json]              platform, layers, build steps and config
layermount history IMAGE                       the build steps, top first, and which layers the store has
layermount lint IMAGE                          what is odd or dangerous in the layers, before mounting
layermount store ls | gc | rm IMAGE            the shared layer store"""


def _print(text: str = "", file=None) -> None:
    """Print one line whose parts may come from an image: escaped, so it cannot drive the terminal."""
    print(shown(text), file=file or sys.stdout)


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other error (``--help`` still shows the usage)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see layermount --help)")


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", help="layer store (default $LAYERMOUNT_STORE, "
                        "/var/lib/layermount as root, else $XDG_DATA_HOME/layermount)")
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pick from a multi-platform image")
    parser.add_argument("--image", dest="ref", metavar="REF", help="which image of an archive holding several (a tag)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_registry_options(parser)


def _add_registry_options(parser: argparse.ArgumentParser) -> None:
    """How to reach a registry, for the verbs that take a REF (skopeo's option names)."""
    parser.add_argument("--tls-verify", type=_boolean, default=True, metavar="true|false",
                        help="verify TLS certificates; false also allows plain HTTP "
                             "(localhost and 127.0.0.0/8 may use HTTP anyway)")
    parser.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials (default: from "
                        "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json)")
    parser.add_argument("--jobs", type=int, metavar="N", help="layers to pull at once (default 3)")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _registry_options(args: argparse.Namespace):
    from .image.auth import parse_creds
    from .image.registry import DEFAULT_JOBS, RegistryOptions

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs: give at least 1")
    return RegistryOptions(tls_verify=args.tls_verify, creds=parse_creds(args.creds) if args.creds else None,
                           jobs=args.jobs or DEFAULT_JOBS)


def _load(args: argparse.Namespace, sources: list[str]):
    try:
        return api.load_image(sources, platform=args.platform, ref=args.ref, registry=_registry_options(args))
    except NetworkError as exc:
        # Offline, as docker run is: an image this store pulled before under that REF will do.
        image = api.recorded_image(api.store_for(getattr(args, "store", None)), sources[0]) \
            if len(sources) == 1 and getattr(args, "command", None) not in ("pull", "push") else None
        if image is None:
            raise
        _print(f"layermount: {exc}; using {image.repo_digests[0]} as pulled before", file=sys.stderr)
        return image


def _mount_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layermount", usage=MOUNT_USAGE,
                                     description="Mount a container image as one root filesystem.")
    parser.add_argument("paths", nargs="+", metavar="IMAGE MOUNTPOINT")
    _add_image_options(parser)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="mount options: lowerdir=L3:L2:L1 (top first) and FUSE options")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("--debug", action="store_true", help="log every request (implies -f)")
    parser.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    parser.add_argument("--suid", action="store_true", help="honour setuid bits (default nosuid)")
    parser.add_argument("--dev", action="store_true", help="allow device nodes (default nodev)")
    parser.add_argument("--log", metavar="FILE", help="where the background daemon logs")
    parser.add_argument("--upper", metavar="DIR", help="keep changes in DIR (a later mount with it shows them "
                        "again); default: a throw-away upper removed at unmount")
    parser.add_argument("--upper-shared", action="store_true",
                        help="accept an --upper DIR that other users can reach into (a copy-up puts the image's "
                        "setuid files and devices there, usable outside the mount's nosuid,nodev)")
    parser.add_argument("--read-only", action="store_true", help="no upper layer: every write fails with EROFS")
    parser.add_argument("--no-layers-dir", action="store_true",
                        help="no /.layers/N (the image as it stood after build step N)")
    parser.add_argument("--whiteout-format", choices=("overlay", "oci"),
                        help="how deletions are written in an -o upperdir= upper (default overlay; image mounts: oci)")
    parser.add_argument("--version", action="version", version=f"layermount {__version__}")
    return parser


def _subcommand_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layermount")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    unpack = commands.add_parser("unpack", help="unpack an image or layer tars into the store")
    unpack.add_argument("sources", nargs="+", metavar="IMAGE|LAYER.tar")
    _add_image_options(unpack)

    run = commands.add_parser("run", help="run a command in the image, in its own namespaces, on the mount")
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("--upper", metavar="DIR", help="keep the container's changes in DIR")
    run.add_argument("--network", choices=("none", "host"), default="none",
                     help="none (default): a network namespace with only loopback; host: share the host's")
    _add_image_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD", help="default: Entrypoint + Cmd")

    umount = commands.add_parser("umount", help="unmount and wait for the daemon to exit")
    umount.add_argument("mountpoint")
    umount.add_argument("-l", "--lazy", action="store_true", help="detach now even if busy")

    inspect = commands.add_parser("inspect", help="show an image's platform, layers, history and config")
    inspect.add_argument("sources", nargs="+", metavar="IMAGE")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--platform")
    inspect.add_argument("--image", dest="ref")
    _add_registry_options(inspect)

    lint = commands.add_parser("lint", help="report what is odd or dangerous in an image's layers")
    lint.add_argument("image", metavar="IMAGE")
    lint.add_argument("--platform")
    lint.add_argument("--image", dest="ref")

    explain = commands.add_parser("explain", help="the lookup of a path told step by step")
    explain.add_argument("path")

    history = commands.add_parser("history", help="the build steps, top first, as docker history shows them")
    history.add_argument("image", metavar="IMAGE")
    _add_image_options(history)
    history.add_argument("--no-trunc", action="store_true", help="show whole digests and steps")

    which = commands.add_parser("which", help="show which layers have a path and which one wins")
    which.add_argument("path")

    diff = commands.add_parser("diff", help="what an upper layer changed, as docker diff prints it")
    diff.add_argument("target", metavar="UPPER|MOUNTPOINT")
    diff.add_argument("--json", action="store_true")
    diff.add_argument("--lowerdir", metavar="L3:L2:L1", help="the lowers of a plain upperdir (top first)")

    commit = commands.add_parser("commit", help="write IMAGE plus the upper as a new layer to a new image")
    commit.add_argument("image", metavar="IMAGE")
    commit.add_argument("upper", metavar="UPPER|MOUNTPOINT")
    commit.add_argument("-o", "--output", metavar="NEW.tar")
    commit.add_argument("--push", metavar="docker://REF", help="push the new image to a registry")
    commit.add_argument("-m", "--message", help="the new layer's history entry (default 'layermount commit')")
    commit.add_argument("--format", choices=("docker", "oci"), default="docker")
    commit.add_argument("--tag", metavar="REPO:TAG")
    commit.add_argument("--platform")
    commit.add_argument("--image", dest="ref")
    _add_registry_options(commit)

    pull = commands.add_parser("pull", help="pull an image from a registry into the layer store")
    pull.add_argument("image", metavar="REF")
    _add_image_options(pull)

    push = commands.add_parser("push", help="upload an image (any layermount reads) to a registry")
    push.add_argument("image", metavar="IMAGE")
    push.add_argument("destination", metavar="docker://HOST/REPO:TAG")
    _add_image_options(push)

    store = commands.add_parser("store", help="the layer store")
    store_option = _Parser(add_help=False)
    store_option.add_argument("--store", metavar="DIR", help="layer store (default as for mounts)")
    store_commands = store.add_subparsers(dest="store_command", required=True, parser_class=_Parser)
    store_commands.add_parser("ls", parents=[store_option], help="layers, sizes and the images that use them")
    store_commands.add_parser("gc", parents=[store_option], help="remove layers no recorded image uses")
    remove = store_commands.add_parser("rm", parents=[store_option],
                                       help="forget an image (its layers go at the next gc)")
    remove.add_argument("image", metavar="ID|TAG|PATH")
    _add_debug_everywhere(parser)
    return parser


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every subcommand: show the traceback of an unexpected failure."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _add_debug_everywhere(subparser)
                if not subparser._subparsers:
                    subparser.add_argument("--debug", action="store_true", help="tracebacks for unexpected failures")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        if argv and argv[0] in SUBCOMMANDS:
            args = _subcommand_parser().parse_args(argv)
            return _run_subcommand(args)
        args = _mount_parser().parse_intermixed_args(argv)
        code = _run_mount(args)
        if not args.foreground and not args.debug:
            _leave_the_daemon_serving(code)
        return code
    except LayermountError as exc:
        _print(f"layermount: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _print("layermount: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # the last line of defence: a hostile input must not get a traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _print(f"layermount: {_input_of(args)}: cannot handle it ({detail}); --debug shows the traceback",
               file=sys.stderr)
        return 3


def _input_of(args: argparse.Namespace | None) -> str:
    """The input a command was working on, to name in an unexpected failure."""
    for name in ("sources", "paths", "image", "target", "upper", "path", "mountpoint"):
        value = getattr(args, name, None)
        if value:
            return value[0] if isinstance(value, list) else value
    return "layermount"


def _leave_the_daemon_serving(code: int) -> None:
    """Exit at once once the forked daemon serves: the interpreter's teardown would write to
    every object, and after fork() every page written is copied (0.1 s, as long as the mount)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_mount(args: argparse.Namespace) -> int:
    parsed = mountopts.parse(args.options)
    fuse_options, warnings = mountopts.fuse_passthrough(parsed)
    for warning in warnings:
        print(f"layermount: {warning}", file=sys.stderr)
    # -o lowerdir= as root is how podman and buildah run a mount_program: fuse-overlayfs'
    # defaults there (others may enter, setuid and devices work); image mounts stay closed.
    as_mount_program = parsed.lowerdirs is not None and os.geteuid() == 0
    options = MountOptions(
        mountpoint="", foreground=args.foreground or args.debug, debug=args.debug,
        allow_other=args.allow_other or parsed.allow_other or as_mount_program,
        suid=parsed.suid if parsed.suid is not None else args.suid or as_mount_program,
        dev=parsed.dev if parsed.dev is not None else args.dev or as_mount_program,
        log_file=args.log, read_only=args.read_only or parsed.read_only, layers_dir=not args.no_layers_dir,
        extra_options=fuse_options)
    if parsed.lowerdirs is not None:
        if len(args.paths) != 1:
            raise UsageError("with -o lowerdir=..., give only the MOUNTPOINT")
        options.mountpoint = args.paths[0]
        if not parsed.lowerdirs:
            raise UsageError("lowerdir= names no directory")
        api.mount_lowerdirs(parsed.lowerdirs, options, parsed.upperdir, parsed.workdir,
                            args.whiteout_format or "overlay", view_options=parsed.view)
        return 0
    if parsed.upperdir is not None or parsed.workdir is not None:
        raise UsageError("upperdir= and workdir= go with lowerdir=; for an image use --upper DIR")
    if len(args.paths) != 2:
        raise UsageError("usage: layermount IMAGE MOUNTPOINT (or -o lowerdir=L3:L2:L1 MOUNTPOINT)")
    image_path, options.mountpoint = args.paths
    check_mountpoint(options.mountpoint)  # before the unpack: fail fast on a bad mountpoint
    image = _load(args, [image_path])
    if args.whiteout_format == "overlay":
        raise UsageError("an image mount's upper is an OCI layer: --whiteout-format overlay is for -o upperdir=")
    api.mount_image(image, api.store_for(args.store), options, PullProgress(quiet=args.quiet), args.upper,
                    view_options=parsed.view, upper_shared=args.upper_shared, jobs=args.jobs)
    return 0


def _run_subcommand(args: argparse.Namespace) -> int:
    if args.command == "unpack":
        image = _load(args, args.sources)
        store = api.store_for(args.store)
        layers = api.unpack(image, store, PullProgress(quiet=args.quiet), jobs=args.jobs)
        if not args.quiet:
            _print(f"Unpacked {image.source} ({len(layers)} layers) into {store.root}")
        return 0
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        image = _load(args, [args.image])
        return api.run_image(image, api.store_for(args.store), command, upper_dir=args.upper,
                             network=args.network, progress=PullProgress(quiet=args.quiet, stream=sys.stderr),
                             jobs=args.jobs)
    if args.command == "umount":
        unmount(args.mountpoint, lazy=args.lazy)
        return 0
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "which":
        return _which(args.path)
    if args.command == "history":
        return _history(args)
    if args.command == "lint":
        from .lint import ERROR, lint_image

        findings = lint_image(api.load_image([args.image], platform=args.platform, ref=args.ref))
        for finding in findings:
            _print(finding)
        errors = sum(finding.severity == ERROR for finding in findings)
        _print(f"{errors} errors, {len(findings) - errors} warnings")
        return 1 if errors else 0
    if args.command == "explain":
        found = api.find_mount(args.path)
        _print(f"Looking up /{found.inside} in {_view_name(found)}, top layer first:")
        for line in explain_lines(_stack_of(found), found.inside):
            _print(line)
        return 0
    if args.command == "store":
        return _store(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "push":
        from .image.registry import push_image

        destination = _push_destination(args.destination)
        image = _load(args, [args.image])
        push_image(image, destination, _registry_options(args), say=_say(args.quiet))
        return 0
    if args.command == "commit":
        return _commit(args)
    if args.command == "diff":
        from .diff import changes

        located = api.locate_upper(args.target, args.lowerdir)
        found = changes(located.upper, located.lowers)
        if args.json:
            print(json.dumps([{"kind": change.kind, "path": change.path} for change in found], indent=1))
        else:
            for change in found:
                _print(change)
        return 0
    raise UsageError(f"unknown command {args.command}")


def _say(quiet: bool):
    from .image.registry import shown

    return (lambda line: None) if quiet else (lambda line: print(shown(line), flush=True))


def _push_destination(text: str):
    from .image.reference import parse_source

    if not text.startswith("docker://"):
        raise UsageError(f"{text}: push to a registry, docker://HOST/REPO:TAG")
    return parse_source(text).registry


def _pull(args: argparse.Namespace) -> int:
    """docker pull's conversation: which layers exist, which arrive, the digest, the status."""
    from .image.reference import parse_source
    from .image.registry import shown

    source = parse_source(args.image)
    if source.registry is None:
        raise UsageError(f"{args.image}: pull takes a registry reference (docker://HOST/REPO:TAG or NAME[:TAG])")
    ref = source.registry
    say = _say(args.quiet)
    image = _load(args, [args.image])
    store = api.store_for(args.store)
    say(f"{ref.tag or ref.digest}: Pulling from {ref.repository}")
    missing = [layer for layer in image.layers if store.layer(layer.diff_id) is None] \
        if store.layers_dir.is_dir() else image.layers
    api.unpack(image, store, PullProgress(quiet=args.quiet), jobs=args.jobs)
    say(f"Digest: {image.repo_digests[0].rsplit('@', 1)[1]}")
    say(f"Status: {'Downloaded newer image' if missing else 'Image is up to date'} for {shown(ref)}")
    if not args.quiet:
        print(shown(ref))
    return 0


def _commit(args: argparse.Namespace) -> int:
    if not args.output and not args.push:
        raise UsageError("commit: give -o NEW.tar, --push docker://REF, or both")
    destination = _push_destination(args.push) if args.push else None
    image = _load(args, [args.image])
    upper = api.locate_upper(args.upper)
    if args.output:
        ident = api.commit(image, upper, args.output, message=args.message, image_format=args.format, tag=args.tag)
        _print(f"Wrote {args.output} ({len(image.layers) + 1} layers, id {ident})")
    if destination is not None:
        digest = api.commit_push(image, upper, destination, _registry_options(args), message=args.message,
                                 say=_say(False))
        _print(f"Pushed {destination.name}:{destination.tag}@{digest} ({len(image.layers) + 1} layers)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    summary = api.image_summary(_load(args, args.sources))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _print(f"Image:    {summary['source']} ({summary['format']})")
    _print(f"Id:       {summary['id']}")
    if summary["repo_tags"]:
        _print(f"Tags:     {', '.join(summary['repo_tags'])}")
    if summary["repo_digests"]:
        _print(f"Digests:  {', '.join(summary['repo_digests'])}")
    _print(f"Platform: {summary['platform'] or '-'}")
    if summary["created"]:
        _print(f"Created:  {summary['created']}")
    _print("Layers (bottom first):")
    for layer in summary["layers"]:
        size = human_size(layer["size"]) if layer["size"] is not None else "?"
        _print(f"  {layer['index']:>3}  {(layer['diff_id'] or layer['digest'] or '?')[:19]}  {size:>9}  "
               f"{layer['created_by'] or '-'}")
    _print("Config:")
    for key, value in summary["config"].items():
        if value:
            _print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def _history(args: argparse.Namespace) -> int:
    image = _load(args, [args.image])
    steps = api.history(image, api.store_for(args.store))
    if image.repo_digests:
        _print(f"Image: {', '.join(image.repo_tags + image.repo_digests)}")
    width = 71 if args.no_trunc else 19
    _print(f"{'LAYER':<{width}}  {'CREATED':<20}  {'SIZE':>9}  {'STORED':<6}  CREATED BY")
    for step in steps:
        layer = (step.diff_id or "<missing>")[:width]
        size = human_size(step.size) if step.size is not None else "?"
        if step.in_store is False:
            size += "*"
        stored = {True: "yes", False: "no", None: "-"}[step.in_store]
        created_by = shown(step.created_by)       # escaped before cutting, so the columns hold
        if not args.no_trunc and len(created_by) > 60:
            created_by = created_by[:57] + "..."
        _print(f"{layer:<{width}}  {step.created[:19]:<20}  {size:>9}  {stored:<6}  {created_by}")
    if any(step.in_store is False for step in steps):
        _print("* size of the blob as stored in the image; unpacked sizes are known once in the store")
    return 0


def _stack_of(found: api.MountPath) -> list[dict]:
    stack = api.mount_stack(found.mountpoint)
    return stack if found.cut is None else cut_stack(stack, found.cut)


def _view_name(found: api.MountPath) -> str:
    if found.cut is None:
        return found.mountpoint
    return f"{found.mountpoint}/.layers/{found.cut} (the image after build step {found.cut})"


def _which(path: str) -> int:
    found = api.find_mount(path)
    verdicts = explain_path(_stack_of(found), found.inside)
    _print(f"/{found.inside}  (mount {_view_name(found)}, layers top first)")
    for verdict in verdicts:
        name = verdict.name[:19] if verdict.name.startswith("sha256:") else verdict.name
        _print(f"  layer {verdict.index:>3}  {verdict.has or '-':<12}  {verdict.note:<40}  {name}")
    if not any(verdict.note == "wins" for verdict in verdicts):
        _print("  (not visible in the merged view)")
        return 1
    return 0


def _store(args: argparse.Namespace) -> int:
    store = api.store_for(args.store)
    if args.store_command == "ls":
        images = store.images()
        users: dict[str, list[str]] = {}
        for record in images:
            label = (record.get("repo_tags") or [os.path.basename(record.get("source", ""))])[0]
            for diff_id in record.get("layers", []):
                users.setdefault(diff_id, []).append(label)
        layers = store.layers()
        _print(f"{'LAYER':<19}  {'SIZE':>9}  {'FILES':>7}  USED BY")
        for layer in layers:
            _print(f"{layer.diff_id[:19]:<19}  {human_size(layer.size):>9}  {layer.meta.get('entries', 0):>7}  "
                  f"{', '.join(users.get(layer.diff_id, [])) or '(unused)'}")
        pulled = [record for record in images if record.get("repo_digests")]
        if pulled:
            _print(f"{'IMAGE':<19}  PULLED FROM")
            for record in pulled:
                _print(f"{record.get('id', '')[:19]:<19}  {', '.join(record.get('repo_tags', []) + record['repo_digests'])}")
        total = sum(layer.size for layer in layers)
        _print(f"{len(layers)} layers, {human_size(total)}, {len(images)} images, store {store.root}")
        return 0
    if args.store_command == "gc":
        removed, busy = store.gc()
        freed = sum(layer.size for layer in removed)
        _print(f"removed {len(removed)} layers, freed {human_size(freed)}")
        for layer in busy:
            _print(f"kept {layer.diff_id[:19]}: in use by a mount")
        return 0
    if args.store_command == "rm":
        removed = store.remove_image(args.image)
        if not removed:
            raise UsageError(f"no image {args.image!r} recorded in store {store.root}")
        for ident in removed:
            _print(f"forgot {ident}")
        return 0
    raise UsageError(f"unknown store command {args.store_command}")
