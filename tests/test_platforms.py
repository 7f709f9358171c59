"""The backend a command starts (gptoss_jax/platforms.py) and a quiet start of the command line."""

import logging
import os
import subprocess
import sys

import pytest

from gptoss_jax import platforms, write_random_checkpoint

from helpers import REPO, tiny_config

CUDART_LINE = (b"I0000 00:00:1796232019.849569    1908 cudart_stub.cc:31] Could not find cuda drivers on your "
               b"machine, GPU will not be used.\n")
ABSL_LINE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"


def host(tmp_path, nodes=(), pci=()):
    """A fake /dev holding `nodes` and /sys/bus/pci/devices holding `pci` ((vendor, class) per function)."""
    dev, bus = tmp_path / "dev", tmp_path / "pci"
    dev.mkdir()
    bus.mkdir()
    for node in nodes:
        (dev / node).parent.mkdir(parents=True, exist_ok=True)
        (dev / node).touch()
    for i, (vendor, cls) in enumerate(pci):
        fn = bus / f"0000:00:{i:02x}.0"
        fn.mkdir()
        (fn / "vendor").write_text(vendor + "\n")
        (fn / "class").write_text(cls + "\n")
    return dict(dev=str(dev), pci_devices=str(bus), system="linux")


INTEL_CPU_HOST = (("0x8086", "0x060000"),)  # a host bridge
GCE_CPU_VM = (("0x1ae0", "0x020000"), ("0x1ae0", "0x010802"))  # Google's gVNIC and NVMe disk: no TPU


@pytest.mark.parametrize("pci", [(), INTEL_CPU_HOST, GCE_CPU_VM])
def test_no_gpu_or_tpu_starts_the_cpu(tmp_path, pci):
    assert platforms.choose_platforms({}, **host(tmp_path, nodes=("null", "vfio/vfio"), pci=pci)) == "cpu"


@pytest.mark.parametrize("node", ["nvidia0", "nvidiactl", "dxg", "kfd", "accel0", "accel/accel0"])
def test_a_gpu_or_tpu_node_leaves_jax_to_choose(tmp_path, node):
    assert platforms.choose_platforms({}, **host(tmp_path, nodes=(node,))) is None


@pytest.mark.parametrize("cls", ["0x120000", "0xff0000", "garbage"])
def test_a_google_accelerator_on_the_pci_bus_leaves_jax_to_choose(tmp_path, cls):
    pci = GCE_CPU_VM + (("0x1ae0", cls),)
    assert platforms.choose_platforms({}, **host(tmp_path, nodes=("vfio/0",), pci=pci)) is None


@pytest.mark.parametrize("environ", [{"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": ""},
                                     {"JAX_BACKEND_TARGET": "grpc://somewhere:1234"}])
def test_the_users_choice_stands(tmp_path, environ):
    assert platforms.choose_platforms(environ, **host(tmp_path)) is None


def test_only_linux_is_pinned(tmp_path):
    assert platforms.choose_platforms({}, **{**host(tmp_path), "system": "darwin"}) is None


def test_quiet_native_logs_drops_only_the_noise(capfd):
    with platforms.quiet_native_logs():
        os.write(2, ABSL_LINE + CUDART_LINE + b"E0000 a real error\n" + ABSL_LINE + CUDART_LINE + b"W0000 another")
    assert capfd.readouterr().err == "E0000 a real error\nW0000 another"


def test_quiet_native_logs_keeps_everything_when_the_body_fails(capfd):
    with pytest.raises(ImportError), platforms.quiet_native_logs():
        os.write(2, ABSL_LINE + CUDART_LINE)
        raise ImportError("no jaxlib")
    assert capfd.readouterr().err == (ABSL_LINE + CUDART_LINE).decode()


def fail_a_plugin():
    """What jax's plugin discovery does on a host without CUDA when JAX_PLATFORMS asks for cuda."""
    os.write(2, ABSL_LINE + CUDART_LINE)
    try:
        try:
            raise RuntimeError("cudaRuntimeGetVersion failed:\nError loading CUDA libraries.")
        except RuntimeError as e:
            raise RuntimeError("Unable to load CUDA. Is it installed?") from e
    except RuntimeError:
        logging.getLogger("jax._src.xla_bridge").exception(
            "Jax plugin configuration error: Exception when calling %s.initialize()", "jax_plugins.xla_cuda12")


def test_a_failing_plugin_is_one_line(monkeypatch, capfd):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "_discover_and_register_pjrt_plugins", fail_a_plugin)
    platforms.load_plugins()
    assert capfd.readouterr().err == (
        "Jax plugin configuration error: Exception when calling jax_plugins.xla_cuda12.initialize(): "
        "Unable to load CUDA. Is it installed? <- cudaRuntimeGetVersion failed: Error loading CUDA libraries.\n")


def test_a_backend_asked_for_that_cannot_start_is_a_one_line_error(monkeypatch):
    import jax
    from jax._src import xla_bridge

    def no_backend():
        raise AssertionError

    monkeypatch.setattr(xla_bridge, "_discover_and_register_pjrt_plugins", fail_a_plugin)
    monkeypatch.setattr(jax, "devices", no_backend)
    with pytest.raises(RuntimeError, match=r"^no backend of JAX_PLATFORMS=cuda started \(AssertionError\)"):
        platforms.start_jax({"JAX_PLATFORMS": "cuda"})


NOISE = ("Traceback", "cudart_stub", "absl::InitializeLog", "TPU_WORKER_HOSTNAMES", "Jax plugin")


@pytest.mark.skipif(platforms.choose_platforms({}) is None, reason="a GPU or TPU host: jax chooses, noise and all")
def test_a_command_starts_quietly_without_jax_platforms(tmp_path):
    """A command that starts a backend (convert), run as a user runs it: no JAX_PLATFORMS, nor any log level;
    with the aot extra installed, jax alone would print CUDA and libtpu start-up failures here."""
    src = tmp_path / "src"
    write_random_checkpoint(tiny_config(), src, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    r = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "convert", str(src), str(tmp_path / "dst"),
                        "--quiet"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("converted ")
    assert not [s for s in NOISE if s in r.stderr], r.stderr[-3000:]
