"""A bad environment gives a message naming the fix, never a traceback (faked conditions)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelscope import cli, host
from kernelscope.errors import BCCMissingError, BPFPermissionError, HeadersMissingError, SetupError

CAP = {"sys_admin": 1 << host.CAP_SYS_ADMIN, "bpf": 1 << host.CAP_BPF,
       "perfmon": 1 << host.CAP_PERFMON}


# --- privileges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "ok"),
    [
        (0, False),
        (CAP["bpf"], False),
        (CAP["perfmon"], False),
        (CAP["bpf"] | CAP["perfmon"], True),
        (CAP["sys_admin"], True),
    ],
)
def test_privileges_need_root_or_cap_bpf_and_perfmon(caps: int, ok: bool) -> None:
    assert host.has_bpf_privileges(caps) is ok


def test_not_root_message_names_the_fix() -> None:
    with pytest.raises(BPFPermissionError) as e:
        host.require_privileges(caps=0)
    msg = str(e.value)
    assert "root" in msg
    assert "CAP_BPF" in msg
    assert "CAP_PERFMON" in msg
    assert "setcap" in msg
    assert isinstance(e.value, PermissionError)


# --- kernel headers ---------------------------------------------------------------------


def fake_debian_headers(src: Path, version: str) -> Path:
    """What linux-headers-VERSION installs under /usr/src: an -amd64 and a -common folder."""
    build = src / f"linux-headers-{version}"
    (build / "include/generated").mkdir(parents=True)
    (build / "Makefile").write_text("# fake\n")
    (build / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{version}"\n')
    (src / f"linux-headers-{version.rsplit('-', 1)[0]}-common").mkdir()
    return build


def test_no_headers_message_names_the_package(tmp_path: Path) -> None:
    (tmp_path / "modules").mkdir()
    (tmp_path / "src").mkdir()
    with pytest.raises(HeadersMissingError) as e:
        host.ensure_headers(modules=tmp_path / "modules", src=tmp_path / "src")
    msg = str(e.value)
    assert "linux-headers-amd64" in msg
    assert "make setup" in msg
    assert host.kernel_release() in msg
    assert isinstance(e.value, SetupError)


def test_installed_headers_get_linked_where_bcc_looks(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    modules.mkdir()
    src.mkdir()
    build = fake_debian_headers(src, "6.1.0-99-amd64")

    note = host.ensure_headers(modules=modules, src=src)

    target = modules / host.kernel_release()
    common = src / "linux-headers-6.1.0-99-common"
    assert (target / "build").resolve() == build.resolve()
    assert (target / "source").resolve() == common.resolve()
    # it says each change it made
    assert note.startswith(f"created {target}; linked {target / 'build'} -> {build}; "
                           f"linked {target / 'source'} -> {common}")
    if host.kernel_release() != "6.1.0-99-amd64":
        assert "not " + host.kernel_release() in note  # says the versions differ
    found = host.find_headers(modules)
    assert found is not None
    assert found.version == "6.1.0-99-amd64"
    # a second run finds them and changes nothing
    again = host.ensure_headers(modules=modules, src=src)
    assert again.startswith(f"kernel headers: {build.resolve()} (6.1.0-99-amd64), unchanged")


def test_a_missing_link_is_added_beside_the_one_setup_made(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    src.mkdir()
    build = fake_debian_headers(src, "6.1.0-99-amd64")
    target = modules / host.kernel_release()
    target.mkdir(parents=True)
    (target / "source").symlink_to(src / "linux-headers-6.1.0-99-common")  # a half-finished setup
    note = host.ensure_headers(modules=modules, src=src)
    assert note.startswith(f"linked {target / 'build'} -> {build}")
    assert "source" not in note.split(";")[0]


@pytest.mark.parametrize("kind", ["dangling build link", "build link elsewhere", "build folder",
                                  "source link elsewhere"])
def test_a_link_setup_did_not_make_is_left_alone_and_reported(tmp_path: Path, kind: str) -> None:
    modules, src, other = tmp_path / "modules", tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()  # somebody's own kernel tree, without a Makefile BCC could use
    fake_debian_headers(src, "6.1.0-99-amd64")
    target = modules / host.kernel_release()
    target.mkdir(parents=True)
    name = "source" if kind.startswith("source") else "build"
    entry = target / name
    if kind == "dangling build link":
        entry.symlink_to(tmp_path / "gone")
    elif kind == "build folder":
        entry.mkdir()
    else:
        entry.symlink_to(other)
    before = {p.name: (os.readlink(p) if p.is_symlink() else "dir") for p in target.iterdir()}

    with pytest.raises(HeadersMissingError) as e:
        host.ensure_headers(modules=modules, src=src)

    after = {p.name: (os.readlink(p) if p.is_symlink() else "dir") for p in target.iterdir()}
    assert after == before  # nothing replaced, nothing added
    msg = str(e.value)
    assert "left what is there alone" in msg
    assert f"{entry} is {'a folder' if kind == 'build folder' else 'a link to'}" in msg
    if kind == "dangling build link":
        assert "which does not exist" in msg
    package = "linux-headers-6.1.0-99-" + ("common" if name == "source" else "amd64")
    assert f"ln -sfn {src / package} {entry}" in msg


def test_usable_headers_someone_else_linked_are_kept(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    src.mkdir()
    fake_debian_headers(src, "6.1.0-99-amd64")
    (tmp_path / "theirs").mkdir()
    theirs = fake_debian_headers(tmp_path / "theirs", "6.18.0-1-custom")
    target = modules / host.kernel_release()
    target.mkdir(parents=True)
    (target / "build").symlink_to(theirs)
    note = host.ensure_headers(modules=modules, src=src)
    assert note.startswith(f"kernel headers: {theirs} (6.18.0-1-custom), unchanged")
    assert os.readlink(target / "build") == str(theirs)
    assert not (target / "source").exists()


def test_check_changes_nothing_and_names_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Probe.load() runs: installed but unlinked headers are an error saying `kernelscope setup`."""
    modules, src = tmp_path / "modules", tmp_path / "src"
    modules.mkdir()
    src.mkdir()
    fake_debian_headers(src, "6.1.0-99-amd64")
    monkeypatch.setattr(host, "MODULES", modules)
    monkeypatch.setattr(host, "SRC", src)
    monkeypatch.setattr(host, "effective_caps", lambda: CAP["bpf"] | CAP["perfmon"])
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: True)

    def must_not(*args: object, **kwargs: object) -> None:
        raise AssertionError("check() changed the host")

    monkeypatch.setattr(host, "_mount", must_not)
    monkeypatch.setattr(Path, "symlink_to", must_not)
    monkeypatch.setattr(Path, "mkdir", must_not)
    with pytest.raises(HeadersMissingError) as e:
        host.check()
    assert "run `kernelscope setup` as root" in str(e.value)
    assert "6.1.0-99-amd64" in str(e.value)
    assert list(modules.iterdir()) == []
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: False)
    with pytest.raises(SetupError, match=r"tracefs is not mounted at .*`kernelscope setup`"):
        host.check("libbpf")


