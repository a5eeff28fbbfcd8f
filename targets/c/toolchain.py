"""Build and run generated C: on the host (gcc, sanitizers) and on emulated Cortex-M (QEMU).

A *harness* (``harness.c``, written by :func:`write_harness`) reads ``input.bin`` (samples of all
model inputs, back to back), calls the model once per sample, writes every output to
``output.bin`` and prints one line of statistics. On Cortex-M the files go through QEMU's
semihosting, and the statistics include SysTick ticks per inference and the stack high-water mark.

Timing under QEMU: with ``-icount shift=0`` each guest instruction advances virtual time by
exactly 1 ns, and SysTick (processor clock, ``SYSCLK`` = 25 MHz on the MPS2 boards) counts
virtual time, so instructions = ticks x 40 (to within 40 instructions), repeatable run to run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np

from lbcc.errors import TargetError

HOST_FLAGS = ["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-pedantic",
              "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
#: the Cortex-M cores the tests run on: QEMU machine, cpu and compiler flags
CORES = {
    "cortex-m4": ("mps2-an386", ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
                                 "-mfpu=fpv4-sp-d16"]),
    "cortex-m3": ("mps2-an385", ["-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"]),
}
ARM_FLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-ffunction-sections",
             "-fdata-sections", "--specs=nano.specs", "--specs=rdimon.specs"]
MODEL_SOURCES = ("model.c", "weights.c", "lbcc_kernels.c")
#: instructions per SysTick tick under -icount shift=0 (1 ns per instruction, 25 MHz clock)
INSNS_PER_TICK = 40
APT_PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"


#: C for SysTick timing on Cortex-M (for a harness, inside ``#if defined(LBCC_SYSTICK)``): the
#: registers, a handler that counts wraps of the 24-bit down counter, and ``lbcc_ticks()`` =
#: wraps * 2^24 + (2^24 - 1 - current value), read until the wrap count is stable
SYSTICK_C = """\
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
static volatile uint32_t lbcc_wraps;
void SysTick_Handler(void);
void SysTick_Handler(void) { ++lbcc_wraps; }
static uint64_t lbcc_ticks(void)
{
    uint32_t w, v;
    do {
        w = lbcc_wraps;
        v = SYST_CVR;
    } while (w != lbcc_wraps);
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}"""


def have_arm_tools() -> bool:
    return all(shutil.which(t) for t in ("arm-none-eabi-gcc", "arm-none-eabi-size",
                                         "qemu-system-arm"))


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_harness(src_dir: Path, inputs: list[tuple[str, str, int]],
                  outputs: list[tuple[str, str, int]], prefix: str = "lbcc_model") -> Path:
    """``harness.c`` for a model whose run() takes ``inputs`` then ``outputs``, each given as
    (C type, symbol, element count)."""
    bufs = [f"static {ct} {sym}[{n}];" for ct, sym, n in [*inputs, *outputs]]
    reads = " ||\n            ".join(f"fread({sym}, sizeof {sym}, 1, fi) != 1"
                                      for _, sym, _ in inputs) or "n_done > 0"
    writes = "\n        ".join(f"fwrite({sym}, sizeof {sym}, 1, fo);" for _, sym, _ in outputs)
    args = ", ".join(sym for _, sym, _ in [*inputs, *outputs])
    text = f"""/* lbcc test harness: input.bin -> {prefix}_run per sample -> output.bin. Generated. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "model.h"

{chr(10).join(bufs)}

#if defined(LBCC_SYSTICK)
/* SysTick: 24-bit down counter on the processor clock; the handler counts wraps */
{SYSTICK_C}
/* stack high-water mark: main paints a region below its own frame (inline, so no call frame
 * sits inside it while painting) and finds the deepest byte the model's calls changed */
#define LBCC_PAINT 65536u
#define LBCC_PAINT_STACK(base) do {{ uint32_t i_; for (i_ = 0; i_ < LBCC_PAINT; ++i_) \
        (base)[i_] = 0xA5u; }} while (0)
