"""The BLAS that node processes use: OpenBLAS when installed, with one fixed thread count.

MLX's Linux CPU wheel links netlib's reference BLAS, ~30x slower than OpenBLAS for float32
matmuls. Preloading Debian's OpenBLAS (`libopenblas0-pthread`) makes MLX call it instead; the
preload must be in the environment when the process starts, so a launcher builds the node
processes' environment with `node_environment()`.

Bit-exact pipelines need the same BLAS and thread count on every node (and for the
single-process reference): results differ in the last bits between reference BLAS and
OpenBLAS and between OpenBLAS with 1 and 2 threads. Hence a fixed `DEFAULT_BLAS_THREADS`,
not one derived from each machine's core count. Across different CPU models, OpenBLAS may also
pick different kernels; `OPENBLAS_CORETYPE` (passed through when set) pins one.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import attrs

__all__ = [
    "DEFAULT_BLAS_THREADS",
    "BlasReport",
    "blas_in_use",
    "find_openblas",
    "node_environment",
]

# One thread: reproducible on any machine whatever its core count (OpenBLAS caps its threads
# at the cores it finds), and nodes that share a host do not oversubscribe it.
DEFAULT_BLAS_THREADS = 1

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"

_DEBIAN_OPENBLAS = "/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0"
_TRIPLETS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}


def find_openblas() -> Path | None:
    """The path of Debian's pthread OpenBLAS for this machine, or None if not installed."""
    triplet = _TRIPLETS.get(platform.machine())
    if triplet is None:
        return None
    path = Path(_DEBIAN_OPENBLAS.format(triplet=triplet))
    return path if path.is_file() else None


def node_environment(
    base: Mapping[str, str] | None = None,
    *,
    threads: int = DEFAULT_BLAS_THREADS,
    openblas: bool = True,
    huge_pages: bool = True,
) -> dict[str, str]:
    """The environment for a node process: `base` (default `os.environ`) plus the BLAS setup.

    Prepends OpenBLAS to `LD_PRELOAD` when `openblas` is true and it is installed (and not
    already preloaded); with `openblas` false, removes any OpenBLAS from `LD_PRELOAD`. Sets
    `OPENBLAS_NUM_THREADS`, and `OMP_NUM_THREADS` likewise, to `threads`. Give every node
    the same arguments.

    With `huge_pages`, adds glibc's `glibc.malloc.hugetlb=1` tunable to `GLIBC_TUNABLES`:
    malloc then asks for transparent huge pages for its large mappings, where MLX keeps the
    weights (the kernel's THP mode here is "madvise"). Decoding is memory-bound and a pipeline
    stage waits between tokens, after which TLB misses cost it; measured for 15 layers of
    SmolLM2 after a 70 ms pause: 40.0 -> 34.3 ms per forward (32.2 -> 30.2 ms without pauses).
    It changes no result bit. glibc before 2.35 ignores the tunable.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = dict(os.environ if base is None else base)
    # ld.so separates LD_PRELOAD entries with spaces or colons.
    preload = env.get("LD_PRELOAD", "").replace(":", " ").split()
    library = find_openblas() if openblas else None
    if not openblas:
        preload = [p for p in preload if "openblas" not in Path(p).name]
    elif library is not None and str(library) not in preload:
        preload.insert(0, str(library))
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    if huge_pages:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        if not any(t.startswith(f"{HUGE_PAGES_TUNABLE}=") for t in tunables):
            tunables.append(f"{HUGE_PAGES_TUNABLE}=1")
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


@attrs.frozen
class BlasReport:
    """Which BLAS this process uses.

    `kind` is "openblas", "reference" (netlib, bundled with the mlx CPU wheel), "accelerate"
    (macOS), or "unknown"; `library` is the file that provides `cblas_sgemm`, when known.
    """

    kind: str
    library: str | None
    threads: str | None
    loaded: tuple[str, ...]

    @property
    def fast(self) -> bool:
        """True for an optimized BLAS (OpenBLAS or Accelerate)."""
        return self.kind in ("openblas", "accelerate")


def _mapped_files() -> list[tuple[int, int, str]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end, fields[5]))
    return regions


def _classify(library: str) -> str:
    name = Path(library).name
    if "openblas" in name:
        return "openblas"
    if name.startswith("libblas"):
        return "reference"
    return "unknown"


def blas_in_use() -> BlasReport:
    """Report which BLAS MLX's matmuls go to in this process (imports mlx.core).

    MLX calls `cblas_sgemm`. The dynamic linker resolves it in the global scope first, where
    preloaded libraries live, and only then in libmlx's own dependencies (the wheel's
    reference `libblas`): so a global `cblas_sgemm` is the one MLX uses, and if there is none
    MLX uses its bundled library. The addresses are matched to files with /proc/self/maps.
    """
    import mlx.core  # noqa: F401  (maps libmlx and its BLAS into this process)

    threads = os.environ.get("OPENBLAS_NUM_THREADS")
    if platform.system() == "Darwin":
        return BlasReport("accelerate", None, threads, ())
    if not Path("/proc/self/maps").exists():
        return BlasReport("unknown", None, threads, ())
    regions = _mapped_files()
    loaded = tuple(sorted({path for _, _, path in regions if "blas" in Path(path).name.lower()}))
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        address = None
    if address is not None:
        for start, end, path in regions:
            if start <= address < end:
                return BlasReport(_classify(path), path, threads, loaded)
    bundled = [path for path in loaded if "mlx" in path and _classify(path) == "reference"]
    if bundled:
        return BlasReport("reference", bundled[0], threads, loaded)
    return BlasReport("unknown", None, threads, loaded)
