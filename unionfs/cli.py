"""Command line: parse, call the library, print. One function per verb; every failure is one line.

Every string that came from an image goes through ``textsafe.shown`` before
it reaches the terminal (``_print``); ``--json`` output is exact JSON (JSON
escapes control characters itself). The parser is the one source of the
help, the shell completions (``layermount completion SHELL``) and the man
page (``layermount man``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from . import __version__, api, mountopts
from .errors import LayermountError, NetworkError, UsageError
from .mount import MountOptions, check_mountpoint, unmount
from .progress import PullProgress, human_size
from .textsafe import shown

PROG = "layermount"
JSON_HELP = "print exact JSON instead of text (strings from the image unescaped, as JSON quotes them)"


def _print(text: str = "", file=None) -> None:
    """Print one line whose parts may come from an image: escaped, so it cannot drive the terminal."""
    print(shown(text), file=file or sys.stdout)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other error (``--help`` still shows the usage)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- the verbs ------------------------------------------------------------------

@dataclass
class Verb:
    name: str
    synopsis: str                                  # the arguments, for the overview
    summary: str                                   # one line
    examples: tuple[str, ...]
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    details: str = ""


VERBS: dict[str, Verb] = {}


def verb(name: str, synopsis: str, summary: str, *examples: str, details: str = ""):
    """Register a verb: ``arguments`` is the function's ``arguments`` attribute, set by ``@args``."""
    def register(function):
        VERBS[name] = Verb(name, synopsis, summary, examples, getattr(function, "arguments", lambda p: None),
                           function, details)
        return function
    return register


def args(configure: Callable[[argparse.ArgumentParser], None]):
    def attach(function):
        function.arguments = configure
        return function
    return attach


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", help="the layer store (default $LAYERMOUNT_STORE, "
                        "/var/lib/layermount as root, else $XDG_DATA_HOME/layermount)")


def _pick_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="which platform of a multi-platform image (default: this machine's)")
    parser.add_argument("--image", dest="ref", metavar="REF", help="which image of an archive holding several (a tag)")


def _image_options(parser: argparse.ArgumentParser) -> None:
    _store_option(parser)
    _pick_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _registry_arguments(parser)


def _registry_arguments(parser: argparse.ArgumentParser) -> None:
    """How to reach a registry, for the verbs that take a REF (skopeo's option names)."""
    parser.add_argument("--tls-verify", type=_boolean, default=True, metavar="true|false",
                        help="verify TLS certificates; false also allows plain HTTP "
                             "(localhost and 127.0.0.0/8 may use HTTP anyway)")
    parser.add_argument("--creds", metavar="USER:PASSWORD", help="registry credentials (default: from "
                        "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json)")
    parser.add_argument("--jobs", type=int, metavar="N", help="layers to pull at once (default 3)")


def _registry_options(args: argparse.Namespace):
    from .image.auth import DEFAULT_JOBS, RegistryOptions, parse_creds

    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs: give at least 1")
    return RegistryOptions(tls_verify=args.tls_verify, creds=parse_creds(args.creds) if args.creds else None,
                           jobs=args.jobs or DEFAULT_JOBS)


def _load(args: argparse.Namespace, sources: list[str], *, offline_ok: bool = True):
    """The image the arguments name: a file, a directory, or a registry REF."""
    try:
        return api.load_image(sources, platform=args.platform, ref=args.ref, registry=_registry_options(args))
    except NetworkError as exc:
        # Offline, as docker run is: an image this store pulled before under that REF will do.
        image = api.recorded_image(api.store_for(getattr(args, "store", None)), sources[0]) \
            if len(sources) == 1 and offline_ok else None
        if image is None:
            raise
        _print(f"layermount: {exc}; using {image.repo_digests[0]} as pulled before", file=sys.stderr)
        return image


def _mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="IMAGE MOUNTPOINT",
                        help="the image (docker save or OCI, tar or directory, or a registry REF) and an empty "
                        "directory; "
                        "with -o lowerdir= only the MOUNTPOINT")
    _image_options(parser)
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                        help="mount options: lowerdir=L3:L2:L1 (top first), upperdir=, workdir= and FUSE options")
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


