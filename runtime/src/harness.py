# etpo sandbox worker ("zygote"). Embedded in the runtime crate with include_str! and started as
# `python -s -c <this file>` inside the sandbox; see runtime/src/pool.rs for the host side.
#
# The worker imports numpy and scikit-learn once (and runs the usual estimators once, to fill
# lazy caches), then serves jobs forever. Before each job it forks a spare child that waits for
# the job on a pipe, so the fork is off the critical path; while it waits, the spare rehearses a
# trivial action (`rehearse`), so that the pages every action writes are copied (copy-on-write
# after the fork) before the job arrives rather than on its path. The child compiles and runs the
# untrusted program, calls build_model(x_train, y_train) and predict_proba(x_val), writes the raw
# probabilities back and waits to be killed; the worker replies to the host as soon as that result
# is complete (or the child dies, or the wall-clock deadline passes), then kills every process left
# and empties the scratch directories. The worker itself never runs user code. Inside the sandbox
# it is PID 1 of its own PID namespace, so the user code cannot signal it, and kill(-1, SIGKILL)
# ends every process a job left behind (double forks and setsid included). The next spare is
# forked only after that kill: it may exist while the job's processes finish exiting, but never
# beside a process of the job that can still run (see `next_spare`).
#
# Wire format, both directions: u32 little-endian header length, a JSON header, then the binary
# payload whose byte length is header["payload"]. Requests carry x_train (f64), y_train (i64) and
# x_val (f64), row-major; responses carry the probability matrix (f64), row-major. The host checks
# shapes, class labels and finiteness (runtime/src/protocol.rs): nothing the child sends is trusted.

import os
import sys

# Started with `-s -c`, not `-I` (which would ignore the environment the host sets): drop the
# working directory that `-c` puts first on the import path, so that a file a job leaves in it can
# never shadow a module.
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]

import json
import time
import signal
import struct
import select
import resource
import traceback
import re
import builtins
import ctypes
import errno

try:
    import numpy as np
except ImportError as e:  # say where we looked: the usual cause is a wrong interpreter
    sys.stderr.write("etpo worker: %s; sys.prefix=%s sys.path=%s\n" % (e, sys.prefix, sys.path))
    raise SystemExit(3)

# Import what generated code usually uses, so a child pays nothing for it (fork shares the pages).
_PRELOAD = (
    "sklearn", "sklearn.base", "sklearn.utils.validation", "sklearn.exceptions",
    "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree", "sklearn.neighbors", "sklearn.svm",
    "sklearn.naive_bayes", "sklearn.preprocessing", "sklearn.pipeline", "sklearn.model_selection",
    "sklearn.impute", "sklearn.discriminant_analysis", "sklearn.neural_network",
    "sklearn.decomposition", "sklearn.feature_selection", "sklearn.compose", "sklearn.metrics",
    "sklearn.gaussian_process", "sklearn.calibration", "sklearn.dummy", "sklearn.multiclass",
    "scipy", "scipy.stats",
)
for _name in _PRELOAD:
    try:
        __import__(_name)
    except Exception:  # a missing optional module only costs the child an import later
        pass

from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
import gc

IS_INIT = os.getpid() == 1
# Whether the next job's child is forked while the last job's processes exit (`next_spare`): only
# as PID 1 of the sandbox's namespace, which sees every process of a job in its own /proc.
OVERLAP = IS_INIT and os.path.isdir("/proc/1")
# Private scratch directories emptied after every job. Only ever inside the sandbox (PID 1 of its
# own namespaces, with tmpfs mounts the launcher made): never touch anything on a host.
SCRATCH = [p for p in os.environ.get("ETPO_SCRATCH", "").split(":") if p] if IS_INIT else []
CTRL_IN = os.dup(0)
CTRL_OUT = os.dup(1)
_devnull = os.open("/dev/null", os.O_RDWR)
os.dup2(_devnull, 0)
os.dup2(2, 1)
os.close(_devnull)
# As PID 1, signals without a handler are dropped when they come from inside the namespace; make
# sure none has a handler (Python installs one for SIGINT).
signal.signal(signal.SIGINT, signal.SIG_IGN)

