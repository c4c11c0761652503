"""The command line as docker, podman and skopeo users type it, driven through a subprocess."""

from __future__ import annotations

import datetime
import argparse
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import termios

import images
import pytest

from conftest import LAYERMOUNT, run_layermount
from unionfs.image.writer import Device, Dir, File, layer_tar, new_config, write_image

PAYLOAD = "evil\x1b]0;owned\x07\x1b[2J\rFORGED"
ESCAPED = "evil\\x1b]0;owned\\x07\\x1b[2J\\rFORGED"


def verbs() -> list[str]:
    from unionfs.cli import VERBS

    return list(VERBS)


@pytest.fixture
def image(tmp_path):
    return images.build(tmp_path / "image.tar")


# ---- help and discovery -------------------------------------------------------

def test_every_verb_and_option_has_help_and_every_verb_an_example():
    from unionfs.cli import VERBS, subcommand_parser

    parser = subcommand_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(VERBS)

    def check(name, sub):
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for inner, inner_parser in action.choices.items():
                    assert "example" in inner_parser.description, f"{name} {inner}"
                    check(f"{name} {inner}", inner_parser)
            else:
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
    for name, sub in commands.choices.items():
        assert VERBS[name].summary and VERBS[name].examples, name
        check(name, sub)


@pytest.mark.parametrize("verb", verbs())
def test_help_verb_shows_description_and_example_and_version_works_on_every_verb(verb):
    shown = run_layermount("help", verb)
    assert shown.returncode == 0, shown.stderr
    assert "examples:" in shown.stdout and f"layermount {verb}" in shown.stdout
    version = run_layermount(verb, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, "layermount 0.1.0"), version.stderr


def test_help_alone_is_the_overview_not_an_image_and_an_unknown_topic_is_a_usage_error():
    overview = run_layermount("help")
    assert overview.returncode == 0 and all(f"layermount {verb}" in overview.stdout for verb in verbs())
    unknown = run_layermount("help", "nosuch")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "nosuch" in unknown.stderr
    store_ls = run_layermount("help", "store", "ls")
    assert store_ls.returncode == 0 and "--json" in store_ls.stdout


def test_bash_completion_is_generated_from_the_parser_and_completes_verbs_and_options(tmp_path):
    script = tmp_path / "layermount.bash"
    script.write_text(run_layermount("completion", "bash", check=True).stdout)
    # Ask bash itself what it would offer after "layermount " and "layermount history --".
    probe = f"""
source {script}
complete -p layermount
for line in "layermount " "layermount history --"; do
  COMP_LINE="$line"; COMP_WORDS=($line); [[ "$line" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMP_POINT=${{#line}}
  $(complete -p layermount | sed -E 's/.*-F ([^ ]+).*/\\1/') layermount "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"
  echo "${{COMPREPLY[*]}}"
done
"""
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert set(verbs()) <= set(lines[1].split()), lines
    assert {"--no-trunc", "--human", "--json", "--version"} <= set(lines[2].split()), lines


@pytest.mark.parametrize("shell,marker", [("zsh", "#compdef layermount"), ("fish", "complete -c layermount")])
def test_zsh_and_fish_completion_name_every_verb(shell, marker):
    result = run_layermount("completion", shell)
    assert result.returncode == 0 and marker in result.stdout
    assert all(verb in result.stdout for verb in verbs())
    if shutil.which(shell):
        check = ["zsh", "-n"] if shell == "zsh" else ["fish", "--no-execute"]
        assert subprocess.run(check, input=result.stdout, text=True, capture_output=True).returncode == 0