@verb("mount", "IMAGE MOUNTPOINT [options]", "mount an image as one root filesystem (also without the word mount)",
      "layermount debian.tar /mnt/root", "layermount -o lowerdir=/l3:/l2:/l1,upperdir=/u,workdir=/w /mnt/merged",
      details="Returns once the mount answers; the daemon serves in the background until "
      "'layermount umount MOUNTPOINT'.")
@args(_mount_arguments)
def mount_verb(args: argparse.Namespace) -> int:
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


@verb("umount", "MOUNTPOINT [--lazy]", "unmount and wait for the daemon to exit", "layermount umount /mnt/root")
@args(lambda p: (p.add_argument("mountpoint", help="where the image is mounted"),
                 p.add_argument("-l", "--lazy", action="store_true", help="detach now even if busy")))
def umount_verb(args: argparse.Namespace) -> int:
    unmount(args.mountpoint, lazy=args.lazy)
    return 0


def _unpack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="IMAGE|LAYER.tar",
                        help="an image, or several plain layer tars (bottom first)")
    _image_options(parser)


@verb("unpack", "IMAGE | LAYER.tar...", "unpack an image or layer tars into the shared layer store",
      "layermount unpack debian.tar", "layermount unpack base.tar app.tar --store /srv/layers")
@args(_unpack_arguments)
def unpack_verb(args: argparse.Namespace) -> int:
    image = _load(args, args.sources)
    store = api.store_for(args.store)
    layers = api.unpack(image, store, PullProgress(quiet=args.quiet), jobs=args.jobs)
    if not args.quiet:
        _print(f"Unpacked {image.source} ({_count(len(layers), 'layer')}) into {store.root}")
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image to run")
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD",
                        help="the command and its arguments (default: the image's Entrypoint + Cmd)")
    parser.add_argument("--rm", action="store_true",
                        help="accepted, and the default: nothing of the container is kept but its --upper")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="pass stdin to the command (always done without -t; with -t, relay it to the pty)")
    parser.add_argument("-t", "--tty", action="store_true", help="give the command a terminal (a pty of its own)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL",
                        help="set an environment variable (KEY alone: this shell's value); repeatable")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]",
                        help="bind a host directory at CTR (nosuid,nodev; :ro read-only); repeatable")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside (default: WorkingDir)")
    parser.add_argument("-u", "--user", metavar="USER[:GROUP]", help="run as this user (default: the image's User)")
    parser.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (and its Cmd); '' clears it")
    parser.add_argument("--name", metavar="NAME", help="the container's hostname (default layermount)")
    parser.add_argument("--network", choices=("none", "host"), default="none",
                        help="none (default): a network namespace of its own with only loopback; host: the host's")
    parser.add_argument("--upper", metavar="DIR", help="keep the container's changes in DIR")
    parser.add_argument("--verbose", action="store_true", help="say what the run does: layers, volumes")
    _image_options(parser)


@verb("run", "[options] IMAGE [CMD ...]", "run a command in the image, in namespaces of its own (a toy runtime)",
      "layermount run -it debian.tar /bin/bash", "layermount run -e LANG=C -v $PWD:/src:ro -w /src debian.tar make",
      details="Options go before the image, as with docker run. Needs root. The exit code is the command's "
      "(125: the runtime failed).")
@args(_run_arguments)
def run_verb(args: argparse.Namespace) -> int:
    from .runtime import HOSTNAME, image_volumes
    from .tools.run import RunOptions, parse_bind, run_image

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    options = RunOptions(command=command, entrypoint=args.entrypoint, env=args.env, workdir=args.workdir,
                         user=args.user, hostname=args.name or HOSTNAME,
                         binds=[parse_bind(spec) for spec in args.volume], network=args.network, tty=args.tty,
                         interactive=args.interactive or not args.tty)
    image = _load(args, [args.image])
    volumes = image_volumes(image.config)
    if volumes and (args.verbose or args.upper):
        what = f"volume {volumes[0]} is a fresh temporary directory" if len(volumes) == 1 else \
            f"volumes {', '.join(volumes)} are fresh temporary directories"
        _print(f"layermount: {what}: writes there do not go to the upper layer", file=sys.stderr)
    progress = PullProgress(quiet=args.quiet, stream=sys.stderr, quiet_when_present=not args.verbose)
    return run_image(image, api.store_for(args.store), options, upper_dir=args.upper, progress=progress,
                     jobs=args.jobs)


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="IMAGE", help="one or more images")
    parser.add_argument("--json", action="store_true", help=JSON_HELP + ": an array, as docker inspect prints")
    parser.add_argument("-f", "--format", metavar="TEMPLATE",
                        help="print a Go-template-style field per image, e.g. '{{.Config.Cmd}}' or '{{json .RootFS}}'")
    _pick_options(parser)
    _registry_arguments(parser)


