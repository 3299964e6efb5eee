"""Counting a training step's FLOPs: torch's FlopCounterMode, taught the CPU attention kernels.

torch's counter knows the CUDA attention kernels but not `_scaled_dot_product_flash_attention_for_cpu`
and its backward, which is what `scaled_dot_product_attention` runs on a CPU: left alone it counts
local_lite's attention (the tower's 24 layers of 577 tokens, the LLM's 30 of 704) as nothing, about
90 GFLOP of a 750 GFLOP step. Counted here as torch counts the CUDA kernels' (the matmuls of
scores and outputs, five in the backward), except that a causal kernel is credited only with the
query-key pairs it computes (about half), where torch counts every pair. llavactl's own chunked
causal attention (:mod:`llavactl.model.causal_attention`) is credited with the causal pairs too,
not with the chunks' masked calls (which compute about a tenth more), and for packed records with
each record's own causal pairs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.data.cache import cache_root

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode


def attention_pairs(queries: int, keys: int, is_causal: bool) -> int:
    """Query-key pairs an attention kernel computes; causal masks align top-left, as torch's do
    (query i sees keys 0..i)."""
    if not is_causal:
        return queries * keys
    diagonal = min(queries, keys)
    return diagonal * (diagonal + 1) // 2 + (queries - diagonal) * keys


def scaled_flops(linear: float, attention: float, measured: tuple[float, float], target: tuple[float, float]) -> float:
    """FLOPs of a step of other shapes, from one measured step's: the non-attention work scales with
    the tokens computed, the attention work with the sum of squared sequence lengths. ``measured``
    and ``target``: (tokens, sum of squared lengths)."""
    tokens, squares = measured
    return (linear * target[0] / tokens if tokens else 0.0) + (attention * target[1] / squares if squares else 0.0)


def attention_share(counts: dict[Any, int]) -> int:
    """The attention kernels' part of a FLOP count by op (forward, backward, llavactl's own)."""
    return sum(n for op, n in counts.items() if "attention" in str(op))


def flop_counter(*, masked_attention_is_causal: bool = False) -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention; use it as a context manager.

    ``masked_attention_is_causal`` counts attention under an explicit mask as causal: for a trace
    on fake tensors of a batch whose real mask transformers would drop for the causal kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def pairs(query: tuple[int, ...], key: tuple[int, ...], is_causal: bool, mask: object) -> int:
        causal = is_causal or (masked_attention_is_causal and mask is not None)
        return attention_pairs(query[2], key[2], causal)

    def forward(
        query: tuple[int, ...],
        key: tuple[int, ...],
        value: tuple[int, ...],
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *args: Any,
        attn_mask: object = None,
        **kwargs: Any,
    ) -> int:
        # scores = q @ k^T, then out = scores @ v; grouped-query k/v are shared, the work is per query head
        return 2 * query[0] * query[1] * pairs(query, key, is_causal, attn_mask) * (query[3] + value[3])

    def backward(
        grad_out: tuple[int, ...],
        query: tuple[int, ...],
        key: tuple[int, ...],
        value: tuple[int, ...],
        out: tuple[int, ...],
        logsumexp: tuple[int, ...],
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *args: Any,
        attn_mask: object = None,
        **kwargs: Any,
    ) -> int:
        # scores recomputed (q k^T), grad scores (dout v^T), grad v (p^T dout), grad q (ds k), grad k (ds^T q)
        return 2 * query[0] * query[1] * pairs(query, key, is_causal, attn_mask) * (3 * query[3] + 2 * value[3])

    Shape = tuple[int, ...]

    def per_record(query: Shape, key: Shape, value: Shape, lengths: list[int] | None, work: Any) -> int:
        # Packed records attend each to itself: credited as one causal attention per record.
        return sum(
            work((*query[:2], n, query[3]), (*key[:2], n, key[3]), (*value[:2], n, value[3]))
            for n in lengths or [query[2]]
        )

    def chunked_forward(
        query: Shape, key: Shape, value: Shape, scale: float = 1.0, lengths: list[int] | None = None, **kwargs: Any
    ) -> int:
        return per_record(query, key, value, lengths, lambda q, k, v: forward(q, k, v, is_causal=True))

    def chunked_backward(
        grad_out: Shape,
        query: Shape,
        key: Shape,
        value: Shape,
        out: Shape = (),
        lse: Shape = (),
        scale: float = 1.0,
        lengths: list[int] | None = None,
        **kwargs: Any,
    ) -> int:
        return per_record(query, key, value, lengths, lambda q, k, v: backward(q, q, k, v, (), (), is_causal=True))

    import llavactl.model.causal_attention  # noqa: F401  (registers its ops)

    aten, ours = torch.ops.aten, torch.ops.llavactl
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
            ours.causal_attention: chunked_forward,
            ours.causal_attention_backward: chunked_backward,
        },
    )


def op_flop_counter() -> OpFlops:
    """A FLOP counter with :func:`flop_counter`'s formulas but no module tracking, for a real training
    step: FlopCounterMode's module tracker adds autograd nodes, which changes the order in which
    gradients are summed and so the step's results. This one only watches the ops."""
    return OpFlops(flop_counter().flop_registry)


