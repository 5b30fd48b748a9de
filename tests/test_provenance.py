"""actfocus_jax.provenance: the machine record written next to every run's results."""

import json
import os

import jax
import numpy as np

from actfocus_jax import provenance

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 rdrand

processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse avx
"""

ARM = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve sve2 bf16 i8mm
CPU implementer\t: 0x41
"""


def _write(tmp_path, name, text):
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_cpu_features_keep_the_vector_extensions_of_the_first_cpu(tmp_path):
    x86 = _write(tmp_path, "x86", X86)
    assert provenance.cpu_model(x86) == "AMD EPYC 9B14"
    assert provenance.cpu_features(x86) == sorted(
        ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"]
    )
    arm = _write(tmp_path, "arm", ARM)
    assert provenance.cpu_features(arm) == ["asimd", "asimdhp", "bf16", "i8mm", "sve", "sve2"]
    missing = os.path.join(tmp_path, "absent")
    assert provenance.cpu_features(missing) is None
    assert provenance.cpu_features(_write(tmp_path, "noflags", "processor\t: 0\n")) is None


def test_machine_info_describes_this_process_and_is_json():
    info = json.loads(json.dumps(provenance.machine_info()))
    assert info["libraries"]["jax"] == jax.__version__
    assert info["libraries"]["numpy"] == np.__version__
    assert info["device_count"] == jax.device_count()
    assert info["platform"] == jax.devices()[0].platform
    assert info["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
        assert set(info["cpu_features"]) <= set(flags.partition(":")[2].split())


def test_bench_environment_info_carries_the_machine_record_under_its_own_keys():
    from experiments import bench

    env = json.loads(json.dumps(bench.environment_info()))
    m = provenance.machine_info()
    assert env["libraries"] == m["libraries"]
    assert env["jax_version"] == jax.__version__ == m["libraries"]["jax"]
    renamed = {"machine": "arch"}
    for key in ("platform", "device_kind", "device_count", "cpu_count", "python", "xla_flags"):
        assert env[key] == m[key], key
    for key in ("cpu_model", "cpu_features", "machine"):
        assert env[key] == m[renamed.get(key, key)], key
    assert env["date"].endswith("+00:00")
