"""Capability probe: this machine against its own /proc/cpuinfo, recorded ARM / x86 / GPU / Jetson
fixtures, a hanging nvidia-smi, and the compatible() truth table."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.cli import render_probe
from agent.core.status import DeviceSummary, GpuSummary
from agent.device import probe as probe_mod
from agent.device.probe import (
    SCHEMA,
    BackendProbe,
    CpuInfo,
    DiskInfo,
    GpuInfo,
    MemoryInfo,
    NvidiaInfo,
    OsInfo,
    Probe,
    ProbeSources,
    compatible,
    probe,
)

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
NOWHERE = Path("/nonexistent/edge-agent-test")


def fixture_sources(tmp_path: Path, *, cpuinfo: Path | None = None, machine: str | None = None,
                    smi: list[str] | None = None, jetson: bool = False, timeout: float = 3.0) -> ProbeSources:
    """Sources reading only fixtures: nothing from this machine's /proc, /etc or GPU stack."""
    j = FIX / "gpu" / "jetson-orin"
    return ProbeSources(
        cpuinfo=cpuinfo or (FIX / "probe" / "cpuinfo-haswell.txt"),
        machine=machine or "x86_64",
        nv_tegra_release=(j / "nv_tegra_release") if jetson else NOWHERE,
        device_tree_model=(j / "device-tree-model") if jetson else NOWHERE,
        os_release=NOWHERE,
        cuda_home=(j / "cuda") if jetson else NOWHERE,
        nvidia_smi=tuple(smi) if smi else (str(tmp_path / "no-such-nvidia-smi"),),
        smi_timeout_s=timeout,
        use_nvml=False,
        live=False,
    )


def fake_smi(tmp_path: Path, csv: str, *, banner: str = "smi-banner.txt") -> list[str]:
    """A fake nvidia-smi: the query prints a recorded CSV, the plain call the recorded banner."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--query-gpu*) cat "{FIX / "gpu" / csv}" ;;\n'
        f'  *) cat "{FIX / "gpu" / banner}" ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)]


# ------------------------------------------------------------------------------- this machine


def _kernel_flags() -> set[str]:
    """Flags of processor 0 parsed independently of the probe (x86 `flags`, ARM `Features`)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_probe_this_machine_matches_proc_cpuinfo(tmp_path: Path) -> None:
    p = probe(tmp_path)
    flags = _kernel_flags()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    assert p.cpu.arch == arch
    tracked = probe_mod.X86_FEATURES if arch == "x86_64" else probe_mod.ARM_FEATURES
    assert set(p.cpu.features) == {f for f in tracked if f in flags}
    assert flags <= set(p.cpu.flags) or set(p.cpu.flags) <= flags  # intersection over cores
    if arch == "x86_64":
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags
        assert p.cpu.int8_path == ("vnni" if vnni else "avx2" if "avx2" in flags else "none")
        assert p.cpu.bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
        assert p.cpu.isa_family == ("x86-vnni" if vnni or "amx_int8" in flags
                                    else "x86-avx2" if "avx2" in flags else "x86-baseline")
    assert p.cpu.logical_cores == sum(1 for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                      if ln.startswith("processor"))
    assert p.cpu.usable_cores == len(os.sched_getaffinity(0))
    assert p.memory.total_mb > 0 and p.disk.free_mb > 0
    assert p.schema == SCHEMA
    doc = json.loads(p.to_json())
    assert doc["schema"] == SCHEMA and doc["cpu"]["int8_path"] == p.cpu.int8_path
    assert p.to_json() == p.to_json()  # deterministic
    s = p.summary()
    assert isinstance(s, DeviceSummary) and s.isa_family == p.cpu.isa_family
    assert list(s.to_json()) == ["arch", "features", "int8_path", "isa_family", "bf16", "gpus", "jetson", "backends"]
    assert "onnxruntime" in s.backends and s.to_json()["features"] == list(p.cpu.features)