def test_headers_that_cannot_be_linked_say_how_to_link_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    fake_debian_headers(src, "6.1.0-99-amd64")
    modules = tmp_path / "modules"
    modules.write_text("a file where a folder should be")
    with pytest.raises(HeadersMissingError) as e:
        host.ensure_headers(modules=modules, src=src)
    assert "ln -s" in str(e.value)


# --- tracefs ----------------------------------------------------------------------------


def test_unmountable_tracefs_message_names_the_mount_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fstype: str, target: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(host, "_mount", refuse)
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: False)
    tracefs = tmp_path / "tracing"
    with pytest.raises(SetupError) as e:
        host.ensure_tracefs(tracefs=tracefs)
    msg = str(e.value)
    assert f"mount -t tracefs nodev {tracefs}" in msg
    assert "Operation not permitted" in msg


def test_mounted_tracefs_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_mount(fstype: str, target: Path) -> None:
        raise AssertionError("mounted although already mounted")

    monkeypatch.setattr(host, "_mount", must_not_mount)
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: True)
    assert host.ensure_tracefs(tmp_path / "t") == f"tracefs already mounted at {tmp_path / 't'}, unchanged"


def test_setup_mounts_tracefs_alone_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """debugfs is not needed: BCC and libbpf use /sys/kernel/tracing when debug/tracing is absent."""
    mounted: list[tuple[str, Path]] = []
    monkeypatch.setattr(host, "_mount", lambda fstype, target: mounted.append((fstype, target)))
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: False)
    assert host.ensure_tracefs(tmp_path / "tracing") == f"mounted tracefs at {tmp_path / 'tracing'}"
    assert mounted == [("tracefs", tmp_path / "tracing")]


# --- BCC --------------------------------------------------------------------------------


@pytest.fixture
def no_bcc_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`import bcc` fails as in a venv without the Debian link; import_bcc's cache is reset."""
    monkeypatch.setitem(sys.modules, "bcc", None)  # None in sys.modules makes import raise
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    host.import_bcc.cache_clear()
    yield
    host.import_bcc.cache_clear()