#define LBCC_STACK_USED(base, used) do {{ uint32_t i_ = 0; \
        while (i_ < LBCC_PAINT && (base)[i_] == 0xA5u) ++i_; (used) = LBCC_PAINT - i_ + 128u; }} while (0)
#endif

int main(void)
{{
    FILE *fi = fopen("input.bin", "rb"), *fo = fopen("output.bin", "wb");
    long n_done = 0;
    uint64_t total = 0, worst = 0;
    uint32_t stack = 0;
    if (!fi || !fo) {{
        printf("lbcc-harness: cannot open input.bin / output.bin\\n");
        return 2;
    }}
#if defined(LBCC_SYSTICK)
    volatile uint8_t anchor = 0;
    volatile uint8_t *paint = (volatile uint8_t *)((uintptr_t)&anchor - 128u - LBCC_PAINT);
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 7u; /* enable, tick interrupt, processor clock */
    while (SYST_CVR == 0u) {{
    }} /* the first reload: from here on, ticks count without a glitch */
#endif
    for (;;) {{
        if ({reads})
            break;
#if defined(LBCC_SYSTICK)
        {{
            uint64_t t0, dt;
            uint32_t used;
            LBCC_PAINT_STACK(paint);
            t0 = lbcc_ticks();
            {prefix}_run({args});
            dt = lbcc_ticks() - t0;
            LBCC_STACK_USED(paint, used);
            total += dt;
            worst = dt > worst ? dt : worst;
            stack = used > stack ? used : stack;
        }}
#else
        {prefix}_run({args});
#endif
        {writes}
        ++n_done;
    }}
    fclose(fi);
    fclose(fo);
    printf("lbcc-harness: samples=%ld ticks_total=%lu ticks_max=%lu stack_bytes=%lu\\n", n_done,
           (unsigned long)total, (unsigned long)worst, (unsigned long)stack);
    return 0;
}}
"""
    path = src_dir / "harness.c"
    path.write_text(text, encoding="utf-8")
    return path


def harness_for(src_dir: Path, program) -> Path:
    """A harness for a lowered :class:`Program` (its inputs and outputs)."""
    return write_harness(src_dir, [(t.ctype, t.symbol, t.size) for t in program.inputs],
                         [(t.ctype, t.symbol, t.size) for t in program.outputs])


@dataclasses.dataclass
class RunResult:
    outputs: bytes
    stdout: str
    stats: dict[str, int]
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def instructions_per_inference(self) -> float | None:
        if "ticks_total" not in self.stats or not self.stats.get("samples"):
            return None
        return self.stats["ticks_total"] * INSNS_PER_TICK / self.stats["samples"]


def _stats(stdout: str) -> dict[str, int]:
    m = re.search(r"lbcc-harness: (.*)", stdout)
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))} if m else {}


def build_host(src_dir: Path, exe: str = "host.exe", flags: list[str] | None = None) -> Path:
    sources = [*MODEL_SOURCES, "harness.c"]
    proc = _run(["gcc", *(flags or HOST_FLAGS), "-I.", *sources, "-o", exe, "-lm"], src_dir)
    if proc.returncode:
        raise TargetError(f"gcc failed on the generated C:\n{proc.stderr[-4000:]}", "")
    return src_dir / exe


def run_host(src_dir: Path, inputs: bytes, exe: str = "host.exe") -> RunResult:
    (src_dir / "input.bin").write_bytes(inputs)
    proc = _run([str((src_dir / exe).resolve())], src_dir)
    if proc.returncode:
        raise TargetError(f"host run failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                          f"{proc.stderr[-4000:]}", "")
    return RunResult((src_dir / "output.bin").read_bytes(), proc.stdout, _stats(proc.stdout))


def build_arm(src_dir: Path, core: str = "cortex-m4", opt: str = "-O2") -> Path:
    """ELF for ``core`` from the model, the harness and this package's startup + linker script."""
    if not have_arm_tools():
        raise TargetError("arm-none-eabi-gcc / qemu-system-arm are not installed.",
                          f"apt-get install {APT_PACKAGES}")
    _, cpu_flags = CORES[core]
    arm = resources.files("lbcc.targets.c").joinpath("arm")
    startup, script = Path(str(arm.joinpath("startup.c"))), Path(str(arm.joinpath("mps2.ld")))
    elf = f"{core}.elf"
    flags = [f if f != "-O2" else opt for f in ARM_FLAGS]
    objs = []
    for src in [*MODEL_SOURCES, "harness.c", str(startup)]:
        obj = f"{core}_{Path(src).stem}.o"
        extra = ["-DLBCC_SYSTICK"] if src == "harness.c" else []
        proc = _run(["arm-none-eabi-gcc", *cpu_flags, *flags, *extra, "-I.", "-c", src, "-o",
                     obj], src_dir)
        if proc.returncode:
            raise TargetError(f"arm-none-eabi-gcc failed on {src}:\n{proc.stderr[-4000:]}", "")
        objs.append(obj)
    proc = _run(["arm-none-eabi-gcc", *cpu_flags, *flags, "-nostartfiles", "-T", str(script),
                 "-Wl,--gc-sections", f"-Wl,-Map={core}.map", *objs, "-o", elf, "-lm"], src_dir)
    if proc.returncode:
        raise TargetError(f"linking {elf} failed:\n{proc.stderr[-4000:]}", "")
    return src_dir / elf