def test_backend_details_listed_from_a_child_process(tmp_path: Path) -> None:
    """Providers/devices come from a child interpreter: the caller never imports onnxruntime."""
    code = (
        "import sys, json; from pathlib import Path; from agent.device.probe import probe; "
        f"p = probe(Path({str(tmp_path)!r}), backend_details=True); "
        "ort = p.backend('onnxruntime'); "
        "print(json.dumps({'devices': list(ort.devices), 'loaded': 'onnxruntime' in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert "CPUExecutionProvider" in doc["devices"]
    assert doc["loaded"] is False


# ------------------------------------------------------------------------------ CPU fixtures


@pytest.mark.parametrize(
    ("name", "machine", "arch", "features", "int8_path", "bf16", "model"),
    [
        ("cpuinfo-graviton3.txt", "aarch64", "aarch64", ("asimd", "asimddp", "i8mm", "bf16", "sve"),
         "arm_dotprod", True, "Neoverse-V1"),
        ("cpuinfo-orin.txt", "arm64", "aarch64", ("asimd", "asimddp"), "arm_dotprod", False, "Cortex-A78AE"),
        ("cpuinfo-sapphire-rapids.txt", "x86_64", "x86_64",
         ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"), "vnni", True,
         "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"),
        ("cpuinfo-haswell.txt", "AMD64", "x86_64", ("avx2",), "avx2", False,
         "Intel(R) Xeon(R) CPU E5-2676 v3 @ 2.40GHz"),
    ],
)
def test_cpu_fixtures(tmp_path: Path, name: str, machine: str, arch: str, features: tuple[str, ...],
                      int8_path: str, bf16: bool, model: str) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=FIX / "probe" / name, machine=machine))
    assert p.cpu.arch == arch
    assert p.cpu.features == features
    assert p.cpu.int8_path == int8_path
    assert p.cpu.bf16 is bf16
    assert p.cpu.model == model
    assert p.nvidia.gpus == ()


def test_cpu_core_counts_from_fixture(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=FIX / "probe" / "cpuinfo-sapphire-rapids.txt"))
    assert (p.cpu.logical_cores, p.cpu.physical_cores) == (4, 2)
    arm = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=FIX / "probe" / "cpuinfo-orin.txt",
                                                  machine="aarch64"))
    assert (arm.cpu.logical_cores, arm.cpu.physical_cores) == (6, None)  # arm64 cpuinfo has no core ids


def test_features_are_the_intersection_over_cores(tmp_path: Path) -> None:
    """A feature only some cores have (heterogeneous SoC) must not be advertised."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n\n"
                       "processor\t: 1\nFeatures\t: fp asimd asimddp\n")
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=cpuinfo, machine="aarch64"))
    assert p.cpu.features == ("asimd", "asimddp")
    assert p.cpu.int8_path == "arm_dotprod"


def test_features_never_guessed_from_model_name(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+ (AMX)\nflags\t\t: fpu sse2\n")
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=cpuinfo))
    assert p.cpu.features == () and p.cpu.int8_path == "none" and p.cpu.bf16 is False


def test_unreadable_cpuinfo_gives_the_safety_net_only(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=tmp_path / "missing"))
    assert p.cpu.features == () and p.cpu.int8_path == "none"


# ------------------------------------------------------------------------------ GPU fixtures


@pytest.mark.parametrize(
    ("csv", "name", "cc", "memory_mb", "fp8", "int8"),
    [
        ("smi-h100.csv", "NVIDIA H100 80GB HBM3", "9.0", 81559, True, True),
        ("smi-a100.csv", "NVIDIA A100-SXM4-80GB", "8.0", 81920, False, True),
        ("smi-l4.csv", "NVIDIA L4", "8.9", 23034, True, True),
        ("smi-t4.csv", "Tesla T4", "7.5", 15360, False, True),
    ],
)
def test_nvidia_smi_fixtures(tmp_path: Path, csv: str, name: str, cc: str, memory_mb: int, fp8: bool,
                             int8: bool) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=fake_smi(tmp_path, csv)))
    assert p.nvidia.source == "nvidia-smi" and p.nvidia.error == ""
    (gpu,) = p.nvidia.gpus
    assert (gpu.name, gpu.compute_capability, gpu.memory_mb, gpu.fp8, gpu.int8) == (name, cc, memory_mb, fp8, int8)
    assert gpu.jetson is False
    assert p.nvidia.cuda_version == "12.4"
    assert p.nvidia.driver_version
    assert p.summary().gpus == (GpuSummary(name, cc, int8, fp8),)
    assert p.summary().to_json()["gpus"] == [{"name": name, "cc": cc, "int8": int8, "fp8": fp8}]


def test_summary_json_is_the_documented_status_form(tmp_path: Path) -> None:
    """Probe.summary().to_json() is the status message's ``device`` (docs/probe.md): every key, in order."""
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=FIX / "probe" / "cpuinfo-orin.txt",
                                                machine="aarch64", jetson=True))
    backends = [b.name for b in p.backends if b.installed and not b.error]
    assert p.summary().to_json() == {
        "arch": "aarch64", "features": ["asimd", "asimddp"], "int8_path": "arm_dotprod",
        "isa_family": p.cpu.isa_family, "bf16": False,
        "gpus": [{"name": "NVIDIA Jetson AGX Orin Developer Kit", "cc": "8.7", "int8": True, "fp8": False}],
        "jetson": "NVIDIA Jetson AGX Orin Developer Kit", "backends": backends,
    }
    bare = probe(tmp_path, sources=fixture_sources(tmp_path)).summary().to_json()
    assert bare["gpus"] == [] and bare["jetson"] is None