@pytest.mark.usefixtures("no_bcc_on_path")
def test_missing_bcc_message_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "DEBIAN_BCC", tmp_path / "no-such-dist-packages" / "bcc")
    with pytest.raises(BCCMissingError) as e:
        host.import_bcc()
    msg = str(e.value)
    assert "python3-bpfcc" in msg
    assert "make setup" in msg
    assert "not on PyPI" in msg
    assert isinstance(e.value, ImportError)
    assert host.bcc_version() is None


@pytest.mark.usefixtures("no_bcc_on_path")
def test_broken_debian_bcc_message_says_reinstall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "dist-packages" / "bcc"
    fake.mkdir(parents=True)
    monkeypatch.setattr(host, "DEBIAN_BCC", fake)
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_bcc appends its shim folder
    with pytest.raises(BCCMissingError) as e:
        host.import_bcc()
    assert "--reinstall python3-bpfcc" in str(e.value)


# --- the CLI turns all of these into a message and an exit code -------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_setup_not_root(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(host, "effective_caps", lambda: 0)
    code, _, err = run_cli(["setup"], capsys)
    assert code != 0
    assert "kernelscope setup:" in err
    assert "CAP_BPF" in err
    assert "Traceback" not in err


def test_cli_setup_tracefs_unmountable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(host, "effective_caps", lambda: CAP["sys_admin"])
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: False)

    def refuse(fstype: str, target: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(host, "_mount", refuse)
    code, _, err = run_cli(["setup"], capsys)
    assert code != 0
    assert "mount -t tracefs" in err
    assert "Traceback" not in err


def test_cli_setup_headers_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(host, "effective_caps", lambda: CAP["sys_admin"])
    monkeypatch.setattr(host, "ensure_tracefs", lambda: "tracefs mounted (faked)")
    monkeypatch.setattr(host, "MODULES", tmp_path)
    monkeypatch.setattr(host, "SRC", tmp_path)
    code, _, err = run_cli(["setup"], capsys)
    assert code != 0
    assert "linux-headers-amd64" in err
    assert "Traceback" not in err


def test_cli_setup_prints_each_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    src.mkdir()
    build = fake_debian_headers(src, "6.1.0-99-amd64")
    monkeypatch.setattr(host, "MODULES", modules)
    monkeypatch.setattr(host, "SRC", src)
    monkeypatch.setattr(host, "TRACEFS", tmp_path / "tracing")
    monkeypatch.setattr(host, "effective_caps", lambda: CAP["sys_admin"])
    mounted: list[str] = []
    monkeypatch.setattr(host, "is_mounted", lambda path, fstype: fstype in mounted)
    monkeypatch.setattr(host, "_mount", lambda fstype, target: mounted.append(fstype))
    code, out, err = run_cli(["setup"], capsys)
    assert code == 0, err
    target = modules / host.kernel_release()
    lines = out.splitlines()
    assert lines[0] == f"kernelscope setup: mounted tracefs at {tmp_path / 'tracing'}"
    assert lines[1].startswith(f"kernelscope setup: created {target}; linked {target / 'build'} -> {build}")
    assert mounted == ["tracefs"]  # no debugfs
    code, out, _ = run_cli(["setup"], capsys)  # again: nothing to change, and it says so
    assert code == 0
    assert out.splitlines()[0].endswith(f"tracefs already mounted at {tmp_path / 'tracing'}, unchanged")
    assert ", unchanged" in out.splitlines()[1]


@pytest.mark.usefixtures("no_bcc_on_path")
def test_cli_setup_bcc_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(host, "effective_caps", lambda: CAP["sys_admin"])
    monkeypatch.setattr(host, "ensure_tracefs", lambda: "tracefs mounted (faked)")
    monkeypatch.setattr(host, "ensure_headers", lambda: "headers (faked)")
    monkeypatch.setattr(host, "DEBIAN_BCC", tmp_path / "nothing")
    code, _, err = run_cli(["setup"], capsys)
    assert code != 0
    assert "python3-bpfcc" in err
    assert "Traceback" not in err


def test_cli_missing_subcommand_module_is_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "kernelscope.captures.record", None)
    code, _, err = run_cli(["record", "--some-flag"], capsys)
    assert code != 0
    assert "kernelscope.captures.record" in err
    assert "Traceback" not in err