@verb("inspect", "IMAGE... [--json | --format T]", "an image's platform, layers, build steps and config",
      "layermount inspect debian.tar", "layermount inspect debian.tar --format '{{.Config.Cmd}}'",
      "layermount inspect a.tar b.tar --json | jq '.[].Id'",
      details="--json prints what docker inspect / podman image inspect print: Id, RepoTags, RepoDigests, "
      "Created, Architecture, Os, Config, RootFS, History ...; layermount's own view is under Layermount.")
@args(_inspect_arguments)
def inspect_verb(args: argparse.Namespace) -> int:
    from .tools.inspect import inspect_image
    from .tools.template import render

    if args.json and args.format:
        raise UsageError("--json and --format: give one")
    found = [inspect_image(_load(args, [source])) for source in args.sources]
    if args.json:
        _print_json(found)
    elif args.format:
        for info in found:
            _print(render(args.format, info))
    else:
        for number, info in enumerate(found):
            if number:
                _print()
            _inspect_text(info)
    return 0


def _inspect_text(info: dict) -> None:
    own = info["Layermount"]
    _print(f"Image:    {own['Source']} ({own['Format']})")
    _print(f"Id:       {info['Id']}")
    if info["RepoTags"]:
        _print(f"Tags:     {', '.join(info['RepoTags'])}")
    if info["RepoDigests"]:
        _print(f"Digests:  {', '.join(info['RepoDigests'])}")
    _print(f"Platform: {own['Platform'] or '-'}")
    if info["Created"]:
        _print(f"Created:  {info['Created']}")
    _print("Layers (bottom first):")
    for index, layer in enumerate(own["Layers"], start=1):
        size = human_size(layer["Size"]) if layer["Size"] is not None else "?"
        _print(f"  {index:>3}  {(layer['DiffID'] or layer['Digest'] or '?')[:19]}  {size:>9}  "
               f"{layer['CreatedBy'] or '-'}")
    _print("Config:")
    for key in ("Env", "Cmd", "Entrypoint", "WorkingDir", "ExposedPorts", "Volumes", "User", "Labels"):
        value = info["Config"].get(key)
        if value:
            _print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")


def _history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image")
    parser.add_argument("--no-trunc", action="store_true", help="show whole ids and build steps")
    parser.add_argument("-H", "--human", type=_boolean, default=True, metavar="true|false",
                        help="sizes and times for people (default true); --human=false: bytes and timestamps")
    parser.add_argument("--json", action="store_true", help=JSON_HELP + ": an array, top step first")
    _store_option(parser)
    _pick_options(parser)
    _registry_arguments(parser)


@verb("history", "IMAGE [--no-trunc] [--human=false] [--json]", "the build steps, top first, as docker history",
      "layermount history debian.tar", "layermount history --no-trunc --human=false debian.tar",
      details="IMAGE is the image's id on the top step and <missing> below (no image of their own). SIZE is "
      "what the layer holds unpacked, known once the store has it; BLOB is the layer's size in the image.")
@args(_history_arguments)
def history_verb(args: argparse.Namespace) -> int:
    from .tools.history import history

    image = _load(args, [args.image])
    steps = history(image, api.store_for(args.store))
    if args.json:
        _print_json([step.as_json() for step in steps])
        return 0
    if image.repo_digests:
        _print(f"Image: {', '.join(image.repo_tags + image.repo_digests)}")
    now = datetime.datetime.now(datetime.timezone.utc)
    id_width = 71 if args.no_trunc else 12
    _print(f"{'IMAGE':<{id_width}}  {'CREATED':<20}  {'CREATED BY':<45}  {'SIZE':>9}  {'BLOB':>9}  STORED")
    for step in steps:
        ident = (step.image if args.no_trunc else step.image.split(":")[-1][:12]) if step.image else "<missing>"
        created_by = shown(step.created_by)       # escaped before cutting, so the columns hold
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:42] + "..."
        created = _since(step.created, now) if args.human else step.created
        stored = {True: "yes", False: "no", None: "-"}[step.in_store]
        _print(f"{ident:<{id_width}}  {shown(created)[:20]:<20}  {created_by:<45}  {_size(step.size, args.human):>9}  "
               f"{_size(step.blob_size, args.human):>9}  {stored}")
    return 0