def test_man_page_is_valid_roff_and_documents_every_verb_and_option():
    page = run_layermount("man", check=True).stdout
    for verb in verbs():
        assert f".SS {verb}" in page
    assert "\\-\\-no\\-trunc" in page and ".SH EXIT STATUS" in page
    warnings = subprocess.run(["groff", "-man", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert warnings.returncode == 0 and warnings.stderr == "", warnings.stderr
    text = subprocess.run(["groff", "-man", "-Tutf8"], input=page, capture_output=True, text=True).stdout
    assert "layermount run" in text.replace("\u2010", "-")


@pytest.mark.parametrize("verb", ["unpack", "history", "inspect", "lint"])
def test_verbs_that_never_mount_leave_the_fuse_stack_and_the_http_client_unloaded(verb, image, tmp_path):
    """Importing pyfuse3, trio, httpx and zstandard is most of a short run's start: only the verbs that need
    them may load them (a top-level import of the mount or registry module brings them all back)."""
    store = ["--store", str(tmp_path / "store")]
    argv = [verb, str(image)] + {"unpack": [*store, "-q"], "history": store}.get(verb, [])
    code = (f"import sys\nfrom unionfs.cli import main\ncode = main({argv!r})\n"
            "print(sorted({'pyfuse3', 'trio', 'httpx', 'zstandard'} & set(sys.modules)), code, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stderr.splitlines()[-1] == "[] 0", result.stderr


# ---- inspect ----------------------------------------------------------------------

def test_inspect_json_is_an_array_with_dockers_keys(tmp_path, image):
    other = images.build(tmp_path / "other.tar", layers=[images.BASE], tag="other:1", format="oci")
    result = run_layermount("inspect", image, other, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert isinstance(found, list) and len(found) == 2
    for info in found:
        assert {"Id", "RepoTags", "RepoDigests", "Created", "Architecture", "Os", "Config", "RootFS",
                "History"} <= set(info)
        assert not any("_" in key for key in info), "snake_case key"
        assert info["RootFS"]["Type"] == "layers" and all(d.startswith("sha256:") for d in info["RootFS"]["Layers"])
    assert found[0]["RepoTags"] == ["fixture:latest"] and found[1]["RepoTags"] == ["other:1"]
    assert found[0]["Config"]["Cmd"] == ["/bin/sh"] and len(found[0]["RootFS"]["Layers"]) == 4
    assert found[0]["RepoDigests"] == []         # never a null digest


def test_inspect_format_reads_fields_as_go_templates_print_them(image):
    result = run_layermount("inspect", image, "--format", "{{.Config.Cmd}} {{.Os}}/{{.Architecture}} "
                            "{{json .Config.Env}} {{.Config.Nothing}} {{len .RootFS}}")
    assert result.returncode == 2 and "len .RootFS" in result.stderr        # unsupported: a usage error
    result = run_layermount("inspect", image, "--format", "{{.Config.Cmd}}|{{json .Config.Env}}|{{.Config.Nothing}}"
                            "|{{ .RepoTags }}|{{.Config}}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('[/bin/sh]|["PATH=/usr/bin:/bin"]|<no value>|[fixture:latest]|'
                             'map[Cmd:[/bin/sh] Env:[PATH=/usr/bin:/bin] WorkingDir:/]\n')


def test_inspect_format_escapes_what_the_image_wrote(tmp_path):
    """Attack (catalogue: CLI output): a Cmd and a tag carrying terminal escapes, printed with
    --format. Must hold: escaped on the terminal, exact in --json."""
    config = new_config(["step"])
    config["config"] = {"Cmd": [PAYLOAD]}
    hostile = tmp_path / "hostile.tar"
    write_image(hostile, [layer_tar([File("a", b"a")])], config, repo_tag="evil:tag")
    shown = run_layermount("inspect", hostile, "--format", "{{.Config.Cmd}}")
    assert shown.stdout == f"[{ESCAPED}]\n" and "\x1b" not in shown.stdout
    exact = json.loads(run_layermount("inspect", hostile, "--json").stdout)
    assert exact[0]["Config"]["Cmd"] == [PAYLOAD]


# ---- history ----------------------------------------------------------------------

def test_history_json_no_trunc_human_false_and_missing(image, store_dir):
    rows = run_layermount("history", image, "--store", store_dir).stdout.splitlines()
    assert rows[0].split()[:4] == ["IMAGE", "CREATED", "CREATED", "BY"]
    assert rows[1].startswith(json.loads(run_layermount("inspect", image, "--json").stdout)[0]["Id"][7:19])
    assert all(row.startswith("<missing>") for row in rows[2:])
    steps = json.loads(run_layermount("history", image, "--json", "--store", store_dir).stdout)
    assert [step["CreatedBy"] for step in steps] == list(reversed(images.STEPS))
    assert steps[0]["Id"].startswith("sha256:") and {step["Id"] for step in steps[1:]} == {"<missing>"}
    assert all(step["Size"] is None and step["InStore"] is False for step in steps)   # one SIZE meaning
    run_layermount("unpack", image, "--store", store_dir, "-q", check=True)
    steps = json.loads(run_layermount("history", image, "--json", "--store", store_dir).stdout)
    assert all(isinstance(step["Size"], int) and step["InStore"] for step in steps)
    exact = run_layermount("history", image, "--store", store_dir, "--no-trunc", "--human=false").stdout.splitlines()
    assert exact[1].startswith(steps[0]["Id"]) and len(steps[0]["Id"]) == 71
    base = exact[-1].split()
    assert str(steps[-1]["Size"]) in base and str(steps[-1]["BlobSize"]) in base     # bytes, not "70.1kB"
    human = run_layermount("history", image, "--store", store_dir).stdout.splitlines()
    assert "kB" in human[-1]
    bad = run_layermount("history", image, "--human=maybe")
    assert bad.returncode == 2 and "maybe" in bad.stderr


# ---- lint -------------------------------------------------------------------------

def lint_image(tmp_path):
    layer = [Dir("usr/bin"), File("usr/bin/passwd", b"x", mode=0o4755), File("usr/bin/chage", b"x", mode=0o2755),
             Dir("srv"), File("srv/helper", b"x", mode=0o4755), Dir("dev"), Device("dev/null", "char", 1, 3),
             Device("dev/zero", "char", 1, 5), Device("srv/disk", "block", 8, 0)]
    path = tmp_path / "lint.tar"
    write_image(path, [layer_tar(layer)], new_config(["step"]))
    return path


def test_lint_rule_ids_json_ignore_singular_and_info_for_what_every_distribution_has(tmp_path):
    path = lint_image(tmp_path)
    text = run_layermount("lint", path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "warning: layer 1: /srv/helper: setuid file (owner 0); the default mount is nosuid [LM201 setuid-file]" \
        in lines
    assert any(line.startswith("warning: layer 1: /srv/disk: device node 8:0") for line in lines)
    infos = [line for line in lines if line.startswith("info:")]
    assert len(infos) == 2 and "2 paths" in infos[0] and "/usr/bin/passwd" in infos[0], lines
    assert lines[-1] == "0 errors, 2 warnings, 4 info"
    every = run_layermount("lint", path, "--all").stdout
    assert "info: layer 1: /dev/zero: device node 1:5" in every
    found = json.loads(run_layermount("lint", path, "--json").stdout)
    assert {(f["code"], f["rule"], f["severity"]) for f in found} == {
        ("LM201", "setuid-file", "warning"), ("LM201", "setuid-file", "info"),
        ("LM202", "device-node", "warning"), ("LM202", "device-node", "info")}
    one = run_layermount("lint", path, "--ignore", "LM202", "--ignore", "setuid-file").stdout.splitlines()
    assert one == ["0 errors, 0 warnings, 0 info"]
    only_disk = run_layermount("lint", path, "--ignore", "LM201", "--all").stdout.splitlines()
    assert only_disk[-1] == "0 errors, 1 warning, 2 info"
    bad = run_layermount("lint", path, "--ignore", "LM999")
    assert bad.returncode == 2 and "LM999" in bad.stderr and bad.stderr.count("\n") == 1


# ---- store ls ---------------------------------------------------------------------

def test_store_ls_lists_images_with_name_id_size_layers_and_when(tmp_path, image, store_dir):
    run_layermount("unpack", image, "--store", store_dir, "-q", check=True)
    other = images.build(tmp_path / "other.tar", layers=[images.BASE], tag="other:1")
    run_layermount("unpack", other, "--store", store_dir, "-q", check=True)
    text = run_layermount("store", "ls", "--store", store_dir).stdout.splitlines()
    assert text[0].split() == ["IMAGE", "ID", "SIZE", "LAYERS", "RECORDED"]
    rows = {line.split()[0]: line.split() for line in text[1:3]}
    assert rows["fixture:latest"][3] == "4" and rows["other:1"][3] == "1"
    assert text[-1].startswith("2 images, 4 layers (0 unused)")
    listing = json.loads(run_layermount("store", "ls", "--json", "--store", store_dir).stdout)
    assert {tuple(image["RepoTags"]) for image in listing["images"]} == {("fixture:latest",), ("other:1",)}
    assert all(image["Size"] > 0 and image["Recorded"].endswith("Z") for image in listing["images"])
    base = [layer for layer in listing["layers"] if len(layer["UsedBy"]) == 2]
    assert len(base) == 1
    run_layermount("store", "rm", "other:1", "--store", store_dir, check=True)
    assert run_layermount("store", "ls", "--store", store_dir).stdout.splitlines()[-1].startswith("1 image, ")


# ---- diff and which ---------------------------------------------------------------

def test_diff_json_and_podman_form_and_which_json(mounts, image, tmp_path):
    upper = tmp_path / "upper"
    root = mounts.mount(image, "--upper", upper, "-q")
    (root / "etc/os-release").write_text("ID=changed\n")
    (root / "new").write_text("new")
    os.unlink(root / "bin/sh")
    plain = json.loads(run_layermount("diff", root, "--json").stdout)
    assert {"kind": "A", "path": "/new"} in plain
    podman = json.loads(run_layermount("diff", upper, "--format", "podman").stdout)
    assert podman == {"changed": ["/etc", "/etc/os-release", "/bin"], "added": ["/new"], "deleted": ["/bin/sh"]} \
        or (set(podman) == {"changed", "added", "deleted"} and "/new" in podman["added"]
            and "/bin/sh" in podman["deleted"] and "/etc/os-release" in podman["changed"]), podman
    which = run_layermount("which", root / "etc/os-release", "--json")
    assert which.returncode == 0, which.stderr
    found = json.loads(which.stdout)
    assert found["visible"] and found["path"] == "/etc/os-release"
    assert found["layers"][0] == {"index": 5, "name": "upper", "has": "file", "note": "wins"}, found
    gone = run_layermount("which", root / "bin/sh", "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["visible"] is False


def test_a_closed_pipe_ends_output_quietly(image):
    process = subprocess.run(f"{' '.join(LAYERMOUNT)} inspect {image} {image} {image} --json | head -c 10",
                             shell=True, capture_output=True, text=True, timeout=60)
    assert len(process.stdout) == 10 and process.stderr == ""


# ---- run, as docker run is typed -----------------------------------------------------

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_run = pytest.mark.skipif(not os.path.exists(BUSYBOX) or os.geteuid() != 0,
                               reason="needs root (namespaces) and a static busybox (Debian busybox-static)")


@pytest.fixture
def busybox(tmp_path, monkeypatch):
    from unionfs.image.writer import Symlink

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    applets = ("sh", "cat", "echo", "hostname", "id", "pwd", "tty", "env", "touch", "stty")
    layer = [Dir("bin"), File("bin/busybox", open(BUSYBOX, "rb").read(), mode=0o755)]
    layer += [Symlink(f"bin/{name}", "busybox") for name in applets]
    layer += [Dir("etc"), File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"),
              File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"), Dir("tmp", mode=0o1777), Dir("work")]
    config = new_config(["ADD busybox"])
    config["config"] = {"Entrypoint": ["/bin/echo", "entry"], "Cmd": ["default"], "Env": ["PATH=/bin", "A=image"],
                        "Volumes": {"/data": {}}}
    path = tmp_path / "busybox.tar"
    write_image(path, [layer_tar(layer)], config, repo_tag="busybox:cli")
    return path


@needs_run
def test_run_takes_dockers_flags(busybox, store_dir, tmp_path):
    base = ["run", "--store", store_dir, "-q", "--rm"]
    assert run_layermount(*base, busybox).stdout == "entry default\n"
    assert run_layermount(*base, busybox, "x").stdout == "entry x\n"
    host = tmp_path / "host"
    host.mkdir()
    (host / "note").write_text("from the host\n")
    script = "echo $A $B $C; pwd; hostname; id -u; cat /src/note; touch /src/new 2>&1 || echo read-only"
    result = run_layermount(*base, "--entrypoint", "/bin/sh", "-e", "A=ours", "-e", "B", "-e", "C=", "-w", "/work",
                            "--name", "box1", "-u", "nobody", "-v", f"{host}:/src:ro", busybox, "-c", script,
                            env={"B": "from-shell"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == ["ours from-shell", "/work", "box1", "65534", "from the host"], lines
    assert "read-only" in lines[-1] or "Read-only" in lines[-1], lines
    assert not (host / "new").exists()
    writable = run_layermount(*base, "--entrypoint", "", "-v", f"{host}:/src", busybox, "/bin/touch", "/src/made")
    assert writable.returncode == 0, writable.stderr
    assert (host / "made").exists() and (host / "made").stat().st_uid == 0
    assert (host / "note").stat().st_uid == os.getuid()        # the user's directory is never chowned


@needs_run
def test_run_is_quiet_once_the_image_is_in_the_store(busybox, store_dir):
    first = run_layermount("run", "--store", store_dir, busybox)
    assert "Pull complete" in first.stderr and "volume" not in first.stderr, first.stderr
    again = run_layermount("run", "--store", store_dir, busybox)
    assert (again.returncode, again.stdout, again.stderr) == (0, "entry default\n", "")
    verbose = run_layermount("run", "--store", store_dir, "--verbose", busybox)
    assert "Already exists" in verbose.stderr and verbose.stderr.count("volume") == 1, verbose.stderr


@needs_run
@pytest.mark.parametrize("flags", [["-t"], ["-it"]])
def test_run_t_gives_the_command_a_terminal(busybox, store_dir, flags):
    base = ["run", "--store", store_dir, "-q", *flags, "--entrypoint", "/bin/sh", busybox, "-c"]
    plain = run_layermount("run", "--store", store_dir, "-q", "--entrypoint", "/bin/tty", busybox)
    assert plain.stdout.strip() == "not a tty"
    # Whatever our stdin is (a pipe here, a pty below), the command's is a terminal of its own.
    result = run_layermount(*base, "tty; stty size")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].strip() == "/dev/console", result.stdout
    # From a terminal of ours (a pty the test holds): the window size is passed on, and with -i
    # what we type reaches the command.
    script = "stty size; read line; echo got $line" if "-it" in flags else "stty size"
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
        os.write(master, b"hello\n")
        process = subprocess.run([*LAYERMOUNT, *map(str, base), script], stdin=slave, capture_output=True,
                                 timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    out = process.stdout.decode()
    assert process.returncode == 0 and "33 77" in out, out + process.stderr.decode()
    if "-it" in flags:
        assert "got hello" in out, out


def test_run_as_a_user_without_root_fails_before_unpacking(busybox, tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become nobody (setpriv)")
    store = tmp_path / "nobody-store"
    os.chmod(tmp_path, 0o755)
    os.chmod(busybox, 0o644)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *LAYERMOUNT, "run",
                             "--store", str(store), str(busybox)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "root" in result.stderr, result.stderr
    assert not store.exists() or not any((store / "layers").glob("*")), "unpacked before failing"


def test_run_arguments_are_checked_before_anything_runs(tmp_path):
    from unionfs.errors import UsageError
    from unionfs.tools.run import RunOptions, container_from, parse_bind

    image = images.build(tmp_path / "image.tar", layers=[images.BASE])
    from unionfs import open_image
    opened = open_image(image)
    for bad in ("", "a" * 64, "evil\x1b]0;x\x07", "-x", "a/b"):
        with pytest.raises(UsageError):
            container_from(opened, RunOptions(hostname=bad))
    for spec in ("nocolon", "/x:relative", f"{tmp_path}:/in:rx", f"{tmp_path / 'missing'}:/in", ":/in"):
        with pytest.raises(UsageError):
            parse_bind(spec)
    assert parse_bind(f"{tmp_path}:/in:ro") == (str(tmp_path), "/in", True)
    container = container_from(opened, RunOptions(entrypoint="", command=["/bin/sh", "-c", "true"], env=["A=1", "A=2"]))
    assert container.argv == ["/bin/sh", "-c", "true"] and container.env.count("A=2") == 1 and "A=1" not in container.env


def test_history_ages_fit_their_column():
    """docker's ages, each short enough for history's 20-character CREATED column (none cut off)."""
    from unionfs.cli import _since

    now = datetime.datetime(2026, 12, 4, 12, 0, 0, tzinfo=datetime.timezone.utc)
    for seconds, expected in ((0, "just now"), (1, "1 second ago"), (42, "42 seconds ago"), (60, "1 minute ago"),
                              (7200, "2 hours ago"), (400 * 86400, "1 year ago")):
        moment = (now - datetime.timedelta(seconds=seconds)).isoformat()
        assert _since(moment, now) == expected and len(expected) <= 20