def test_status_payload_embeds_the_device_summary_unchanged(tmp_path: Path) -> None:
    """The birth message's ``device`` is the summary's JSON form, validated and embedded as is."""
    from agent.mqtt.payloads import parse_status, status_payload

    s = probe(tmp_path, sources=fixture_sources(tmp_path, smi=fake_smi(tmp_path, "smi-l4.csv"))).summary()
    doc = parse_status(status_payload(device_id="d", version="0", started_at=0.0, device=s))
    assert doc["device"] == s.to_json()


def test_nvml_preferred_when_pynvml_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml answers first (no subprocess); the fake mirrors pynvml's documented calls."""
    import importlib.machinery
    import types

    class NVMLError(Exception):
        pass

    calls: list[str] = []
    fake = types.ModuleType("pynvml")
    fake.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA L4"
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 9)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=23034 * 1024 * 1024)
    fake.nvmlSystemGetDriverVersion = lambda: "550.90.07"
    fake.nvmlSystemGetCudaDriverVersion = lambda: 12040
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    src = dataclasses.replace(fixture_sources(tmp_path, smi=["/bin/false"]), use_nvml=True)
    p = probe(tmp_path, sources=src)
    assert p.nvidia.source == "nvml" and calls == ["init", "shutdown"]
    (gpu,) = p.nvidia.gpus
    assert (gpu.name, gpu.compute_capability, gpu.memory_mb, gpu.fp8) == ("NVIDIA L4", "8.9", 23034, True)
    assert (p.nvidia.driver_version, p.nvidia.cuda_version) == ("550.90.07", "12.4")

    def broken() -> None:
        raise NVMLError("Driver Not Loaded")

    fake.nvmlInit = broken  # NVML unusable: falls back to nvidia-smi
    p = probe(tmp_path, sources=dataclasses.replace(src, nvidia_smi=tuple(fake_smi(tmp_path, "smi-t4.csv"))))
    assert p.nvidia.source == "nvidia-smi" and p.nvidia.gpus[0].name == "Tesla T4"


def test_two_gpus(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=fake_smi(tmp_path, "smi-a100-l4.csv")))
    assert [(g.index, g.compute_capability, g.fp8) for g in p.nvidia.gpus] == [(0, "8.0", False), (1, "8.9", True)]


def test_old_driver_without_compute_cap_field(tmp_path: Path) -> None:
    """Drivers that do not know compute_cap: GPUs are listed with an unknown CC (no GPU variant)."""
    script = tmp_path / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\' >&2; exit 2 ;;\n'
        '  *--query-gpu*) echo "Tesla P4, 7611, 418.87.01" ;;\n'
        '  *) echo "| NVIDIA-SMI 418.87.01  Driver Version: 418.87.01  CUDA Version: 10.1 |" ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=[str(script)]))
    (gpu,) = p.nvidia.gpus
    assert (gpu.name, gpu.compute_capability, gpu.fp8, gpu.int8, gpu.memory_mb) == ("Tesla P4", None, False, False, 7611)
    assert p.nvidia.cuda_version == "10.1"


def test_absent_nvidia_smi_means_no_gpu_and_no_error(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path))
    assert p.nvidia.gpus == () and p.nvidia.error == "" and p.nvidia.source == "none"


def test_failing_nvidia_smi_means_no_gpu_with_reason(tmp_path: Path) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\"'\"'t communicate with the "
                      "NVIDIA driver.'\nexit 9\n")
    script.chmod(0o755)
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=[str(script)]))
    assert p.nvidia.gpus == ()
    assert "exited 9" in p.nvidia.error and "communicate with the NVIDIA driver" in p.nvidia.error


