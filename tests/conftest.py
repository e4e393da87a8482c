"""Runs the ``kernel``-marked tests inside a VM with a real nbd driver.

On the host, each selected kernel test is replaced by a stand-in item; once
the tests are collected the guests boot (tests/vm/vm-run), one per kernel
series, side by side, each running all of its tests in a single pytest
session while the host runs its own tests, and every stand-in then reports
its own test's outcome from its guest. Inside
the guest (VMTEST_GUEST=1) the real tests run.

Every kernel test runs on Debian's stock kernel (6.1). Tests marked
``kernel(newer=True)`` also run on a newer one (6.12, whose nbd driver
changed), in a second guest, as stand-ins named ``test_x@6.12``; those
marked ``kernel(newer="only")`` run there alone (what they test does not
differ between kernels, and the stock guest is the longer run). Tests
marked ``kernel(systemd=True)`` run in a guest of the stock kernel that
boots systemd as PID 1 (``vm-run --systemd``), named ``test_x@systemd``,
after the stock guest, on its CPUs (two lanes of guests, side by side). The guests
run side by side, each on its share of the host's CPUs.

``--skip-kernel`` (or EROFS_MOUNT_SKIP_KERNEL_TESTS=1) skips them, saying so;
anything else that stops them (no qemu, no kernel package) fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
VM_RUN = Path(os.environ.get("EROFS_MOUNT_VM_RUN", ROOT / "tests" / "vm" / "vm-run"))
IN_GUEST = os.environ.get("VMTEST_GUEST") == "1"
REPORT_ENV = "EROFS_MOUNT_GUEST_REPORT"
SKIP_ENV = "EROFS_MOUNT_SKIP_KERNEL_TESTS"
#: where each guest's output goes as it comes (`tail -f` it); EROFS_MOUNT_GUEST_LOG_DIR names another directory
#: (the harness's own tests run sessions of their own beside this one)
GUEST_LOG_DIR = Path(os.environ.get("EROFS_MOUNT_GUEST_LOG_DIR") or ROOT)
GUEST_LOG = GUEST_LOG_DIR / ".guest-pytest.log"
GUEST_TIMEOUT = int(os.environ.get("EROFS_MOUNT_GUEST_TIMEOUT", "2700"))
#: seconds from power-on to the guest's pytest session start on an idle machine of this kind (measured: 20-30);
#: a guest that took longer (a loaded host) gets its session's timeout stretched as much, up to SCALE_MAX times
NOMINAL_START = 40.0
SCALE_MAX = 3.0
#: a guest whose pytest session has not started by then failed to boot (it is tried once more)
BOOT_LIMIT = 600
#: the newer kernel series; tests/vm/kernel-pkg names its current Debian package
NEWER_KERNEL = "6.12"
STOCK_KERNEL = ""  # vm-run's default: Debian's linux-image-amd64
#: the guest of the stock kernel with systemd as PID 1
SYSTEMD_GUEST = "systemd"
#: guests that run one after the other, on the same share of the CPUs
LANES = ((STOCK_KERNEL, SYSTEMD_GUEST), (NEWER_KERNEL,))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-kernel", action="store_true", default=os.environ.get(SKIP_ENV) == "1",
                     help=f"skip the tests that need the nbd driver (env {SKIP_ENV}=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    stand_ins: list[pytest.Item] = []
    newer: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("kernel")
        if marker is None:
            stand_ins.append(item)
            continue
        if marker.kwargs.get("systemd"):
            newer.append(GuestItem.from_parent(item.parent, name=f"{item.name}@{SYSTEMD_GUEST}",
                                               nodeid_in_guest=item.nodeid, kernel=SYSTEMD_GUEST))
            continue
        if marker.kwargs.get("newer") != "only":
            stand_ins.append(GuestItem.from_parent(item.parent, name=item.name, nodeid_in_guest=item.nodeid,
                                                   kernel=STOCK_KERNEL))
        if marker.kwargs.get("newer"):
            newer.append(GuestItem.from_parent(item.parent, name=f"{item.name}@{NEWER_KERNEL}",
                                               nodeid_in_guest=item.nodeid, kernel=NEWER_KERNEL))
    items[:] = stand_ins + newer


def pytest_collection_finish(session: pytest.Session) -> None:
    """The guests boot as soon as the tests are known, and run while the host's own tests run: their
    sessions are the longest part of the run (two lanes, one CPU each), the host's tests fill the gaps."""
    if IN_GUEST or session.config.getoption("--skip-kernel") or session.config.option.collectonly:
        return
    if any(isinstance(item, GuestItem) for item in session.items):
        _start_guests(session)