def test_cli_passes_remaining_arguments_to_the_module(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    seen: list[list[str]] = []

    class FakeBench:
        @staticmethod
        def main(argv: list[str]) -> int:
            seen.append(argv)
            return 3

    monkeypatch.setitem(sys.modules, "kernelscope.bench.__main__", FakeBench)
    code, _, _ = run_cli(["bench", "--events", "10", "-x"], capsys)
    assert code == 3
    assert seen == [["--events", "10", "-x"]]


# --- kernel config and lockdown ---------------------------------------------------------


def test_kernel_config_reports_unset_options_as_n(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    cfg = tmp_path / "config.gz"
    with gzip.open(cfg, "wt") as f:
        f.write("CONFIG_BPF=y\n# CONFIG_KPROBES is not set\nCONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y\n")
    monkeypatch.setattr(host, "CONFIG_GZ", cfg)
    monkeypatch.setattr(host, "LOCKDOWN", tmp_path / "no-securityfs")
    found = host.kernel_config()
    assert found is not None
    options, source = found
    assert options == {"CONFIG_BPF": "y", "CONFIG_KPROBES": "n",
                       "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY": "y"}
    assert source == str(cfg)
    mode = host.lockdown_mode()
    assert mode is not None
    assert mode[0] == "integrity"
    assert "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY" in mode[1]


def test_lockdown_read_from_securityfs_when_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "lockdown"
    f.write_text("none integrity [confidentiality]\n")
    monkeypatch.setattr(host, "LOCKDOWN", f)
    assert host.lockdown_mode() == ("confidentiality", str(f))


# --- the real-kernel group: skip without privileges, fail under KERNELSCOPE_REQUIRE_BPF=1 --


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs root and setpriv (util-linux) to drop capabilities")
@pytest.mark.parametrize(("require", "outcome"), [("0", "1 skipped"), ("1", "1 error")])
def test_kernel_tests_without_privileges(tmp_path: Path, require: str, outcome: str) -> None:
    here = Path(__file__).parent
    for name in ("conftest.py", "util.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "test_k.py").write_text(
        "import pytest\n\n@pytest.mark.kernel\ndef test_k():\n    pass\n"
    )
    env = {**os.environ, "KERNELSCOPE_REQUIRE_BPF": require}
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin,-bpf,-perfmon", "--inh-caps", "-all",
         sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "-p", "no:nbval",
         "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False,
    )
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == (0 if require == "0" else 1)  # a setup error fails the run
    assert "CAP_BPF" in proc.stdout  # the reason names what is missing
    if require == "1":
        assert "KERNELSCOPE_REQUIRE_BPF=1 but" in proc.stdout


# --- Probe.load() only checks: no mount, no link, for real --------------------------------

LOAD_AND_COMPARE = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from kernelscope import Probe, host

def mounts():
    return sorted(" ".join(line.split()[3:]) for line in open("/proc/self/mountinfo"))

def links():
    target = host.MODULES / host.kernel_release()
    return {p.name: os.readlink(p) if p.is_symlink() else "not a link" for p in sorted(target.iterdir())}

for path in ("/sys/kernel/debug/tracing", "/sys/kernel/debug"):  # this namespace only
    subprocess.run(["umount", path], check=False, capture_output=True)
before = (mounts(), links())
rows = {}
for backend, source in (("bcc", sys.argv[1]), ("libbpf", sys.argv[2])):
    p = Probe(source, backend=backend, cflags=[f"-DTARGET={os.getpid()}"]).start()
    for _ in range(50):
        os.getppid()
    time.sleep(0.3)
    p.stop()
    rows[backend] = len(p.df)
    p.close()
after = (mounts(), links())
print(json.dumps({"rows": rows, "same": before == after, "before": before, "after": after,
                  "debugfs": host.is_mounted(host.DEBUGFS, "debugfs")}))
"""

BCC_GETPPID = """
struct ev { u32 pid; };
BPF_RINGBUF_OUTPUT(ks_host_ev, 16);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    struct ev e = {.pid = bpf_get_current_pid_tgid() >> 32};
    if (e.pid == TARGET) ks_host_ev.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
"""

CORE_GETPPID = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 4096 * 4); } ks_host_core SEC(".maps");
struct ev { u32 pid; };
SEC("tp/syscalls/sys_enter_getppid")
int ks_host_core_tp(void *ctx) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    struct ev *e = bpf_ringbuf_reserve(&ks_host_core, sizeof(*e), 0);
    if (!e) return 0;
    e->pid = pid;
    bpf_ringbuf_submit(e, 0);
    return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare (util-linux) for a private mount namespace")
def test_load_mounts_nothing_and_links_nothing_and_needs_no_debugfs() -> None:
    """Both backends load and deliver with debugfs unmounted (in a private mount namespace, so
    the host's own mounts are untouched), and the mount table and header links are unchanged."""
    import json

    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", LOAD_AND_COMPARE,
         BCC_GETPPID, CORE_GETPPID],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["rows"] == {"bcc": 50, "libbpf": 50}
    assert out["debugfs"] is False  # nobody mounted it
    assert out["same"], (out["before"], out["after"])