def test_hanging_nvidia_smi_is_killed_within_the_timeout(tmp_path: Path) -> None:
    """A wedged driver: the wrapper's grandchild `sleep` holds the pipe; the whole group is killed."""
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\nsleep 30\necho never\n")
    script.chmod(0o755)
    t0 = time.monotonic()
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=[str(script)], timeout=0.5))
    elapsed = time.monotonic() - t0
    assert p.nvidia.gpus == ()
    assert "did not answer" in p.nvidia.error
    assert elapsed < 5, elapsed


def test_jetson_orin_from_tegra_release_and_device_tree(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, cpuinfo=FIX / "probe" / "cpuinfo-orin.txt",
                                                machine="aarch64", jetson=True))
    j = p.nvidia.jetson
    assert j is not None
    assert (j.model, j.module, j.l4t) == ("NVIDIA Jetson AGX Orin Developer Kit", "orin", "36.3.0")
    (gpu,) = p.nvidia.gpus
    assert gpu.jetson and gpu.compute_capability == "8.7"
    assert gpu.int8 is True and gpu.fp8 is False
    assert p.nvidia.source == "jetson"
    assert p.nvidia.cuda_version == "12.2"
    assert p.cpu.int8_path == "arm_dotprod"


def test_jetson_with_nvidia_smi_missing_fields(tmp_path: Path) -> None:
    """JetPack 6's nvidia-smi lists the iGPU but may answer N/A for compute_cap: the board table fills it."""
    script = tmp_path / "nvidia-smi"
    script.write_text('#!/bin/sh\ncase "$*" in\n  *--query-gpu*) echo "Orin (nvgpu), [N/A], [N/A], 540.3.0" ;;\n'
                      '  *) echo "CUDA Version: 12.6" ;;\nesac\n')
    script.chmod(0o755)
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=[str(script)], jetson=True, machine="aarch64",
                                                cpuinfo=FIX / "probe" / "cpuinfo-orin.txt"))
    (gpu,) = p.nvidia.gpus
    assert (gpu.name, gpu.compute_capability, gpu.fp8, gpu.jetson) == ("Orin (nvgpu)", "8.7", False, True)
    assert p.nvidia.cuda_version == "12.6"


