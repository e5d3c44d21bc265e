"""The decode step's Triton kernels compiled for a GPU that is not here: per kernel the registers, shared
memory and spills at a real model's widths, on this machine's CPU, with Triton's own compiler and ptxas.

    python -m benchmarks.aot [--model llama-3.1-8b] [--kept 0.4] [--options JSON] [--arch 90]

``compile_only`` makes every Triton launch compile for the target and stop there: a stand-in driver names the
target, and the launch returns once it has compiled. ``step_kernels`` builds a ``FastLM`` of the shape's widths
(two layers, weights allocated but never initialised), then runs one decode step and one selection under
it. The kernels, grids and tilings recorded are exactly the ones ``FastLM`` launches. Nothing is timed and
nothing runs on a GPU. A kernel that fails to build for Hopper, or that spills, shows here before any device
time is spent; so does a launch count per step, or a tiling that fits fewer programs per SM than planned.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Hopper (sm_90) per SM: 64K 32-bit registers (allocated per warp in units of 256), 227 KB of shared memory
# for one block, at most 64 resident warps and 32 blocks; 132 SMs on an H100/H200 SXM
SM90 = {"regs": 65536, "smem": 227 * 1024, "warps": 64, "blocks": 32, "sms": 132}


class _CompileOnlyDriver:
    """What ``JITFunction.run`` asks the active driver before it compiles; nothing else is ever reached."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Inside: every Triton launch compiles for ``cuda`` sm_``arch`` and returns without running; yields the
    list of launches, each (kernel name, grid, CompiledKernel). The kernels' outputs are left unwritten."""
    records: list[tuple[str, tuple, object]] = []
    run = JITFunction.run

    def compile_and_record(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append((self.fn.__name__, tuple(grid) if not callable(grid) else grid, kernel))
        return kernel

    previous = driver._active  # not .active: on a machine without a GPU, making the default driver raises
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    try:
        with mock.patch.object(JITFunction, "run", compile_and_record):
            yield records
    finally:
        driver._active = previous


def _cuobjdump(kernel, flag: str) -> str:
    """What the cuobjdump that ships with Triton prints of a compiled kernel's cubin with ``flag``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def sass_ops(kernel) -> list[str]:
    """A compiled kernel's machine instructions (SASS), in order, without addresses or encodings."""
    return [line.split("*/", 1)[1].split(";")[0].strip() for line in _cuobjdump(kernel, "--dump-sass").splitlines()
            if re.match(r"\s*/\*[0-9a-f]{4}\*/", line)]


def pdl_order(kernel, ops: list[str] | None = None) -> dict:
    """Where a compiled kernel waits for the previous one and lets the next one launch, from its SASS:
    ``griddepcontrol.wait`` is ACQBULK, ``launch_dependents`` PREEXIT. ``loads_before_wait``: global loads
    issued before the wait (the weights a PDL kernel streams while the previous one runs); ``trigger``: "entry",
    "after wait" or None (no PDL)."""
    ops = sass_ops(kernel) if ops is None else ops
    wait = next((i for i, op in enumerate(ops) if "ACQBULK" in op), None)
    trig = next((i for i, op in enumerate(ops) if "PREEXIT" in op), None)
    if wait is None:
        return {"loads_before_wait": None, "trigger": None}
    return {"loads_before_wait": sum("LDG" in op for op in ops[:wait]),
            "trigger": None if trig is None else ("entry" if trig < wait else "after wait")}


def resources(kernel) -> dict:
    """Registers per thread, shared memory and local (spill) bytes of a compiled kernel, read from its cubin by
    the cuobjdump that ships with Triton."""
    text = _cuobjdump(kernel, "--dump-resource-usage")
    use = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if use is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{text}")
    regs, stack, shared, local = (int(v) for v in use.groups())
    return {"regs": regs, "stack": stack, "shared": shared, "local": local}


def blocks_per_sm(regs: int, shared: int, warps: int, sm: dict = SM90) -> int:
    """Resident blocks per SM allowed by registers, shared memory, warps and the block limit."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = sm["regs"] // (regs_per_warp * warps)
    by_smem = sm["smem"] // shared if shared else sm["blocks"]
    return max(0, min(by_regs, by_smem, sm["warps"] // warps, sm["blocks"]))


def report(records) -> list[dict]:
    """One row per launch: name, grid, warps, stages, resources, resident blocks per SM and waves. ``shared``:
    the cubin's static shared memory plus the dynamic amount Triton launches the kernel with (its reductions'
    scratch, a pipelined loop's buffers); ``async_copies``: its cp.async (LDGSTS) instructions, the loads a
    pipelined loop issues ahead into shared memory."""
    rows = []
    for name, grid, kernel in records:
        md = kernel.metadata
        use = resources(kernel)
        use["shared"] += md.shared
        ops = sass_ops(kernel)
        programs = math.prod(int(g) for g in grid)
        per_sm = blocks_per_sm(use["regs"], use["shared"], md.num_warps)
        rows.append({"kernel": name, "grid": list(grid), "programs": programs, "warps": md.num_warps,
                     "stages": md.num_stages, **use, **pdl_order(kernel, ops),
                     "async_copies": sum("LDGSTS" in op for op in ops), "blocks_per_sm": per_sm,
                     "cubin_sha1": hashlib.sha1(kernel.asm["cubin"]).hexdigest()[:12],
                     "waves": round(programs / (per_sm * SM90["sms"]), 2) if per_sm else None})
    return rows


def shape_weights(spec: str, n_layers: int, dtype: torch.dtype):
    """``FastWeights`` of a published shape with ``n_layers`` layers, on CPU, allocated but not initialised."""
    import transformers

    from coreinfer.runtime.cuda.bench import shape_config
    from coreinfer.runtime.cuda.fastlm import FastWeights

    cfg = shape_config(spec, num_hidden_layers=n_layers)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu").eval()
    return FastWeights.from_hf(model)


def step_kernels(spec: str = "llama-3.1-8b", kept_fraction: float | None = 0.4, options: dict | None = None,
                 arch: int = 90, n_layers: int = 2, prompt_tokens: int = 256, max_seq_len: int = 384,
                 dtype: torch.dtype = torch.bfloat16, weights=None) -> dict:
    """The kernels of one decode step of ``bench.step_variant(options)`` at ``spec``'s widths (every layer
    sparse), and of the selection of ``n_layers`` layers x ``prompt_tokens`` tokens, compiled for sm_``arch``.
    ``weights``: the ``shape_weights(spec, n_layers, dtype)`` to use (built when None)."""
    from coreinfer.runtime.cuda import bench, kernels, select_kernels
    from coreinfer.runtime.cuda.fastlm import FastLM
    from coreinfer.runtime.selection import DEFAULT_SCORE

    weights = weights if weights is not None else shape_weights(spec, n_layers, dtype)
    n_layers = len(weights.layers)
    opts = {"pdl": True, **(options or {})}
    # FastLM launches the Triton kernels (and PDL) on CUDA only: here they only compile, so let it pick them on CPU
    with mock.patch.object(FastLM, "_pick_attention", lambda self, attention, on_cuda: "triton"), \
            mock.patch.object(FastLM, "_pick_gemv", lambda self, gemv, on_cuda: "triton"), \
            mock.patch.object(kernels, "pdl_supported", lambda device=None: True):
        fast = bench.step_variant(weights, {"cuda_graph": False, "compile_elementwise": False, **opts},
                                  max_seq_len=max_seq_len, kept_fraction=kept_fraction)
    with torch.inference_mode(), compile_only(arch) as step:
        fast._pos.fill_(prompt_tokens)
        fast._decode_step()
    out = {"model": spec, "arch": f"sm_{arch}", "kept_fraction": kept_fraction, "k": fast.k,
           "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
           "layers_built": n_layers, "step": report(step)}
    if kept_fraction is not None:
        acts = torch.empty(n_layers, prompt_tokens, weights.n_neurons, dtype=dtype)
        with compile_only(arch) as sel:
            select_kernels.select(acts, fast.alpha, DEFAULT_SCORE, fast.k)
        out["selection"] = report(sel)
    return out


# Triton launches of a step outside its layers: one RMSNorm (the final one of the default step, whose other norms
# are folded into the GEMVs; the first one of the step with norm launches, fold_norm=False), the lm_head GEMV,
# argmax + counters
STEP_TRITON_LAUNCHES_OUTSIDE_LAYERS = 3


def launches_per_step(result: dict, n_layers: int) -> int:
    """Kernel launches of a full-depth decode step from a shallower build: the Triton launches per layer times
    the depth, the rest once, plus the embedding lookup (one PyTorch launch)."""
    fixed = STEP_TRITON_LAUNCHES_OUTSIDE_LAYERS
    per_layer, rest = divmod(len(result["step"]) - fixed, result["layers_built"])
    if rest:
        raise RuntimeError(f"{len(result['step'])} launches do not split into {result['layers_built']} equal layers")
    return per_layer * n_layers + fixed + 1


def format_rows(rows: list[dict]) -> str:
    lines = ["| kernel | programs | warps | stages | regs | shared B | spill B | blocks/SM | waves |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["kernel"], r["programs"], r["regs"], r["shared"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['kernel']} | {r['programs']} | {r['warps']} | {r['stages']} | {r['regs']} | {r['shared']} | "
                     f"{r['local']} | {r['blocks_per_sm']} | {r['waves']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="a published shape of coreinfer.runtime.cuda.bench.SHAPES")
    ap.add_argument("--kept", type=float, default=0.4, help="kept fraction (0 for the dense step)")
    ap.add_argument("--options", default=None, help='step_variant choices as JSON, e.g. {"pdl": false}')
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from coreinfer.runtime.cuda import bench

    if args.model not in bench.SHAPES:
        ap.error(f"--model must be one of {sorted(bench.SHAPES)}, got {args.model!r}")
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(args.options or "{}").items()}
    result = step_kernels(args.model, args.kept or None, options, args.arch)
    n = bench.SHAPES[args.model][1]["num_hidden_layers"]
    result["launches_per_step"] = launches_per_step(result, n)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.model}, {result['arch']}, kept {args.kept}, options {result['options']}: "
          f"{result['launches_per_step']} launches per decode step ({n} layers)\n")
    print(format_rows(result["step"]))
    if "selection" in result:
        print(f"\nselection ({result['layers_built']} layers x 256 tokens):\n")
        print(format_rows(result["selection"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