def _lint_arguments(parser: argparse.ArgumentParser) -> None:
    from .tools.lint import RULES

    parser.add_argument("image", metavar="IMAGE", help="the image")
    parser.add_argument("--json", action="store_true", help=JSON_HELP + ": an array of findings")
    parser.add_argument("--ignore", action="append", default=[], metavar="RULE",
                        help="leave out a rule, by id or name (LM201 or setuid-file); repeatable or comma-separated. "
                        "Rules: " + ", ".join(f"{code} {name}" for code, name in RULES.items()))
    parser.add_argument("--all", action="store_true", help="list every info finding instead of grouping them")
    _pick_options(parser)
    _registry_arguments(parser)


@verb("lint", "IMAGE [--json] [--ignore RULE]", "what is odd or dangerous in an image's layers, before mounting",
      "layermount lint debian.tar", "layermount lint --ignore LM201 --json app.tar",
      details="Errors are what unpacking would refuse (exit 1); warnings deserve a look; info is what every "
      "distribution has (setuid-root helpers in system directories, nodes in /dev), grouped per rule.")
@args(_lint_arguments)
def lint_verb(args: argparse.Namespace) -> int:
    from .tools.lint import ERROR, INFO, USUAL, WARNING, lint_image, rule_code

    ignore = frozenset(rule_code(name) for spec in args.ignore for name in spec.split(",") if name)
    findings = lint_image(_load(args, [args.image]), ignore)
    errors = sum(finding.severity == ERROR for finding in findings)
    if args.json:
        _print_json([finding.as_json() for finding in findings])
        return 1 if errors else 0
    infos: dict[str, list] = {}
    for finding in findings:
        if finding.severity == INFO and not args.all:
            infos.setdefault(finding.code, []).append(finding)
        else:
            _print(finding)
    for code, group in infos.items():
        paths = ", ".join("/" + finding.path for finding in group[:6]) + (", ..." if len(group) > 6 else "")
        _print(f"info: {_count(len(group), 'path')}: {USUAL[code]}, as every distribution has: {paths} "
               f"[{code} {group[0].rule}] (--all lists each)")
    warnings = sum(finding.severity == WARNING for finding in findings)
    _print(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}, {len(findings) - errors - warnings} info")
    return 1 if errors else 0


@verb("which", "MOUNTPOINT/PATH [--json]", "which layers have a path, which one wins, what hides what",
      "layermount which /mnt/root/etc/os-release", "layermount which /mnt/root/.layers/2/usr/bin/awk",
      details="PATH is resolved inside the image, as its processes see it (its absolute symlinks stay in it); "
      "MOUNTPOINT/.layers/N/PATH asks the image as it stood after build step N.")
@args(lambda p: (p.add_argument("path", help="a path inside a layermount mount"),
                 p.add_argument("--json", action="store_true", help=JSON_HELP + ": one object per layer, top first")))
def which_verb(args: argparse.Namespace) -> int:
    from .tools.locate import find_mount
    from .tools.provenance import explain_path

    found = find_mount(args.path)
    verdicts = explain_path(_stack_of(found), found.inside)
    visible = any(verdict.note == "wins" for verdict in verdicts)
    if args.json:
        _print_json({"mountpoint": found.mountpoint, "cut": found.cut, "path": "/" + found.inside, "visible": visible,
                     "layers": [{"index": v.index, "name": v.name, "has": v.has, "note": v.note} for v in verdicts]})
        return 0 if visible else 1
    _print(f"/{found.inside}  (mount {_view_name(found)}, layers top first)")
    for verdict in verdicts:
        name = verdict.name[:19] if verdict.name.startswith("sha256:") else verdict.name
        _print(f"  layer {verdict.index:>3}  {verdict.has or '-':<12}  {verdict.note:<40}  {name}")
    if not visible:
        _print("  (not visible in the merged view)")
    return 0 if visible else 1


