"""Time LiteRT on this CPU with XNNPACK limited to the kernels of an older x86 CPU.

A research aid for ``bench/quantize.py``, which runs this file once per
instruction-set level in a child process. int8 vs float32 latency depends on
which kernels XNNPACK picks, and it picks them once per process from the
``cpuinfo_isa`` flags of the cpuinfo library linked into LiteRT. Clearing the
AVX-512 and AVX-VNNI flags before the first interpreter exists makes XNNPACK
(and ruy, LiteRT's builtin kernels) run the code an AVX2-only CPU runs, on the
same core, so the kernels can be compared where nothing else differs. The
clock, caches and execution ports are still this CPU's: absolute times are
not those of a real AVX2-only machine, the kernel choice is.

``cpuinfo_isa`` is a private symbol: it is found in the library's ELF symbol
table, and the struct layout below is trusted only if every flag read from it
agrees with ``/proc/cpuinfo``. Otherwise the level is reported as unsupported
and nothing is patched.

    python bench/_litert_isa.py LEVEL MODEL_DIR   # prints one JSON object

``sweep`` runs it for every level and ``print_sweep`` prints the table.
"""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LIBRARY = "libpywrap_litert_common.so"
#: Level -> (column title, which CPUs have it). "native" patches nothing.
LEVELS = {
    "native": ("this CPU", "this CPU as it is"),
    "avxvnni": ("AVX-VNNI, no AVX-512", "e.g. Intel Alder Lake clients"),
    "avx2": ("AVX2+FMA, no VNNI", "e.g. Intel Haswell..Cascade Lake, AMD Zen 1-3"),
}
#: Byte offsets in cpuinfo's ``struct cpuinfo_x86_isa`` (x86-64), each checked
#: against the /proc/cpuinfo flag next to it before anything is written.
_FIELDS = {
    0x16: "avx",
    0x17: "avx_vnni",
    0x18: "fma",
    0x19: "fma4",
    0x1A: "xop",
    0x1B: "f16c",
    0x1C: "avx2",
    0x1D: "avx512f",
    0x21: "avx512dq",
    0x22: "avx512bw",
    0x23: "avx512vl",
    0x29: "avx512_vnni",
}
_AVXVNNI = 0x17
#: avx512f .. AMX and AVX-VNNI-INT8/16: every flag newer than AVX2 except AVX-VNNI.
_AVX512_AND_LATER = range(0x1D, 0x40)