def linked_model_bytes(map_path: Path, objects: list[str]) -> dict[str, int]:
    """Flash and RAM bytes that ``objects`` contribute to the linked image, from the linker map
    (after --gc-sections, so kernels the model does not call are not counted): input sections at
    addresses below 0x20000000 are flash, above are RAM; .data counts in both (its load image
    is in flash)."""
    import re

    text = map_path.read_text(encoding="utf-8", errors="replace")
    text = text[text.find("Linker script and memory map"):]
    flash = ram = 0
    section = ""
    for line in text.splitlines():
        m = re.match(r"^ (\.\S+)", line)
        if m:
            section = m.group(1)
        m = re.search(r"0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+\.o)\s*$", line)
        if not m or Path(m.group(3)).name not in objects:
            continue
        addr, size = int(m.group(1), 16), int(m.group(2), 16)
        if addr >= 0x20000000:
            ram += size
            if section.startswith(".data"):
                flash += size
        else:
            flash += size
    return {"flash": flash, "ram": ram}


def arm_sizes(src_dir: Path, core: str = "cortex-m4") -> dict[str, int]:
    """The model's share of the linked image (model.c, weights.c, the kernels it calls; from the
    linker map), ``arm-none-eabi-size`` of its object files (all kernels) and of the whole ELF
    (with harness, startup and newlib)."""
    def size(files: list[str]) -> dict[str, int]:
        proc = _run(["arm-none-eabi-size", "-B", "-t", *files], src_dir)
        last = proc.stdout.strip().splitlines()[-1].split()
        return {"text": int(last[0]), "data": int(last[1]), "bss": int(last[2])}

    objects = [f"{core}_{Path(s).stem}.o" for s in MODEL_SOURCES]
    model = size(objects)
    elf = size([f"{core}.elf"])
    linked = linked_model_bytes(src_dir / f"{core}.map", objects)
    return {"model_flash": linked["flash"], "model_ram": linked["ram"],
            "objects_flash": model["text"] + model["data"],
            "objects_ram": model["data"] + model["bss"],
            "elf_flash": elf["text"] + elf["data"], "elf_ram_static": elf["data"] + elf["bss"]}


def run_qemu(src_dir: Path, inputs: bytes, core: str = "cortex-m4", timeout: float = 600
             ) -> RunResult:
    machine, _ = CORES[core]
    (src_dir / "input.bin").write_bytes(inputs)
    out = src_dir / "output.bin"
    out.unlink(missing_ok=True)
    cmd = ["qemu-system-arm", "-M", machine, "-cpu", core, "-nographic", "-monitor", "none",
           "-serial", "none", "-semihosting-config", "enable=on,target=native",
           "-icount", "shift=0", "-kernel", f"{core}.elf"]
    proc = _run(cmd, src_dir, timeout=timeout)
    if proc.returncode:
        raise TargetError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}"
                          f"{proc.stderr[-2000:]}", "")
    return RunResult(out.read_bytes() if out.is_file() else b"", proc.stdout, _stats(proc.stdout),
                     arm_sizes(src_dir, core))