def test_tensorrt_version_read_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JetPack-style tensorrt package without pip metadata: the version comes from its source text."""
    pkg = tmp_path / "site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("must not be imported")\n__version__ = "10.3.0"\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert probe_mod.package_version("tensorrt", ("no-such-dist",)) == "10.3.0"
    assert "tensorrt" not in sys.modules
    p = probe(tmp_path, sources=fixture_sources(tmp_path))
    assert p.nvidia.tensorrt_version == "10.3.0"
    trt = p.backend("tensorrt")
    assert trt is not None and trt.installed and trt.error == "no NVIDIA GPU"


# ------------------------------------------------------------------------------- compatible()


def make_probe(*, arch: str = "x86_64", flags: tuple[str, ...] = (), ccs: tuple[str | None, ...] = (),
               trt: str | None = None, backends: dict[str, str | None] | None = None) -> Probe:
    gpus = tuple(probe_mod.gpu_info(i, f"gpu{i}", cc, 1000) for i, cc in enumerate(ccs))
    bk = backends if backends is not None else {"onnxruntime": "1.20.0"}
    return Probe(
        cpu=CpuInfo(arch=arch, model="test", logical_cores=2, physical_cores=2, usable_cores=2,
                    features=(), flags=tuple(sorted(flags)), int8_path="none", bf16=False),
        nvidia=NvidiaInfo(gpus=gpus, tensorrt_version=trt),
        memory=MemoryInfo(1000, 1000), disk=DiskInfo(".", 1000, 1000), os=OsInfo("Linux", "", "", "3.11"),
        backends=tuple(BackendProbe(n, v is not None, v) for n, v in bk.items()),
    )


X86_VNNI = make_probe(flags=("avx2", "avx512f", "avx512_vnni"))
X86_AVX2 = make_probe(flags=("avx2",))
ARM_DP = make_probe(arch="aarch64", flags=("asimd", "asimddp"))
H100 = make_probe(flags=("avx2",), ccs=("9.0",), trt="10.3.0.26")
ORIN = make_probe(arch="aarch64", flags=("asimd", "asimddp"), ccs=("8.7",), trt="10.3.0")
A100_NO_TRT = make_probe(ccs=("8.0",))

FP8_TRT = {"gpu": True, "gpu_compute_capability_min": "8.9", "tensorrt_min": "10.0"}
INT8_TRT = {"gpu": True, "gpu_compute_capability_min": "7.5", "tensorrt_min": "10.0"}


@pytest.mark.parametrize(
    ("requires", "p", "ok", "reason"),
    [
        ({}, X86_AVX2, True, ""),
        ({}, ARM_DP, True, ""),
        ({"arch": ["x86_64"], "cpu_features": ["avx512_vnni"]}, X86_VNNI, True, ""),
        ({"arch": ["x86_64"], "cpu_features": ["avx512_vnni"]}, X86_AVX2, False, "CPU lacks avx512_vnni"),
        ({"arch": ["x86_64"]}, ARM_DP, False, "needs arch x86_64, this is aarch64"),
        ({"arch": ["aarch64"], "cpu_features": ["asimddp"]}, ARM_DP, True, ""),
        ({"arch": ["arm64"]}, ARM_DP, True, ""),  # normalised spelling
        ({"cpu_features_any": ["avx512_vnni", "avx_vnni"]}, X86_VNNI, True, ""),
        ({"cpu_features_any": ["avx512_vnni", "avx_vnni"]}, X86_AVX2, False, "CPU has none of"),
        (FP8_TRT, H100, True, ""),
        (FP8_TRT, ORIN, False, "needs GPU compute capability 8.9..any, found 8.7"),
        (FP8_TRT, X86_VNNI, False, "needs an NVIDIA GPU, none found"),
        (INT8_TRT, ORIN, True, ""),
        (INT8_TRT, A100_NO_TRT, False, "needs TensorRT >= 10.0, not installed"),
        ({**INT8_TRT, "tensorrt_min": "10.4"}, H100, False, "needs TensorRT >= 10.4, found 10.3.0.26"),
        ({"gpu": True, "gpu_compute_capability_max": "8.7"}, H100, False, "found 9.0"),
        ({"gpu": True, "gpu_compute_capability_min": "8.0", "gpu_compute_capability_max": "9.0"}, H100, True, ""),
        ({"something_new": ["x"]}, X86_VNNI, False, "unknown requirement(s) something_new"),
    ],
)
def test_compatible_truth_table(requires: dict, p: Probe, ok: bool, reason: str) -> None:
    got_ok, got_reason = compatible(requires, p)
    assert got_ok is ok
    assert reason in got_reason
    if ok:
        assert got_reason == ""


def test_compatible_with_backend_and_manifest_requires_model() -> None:
    from agent.core.manifest import Requires

    req = Requires(arch=("x86_64",), cpu_features=("avx512_vnni",), backend_min_version="2024.0")
    assert compatible(req, X86_VNNI, backend="onnxruntime") == (False, "needs onnxruntime >= 2024.0, found 1.20.0")
    assert compatible(req, X86_VNNI, backend="openvino") == (False, "backend openvino is not installed")
    ov_old = make_probe(flags=("avx512_vnni",), backends={"openvino": "2023.3.0"})
    assert compatible(req, ov_old, backend="openvino") == (False, "needs openvino >= 2024.0, found 2023.3.0")
    ov_new = make_probe(flags=("avx512_vnni",), backends={"openvino": "2025.1.0"})
    assert compatible(req, ov_new, backend="openvino") == (True, "")


# ---------------------------------------------------------------------------------------- CLI


def test_cli_probe_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli_main(["probe", "--json", "--quick"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA
    assert set(doc) >= {"cpu", "nvidia", "memory", "disk", "os", "backends", "probed_at"}
    assert cli_main(["probe", "--quick"]) == 0
    table = capsys.readouterr().out
    assert "int8 path" in table and "backend onnxruntime" in table


def test_render_table_with_gpus(tmp_path: Path) -> None:
    p = probe(tmp_path, sources=fixture_sources(tmp_path, smi=fake_smi(tmp_path, "smi-l4.csv")))
    text = render_probe(p)
    assert "NVIDIA L4, CC 8.9, 23034 MB, int8 yes, fp8 yes" in text
    assert "CUDA 12.4 (via nvidia-smi)" in text


def test_gpu_info_is_frozen() -> None:
    g = GpuInfo(0, "x", "8.9", 1, True, True)
    with pytest.raises(AttributeError):
        g.fp8 = False  # type: ignore[misc]