class OpFlops:
    """FLOPs of the ops run under it (as a context manager), in all and by op."""

    def __init__(self, registry: dict[Any, Any]) -> None:
        from collections import Counter

        self._registry = registry
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> OpFlops:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                count = counter._registry.get(func._overloadpacket)
                if count is not None:
                    counter.by_op[str(func._overloadpacket)] += count(*args, **kwargs, out_val=out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


PEAKS_FILE = "matmul_peaks.json"  # in llavactl's cache: the best rate seen per machine, dtype and threads
_TIMED_RUNS = 7


@functools.cache
def measure_matmul_flops(device: str, dtype_name: str = "float32") -> float:
    """FLOP/s of a large square matmul in ``dtype_name`` on ``device``: the machine's steady peak.

    The best of several short timed matmuls (2048^3 on a CPU, 8192^3 on a GPU), so that a moment
    when another process holds the cores lowers no run but that one; and the best rate this machine
    ever showed for this dtype and thread count, kept in llavactl's cache, so that a busy moment
    cannot lower the peak that MFU is reported against (and inflate MFU). Measured once per process."""
    return steady_peak(machine_key(device, dtype_name), best_matmul_rate(device, dtype_name))


def best_matmul_rate(device: str, dtype_name: str) -> float:
    """The best of :data:`_TIMED_RUNS` timed matmuls, after a warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    if not cuda:
        # A dtype the CPU only emulates (bf16 without AVX512-BF16 or AMX) runs a 2048^3 matmul in
        # seconds: the size is halved until one takes under a fifth of a second (the rate is as low).
        while n > 256:
            probe = torch.randn(n // 4, n // 4, dtype=dtype)
            torch.mm(probe, probe)  # the first call starts the threads
            start = time.perf_counter()
            torch.mm(probe, probe)
            if (time.perf_counter() - start) * 64 < 0.2:
                break
            n //= 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    [seconds] = best_seconds(functools.partial(torch.mm, a, b), sync=torch.cuda.synchronize if cuda else None)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n**3 / seconds


def best_seconds(
    *calls: Callable[[], object],
    runs: int = _TIMED_RUNS,
    budget_s: float = math.inf,
    sync: Callable[[], object] | None = None,
    warm_up: bool = True,
) -> list[float]:
    """The shortest of up to ``runs`` timed calls of each of ``calls``, after an untimed one each
    (``warm_up``: the kernel and the threads), stopping once the timed calls have taken
    ``budget_s``. Several calls are timed in turn, so that a moment when another process holds the
    cores slows each of them alike. ``sync`` waits for the device (``torch.cuda.synchronize``)
    before each clock reading."""
    wait = sync or (lambda: None)
    if warm_up:
        for call in calls:
            call()
    best, spent = [math.inf] * len(calls), 0.0
    for _ in range(runs):
        for i, call in enumerate(calls):
            wait()
            start = time.perf_counter()
            call()
            wait()
            took = time.perf_counter() - start
            best[i], spent = min(best[i], took), spent + took
        if spent >= budget_s:
            break
    return best


_LINEAR_BUDGET_S = 0.5  # fp32 and bf16 together: doctor's first call on a machine measures them
_SLICE_ROWS, _SLICE_OUTPUTS = 256, 1024
_LINEAR_RUNS = 100  # small shapes take a millisecond: many runs, so that a busy moment passes


@dataclass(frozen=True)
class Bf16Speed:
    """bf16 against fp32 on this CPU in one linear layer's shapes: ``tokens`` x ``width`` -> ``out``."""

    tokens: int
    width: int
    out: int
    fp32_flops_per_s: float
    bf16_flops_per_s: float

    @property
    def speedup(self) -> float:
        """How many times faster bf16 runs than fp32 (under 1: slower)."""
        return self.bf16_flops_per_s / self.fp32_flops_per_s


def linear_rates(tokens: int, width: int, out: int, *, budget_s: float = _LINEAR_BUDGET_S) -> tuple[float, float]:
    """FLOP/s on one core of this CPU of a linear layer's forward in fp32 and in bf16: ``tokens``
    inputs of ``width`` through an ``out`` x ``width`` weight (as nn.Linear stores it: the layout
    autocast's bf16 matmuls run in), the best of many calls of each, in turn, within ``budget_s``.

    A slice of the layer: at most 256 of its rows and 1024 of its outputs, the whole reduction
    (``width``). Enough to keep the matmul bound by compute, as the whole layer's is (a slice of a
    few rows is bound by reading the weight, which bf16 halves: emulated bf16 read 1.4-2x there), and
    small enough that emulated bf16 (5x slower than fp32) takes a fraction of a second at a 7B
    LLM's widths. On one thread: where another process holds a core, a call on two threads waits
    for its slower half, and a small matmul's rate falls tenfold (tiny's 64-wide layers read 1.8x
    for emulated bf16 on a busy 2-core machine, 0.07x on a quiet one); one thread slows in
    proportion, both dtypes alike."""
    import torch
    import torch.nn.functional as F

    rows, cols = min(tokens, _SLICE_ROWS), min(out, _SLICE_OUTPUTS)
    calls = [
        functools.partial(F.linear, torch.randn(rows, width, dtype=dtype), torch.randn(cols, width, dtype=dtype))
        for dtype in (torch.float32, torch.bfloat16)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32_s, bf16_s = best_seconds(*calls, runs=_LINEAR_RUNS, budget_s=budget_s)
    finally:
        torch.set_num_threads(threads)
    flops = 2 * rows * width * cols
    return flops / fp32_s, flops / bf16_s


def bf16_speedup(tokens: int, width: int, out: int) -> Bf16Speed:
    """bf16 against fp32 on this CPU in a linear layer of these shapes (:func:`linear_rates`, about
    a second), measured once per machine, thread count, torch and shapes and kept in llavactl's
    cache beside the matmul peaks: doctor says it on every run without timing it again (delete
    the cache's matmul_peaks.json to measure again)."""
    keys = [f"{machine_key('cpu', dtype)} | linear {tokens}x{width}->{out}" for dtype in ("float32", "bfloat16")]
    kept = [kept_rate(key) for key in keys]
    if None in kept:
        kept = [steady_peak(key, rate) for key, rate in zip(keys, linear_rates(tokens, width, out), strict=True)]
    return Bf16Speed(tokens, width, out, *kept)


def machine_key(device: str, dtype_name: str) -> str:
    """What a kept peak is filed under: the processor (or GPU), the threads torch uses, torch, the dtype."""
    import platform

    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{name} | {device.split(':')[0]} | {threads} threads | torch {torch.__version__} | {dtype_name}"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _kept_rates() -> dict[str, Any]:
    try:
        kept = json.loads((cache_root() / PEAKS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return kept if isinstance(kept, dict) else {}


def kept_rate(key: str) -> float | None:
    """The rate kept for ``key`` in llavactl's cache, if any."""
    rate = _kept_rates().get(key)
    return float(rate) if isinstance(rate, int | float) and math.isfinite(rate) and rate > 0 else None


def steady_peak(key: str, measured: float) -> float:
    """The best of ``measured`` and the rate kept for ``key``, which is raised when ``measured`` beats
    it. A cache that cannot be read or written costs only the steadiness."""
    best = kept_rate(key)
    if best is not None and best >= measured:
        return best
    path = cache_root() / PEAKS_FILE
    kept = _kept_rates()
    kept[key] = measured
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".peaks-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # concurrent runs each write a whole file
    return measured
