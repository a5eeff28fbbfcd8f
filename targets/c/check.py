"""Run a graph both ways, generated C (host or emulated Cortex-M) and ONNX Runtime, and compare.

``run_c`` lowers, plans, writes and builds the C with a harness, feeds it samples and returns the
outputs; ``run_ort`` runs the same graph in ONNX Runtime (default CPU session, graph
optimizations on: the fused QLinear/MatMulIntegerToFloat kernels are what the C reproduces);
``bit_exact`` compares the two bit for bit (float outputs compared as their uint32 patterns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from lbcc.targets.c import emit, planner, toolchain
from lbcc.targets.c.lowering import lower
from lbcc.targets.c.program import DTYPES


def run_c(model: ir.Model, samples: list[np.ndarray], workdir: Path, core: str | None = None,
          host_flags: list[str] | None = None) -> tuple[list[np.ndarray], toolchain.RunResult]:
    """Outputs ``[n_samples, *shape]`` per graph output. ``samples[i]`` is [n, *input_i shape];
    ``core`` None runs on the host (gcc, sanitizers), else "cortex-m4" / "cortex-m3" in QEMU."""
    workdir.mkdir(parents=True, exist_ok=True)
    program = lower(model)
    planner.plan(program)
    planner.check_plan(program)
    emit.write(program, workdir)
    toolchain.harness_for(workdir, program)
    data = toolchain.pack_inputs([np.ascontiguousarray(s, DTYPES[t.dtype][2])
                                  for s, t in zip(samples, program.inputs)])
    if core is None:
        toolchain.build_host(workdir, flags=host_flags)
        result = toolchain.run_host(workdir, data)
    else:
        toolchain.build_arm(workdir, core)
        result = toolchain.run_qemu(workdir, data, core)
    specs = [(np.dtype(DTYPES[t.dtype][2]), t.shape) for t in program.outputs]
    return toolchain.unpack_outputs(result.outputs, specs), result


#: ONNX Runtime graph rewrites that replace integer kernels with float ones, disabled in the
#: reference session. MatMulAddFusion (ORT 1.32) turns ``MatMul(DQ(x), DQ(w)) + bias`` into a
#: float Gemm on the dequantized operands (float sums in MLAS order, FMA): no int8 kernel runs at
#: all, and no other implementation can match that bit for bit. Without it ORT runs
#: MatMulIntegerToFloat (or QLinearMatMul) and a float Add, which the C reproduces exactly.
ORT_DISABLED_OPTIMIZERS = ["MatMulAddFusion"]


def ort_session(model: ir.Model, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"],
                                disabled_optimizers=ORT_DISABLED_OPTIMIZERS)


def run_ort(model: ir.Model, samples: list[np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs for each sample, stacked like :func:`run_c`'s."""
    sess = ort_session(model)
    names = [i.name for i in sess.get_inputs()]
    outs = [sess.run(None, {n: np.asarray(s[j]) for n, s in zip(names, samples)})
            for j in range(samples[0].shape[0])]
    return [np.stack([o[i] for o in outs]) for i in range(len(outs[0]))]


def bit_exact(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == np.float32:
        return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
    return bool(np.array_equal(a, b))


def mismatches(a: np.ndarray, b: np.ndarray) -> int:
    if a.dtype == np.float32:
        return int((a.view(np.uint32) != b.view(np.uint32)).sum())
    return int((a != b).sum())