@verb("explain", "MOUNTPOINT/PATH", "the lookup of a path told step by step, top layer first",
      "layermount explain /mnt/root/usr/bin/tool", details="PATH is resolved as for which.")
@args(lambda p: p.add_argument("path", help="a path inside a layermount mount"))
def explain_verb(args: argparse.Namespace) -> int:
    from .tools.locate import find_mount
    from .tools.provenance import explain_lines

    found = find_mount(args.path)
    _print(f"Looking up /{found.inside} in {_view_name(found)}, top layer first:")
    for line in explain_lines(_stack_of(found), found.inside):
        _print(line)
    return 0


def _stack_of(found) -> list[dict]:
    """The layers the path is looked up in: the mount's, or those of its /.layers/N cut."""
    from .tools.locate import mount_stack
    from .tools.provenance import cut_stack

    stack = mount_stack(found.mountpoint)
    return stack if found.cut is None else cut_stack(stack, found.cut)


def _view_name(found) -> str:
    if found.cut is None:
        return found.mountpoint
    return f"{found.mountpoint}/.layers/{found.cut} (the image after build step {found.cut})"


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="UPPER|MOUNTPOINT",
                        help="a mountpoint, a kept --upper DIR, or a plain upperdir (with --lowerdir)")
    parser.add_argument("--lowerdir", metavar="L3:L2:L1", help="the lowers of a plain upperdir (top first)")
    parser.add_argument("--json", action="store_true", help=JSON_HELP + ": [{kind, path}, ...]")
    parser.add_argument("--format", choices=("text", "json", "podman"), default=None,
                        help="podman: JSON as podman diff --format json prints it, {changed, added, deleted}")


@verb("diff", "UPPER|MOUNTPOINT [--json | --format podman]", "what an upper layer changed (A/C/D, as docker diff)",
      "layermount diff /mnt/root", "layermount diff ./upper --format podman")
@args(_diff_arguments)
def diff_verb(args: argparse.Namespace) -> int:
    from .library import diff

    found = diff(args.target, lowerdir=args.lowerdir)
    form = args.format or ("json" if args.json else "text")
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json and --format {args.format}: give one")
    if form == "json":
        _print_json([{"kind": change.kind, "path": change.path} for change in found])
    elif form == "podman":
        kinds = {"C": "changed", "A": "added", "D": "deleted"}
        grouped: dict[str, list[str]] = {}
        for change in found:
            grouped.setdefault(kinds[change.kind], []).append(change.path)
        _print_json(grouped)
    else:
        for change in found:
            _print(change)
    return 0


def _commit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image the upper was made on")
    parser.add_argument("upper", metavar="UPPER|MOUNTPOINT", help="a kept --upper DIR or a mountpoint")
    parser.add_argument("-o", "--output", metavar="NEW.tar", help="where the new image goes (a file)")
    parser.add_argument("--push", metavar="docker://REF", help="push the new image to a registry (with or without -o)")
    parser.add_argument("-m", "--message", help="the new layer's history entry (default 'layermount commit')")
    parser.add_argument("--format", choices=("docker", "oci"), default="docker",
                        help="docker (default): docker save form; oci: an OCI layout tar")
    parser.add_argument("--tag", metavar="REPO:TAG", help="the new image's tag")
    _pick_options(parser)
    _registry_arguments(parser)


@verb("commit", "IMAGE UPPER -o NEW.tar | --push REF", "write IMAGE plus the upper as one more layer to a new image",
      "layermount commit debian.tar ./upper -o debian-edited.tar -m 'RUN edit' --tag me/debian:edited",
      "layermount commit debian.tar ./upper --push docker://localhost:5000/me/debian:edited")
@args(_commit_arguments)
def commit_verb(args: argparse.Namespace) -> int:
    from .tools.commit import commit, commit_push
    from .tools.locate import locate_upper

    if not args.output and not args.push:
        raise UsageError("commit: give -o NEW.tar, --push docker://REF, or both")
    destination = _push_destination(args.push) if args.push else None
    image = _load(args, [args.image])
    upper = locate_upper(args.upper)
    if args.output:
        ident = commit(image, upper, args.output, message=args.message, image_format=args.format, tag=args.tag)
        _print(f"Wrote {args.output} ({_count(len(image.layers) + 1, 'layer')}, id {ident})")
    if destination is not None:
        digest = commit_push(image, upper, destination, _registry_options(args), message=args.message,
                             say=_say(False))
        _print(f"Pushed {destination.name}:{destination.tag}@{digest} ({_count(len(image.layers) + 1, 'layer')})")
    return 0


