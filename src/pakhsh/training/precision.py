"""`train.mixed_precision: auto`: bf16 autocast where the device runs bf16 natively, fp32 everywhere else.

bf16 autocast only pays where the hardware has bf16 arithmetic: CUDA GPUs that support it, and CPUs with AMX or
AVX-512 BF16. On other CPUs oneDNN emulates it and a training step runs several times slower than in fp32.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# /proc/cpuinfo flags of native bf16 on x86 (Sapphire Rapids and later, Zen 4 and later)
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_features() -> list[str]:
    """The native-bf16 features of this CPU: /proc/cpuinfo flags on Linux, else whatever torch's capability
    string reveals (today it says only AVX512/AVX2, which does not imply bf16, so elsewhere this is empty)."""
    if _onednn_isa_capped():
        return []
    if sys.platform.startswith("linux"):
        try:
            flags = _cpuinfo_flags(CPUINFO.read_text(errors="replace"))
        except OSError:
            flags = set()
        return [f for f in CPU_BF16_FLAGS if f in flags]
    cap = str(torch.backends.cpu.get_cpu_capability()).lower()
    return [cap] if "bf16" in cap or "amx" in cap else []


# oneDNN ISA names that include native bf16 (ONEDNN_MAX_CPU_ISA caps what its kernels may use)
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
              "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "DEFAULT", "ALL")


def _onednn_isa_capped() -> bool:
    """ONEDNN_MAX_CPU_ISA set below bf16 (e.g. AVX2, to reproduce an older CPU): oneDNN then emulates bf16 even
    where the CPU has it, so auto must choose fp32 too."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return bool(cap) and cap not in _BF16_ISAS


def _cpuinfo_flags(text: str) -> set[str]:
    """The flags of the first processor in /proc/cpuinfo text (every core of a machine has the same)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def runs_on_cuda(device: str) -> bool:
    """Whether train.device ends up on a GPU: accelerate picks CUDA for 'auto' when one is visible."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def choose_precision(requested: str, device: str) -> tuple[str, str]:
    """(the autocast setting for accelerate: 'no' / 'bf16' / 'fp16', why) for train.mixed_precision and
    train.device. Only 'auto' is decided here; an explicit setting is taken as it is."""
    if requested != "auto":
        return requested, f"train.mixed_precision={requested}"
    if runs_on_cuda(device):
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU runs bf16 natively"
        return "no", "this GPU has no native bf16"
    if cpu_bf16_features():
        return "bf16", "CPU has AMX/AVX-512 BF16"
    return "no", "this CPU has no native bf16: bf16 autocast would be ~9x slower"


def bf16_sampling_notice(device: torch.device) -> str | None:
    """What to tell a user who asked for `--bf16` on a device without native bf16, or None where it runs natively.
    On such a CPU oneDNN emulates bf16: 20-step sampling of the shapes model took 19.4 s with --bf16 against 5.0 s
    in fp32 (ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine, 2 threads, one run each, start-up included:
    `ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=2 time pakhsh sample -n 32 --steps 20 [--bf16] -q`)."""
    if device.type == "cpu" and not cpu_bf16_features():
        return ("--bf16: this CPU has no native bf16 (AMX or AVX-512 BF16), so bf16 autocast is emulated and "
                "runs several times slower than fp32 here; leave --bf16 out")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "--bf16: this GPU has no native bf16; leave --bf16 out (fp32 is faster and exact)"
    return None