# The worker is not dumpable: programs (same uid) cannot read its memory or /proc/1/environ.
# Each child makes itself dumpable again so that it may raise its own oom_score_adj.
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_DUMPABLE = 4
if IS_INIT:
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

PATH_RE = re.compile(r"(?:/[^\s'\"():,]+)*/(?:site-packages|dist-packages|lib/python3\.\d+)/")
MAX_MESSAGE = 1500
# Largest probability matrix sent back (the host accepts 64 MiB).
MAX_RESULT = 64 << 20
# Whether each child forked ahead rehearses a trivial action while it waits (see `rehearse`);
# set by the host (runtime/src/sandbox.rs, `Tuning` in pool.rs).
REHEARSE = os.environ.get("ETPO_REHEARSE", "1") != "0"
# How long a spare waits for its job before rehearsing. The spare is forked right after the last
# reply, while the worker still reaps and wipes; a host sending actions back-to-back has its
# next request there within this (the rehearsal would only delay it), an idle one does not.
REHEARSAL_GRACE_S = 0.005

# Timestamps of one action for `etpo bench sandbox`'s breakdown (runtime/src/pool.rs,
# `Pool::evaluate_traced`): CLOCK_MONOTONIC in nanoseconds, the clock the host reads too (the
# sandbox has no time namespace). Diagnostics only: the host decides nothing on them.
now = time.monotonic_ns


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def read_exact(fd, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return buf


def write_all(fd, data):
    view = memoryview(data)
    while len(view):
        k = os.write(fd, view)
        view = view[k:]


def send(fd, header, payload=b""):
    """One frame in one write where the pipe has room: the reader wakes once, not per part."""
    header["payload"] = len(payload)
    head = json.dumps(header).encode()
    write_all(fd, b"".join((struct.pack("<I", len(head)), head, payload)))


def recv(fd):
    (n,) = struct.unpack("<I", bytes(read_exact(fd, 4)))
    header = json.loads(bytes(read_exact(fd, n)))
    payload = read_exact(fd, header.get("payload", 0))
    return header, payload


def clean(text):
    """Sandbox paths out, length capped: the text is shown to the model."""
    text = PATH_RE.sub("", str(text))
    if len(text) > MAX_MESSAGE:
        text = text[:1000] + "\n...\n" + text[-(MAX_MESSAGE - 1010):]
    return text.strip()


def describe(exc, lines, what=None):
    """`line N: <source>` + `Type: message` for an exception raised by (or through) the action."""
    lineno = None
    for frame, no in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == "<action>":
            lineno = no
    try:
        text = str(exc)
    except BaseException:  # a hostile __str__
        text = "<unprintable>"
    msg = "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
    if what:
        msg = "%s raised %s" % (what, msg)
    if lineno is not None and 0 < lineno <= len(lines):
        msg = "line %d: %s\n%s" % (lineno, lines[lineno - 1].strip(), msg)
    return clean(msg)


def kind_of(exc):
    return "Memory" if isinstance(exc, MemoryError) else "Exception"


def prepare_child(job_r, rehearse_first):
    """Job-independent setup of a spare child, done while it waits for its job. Returns the
    private writable memory it holds, the base of the memory limit, and whether it rehearsed (only
    if `rehearse_first` and its job has not come within `REHEARSAL_GRACE_S`: a job that waits would
    wait longer)."""
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # the child dies first on memory pressure
            f.write("1000")
    except OSError:
        pass
    rehearsed = rehearse_first and not select.select([job_r], [], [], REHEARSAL_GRACE_S)[0]
    if rehearsed:
        rehearse()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024, rehearsed
    except (OSError, ValueError):
        pass
    return 0, rehearsed


def child(job, payload, result_w, base_data, trace):
    """Runs in the forked child: everything here may be sabotaged by the user code, so the host
    trusts nothing it sends back beyond its format."""
    set_limits(job["limits"], base_data)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def finish(header, data=b""):
        trace["c_done"] = now()
        trace["c_faults"] = minor_faults() - trace.pop("faults0")
        send(result_w, dict(usage(), **header, trace=trace), data)
        sys.stdout.flush()
        # Wait to be killed rather than exit: tearing this process down (unmapping all it shares
        # with the worker) takes milliseconds of CPU, which would compete with the worker's reply;
        # the worker kills it right after replying. Bounded, so that a result the worker cannot
        # take as complete (a program that wrote a frame of its own first) ends with the exit.
        time.sleep(1.0)
        os._exit(0)

    run_job(job, payload, trace, finish)
    os._exit(70)  # not reached: run_job ends in finish


def set_limits(limits, base_data):
    """The job's own limits on this child (lowered only, never raised)."""
    mem = int(limits["memory_mb"]) << 20
    if mem > 0:
        # RLIMIT_DATA counts private writable memory (heap, numpy buffers, thread stacks) but not
        # address space merely reserved (glibc arenas), so threads stay cheap. It grows from what
        # the worker already holds: the limit is on the action's new memory.
        _lower(resource.RLIMIT_DATA, base_data + mem)
    cpu = max(1, int(float(limits["cpu_s"]) + 0.999))
    _lower(resource.RLIMIT_CPU, cpu, cpu + 1)
    procs = int(limits.get("max_processes", 0))
    if procs > 0 and IS_INIT:
        # Counted per user in the sandbox's user namespace: the worker is one of them. (Outside a
        # sandbox the count would include the host user's other processes: left alone there.)
        _lower(resource.RLIMIT_NPROC, procs + 1)


def run_job(job, payload, trace, finish):
    """Runs the job's program on its data and ends in `finish(header, data)` with the result or
    the failure (the header's ok, kind, message or rows, cols, classes; data the probabilities)."""
    nt, nf, nv = job["n_train"], job["n_features"], job["n_val"]
    a = nt * nf * 8
    b = a + nt * 8
    x_train = np.frombuffer(payload, dtype="<f8", count=nt * nf, offset=0).reshape(nt, nf).copy()
    y_train = np.frombuffer(payload, dtype="<i8", count=nt, offset=a).copy()
    x_val = np.frombuffer(payload, dtype="<f8", count=nv * nf, offset=b).reshape(nv, nf).copy()
    del payload
    trace["c_ready"] = now()

    def fail(kind, message):
        finish(dict(ok=False, kind=kind, message=message))

    src = job["program"]
    lines = src.splitlines()
    try:
        code = compile(src, "<action>", "exec")
    except SyntaxError as e:
        where = ""
        if e.lineno:
            text = (e.text or (lines[e.lineno - 1] if e.lineno <= len(lines) else "")).rstrip()
            where = "line %d: %s\n" % (e.lineno, text.strip())
        fail("Syntax", clean("%s%s: %s" % (where, type(e).__name__, e.msg)))
    except (ValueError, RecursionError, MemoryError) as e:
        fail("Syntax", clean("%s: %s" % (type(e).__name__, e)))

    namespace = {"__name__": "__action__", "__builtins__": builtins}
    del job, src
    try:
        exec(code, namespace)
        build_model = namespace.get("build_model")
        if not callable(build_model):
            fail("Exception", "the program does not define a function build_model(x_train, y_train)")
        model = build_model(x_train, y_train)
        if model is None:
            fail("Exception", "build_model returned None; it must return a fitted classifier")
        try:
            check_is_fitted(model)
        except NotFittedError:
            model.fit(x_train, y_train)
        except TypeError:
            pass  # not a scikit-learn estimator: trust that it is ready to predict
    except SystemExit as e:
        fail("Exception", describe(e, lines, None) or "the program called exit()")
    except BaseException as e:
        fail(kind_of(e), describe(e, lines))
    trace["c_built"] = now()

    if not callable(getattr(model, "predict_proba", None)):
        fail("BadPredictions", clean(
            "build_model returned a %s, which has no predict_proba method; return a fitted "
            "classifier that can give class probabilities" % type(model).__name__))
    try:
        proba = np.asarray(model.predict_proba(x_val), dtype=np.float64)
    except BaseException as e:
        fail(kind_of(e) if isinstance(e, MemoryError) else "BadPredictions",
             describe(e, lines, "predict_proba(x_val)"))
    try:
        classes = getattr(model, "classes_", None)
        classes = None if classes is None else [int(c) for c in np.asarray(classes).ravel()]
    except BaseException:
        classes = None
    if proba.ndim != 2:
        fail("BadPredictions", "predict_proba(x_val) returned an array of shape %s; expected "
             "(%d, n_classes)" % (tuple(proba.shape), nv))
    if proba.nbytes > MAX_RESULT:
        fail("BadPredictions", "predict_proba(x_val) returned an array of shape %s; expected "
             "(%d, n_classes)" % (tuple(proba.shape), nv))
    data = np.ascontiguousarray(proba, dtype="<f8").tobytes()
    finish(dict(ok=True, rows=int(proba.shape[0]), cols=int(proba.shape[1]), classes=classes), data)


class Rehearsed(BaseException):
    """Ends a rehearsal where a job would send its result."""


def rehearsal_frame():
    """The request of the rehearsal: a trivial program on a small made-up problem."""
    rows = [[float(i % 5), float(i % 3), float(i % 7), float(i % 2)] for i in range(24)]
    x = np.array(rows, dtype="<f8")
    y = np.arange(24, dtype="<i8") % 3
    header = {"program": "from sklearn.dummy import DummyClassifier\n"
                         "def build_model(x_train, y_train):\n"
                         "    return DummyClassifier(strategy='prior').fit(x_train, y_train)\n",
              "n_train": 24, "n_features": 4, "n_val": 24, "n_classes": 3}
    payload = x.tobytes() + y.tobytes() + x.tobytes()
    header["payload"] = len(payload)
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + payload


def rehearse():
    """Runs the rehearsal through the same steps as a job (decode, arrays, compile, build_model,
    the fitted check, predict_proba, encoding the result) without sending anything. Every page
    those steps write is shared with the worker after the fork and is copied on its first write
    (a page fault each): taken here, while the child waits, instead of on the job's path. Only
    trusted code runs, before any job; numpy's global random state is put back, and the
    estimator warns about nothing (the worker ran it in warm_up already)."""
    state = np.random.get_state()
    try:
        (n,) = struct.unpack("<I", REHEARSAL[:4])
        job = json.loads(REHEARSAL[4:4 + n])
        payload = bytearray(REHEARSAL[4 + n:])

        def finish(header, data=b""):
            json.dumps(dict(usage(), **header, trace={"c_done": now()})).encode()
            raise Rehearsed

        run_job(job, payload, {}, finish)
    except Exception:
        pass  # a rehearsal that fails has still done most of its work
    except Rehearsed:
        pass
    finally:
        np.random.set_state(state)


def usage():
    """CPU seconds and peak memory of this process and its reaped children (reported by the child
    itself: the worker replies before reaping it)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024.0}


def _lower(which, soft, hard=None):
    try:
        cur_soft, cur_hard = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def kill_job(pid):
    """Sends SIGKILL to every process the job started, escapees (setsid, double fork) included.
    Inside the sandbox one kill(-1) reaches every process of the namespace but the worker, and
    none escapes it by forking: the kernel walks the process list under the lock a fork needs to
    join it, and fails a fork whose parent has SIGKILL pending. No process of the job runs another
    instruction after this returns; they may still be exiting (unmapping their memory)."""
    targets = (-1,) if IS_INIT else (-pid, pid)
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_job(pid, keep):
    """Waits, after `kill_job`, until every process but the worker and `keep` (the child already
    forked for the next job) is gone. Inside the sandbox every process descends from the worker
    and orphans are re-parented to it (PID 1), so each ends as a child of the worker; /proc (the
    sandbox's own) lists whoever is left."""
    try:
        os.waitpid(pid, 0)  # the job's child: almost always the only one
    except ChildProcessError:
        pass  # reaped already (it exited early or timed out)
    while True:
        left = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if p not in (1, keep)]
        if not left:
            return
        for p in left:
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass  # not the worker's child yet: its parent is still exiting
        time.sleep(0.0002)


def kill_all(pid):
    """Every process the job started, including escapees (setsid, double fork), is gone after this
    (the order without a spare waiting: see `next_spare`). Inside the sandbox it kills again after
    each process reaped, as it always has; `kill_job` says why once would do."""
    kill_job(pid)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if IS_INIT:
            kill_job(pid)


def wipe(path):
    """Empties a writable scratch directory between jobs (the next job must not see this one's files)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                wipe(e.path)
                os.rmdir(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            pass


class Spare:
    """A child forked ahead of time, waiting for its job on a pipe: the fork is off the critical
    path of the next job."""

    def __init__(self):
        # The host's next request may be there already (actions queued): then the child forked
        # now would only delay it by rehearsing.
        rehearse_first = REHEARSE and not select.select([CTRL_IN], [], [], 0)[0]
        job_r, self.job_w = os.pipe()
        self.res_r, res_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.forked_at = now()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for fd in (CTRL_IN, CTRL_OUT, self.job_w, self.res_r, self.out_r):
                    os.close(fd)
                if not IS_INIT:
                    os.setpgid(0, 0)
                os.dup2(out_w, 1)
                os.dup2(out_w, 2)
                os.close(out_w)
                base_data, rehearsed = prepare_child(job_r, rehearse_first)
                faults = minor_faults()  # a forked child's count starts at zero
                trace = {"c_prepared": now(), "c_prep_faults": faults, "faults0": faults,
                         "c_rehearsed": int(rehearsed)}
                try:
                    job, payload = recv(job_r)
                except EOFError:
                    os._exit(0)
                trace["c_job"] = now()
                os.close(job_r)
                child(job, payload, res_w, base_data, trace)
            finally:
                os._exit(70)
        self.fork_ns = now() - self.forked_at
        for fd in (job_r, res_w, out_w):
            os.close(fd)
        self.pidfd = os.pidfd_open(self.pid)


def frame_complete(buf):
    """Whether `buf` holds one whole frame (header and payload)."""
    if len(buf) < 4:
        return False
    (n,) = struct.unpack("<I", bytes(buf[:4]))
    if len(buf) < 4 + n:
        return False
    try:
        size = json.loads(bytes(buf[4:4 + n])).get("payload", 0)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return True  # garbage: stop waiting, the reply says so
    return not isinstance(size, int) or len(buf) >= 4 + n + size


# What a child's result header may hold: the child runs user code, which can find its result
# pipe and write anything, so only these keys and types reach the host.
RESULT_KEYS = {"ok": bool, "kind": str, "message": str, "rows": int, "cols": int, "classes": list,
               "cpu_s": (int, float), "peak_rss_mb": (int, float)}
KINDS = ("Syntax", "Exception", "Memory", "BadPredictions")
# The child's timestamps and counts passed on in the trace (non-negative integers only).
CHILD_TRACE = ("c_prepared", "c_prep_faults", "c_rehearsed", "c_job", "c_ready", "c_built",
               "c_done", "c_faults")


def sanitize(child_head, header):
    out = {}
    for key, types in RESULT_KEYS.items():
        value = child_head.get(key)
        if isinstance(value, types) and not (isinstance(value, bool) and types is not bool):
            out[key] = value
    for key in ("cpu_s", "peak_rss_mb"):
        if key in header:  # the kernel's figures win where we have them
            out.pop(key, None)
    if out.get("kind") not in KINDS:
        out.pop("kind", None)
    if "message" in out:
        out["message"] = clean(out["message"])
    classes = out.get("classes")
    if classes is not None and (len(classes) > 100000 or not all(
            isinstance(c, int) and not isinstance(c, bool) and abs(c) < (1 << 62) for c in classes)):
        out.pop("classes")
    for key in ("rows", "cols"):
        if key in out and not 0 <= out[key] < (1 << 40):
            out.pop(key)
    trace = child_head.get("trace")
    if isinstance(trace, dict):
        out["trace"] = {k: v for k, v in trace.items()
                        if k in CHILD_TRACE and type(v) is int and 0 <= v < (1 << 63)}
    out.setdefault("ok", False)
    if not out["ok"]:
        out.setdefault("kind", "Exception")
        out.setdefault("message", "the program failed")
    return out


# Durations (ns) of the worker's work after its last reply, reported with the next one.
after_reply = {}


def serve_one(sp, raw, job, trace):
    limits = job["limits"]
    cap = int(limits["output_kb"]) * 1024
    wall = float(limits["wall_s"])
    start = time.monotonic()
    deadline = start + wall
    try:
        write_all(sp.job_w, raw)
    except OSError:
        pass  # the child died before its job: reported below as an exit
    os.close(sp.job_w)
    del raw
    trace["w_job"] = now()
    pid, res_r, out_r = sp.pid, sp.res_r, sp.out_r
    output = bytearray()
    result = bytearray()
    truncated = False

    def take(fd, chunk):
        nonlocal result, truncated
        if fd == out_r:
            room = cap - len(output)
            if room > 0:
                output.extend(chunk[:room])
            if len(chunk) > room:
                truncated = True  # keep draining so that a print flood never blocks the child
        else:
            result += chunk
            if len(result) > MAX_RESULT + (1 << 20):
                result = bytearray(b"\xff")  # absurd size: garbage, but keep draining

    # The job ends when the child's result is complete or the child exits, not when the pipes
    # close: processes it left behind may hold them open.
    open_fds = {res_r, out_r}
    poller = select.poll()
    for fd in (res_r, out_r, sp.pidfd):
        poller.register(fd, select.POLLIN)
    timed_out = exited = complete = False
    while not (exited or complete):
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for fd, _ in poller.poll(max(1, int(left * 1000) + 1)):
            if fd == sp.pidfd:
                exited = True
                continue
            if fd not in open_fds:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
            else:
                take(fd, chunk)
                if fd == res_r and frame_complete(result):
                    complete = True
    wall_s = time.monotonic() - start
    trace["w_result"] = now()
    # What was printed before the result (or the exit) is in the pipe already; later writers
    # (left-behind processes) may go on for ever, so read only what is there.
    for fd in (out_r, res_r):
        if fd in open_fds and not (fd == res_r and complete):
            os.set_blocking(fd, False)
            try:
                while len(output) <= cap or fd == res_r:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    take(fd, chunk)
            except BlockingIOError:
                pass
    status = rusage = None
    if not complete:
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status, rusage = os.wait4(pid, 0)
    header = {"wall_s": wall_s, "output": output.decode("utf-8", "replace"),
              "output_truncated": truncated}
    if rusage is not None:
        header["cpu_s"] = rusage.ru_utime + rusage.ru_stime
        header["peak_rss_mb"] = rusage.ru_maxrss / 1024.0
    body = b""
    if timed_out:
        header.update(ok=False, kind="Timeout", message=None)
    elif len(result) >= 4:
        (n,) = struct.unpack("<I", bytes(result[:4]))
        try:
            child_head = json.loads(bytes(result[4:4 + n]))
            body = bytes(result[4 + n:])
            if (not isinstance(child_head, dict) or len(body) != child_head.get("payload")
                    or len(body) > MAX_RESULT):
                raise ValueError
            header.update(sanitize(child_head, header))
        except (ValueError, UnicodeDecodeError):
            header.update(ok=False, kind="Exception",
                          message="the program corrupted the channel its result is sent on")
            body = b""
    elif os.WIFSIGNALED(status):
        header.update(ok=False, kind="Killed", signal=os.WTERMSIG(status), message=None)
    else:
        header.update(ok=False, kind="Exception",
                      message="the program exited (status %d) before build_model returned"
                      % os.WEXITSTATUS(status))
    if status is not None and os.WIFSIGNALED(status) and not header.get("ok"):
        header["signal"] = os.WTERMSIG(status)
    header["trace"] = dict(header.pop("trace", {}), **trace, **after_reply, w_reply=now())
    send(CTRL_OUT, header, body)


def next_spare(sp):
    """Ends every process of the job that `sp` ran (after its reply), empties the scratch
    directories and returns the child forked for the next job. The host is not kept waiting for
    any of it, unless its next request is already there.

    Each exit of a child unmaps all it shares with the worker, milliseconds of CPU in the exiting
    process; forking the next child is milliseconds in the worker. Inside the sandbox the two
    overlap: the fork follows the kill of every process of the job (`kill_job`), so the new child
    only ever coexists with processes that cannot run, and the scratch directories are emptied
    once they are all gone, before the new child can get a job. The job's pipes are closed before
    the fork, so the new child holds nothing of the old job's."""
    t0 = now()
    kill_job(sp.pid)
    for fd in (sp.res_r, sp.out_r, sp.pidfd):
        os.close(fd)
    t1 = now()
    spare = None
    if OVERLAP:
        try:
            spare = Spare()
        except OSError:
            pass  # e.g. the sandbox's process limit, full until the job's processes are reaped
    t2 = now()
    if spare is not None:
        reap_job(sp.pid, spare.pid)
    else:
        kill_all(sp.pid)
    t3 = now()
    for scratch in SCRATCH:
        wipe(scratch)
    t4 = now()
    if spare is None:
        spare = Spare()
    after_reply.update(a_kill=t1 - t0, a_reap=t3 - t2, a_wipe=t4 - t3, a_fork=spare.fork_ns,
                       w_fork=spare.forked_at)
    return spare


def warm_up():
    """Runs the usual estimators once, so that lazy imports and caches are filled in the worker
    (shared by every child) instead of in each child."""
    rng = np.random.RandomState(0)
    x = rng.rand(30, 3)
    y = np.arange(30) % 3
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    for model in (DummyClassifier(), LogisticRegression(), DecisionTreeClassifier(),
                  RandomForestClassifier(n_estimators=2), KNeighborsClassifier(3),
                  make_pipeline(StandardScaler(), LogisticRegression())):
        try:
            model.fit(x, y).predict_proba(x)
            check_is_fitted(model)
        except Exception:
            pass


REHEARSAL = rehearsal_frame()

MADV_COLLAPSE = 25  # Linux 6.1
HUGE = 2 << 20


def huge_pages():
    """Backs the worker's memory with 2 MiB pages where the kernel can. Every fork copies, and
    every child's exit drops, one page-table entry per page the worker holds, page by page unless
    the pages come in large folios. The worker's writes after a fork split the mappings again,
    but the folios stay large. Only whole 2 MiB chunks of anonymous memory qualify: glibc's heap
    and runs of pymalloc's 1 MiB arenas. Best effort: on an older kernel, or with THP turned
    off, nothing changes."""
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "rw-p" or parts[5:] not in ([], ["[heap]"]):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        for at in range((lo + HUGE - 1) & ~(HUGE - 1), hi & ~(HUGE - 1), HUGE):
            if _libc.madvise(at, HUGE, MADV_COLLAPSE) != 0 and ctypes.get_errno() != errno.EINVAL:
                return  # no huge page to be had (EINVAL: not this chunk, or no MADV_COLLAPSE)


def main():
    try:
        warm_up()
    except Exception:
        pass
    # Everything so far is shared with the children: keep the collector from touching (and so
    # copying) those pages in every child.
    gc.collect()
    gc.freeze()
    huge_pages()
    send(CTRL_OUT, {"ready": True, "pid": os.getpid(), "python": sys.version.split()[0]})
    spare = Spare()
    after_reply.update(a_fork=spare.fork_ns, w_fork=spare.forked_at)
    while True:
        idle = now()
        try:
            (n,) = struct.unpack("<I", bytes(read_exact(CTRL_IN, 4)))
            head = read_exact(CTRL_IN, n)
            job = json.loads(bytes(head))
            payload = read_exact(CTRL_IN, job.get("payload", 0))
        except EOFError:
            os._exit(0)  # the host closed the channel: nothing to finish
        raw = bytes(struct.pack("<I", n) + head + payload)
        del head, payload
        serve_one(spare, raw, job, {"w_idle": idle, "w_req": now()})
        spare = next_spare(spare)


main()