def _pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="REF", help="docker://HOST/REPO:TAG, HOST/REPO@sha256:..., or NAME[:TAG]")
    _image_options(parser)


@verb("pull", "REF", "pull an image from a registry into the layer store, as docker pull",
      "layermount pull docker://localhost:5000/debian:12", "layermount pull --tls-verify=false myhost:5000/app:1")
@args(_pull_arguments)
def pull_verb(args: argparse.Namespace) -> int:
    """docker pull's conversation: which layers exist, which arrive, the digest, the status."""
    from .image.reference import parse_source
    from .image.registry import shown as shown_ref

    source = parse_source(args.image)
    if source.registry is None:
        raise UsageError(f"{args.image}: pull takes a registry reference (docker://HOST/REPO:TAG or NAME[:TAG])")
    ref = source.registry
    say = _say(args.quiet)
    image = _load(args, [args.image], offline_ok=False)
    store = api.store_for(args.store)
    say(f"{ref.tag or ref.digest}: Pulling from {ref.repository}")
    missing = [layer for layer in image.layers if store.layer(layer.diff_id) is None] \
        if store.layers_dir.is_dir() else image.layers
    api.unpack(image, store, PullProgress(quiet=args.quiet), jobs=args.jobs)
    say(f"Digest: {image.repo_digests[0].rsplit('@', 1)[1]}")
    say(f"Status: {'Downloaded newer image' if missing else 'Image is up to date'} for {shown_ref(ref)}")
    if not args.quiet:
        print(shown_ref(ref))
    return 0


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="any image layermount reads (a file, a directory, a REF)")
    parser.add_argument("destination", metavar="docker://HOST/REPO:TAG", help="where it goes")
    _image_options(parser)


@verb("push", "IMAGE docker://HOST/REPO:TAG", "upload an image to a registry",
      "layermount push debian.tar docker://localhost:5000/debian:12")
@args(_push_arguments)
def push_verb(args: argparse.Namespace) -> int:
    from .image.registry import push_image

    destination = _push_destination(args.destination)
    image = _load(args, [args.image], offline_ok=False)
    push_image(image, destination, _registry_options(args), say=_say(args.quiet))
    return 0


def _say(quiet: bool):
    from .image.registry import shown as shown_ref

    return (lambda line: None) if quiet else (lambda line: print(shown_ref(line), flush=True))


def _push_destination(text: str):
    from .image.reference import parse_source

    if not text.startswith("docker://"):
        raise UsageError(f"{text}: push to a registry, docker://HOST/REPO:TAG")
    return parse_source(text).registry


STORE_VERBS = {
    "ls": ("images (name, id, size, layers, when) and the layers they use", "layermount store ls --json"),
    "gc": ("remove layers no recorded image uses", "layermount store gc"),
    "rm": ("forget an image (its layers go at the next gc)", "layermount store rm debian:12"),
}


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="store_command", required=True, parser_class=_Parser, metavar="ls|gc|rm")
    for name, (summary, example) in STORE_VERBS.items():
        sub = commands.add_parser(name, help=summary, description=f"{summary}\n\nexample:\n  {example}")
        _store_option(sub)
        if name == "ls":
            sub.add_argument("--json", action="store_true", help=JSON_HELP + ": {images: [...], layers: [...]}")
            sub.add_argument("--layers", action="store_true", help="also list every layer and who uses it")
        if name == "rm":
            sub.add_argument("image", metavar="ID|TAG|PATH", help="the image, by id, tag or the path it came from")


@verb("store", "ls | gc | rm IMAGE", "the shared layer store: list, collect garbage, forget an image",
      "layermount store ls", "layermount store rm debian:12 && layermount store gc")
