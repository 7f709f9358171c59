"""Which JAX backend a command starts, and a quiet start.

jax starts every backend it finds installed. With the compile-only toolchains (`pip install .[aot]`: the
CUDA plugin, libtpu) on a host with neither a GPU nor a TPU, that prints pages of failed CUDA and libtpu
initialisations before jax falls back to the CPU. Three pieces keep a start to the lines that matter:

- `choose_platforms`: "cpu" on a Linux host with no GPU or TPU device where the user set no
  JAX_PLATFORMS (device nodes and PCI ids only: no jax, no driver call); otherwise jax chooses as usual.
- `quiet_native_logs`: native code prints a few lines to fd 2 whenever jax loads its CUDA modules on a
  host without CUDA (absl logs to stderr before anything sets its logging up; no environment variable,
  TF_CPP_MIN_LOG_LEVEL included, reaches it). This drops exactly those lines and passes everything else.
  `gptoss_jax/__init__.py` imports jax through it.
- `start_jax`, which the command line calls before each command's first backend use: pins the choice,
  then loads jax's plugins through `quiet_native_logs`, a failing plugin reported in one line.

`cpu_xla_flags` adds the XLA:CPU options the decode formulations of `gptoss_jax.cpu_kernels` need to
XLA_FLAGS (`gptoss_jax/__init__.py` calls it before jax starts a backend; options the user set win).

Imports nothing of jax at module level (jax is not loaded yet when `gptoss_jax/__init__.py` imports it).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import tempfile

DEV = "/dev"
PCI_DEVICES = "/sys/bus/pci/devices"

# Any of these in `DEV` means a GPU jax may use: NVIDIA's device and control nodes (the control node is
# what containers always get), WSL2's GPU bridge, AMD's ROCm compute node.
GPU_NODES = ("nvidia*", "dxg", "kfd")
# TPU v2-v4 (and other chips of the kernel's accel subsystem) appear as /dev/accel*.
ACCEL_NODES = ("accel*",)
# Newer TPUs are reached through VFIO and are known by their PCI vendor, Google's. Google also makes
# the virtual NIC (gVNIC) and the NVMe disks of ordinary Compute Engine VMs; those two PCI base classes
# are not TPUs, any other Google function is taken for one (an unknown one then leaves jax to choose).
GOOGLE_PCI_VENDOR = 0x1AE0
NOT_TPU_PCI_CLASSES = (0x01, 0x02)  # mass storage, network
PCI_BASE_CLASS_SHIFT = 16  # the class file holds 0xBBSSPP: base class, subclass, programming interface

# Set by the user: jax's own choice stands (an empty value too, which asks jax to choose).
# JAX_BACKEND_TARGET / PJRT_NAMES_AND_LIBRARY_PATHS: a remote or self-registered backend, not on the PCI bus.
USER_CHOICE = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_BACKEND_TARGET", "PJRT_NAMES_AND_LIBRARY_PATHS")

# Printed to fd 2 by native code as jax loads its CUDA modules and plugin on a host without CUDA, at
# every start, whatever the backend: informational only. Matched against whole lines.
NATIVE_NOISE = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(r"I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, "
               r"GPU will not be used\."),
)


# XLA:CPU options (name, value), each added to XLA_FLAGS unless the user set it there (docs/cpu.md):
# - YNNPACK for dots only: its reduction fusions take the float ops feeding a reduction and leave the
#   rest outside (the integer MXFP4 decode), materialising it: the fused MXFP4 products of
#   cpu_kernels then run ~10x slower;
# - the memory-optimised scheduler: the default one starts the per-layer copies of constant buffers
#   (a scan's output, a scatter's zeros) of every layer at once, 4.1 GB instead of 0.35 GB of
#   temporaries for a 512-token prefill of the 20b;
# - on AVX-512 hosts, 512-bit vectors (the fused MXFP4 decode runs 16 lanes at a time, ~1.3x).
CPU_XLA_FLAGS = (("xla_cpu_experimental_ynn_fusion_type", "individual_dot"),
                 ("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"))
AVX512_XLA_FLAGS = (("xla_cpu_prefer_vector_width", "512"),)
CPUINFO = "/proc/cpuinfo"


# How jax logs a plugin whose initialize() raised (jax/_src/xla_bridge.py, discover_pjrt_plugins).
PLUGIN_FAILURE = "Jax plugin configuration error"
MAX_CAUSES = 4  # of its exception chain in the one line (a chain can loop)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def has_gpu(dev: str = DEV) -> bool:
    return any(glob.glob(os.path.join(dev, pattern)) for pattern in GPU_NODES)


def has_tpu(dev: str = DEV, pci_devices: str = PCI_DEVICES) -> bool:
    if any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCEL_NODES):
        return True
    for function in glob.glob(os.path.join(pci_devices, "*")):
        if _hex(_read(os.path.join(function, "vendor"))) != GOOGLE_PCI_VENDOR:
            continue
        cls = _hex(_read(os.path.join(function, "class")))
        if cls is None or cls >> PCI_BASE_CLASS_SHIFT not in NOT_TPU_PCI_CLASSES:
            return True
    return False


def choose_platforms(environ, *, dev: str = DEV, pci_devices: str = PCI_DEVICES,
                     system: str = sys.platform) -> str | None:
    """The JAX_PLATFORMS value to start with: "cpu" on a Linux host with no GPU and no TPU where the
    user chose nothing, else None (jax chooses: a GPU or TPU when there is one). Reads only `environ`
    and the device trees under `dev` and `pci_devices`."""
    if any(name in environ for name in USER_CHOICE):
        return None
    if not system.startswith("linux"):  # elsewhere the plugins differ (jax-metal): not ours to pin
        return None
    if has_gpu(dev) or has_tpu(dev, pci_devices):
        return None
    return "cpu"


def has_avx512(cpuinfo: str = CPUINFO) -> bool:
    """Whether the host CPU has AVX-512F (Linux's /proc/cpuinfo; False where it cannot be read)."""
    return any(line.startswith("flags") and "avx512f" in line.split() for line in _read(cpuinfo).splitlines())


def cpu_xla_flags(environ=None, *, cpuinfo: str = CPUINFO) -> str:
    """Add CPU_XLA_FLAGS (and AVX512_XLA_FLAGS on such a host) to environ["XLA_FLAGS"], each unless
    that option is already there; returns the new value. XLA reads XLA_FLAGS once, when jax starts
    its first backend: options added later do not apply to that process."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    wanted = CPU_XLA_FLAGS + (AVX512_XLA_FLAGS if has_avx512(cpuinfo) else ())
    added = [f"--{name}={value}" for name, value in wanted if f"--{name}=" not in flags]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags] + added if flags else added)
    return environ.get("XLA_FLAGS", "")


def _is_noise(line: bytes) -> bool:
    text = line.rstrip(b"\r\n").decode(errors="replace")
    return any(p.fullmatch(text) for p in NATIVE_NOISE)


def _flush_stderr():
    if sys.stderr is not None:  # None without a console (pythonw)
        sys.stderr.flush()


def _write_fd2(data: bytes):
    while data:  # back where native code wrote it (sys.stderr may be redirected, e.g. under pytest)
        data = data[os.write(2, data):]


@contextlib.contextmanager
def quiet_native_logs():
    """Capture fd 2 (native code writes there directly) for the body and write it back after, less the
    NATIVE_NOISE lines; if the body raises, all of it. Filters nothing when fd 2 is not open or no
    temporary file can be made (a read-only host)."""
    try:
        captured = tempfile.TemporaryFile()
    except OSError:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        captured.close()
        yield
        return
    ok = False
    with captured:
        _flush_stderr()
        os.dup2(captured.fileno(), 2)
        try:
            yield
            ok = True
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            _write_fd2(b"".join(line for line in lines if not ok or not _is_noise(line)))


class _PluginFailures(logging.Filter):
    """jax logs a plugin that fails to start with its whole traceback; keep one line per failure."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def filter(self, record):
        if not (record.exc_info and record.getMessage().startswith(PLUGIN_FAILURE)):
            return True
        reasons, e = [], record.exc_info[1]
        while e is not None and len(reasons) < MAX_CAUSES:  # the exception, then what caused it
            reasons.append(" ".join(str(e).split()) or type(e).__name__)
            e = e.__cause__ or e.__context__
        self.lines.append(f"{record.getMessage()}: {' <- '.join(reasons)}")
        return False


def load_plugins():
    """Load jax's backend plugins now, quietly (jax loads them at its first backend use otherwise): a
    plugin that fails prints one line, its reason. Starts no backend. jax has no public call for this."""
    from jax._src import xla_bridge

    discover = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    if discover is None:  # another jax: the plugins load at the first backend use, as they always did
        return []
    failures = _PluginFailures()
    log = logging.getLogger(xla_bridge.__name__)
    log.addFilter(failures)
    try:
        with quiet_native_logs():
            discover()
    finally:
        log.removeFilter(failures)
    for line in failures.lines:
        print(line, file=sys.stderr)
    return failures.lines


def start_jax(environ=None):
    """The command line's start: pin jax to `choose_platforms(environ)` (os.environ by default) unless
    the user or jax itself already chose, then `load_plugins()`. Call before the first backend use.
    Raises RuntimeError (one line) when a plugin failed and the platforms the user asked for do not
    start: jax itself would fail later with a bare AssertionError."""
    import jax

    environ = os.environ if environ is None else environ
    chosen = choose_platforms(environ)
    if chosen is not None and not jax.config.jax_platforms:  # e.g. jax's TPU VM set-up chose already
        environ["JAX_PLATFORMS"] = chosen  # subprocesses start the same way
        jax.config.update("jax_platforms", chosen)  # jax read the variable when it was imported
    if load_plugins() and environ.get("JAX_PLATFORMS"):
        try:
            jax.devices()  # started now only in this case: the failed plugin may be one the user asked for
        except Exception as e:
            raise RuntimeError(f"no backend of JAX_PLATFORMS={environ['JAX_PLATFORMS']} started "
                               f"({type(e).__name__}): see the plugin failure above") from e