def pack_inputs(arrays: list[np.ndarray]) -> bytes:
    """Samples for the harness: ``arrays[i]`` is [samples, *input_i shape]; interleaved per sample."""
    n = arrays[0].shape[0]
    return b"".join(np.ascontiguousarray(a[s]).tobytes() for s in range(n) for a in arrays)


def unpack_outputs(data: bytes, specs: list[tuple[np.dtype, tuple[int, ...]]]
                   ) -> list[np.ndarray]:
    """Inverse of the harness's writes: one [samples, *shape] array per output."""
    per = sum(int(np.prod(s)) * np.dtype(d).itemsize for d, s in specs)
    n = len(data) // per if per else 0
    outs: list[list[np.ndarray]] = [[] for _ in specs]
    pos = 0
    for _ in range(n):
        for i, (d, s) in enumerate(specs):
            nb = int(np.prod(s)) * np.dtype(d).itemsize
            outs[i].append(np.frombuffer(data[pos:pos + nb], dtype=d).reshape(s))
            pos += nb
    return [np.stack(o) if o else np.zeros((0, *s), d) for o, (d, s) in zip(outs, specs)]




def measure(src_dir: Path, core: str = "cortex-m4", samples: int = 1) -> dict:
    """Flash, RAM and instructions per inference of the generated C in ``src_dir`` on ``core``.

    Builds a copy (``src_dir`` is left as it is) with a harness fed zeros, runs it in QEMU and
    returns: ``flash_bytes`` (code + const weights of model.c, weights.c and the kernels, from
    arm-none-eabi-size), ``ram_bytes`` (their .data + .bss, i.e. the arena, plus the stack
    high-water mark of one inference), ``instructions_per_inference`` (QEMU -icount).
    """
    import json
    import tempfile

    from lbcc.targets.c.emit import MANIFEST

    src_dir = Path(src_dir)
    manifest_path = src_dir / MANIFEST
    if not manifest_path.is_file():
        raise TargetError(f"{str(src_dir)!r} holds no {MANIFEST}: not an lbcc c-target output.",
                          "Run lbcc compile MODEL --target c -o DIR first.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    args = manifest["args"]
    with tempfile.TemporaryDirectory(prefix="lbcc-measure-") as tmp:
        work = Path(tmp)
        for f in src_dir.iterdir():
            if f.suffix in (".c", ".h"):
                shutil.copy(f, work / f.name)
        write_harness(work, [(a["ctype"], a["symbol"], a["size"]) for a in args
                             if a["direction"] == "in"],
                      [(a["ctype"], a["symbol"], a["size"]) for a in args
                       if a["direction"] == "out"], prefix=manifest["prefix"])
        itemsize = {"float": 4, "uint8_t": 1, "int8_t": 1, "int32_t": 4, "int64_t": 8}
        zeros = bytes(samples * sum(a["size"] * itemsize[a["ctype"]] for a in args
                                    if a["direction"] == "in"))
        build_arm(work, core)
        run = run_qemu(work, zeros, core)
    sizes = run.sizes
    return {"core": core, "machine": CORES[core][0],
            "flash_bytes": sizes["model_flash"], "ram_bytes": sizes["model_ram"]
            + run.stats.get("stack_bytes", 0), "arena_bytes": manifest["arena_bytes"],
            "weight_bytes": manifest["weight_bytes"],
            "static_ram_bytes": sizes["model_ram"], "stack_bytes": run.stats.get("stack_bytes", 0),
            "instructions_per_inference": run.instructions_per_inference,
            "harness_elf_flash_bytes": sizes["elf_flash"]}