@args(_store_arguments)
def store_verb(args: argparse.Namespace) -> int:
    store = api.store_for(args.store)
    if args.store_command == "ls":
        return _store_ls(store, args)
    if args.store_command == "gc":
        removed, busy = store.gc()
        _print(f"removed {_count(len(removed), 'layer')}, freed {human_size(sum(layer.size for layer in removed))}")
        for layer in busy:
            _print(f"kept {layer.diff_id[:19]}: in use by a mount")
        return 0
    removed = store.remove_image(args.image)
    if not removed:
        raise UsageError(f"no image {args.image!r} recorded in store {store.root}")
    for ident in removed:
        _print(f"forgot {ident}")
    return 0


def _store_ls(store, args: argparse.Namespace) -> int:
    layers = {layer.diff_id: layer for layer in store.layers()}
    images = []
    for record in store.images():
        own = [diff_id for diff_id in record.get("layers", []) if isinstance(diff_id, str)]
        tags = [tag for tag in record.get("repo_tags") or [] if isinstance(tag, str)]
        when = record.get("recorded_at")
        digests = [digest for digest in record.get("repo_digests") or [] if isinstance(digest, str)]
        images.append({"Id": record.get("id"), "RepoTags": tags, "RepoDigests": digests, "Source": record.get("source"),
                       "Layers": own, "Size": sum(layers[d].size for d in own if d in layers),
                       "Complete": all(d in layers for d in own),
                       "Recorded": _iso(when) if isinstance(when, (int, float)) else None})
    used = {diff_id for image in images for diff_id in image["Layers"]}
    if args.json:
        _print_json({"images": images, "layers": [
            {"DiffID": layer.diff_id, "Size": layer.size, "Files": layer.meta.entries,
             "UsedBy": [image["Id"] for image in images if layer.diff_id in image["Layers"]]}
            for layer in layers.values()]})
        return 0
    _print(f"{'IMAGE':<30}  {'ID':<12}  {'SIZE':>9}  {'LAYERS':>6}  RECORDED")
    for image in images:
        name = (image["RepoTags"] or [os.path.basename(image["Source"] or "") or "<none>"])[0]
        ident = str(image["Id"] or "?").split(":")[-1][:12]
        layers_text = str(len(image["Layers"])) + ("" if image["Complete"] else "*")
        _print(f"{shown(name):<30}  {ident:<12}  {human_size(image['Size']):>9}  {layers_text:>6}  "
               f"{(image['Recorded'] or '?')[:19]}")
    if args.layers:
        _print()
        _print(f"{'LAYER':<19}  {'SIZE':>9}  {'FILES':>7}  USED BY")
        for layer in layers.values():
            users = [(image["RepoTags"] or [os.path.basename(image["Source"] or "")])[0] for image in images
                     if layer.diff_id in image["Layers"]]
            _print(f"{layer.diff_id[:19]:<19}  {human_size(layer.size):>9}  {layer.meta.entries:>7}  "
                   f"{', '.join(users) or '(unused)'}")
    pulled = [image for image in images if image["RepoDigests"]]
    if pulled:
        _print()
        _print(f"{'ID':<12}  PULLED FROM")
        for image in pulled:
            _print(f"{str(image['Id'] or '?').split(':')[-1][:12]:<12}  {', '.join(image['RepoTags'] + image['RepoDigests'])}")
    unused = [layer for diff_id, layer in layers.items() if diff_id not in used]
    total = sum(layer.size for layer in layers.values())
    _print(f"{_count(len(images), 'image')}, {_count(len(layers), 'layer')} ({len(unused)} unused), "
           f"{human_size(total)}, store {store.root}")
    if any(not image["Complete"] for image in images):
        _print("* some of the image's layers are no longer in the store")
    return 0


# ---- help, completion, man ---------------------------------------------------------

@verb("help", "[VERB]", "help on a verb, or the overview", "layermount help run")
@args(lambda p: p.add_argument("topic", nargs="*", metavar="VERB", help="a verb (and a store verb: store ls)"))
def help_verb(args: argparse.Namespace) -> int:
    if not args.topic:
        _mount_parser().print_help()
        return 0
    if args.topic[0] not in VERBS:
        raise UsageError(f"help {args.topic[0]!r}: no such verb (verbs: {', '.join(VERBS)})")
    parser = _verb_parser(args.topic[0])
    if args.topic[0] == "store" and len(args.topic) > 1:
        parser.parse_args([args.topic[1], "--help"])
    parser.print_help()
    return 0