class GuestRun:
    """One guest boot running every selected kernel test for one kernel series."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.systemd = key == SYSTEMD_GUEST
        self.kernel = STOCK_KERNEL if self.systemd else key
        self.log = GUEST_LOG_DIR / f".guest-pytest-{key}.log" if key else GUEST_LOG
        self.results: dict[str, dict[str, object]] | None = None
        self.error: str | None = None
        self.output = ""
        self.seconds = 0.0
        self.started = False
        self.done = threading.Event()
        self.scale = 1.0  # how much the session's timeout was stretched for a slow boot
        self.boot: float | None = None  # the guest's uptime when its pytest session started
        self.retried: str | None = None  # why the first boot failed, when it was tried again

    def wait(self) -> None:
        self.done.wait()

    def run(self, nodeids: list[str], cpus: int) -> None:
        """Run ``nodeids`` in a guest; a guest that fails to boot is tried once more."""
        for attempt in (1, 2):
            booted = self._boot(nodeids, cpus)
            if booted or self.results:
                return
            if attempt == 1:
                self.retried = self.error
                self.error = "the test VM was interrupted"

    def _boot(self, nodeids: list[str], cpus: int) -> bool:
        """One guest session; whether its pytest started. Each test's outcome is read as the guest reports it,
        so a session cut short by its timeout fails only the tests it had not run."""
        report = self.log.with_name(f"{self.log.name}.{os.getpid()}.report.json")  # this session's alone
        report.unlink(missing_ok=True)
        env = dict(os.environ, **{REPORT_ENV: str(report)})
        if self.kernel:
            pkg = subprocess.run([ROOT / "tests" / "vm" / "kernel-pkg", self.kernel],
                                 capture_output=True, text=True)
            if pkg.returncode != 0:
                self.error = f"the test VM did not start: {pkg.stderr.strip()}"
                return True  # nothing a second boot would change
            env["VMTEST_KERNEL_PKG"] = pkg.stdout.strip()
        cap = int(GUEST_TIMEOUT * SCALE_MAX)
        cmd = [str(VM_RUN), "--timeout", str(cap), "--mem", "2G", "--cpus", str(cpus),
               *(["--systemd"] if self.systemd else []), "--",
               sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEsP",
               "--durations=15", *nodeids]  # -rP: what passed tests measured and printed
        start = time.monotonic()
        self.error = "the test VM was interrupted"  # until it reports
        started: float | None = None  # the guest's uptime when its pytest session started
        deadline = start + BOOT_LIMIT
        # the guest's output goes to a file as it comes: `tail -f` it to watch
        with open(self.log, "w") as log:
            try:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            except OSError as exc:
                self.error = f"the test VM did not start: {exc}"
                return True
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    # (not time.sleep: a host test running meanwhile may replace it, as test_faults does)
                    threading.Event().wait(1)
                    lines = _read_report(report)
                    if started is None and lines.started is not None:
                        started = lines.started
                        self.scale = min(SCALE_MAX, max(1.0, started / NOMINAL_START))
                        deadline = start + GUEST_TIMEOUT * self.scale
            finally:
                cut = proc.poll() is None
                if cut:
                    proc.terminate()  # vm-run stops qemu on SIGTERM (not on SIGKILL)
                    proc.wait(30)
                self.seconds = time.monotonic() - start
                self.output = self.log.read_text(errors="replace")
        lines = _read_report(report)
        report.unlink(missing_ok=True)
        self.results = lines.outcomes
        started = started if started is not None else lines.started
        self.boot = started
        if started is None:
            self.error = (f"the test VM ran no tests (vm-run exit {proc.returncode}"
                          f"{', its pytest had not started after %d s' % BOOT_LIMIT if cut else ''}):\n"
                          + "\n".join(self.output.splitlines()[-40:]))
            return False
        self.error = None
        if cut:
            self.error = (f"the test VM's session was stopped at its timeout, {GUEST_TIMEOUT * self.scale:.0f} s "
                          f"({GUEST_TIMEOUT} s, stretched {self.scale:.1f}x for a boot of {started:.0f} s), "
                          "before it ran this test")
        elif proc.returncode not in (0, 1) and len(self.results) < len(nodeids):
            self.error = (f"the test VM ended (vm-run exit {proc.returncode}) before it ran this test:\n"
                          + "\n".join(self.output.splitlines()[-40:]))
        return True


@attrs.define
class _Report:
    started: float | None = None
    outcomes: dict[str, dict[str, object]] = attrs.Factory(dict)


def _read_report(path: Path) -> _Report:
    """The guest's report so far: a JSON line when its session started, then one per test outcome (the last
    line of a test is its outcome)."""
    found = _Report()
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return found
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if "started" in entry:
            found.started = float(entry["started"])
        elif "nodeid" in entry:
            found.outcomes[entry.pop("nodeid")] = entry
    return found


class GuestItem(pytest.Item):
    """Stands on the host for a kernel test that runs in the guest."""

    def __init__(self, *, nodeid_in_guest: str, kernel: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.nodeid_in_guest = nodeid_in_guest
        self.kernel = kernel
        self.add_marker("kernel")
        # the first stand-in waits for the whole guest session: two boots, the longest session
        self.add_marker(pytest.mark.timeout(BOOT_LIMIT + GUEST_TIMEOUT * SCALE_MAX + 180))

    def runtest(self) -> None:
        if self.config.getoption("--skip-kernel"):
            pytest.skip(f"kernel tests skipped on request (--skip-kernel / {SKIP_ENV}=1)")
        _start_guests(self.session)
        guest = _guest(self.config, self.kernel)
        guest.wait()
        result = guest.results.get(self.nodeid_in_guest) if guest.results else None
        if result is None:
            raise GuestFailure(guest.error or "the guest did not report this test")
        if result["outcome"] == "skipped":
            pytest.skip(f"in the guest: {result['text']}")
        if result["outcome"] != "passed":
            raise GuestFailure(str(result["text"]))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: object = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return f"[in the test VM]\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.name} [kernel, in VM]"


class GuestFailure(Exception):
    pass


_GUESTS_KEY = pytest.StashKey[dict[str, GuestRun]]()


def _start_guests(session: pytest.Session) -> None:
    """Boot the guests (the first time a stand-in runs): a lane's one after another, the lanes at once,
    each lane with its share of the CPUs."""
    keys = list(dict.fromkeys(i.kernel for i in session.items if isinstance(i, GuestItem)))
    guests = [_guest(session.config, key) for key in keys]
    if any(g.started for g in guests):
        return
    # the guests write no bytecode (PYTHONDONTWRITEBYTECODE passes into them): without it, each of their
    # interpreters compiles every module it imports again
    subprocess.run([sys.executable, "-m", "compileall", "-q", "erofs_mount_core", "plugins", "tests"],
                   cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    lanes = [[_guest(session.config, k) for k in lane if k in keys] for lane in LANES]
    lanes = [lane for lane in lanes if lane]
    # the host's CPUs divided between them: emulated CPUs beyond the host's slow every guest down
    # (measured: two guests of two CPUs each on two cores took half as long again as one CPU each)
    cpus = max(1, (os.cpu_count() or 1) // len(lanes))

    def run(lane: list[GuestRun]) -> None:
        for guest in lane:
            try:
                guest.run([i.nodeid_in_guest for i in session.items
                           if isinstance(i, GuestItem) and i.kernel == guest.key], cpus)
            finally:
                guest.done.set()

    for lane in lanes:
        for guest in lane:
            guest.started = True
        threading.Thread(target=run, args=(lane,), name=f"guests {'+'.join(g.key or 'stock' for g in lane)}",
                         daemon=True).start()


def _guest(config: pytest.Config, kernel: str) -> GuestRun:
    guests = config.stash.setdefault(_GUESTS_KEY, {})
    if kernel not in guests:
        guests[kernel] = GuestRun(kernel)
    return guests[kernel]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    guests = [g for g in config.stash.get(_GUESTS_KEY, {}).values()
              if g.results is not None or g.error is not None]
    if not guests:
        return
    terminalreporter.section("kernel tests, run in the test VM")
    for guest in guests:
        if guest.results is not None:
            kernel = next(iter(guest.results.values()), {}).get("kernel", "?") if guest.results else "?"
            counts: dict[str, int] = {}
            for r in guest.results.values():
                counts[str(r["outcome"])] = counts.get(str(r["outcome"]), 0) + 1
            summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            booted = f", its pytest started {guest.boot:.0f} s after power-on" if guest.boot is not None else ""
            terminalreporter.write_line(f"guest kernel {kernel}: {summary} ({guest.seconds:.0f} s with boot{booted})")
        if guest.retried:
            terminalreporter.write_line(f"guest {guest.key or 'stock'}: its first boot failed and it was booted "
                                        f"again: {guest.retried.splitlines()[0]}")
        if guest.error:
            terminalreporter.write_line(f"guest {guest.key or 'stock'}: {guest.error.splitlines()[0]}")
        for line in guest.output.strip().splitlines()[-15:]:
            terminalreporter.write_line(f"guest| {line}")


# -- inside the guest: write the outcome of each test for the host ----------

_guest_outcomes: dict[str, dict[str, object]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    """In the guest: the report's first line, with how long the guest took to get here (its uptime)."""
    path = os.environ.get(REPORT_ENV)
    if IN_GUEST and path:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        _write_through(path, "w", {"started": uptime})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not IN_GUEST:
        return
    if report.when == "call" or report.outcome != "passed":
        prev = _guest_outcomes.get(report.nodeid)
        if prev and prev["outcome"] != "passed":
            return  # keep the first failure (setup/call) over a later teardown note
        text = report.longreprtext if report.outcome != "passed" else ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            text = str(report.longrepr[2])
        _guest_outcomes[report.nodeid] = {"outcome": report.outcome, "text": text,
                                          "seconds": report.duration, "kernel": os.uname().release}
        path = os.environ.get(REPORT_ENV)
        if path:  # at once, so that a session cut short keeps what it ran
            _write_through(path, "a", {"nodeid": report.nodeid, **_guest_outcomes[report.nodeid]})


def _write_through(path: str, mode: str, entry: dict[str, object]) -> None:
    """One line of the report, on the host's disk now (the shared directory is cached, write-back)."""
    with open(path, mode) as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