class Unsupported(RuntimeError):
    """The level cannot be emulated here (another LiteRT build, another CPU)."""


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _elf_symbols(path: str, names: set[str]) -> tuple[dict[str, int], int]:
    """Values of ``names`` in the ELF ``.symtab`` and the vaddr of the segment at offset 0."""
    data = Path(path).read_bytes()
    if data[:5] != b"\x7fELF\x02":
        raise Unsupported(f"{path} is not a 64-bit ELF file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    first_vaddr = 0
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset == 0:  # PT_LOAD mapping the file's start
            first_vaddr = p_vaddr
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    wanted = {n.encode() for n in names}
    found: dict[str, int] = {}
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strings = sections[sec[6]][4]
        for off in range(sec[4], sec[4] + sec[5], 24):
            st_name, _, _, _, st_value, _ = struct.unpack_from("<IBBHQQ", data, off)
            start = strings + st_name
            name = data[start : data.index(b"\0", start)]
            if name in wanted:
                found[name.decode()] = st_value
    return found, first_vaddr


def restrict(level: str) -> dict[str, bool]:
    """Limit XNNPACK to ``level``; call before the process creates any interpreter.

    Returns the flags in effect afterwards. Raises ``Unsupported`` if the level
    is not below this CPU's or the library cannot be patched safely.
    """
    if level not in LEVELS:
        raise Unsupported(f"unknown level {level!r}; choose from {sorted(LEVELS)}")
    if level == "native":
        return {}  # nothing to patch, nothing to check
    import ai_edge_litert.interpreter  # noqa: F401  (maps the library)

    maps = [ln.split() for ln in Path("/proc/self/maps").read_text().splitlines()]
    mapped = [
        m for m in maps if len(m) >= 6 and m[5].endswith("/" + LIBRARY) and int(m[2], 16) == 0
    ]
    if not mapped:
        raise Unsupported(f"{LIBRARY} is not loaded: another LiteRT build")
    path = mapped[0][5]
    symbols, first_vaddr = _elf_symbols(path, {"cpuinfo_initialize", "cpuinfo_isa"})
    if len(symbols) != 2:
        raise Unsupported(f"{path} has no cpuinfo symbols (stripped build)")
    base = int(mapped[0][0].split("-")[0], 16) - first_vaddr
    if not ctypes.CFUNCTYPE(ctypes.c_bool)(base + symbols["cpuinfo_initialize"])():
        raise Unsupported("cpuinfo_initialize failed")
    isa = (ctypes.c_uint8 * 0x40).from_address(base + symbols["cpuinfo_isa"])
    flags = _cpu_flags()
    wrong = [f for off, f in _FIELDS.items() if bool(isa[off]) != (f in flags)]
    if wrong:
        raise Unsupported(f"cpuinfo_isa layout differs from the one expected (flags {wrong})")
    if level == "avxvnni":
        if not (isa[_AVXVNNI] and isa[0x1D]):
            raise Unsupported("needs a CPU with both AVX-VNNI and AVX-512")
        for off in _AVX512_AND_LATER:
            isa[off] = 0
    elif level == "avx2":
        if not (isa[0x1C] and (isa[_AVXVNNI] or isa[0x29])):
            raise Unsupported("needs a CPU with AVX2 and VNNI")
        for off in (*_AVX512_AND_LATER, _AVXVNNI):
            isa[off] = 0
    return {f: bool(isa[off]) for off, f in _FIELDS.items()}


def _time(fns: dict[str, Callable[[], object]], per_round: dict[str, int], rounds: int) -> Any:
    """Median thread CPU seconds per call, interleaved round by round (as bench/quantize.py)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            n = per_round[key]
            t0 = time.thread_time_ns()
            for _ in range(n):
                fn()
            samples[key].append((time.thread_time_ns() - t0) / n / 1e9)
    return {k: float(np.median(v)) for k, v in samples.items()}


def measure(model_dir: Path, rounds: int = 15) -> dict[str, dict[str, list[float]]]:
    """``{name: {mode: [invoke_s, device_s]}}`` for every ``name.mode.tflite`` in ``model_dir``.

    ``invoke_s`` times ``Interpreter.invoke`` alone; ``device_s`` times the
    device's ``ModelServer.infer_real`` on the real-valued ``name.x.npy``.
    """
    from ai_edge_litert.interpreter import Interpreter

    from device.runtime import LoadedModel, ModelServer

    fns: dict[str, Callable[[], object]] = {}
    per_round: dict[str, int] = {}
    servers = []
    for path in sorted(model_dir.glob("*.tflite")):
        name, mode = path.stem.split(".")
        data = path.read_bytes()
        x = np.load(model_dir / f"{name}.x.npy")
        model = LoadedModel(data, pool_size=1, num_threads=1)
        server = ModelServer()
        server.swap(model, warmup=10)
        servers.append(server)
        # The device's interpreter settings: LiteRT defaults (XNNPACK), one thread.
        it = Interpreter(model_content=data, num_threads=1)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], model.quantize(x))
        for _ in range(10):
            it.invoke()
        n = max(1, int(2e-3 / _one_call_s(it.invoke)))  # about 2 ms of work per round
        fns[f"{name}.{mode}.invoke"] = it.invoke
        fns[f"{name}.{mode}.device"] = lambda s=server, x=x: s.infer_real(x)
        per_round[f"{name}.{mode}.invoke"] = per_round[f"{name}.{mode}.device"] = n
    times = _time(fns, per_round, rounds)
    for server in servers:
        server.close()
    out: dict[str, dict[str, list[float]]] = {}
    for key, seconds in times.items():
        name, mode, kind = key.split(".")
        out.setdefault(name, {}).setdefault(mode, [0.0, 0.0])[kind == "device"] = seconds
    return out


def _one_call_s(fn: Callable[[], object]) -> float:
    t0 = time.thread_time_ns()
    for _ in range(5):
        fn()
    return max(1e-7, (time.thread_time_ns() - t0) / 5 / 1e9)


def sweep(sets: dict[str, tuple[dict[str, bytes], np.ndarray]]) -> dict[str, Any]:
    """Per level of ``LEVELS``: ``{name: {mode: [invoke_s, device_s]}}``, or why it was skipped.

    Each level runs in its own process (``bench/_litert_isa.py``): XNNPACK
    chooses its kernels once per process.
    """
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-isa-") as tmp:
        for name, (models, x) in sets.items():
            for mode in ("float32", "int8"):
                Path(tmp, f"{name}.{mode}.tflite").write_bytes(models[mode])
            np.save(Path(tmp, f"{name}.x.npy"), x)
        for level in LEVELS:
            proc = subprocess.run(
                [sys.executable, __file__, level, tmp],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            try:
                reply = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                out[level] = f"child failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
                continue
            out[level] = reply.get("unsupported") or reply["results"]
    return out


def print_sweep(results: dict[str, Any], labels: dict[str, str]) -> None:
    print(
        "  int8 / float32 with XNNPACK limited to the kernels of older x86 CPUs, same core "
        "(bench/_litert_isa.py; thread CPU time; cell: ratio (float32 -> int8 us))"
    )
    levels = [(lv, t) for lv, (t, _) in LEVELS.items() if isinstance(results.get(lv), dict)]
    print(f"    {'':<38}" + "".join(f"{title:>24}" for _, title in levels))
    for name, label in labels.items():
        for kind, col in (("invoke", 0), ("device", 1)):
            if name.startswith("layer") and kind == "device":
                continue  # a layer alone has no device path worth reading
            cells = []
            for lv, _ in levels:
                f, q = results[lv][name]["float32"][col], results[lv][name]["int8"][col]
                cells.append(f"{q / f:5.2f} ({f * 1e6:6.1f} ->{q * 1e6:6.1f})")
            print(f"    {label + ': ' + kind:<38}" + "".join(f"{c:>24}" for c in cells))
    for lv, (title, _) in LEVELS.items():
        if not isinstance(results.get(lv), dict):
            print(f"    {title}: not measured: {results.get(lv)}")


def main(argv: list[str]) -> int:
    level, model_dir = argv[0], Path(argv[1])
    try:
        flags = restrict(level)
    except Unsupported as e:
        print(json.dumps({"level": level, "unsupported": str(e)}))
        return 0
    print(json.dumps({"level": level, "flags": flags, "results": measure(model_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