@verb("completion", "bash|zsh|fish", "print a shell completion script, generated from this parser",
      "layermount completion bash > /etc/bash_completion.d/layermount",
      "layermount completion fish > ~/.config/fish/completions/layermount.fish",
      "echo 'eval \"$(layermount completion zsh)\"' >> ~/.zshrc")
@args(lambda p: p.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell"))
def completion_verb(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(subcommand_parser(), shell=args.shell))
    return 0


@verb("man", "", "print the manual page (roff), generated from this parser", "layermount man | man -l -",
      "layermount man > /usr/local/share/man/man1/layermount.1")
def man_verb(args: argparse.Namespace) -> int:
    from .manpage import manual

    sys.stdout.write(manual(subcommand_parser(), VERBS, __version__))
    return 0


# ---- parsers --------------------------------------------------------------------

def overview() -> str:
    width = max(len(f"{PROG} {v.name} {v.synopsis}") for v in VERBS.values() if len(v.synopsis) < 40) + 2
    lines = []
    for v in VERBS.values():
        left = f"{PROG} {v.name} {v.synopsis}".rstrip()
        lines.append(f"{left:<{width}}{v.summary}" if len(left) < width else f"{left}\n{'':<{width}}{v.summary}")
    return "\n".join(lines) + f"\n\n'{PROG} help VERB' or '{PROG} VERB --help' tells more about each."


def _describe(v: Verb) -> str:
    text = v.summary[0].upper() + v.summary[1:] + "."
    if v.details:
        text += "\n\n" + v.details
    return text + "\n\nexamples:\n" + "\n".join(f"  {example}" for example in v.examples)


def _finish(parser: argparse.ArgumentParser) -> None:
    """``--version`` and ``--debug`` on every verb (and store verb)."""
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finish(sub)
            return
    if not any("--debug" in action.option_strings for action in parser._actions):
        parser.add_argument("--debug", action="store_true", help="tracebacks for unexpected failures")


def _verb_parser(name: str) -> argparse.ArgumentParser:
    v = VERBS[name]
    parser = _Parser(prog=f"{PROG} {name}", description=_describe(v))
    v.arguments(parser)
    _finish(parser)
    return parser


def _mount_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, usage=f"{PROG} IMAGE MOUNTPOINT [options]\n\n{overview()}",
                     description="Mount a container image as one root filesystem.")
    _mount_arguments(parser)
    _finish(parser)
    return parser


def subcommand_parser() -> argparse.ArgumentParser:
    """Every verb in one parser: what completion and the man page are generated from."""
    parser = _Parser(prog=PROG, description="Mount a container image as one root filesystem, and learn its layers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="VERB")
    for v in VERBS.values():
        sub = commands.add_parser(v.name, help=v.summary, description=_describe(v),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        v.arguments(sub)
        _finish(sub)
    return parser


# ---- main -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        name = argv[0] if argv and argv[0] in VERBS else "mount"
        if name == "mount":
            rest = argv[1:] if argv[:1] == ["mount"] else argv
            parser = _mount_parser() if argv[:1] != ["mount"] else _verb_parser("mount")
            args = parser.parse_intermixed_args(rest)
            code = mount_verb(args)
            if not args.foreground and not args.debug:
                _leave_the_daemon_serving(code)
            return code
        args = _verb_parser(name).parse_args(argv[1:])
        return VERBS[name].run(args)
    except LayermountError as exc:
        _print(f"layermount: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _print("layermount: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:      # `layermount ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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


# ---- small formatting -----------------------------------------------------------

def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def _size(size: int | None, human: bool) -> str:
    if size is None:
        return "?"
    return human_size(size) if human else str(size)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _since(created: str, now: datetime.datetime) -> str:
    """docker's "3 weeks ago"; the timestamp as given when it is not one."""
    try:
        moment = datetime.datetime.fromisoformat(_six_digit_fraction(created))
    except ValueError:
        return created
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return created
    for unit, length in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                         ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= length:
            return f"{_count(int(seconds // length), unit)} ago"
    return "just now"      # fits the 20-character column, as every other answer does


def _six_digit_fraction(created: str) -> str:
    """Go writes nanoseconds; Python's fromisoformat reads at most microseconds."""
    head, dot, rest = created.partition(".")
    if not dot:
        return created
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
