"""Per-operator latency under ONNX Runtime: a lookup table measured once and cached on disk.

An :class:`~graphprune.planning.op_spec.OpSpec` describes one operator as ONNX Runtime
runs it (op, attributes, input shapes and dtypes, which inputs are constants). Two nodes
with equal specs cost the same, so a model's latency is estimated as the sum of its nodes'
entries, ``T(model) ~ sum_n t(spec(n))``, and a pruned model's from the same nodes with
pruned input shapes. Nodes that ORT fuses into one kernel (Conv+Relu, MatMul+Add, Gelu)
count once, at their costliest member's time (:func:`fusion_groups`).

Measurement (:meth:`LatencyTable.latency`) puts many uncached specs into ONE model, each as
an independent node with its own graph inputs (shared between specs of equal shape and
dtype) and its own random constants, every output a graph output so that nothing is
pruned away. The session is created with full graph optimisation, sequential execution
and profiling; it runs ``warmup + repeats`` times (every run sweeps all specs, so a load
change hits them alike) and the per-node kernel times are read from the profile JSON.
ONNX Runtime may replace a node (a CPU Conv becomes an NCHWc Conv named after its output); node and output names carry a ``gpspec<i>x`` marker, so every
kernel is credited to its spec. Kernels without a marker are the layout reorders ONNX
Runtime adds around an isolated NCHWc node; inside a real network the blocked layout
carries from node to node, so they are left out (and counted in ``stats``). A spec's
latency is the minimum over the repeats of its kernels' summed time: on a loaded machine a
preemption lands inside most runs of a long kernel and few of a short one, so medians
inflate long kernels against short ones (the sum of per-kernel medians of a ResNet-18
pruned at 0.5 put it at 0.12 of the original while whole runs measured 0.26; the sum of
minima said 0.25; ``statistic="mean"`` is unbiased too, but noisier). A spec that ORT
removed (a constant folded away) costs 0. A batch that ORT cannot load or run is split in
halves until the failing specs are found; those are cached as failures and count 0.

The table is keyed by provider and machine (CPU model, core count, ONNX Runtime version,
thread count) and stored as JSON under ``$GRAPHPRUNE_CACHE/latency/`` (default
``~/.cache/graphprune/latency/``), written atomically and merged with what another process
wrote in the meantime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from graphprune.errors import UsageError
from graphprune.io._atomic import atomic_write_text
from graphprune.io.scratch import Folder as scratch_folder
from graphprune.planning.op_spec import (
    FORMAT,
    OperandSpec,
    OpSpec,
    ShapeOf,
    Untimable,
    static_shape,
)
from graphprune.verify.timing import resolve_providers

__all__ = ["LatencyTable", "OpSpec", "OperandSpec", "machine_fingerprint", "static_shape"]

_MARKER = re.compile(r"gpspec(\d+)x")


# --------------------------------------------------------------------------- measurement


class _Values:
    """Made-up values for constants and feeds: views of one seeded random pool (cheap: a
    measurement session needs hundreds of megabytes of weights whose values do not matter
    to the kernels' speed, only that they are ordinary non-zero numbers)."""

    pool = np.empty(0, np.float32)  # shared by every measurement in the process, grows

    def floats(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = int(np.prod(shape))
        if size > _Values.pool.size:
            rng = np.random.default_rng(size)
            _Values.pool = rng.random(max(size, 2 * _Values.pool.size, 1 << 20), dtype=np.float32) - np.float32(0.5)
        return _Values.pool[:size].reshape(shape).astype(dtype, copy=False)

    def constant(self, operand: OperandSpec) -> np.ndarray:
        dtype = np.dtype(operand.dtype)
        if operand.values is not None:
            return np.asarray(operand.values, dtype=dtype).reshape(operand.shape)
        if np.issubdtype(dtype, np.floating):
            return self.floats(operand.shape, dtype)
        return np.zeros(operand.shape, dtype=dtype)  # valid indices, axes and counts

    def feed(self, operand: OperandSpec) -> np.ndarray:
        dtype = np.dtype(operand.dtype)
        if np.issubdtype(dtype, np.floating):
            return self.floats(operand.shape, dtype).copy()
        return np.zeros(operand.shape, dtype=dtype)


def _nbytes(operand: OperandSpec | None) -> int:
    if operand is None:
        return 0
    return int(np.prod(operand.shape)) * np.dtype(operand.dtype).itemsize


EXTERNAL_BYTES = 4096
"""Made-up constants from this size are handed to ONNX Runtime as in-memory external
initializers (still constants to its optimiser, so weights are prepacked and NCHWc-reordered
as in a real model) instead of being serialised into the model."""


@dataclasses.dataclass
class _Measurement:
    """A measurement model: the proto, its feeds, and the arrays of its external constants."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    external: dict[str, np.ndarray]


def _external(tensor: onnx.TensorProto, name: str, array: np.ndarray) -> None:
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "graphprune-memory"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


CARRIER_CHANNELS = 4
"""Channels of the made-up input of a layout carrier."""


def _activation(graph: onnx.GraphProto, feeds: dict[str, np.ndarray], values: _Values,
                operand: OperandSpec, name: str) -> str:
    """A graph input for ``operand`` (fed ``feeds[name]``); the tensor name to read.

    A 4-D float activation is written by a *layout carrier* instead: a 1x1 Conv from a
    made-up ``CARRIER_CHANNELS``-channel input, whose output is also a graph output (so
    that ORT fuses nothing into it). ORT runs it in the NCHWc layout when the channel count
    allows, so the measured op receives its input the way it does after a convolution in a
    real network: depthwise convs, pools and elementwise ops then run their NCHWc kernels
    with no reorder in front (ORT inserts none for them). Its kernels carry no marker and
    do not count.
    """
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(operand.dtype))
    if len(operand.shape) != 4 or operand.dtype != "float32":
        feeds[name] = values.feed(operand)
        graph.input.append(helper.make_tensor_value_info(name, elem, list(operand.shape)))
        return name
    batch, channels, *spatial = operand.shape
    seed = (batch, CARRIER_CHANNELS, *spatial)
    feeds[name] = values.floats(seed, np.dtype(np.float32)).copy()
    graph.input.append(helper.make_tensor_value_info(name, elem, list(seed)))
    weight = values.floats((channels, CARRIER_CHANNELS, 1, 1), np.dtype(np.float32))
    graph.initializer.append(numpy_helper.from_array(weight, f"{name}_carrier_weight"))
    graph.node.append(helper.make_node("Conv", [name, f"{name}_carrier_weight"], [f"{name}_carried"],
                                       name=f"{name}_carrier"))
    graph.output.append(onnx.ValueInfoProto(name=f"{name}_carried"))
    return f"{name}_carried"


def _build(specs: Sequence[OpSpec]) -> _Measurement:
    """One model holding every spec as an independent node, with its feeds."""
    model = onnx.ModelProto()
    graph = model.graph
    graph.name = "graphprune_latency"
    feeds: dict[str, np.ndarray] = {}
    external: dict[str, np.ndarray] = {}
    shared: dict[tuple[tuple[int, ...], str], str] = {}
    opsets: dict[str, int] = {}
    values = _Values()
    for index, spec in enumerate(specs):
        domain = spec.domain or ""
        opsets[domain] = max(opsets.get(domain, 1), spec.opset if not domain else 1)
        names = []
        for slot, operand in enumerate(spec.inputs):
            if operand is None:
                names.append("")
            elif operand.constant:
                name = f"gpspec{index}x_c{slot}"
                array = values.constant(operand)
                if operand.values is None and array.nbytes >= EXTERNAL_BYTES:
                    external[name] = array.copy()  # its own memory, as every weight has
                    _external(graph.initializer.add(), name, array)
                else:
                    graph.initializer.append(numpy_helper.from_array(array, name))
                names.append(name)
            else:
                key = (operand.shape, operand.dtype)
                if key not in shared:
                    shared[key] = _activation(graph, feeds, values, operand, f"input{len(shared)}")
                names.append(shared[key])
        node = spec.to_node(f"gpspec{index}x", names)
        graph.node.append(node)
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in node.output if name)
    opsets.setdefault("", 13)
    for domain, version in sorted(opsets.items()):
        model.opset_import.append(helper.make_opsetid(domain, version))
    model.ir_version = max(8, helper.find_min_ir_version_for([i for i in model.opset_import if not i.domain]))
    return _Measurement(model, feeds, external)


STATISTICS = {"min": np.min, "median": np.median, "mean": np.mean}


def _kernel_times(profile: list[dict[str, Any]], count: int, warmup: int,
                  statistic: str = "min") -> tuple[list[float | None], float]:
    """Kernel seconds per spec index over the runs (None: never ran) and the unattributed
    seconds per run (layout reorders), each summarised by ``statistic``."""
    summary = STATISTICS[statistic]
    occurrences: dict[str, int] = defaultdict(int)
    per_run: dict[tuple[int, int], float] = defaultdict(float)
    unattributed: dict[int, float] = defaultdict(float)
    runs = 0
    for event in profile:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        name = event["name"]
        run = occurrences[name]
        occurrences[name] += 1
        runs = max(runs, run + 1)
        if run < warmup:
            continue
        seconds = float(event.get("dur", 0)) * 1e-6
        match = _MARKER.search(name)
        if match is None:
            unattributed[run] += seconds
        else:
            per_run[(int(match.group(1)), run)] += seconds
    samples: dict[int, list[float]] = defaultdict(list)
    for (index, _run), seconds in per_run.items():
        samples[index].append(seconds)
    times: list[float | None] = [float(summary(samples[i])) if samples.get(i) else None for i in range(count)]
    extra = float(summary(list(unattributed.values()))) if unattributed else 0.0
    return times, extra


def machine_fingerprint(provider: str, threads: int | None) -> dict[str, Any]:
    """What the measurements depend on besides the op: provider, CPU, cores, ORT, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"provider": provider, "cpu": cpu, "cores": os.cpu_count(),
            "onnxruntime": ort.__version__, "threads": threads, "format": FORMAT}


def _default_cache_dir() -> Path:
    root = os.environ.get("GRAPHPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "graphprune") / "latency"


class LatencyTable:
    """Per-operator latency in seconds on one provider and machine, cached on disk.

    ``threads``: ONNX Runtime intra-op threads (None: its default). ``repeats`` timed runs
    after ``warmup`` per measurement session, summarised by ``statistic`` (``min``, the
    default, ``median`` or ``mean``; a first, slower run never sets the minimum, so no
    warm-up is needed); at most ``max_batch`` specs and ``max_batch_bytes`` of inputs and
    constants go into one session.
    """

    def __init__(self, provider: str = "cpu", threads: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 *, repeats: int = 3, warmup: int = 0, statistic: str = "min", max_batch: int = 400,
                 max_batch_bytes: int = 512 << 20) -> None:
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        if repeats < 1 or warmup < 0:
            raise UsageError(f"need repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})")
        if statistic not in STATISTICS:
            raise UsageError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        self.statistic = statistic
        self.provider = provider.lower()
        self.providers = resolve_providers(self.provider)
        self.threads = threads
        self.repeats, self.warmup = repeats, warmup
        self.max_batch, self.max_batch_bytes = max_batch, max_batch_bytes
        self.fingerprint = machine_fingerprint(self.provider, threads)
        if statistic != "min":
            self.fingerprint["statistic"] = statistic
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_key = f"{self.provider}-{digest}"
        self.cache_path = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self.cache_path = self.cache_path / f"{self.cache_key}.json"
        self._entries: dict[str, dict[str, Any]] | None = None
        self.untimed: dict[str, str] = {}
        """node name -> why it counted 0, from the last :meth:`estimate` or :meth:`node_latencies`"""
        self.stats: dict[str, float] = {"measured": 0, "cached": 0, "failed": 0, "sessions": 0,
                                        "seconds": 0.0, "unattributed_seconds": 0.0}
        """specs measured / answered from the cache / failing, ORT sessions created,
        wall seconds spent measuring, reorder kernel seconds left out (per run, summed)"""

    def __repr__(self) -> str:
        return f"LatencyTable(provider={self.provider!r}, threads={self.threads}, cache='{self.cache_path}')"

    # ---- cache -------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """The cached entries, spec key -> {"seconds": float | None, "op": description}."""
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _save(self, new: dict[str, dict[str, Any]]) -> None:
        merged = self._load()
        merged.update(self.entries)
        merged.update(new)
        self._entries = merged
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": self.fingerprint, "entries": merged}
        atomic_write_text(self.cache_path, json.dumps(payload, indent=0, sort_keys=True))

    # ---- measurement ---------------------------------------------------------------------
    def latency(self, specs: Sequence[OpSpec]) -> np.ndarray:
        """Seconds per spec (0 for a spec that failed to run), measuring the uncached ones."""
        keys = [spec.key for spec in specs]
        missing: dict[str, OpSpec] = {}
        for key, spec in zip(keys, specs, strict=True):
            if key not in self.entries and key not in missing:
                missing[key] = spec
        self.stats["cached"] += sum(1 for key in set(keys) if key in self.entries)
        if missing:
            start = time.perf_counter()
            measured = self._measure(list(missing.values()))
            self.stats["seconds"] += time.perf_counter() - start
            new = {key: {"seconds": seconds, "op": spec.describe()}
                   for (key, spec), seconds in zip(missing.items(), measured, strict=True)}
            self.stats["measured"] += sum(1 for seconds in measured if seconds is not None)
            self.stats["failed"] += sum(1 for seconds in measured if seconds is None)
            self._save(new)
        return np.array([self.entries[key]["seconds"] or 0.0 for key in keys], dtype=np.float64)

    def failed(self, spec: OpSpec) -> bool:
        """Did ``spec`` fail to run when it was measured?"""
        entry = self.entries.get(spec.key)
        return entry is not None and entry["seconds"] is None

    def _batches(self, specs: list[OpSpec]) -> Iterable[list[OpSpec]]:
        batch: list[OpSpec] = []
        size = 0
        for spec in specs:
            cost = sum(_nbytes(operand) for operand in spec.inputs)
            if batch and (len(batch) >= self.max_batch or size + cost > self.max_batch_bytes):
                yield batch
                batch, size = [], 0
            batch.append(spec)
            size += cost
        if batch:
            yield batch

    def _measure(self, specs: list[OpSpec]) -> list[float | None]:
        """Seconds per spec, in order; one model per opset (an op's meaning can change
        between opsets: ReduceMean's axes, Split's sizes)."""
        by_opset: dict[int, list[int]] = defaultdict(list)
        for index, spec in enumerate(specs):
            by_opset[spec.opset].append(index)
        results: list[float | None] = [None] * len(specs)
        for indices in by_opset.values():
            measured: list[float | None] = []
            for batch in self._batches([specs[index] for index in indices]):
                measured.extend(self._measure_batch(batch))
            for index, seconds in zip(indices, measured, strict=True):
                results[index] = seconds
        return results

    def _measure_batch(self, specs: list[OpSpec]) -> list[float | None]:
        try:
            return self._run_session(specs)
        except Exception:  # noqa: BLE001 - ORT raises plain RuntimeErrors; find the culprits
            if len(specs) == 1:
                return [None]
            middle = len(specs) // 2
            return self._measure_batch(specs[:middle]) + self._measure_batch(specs[middle:])

    def _run_session(self, specs: list[OpSpec]) -> list[float | None]:
        built = _build(specs)
        with scratch_folder("graphprune-latency-") as scratch:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.log_severity_level = 4
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(scratch, "profile")
            if self.threads is not None:
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
            self.stats["sessions"] += 1
            handles = [ort.OrtValue.ortvalue_from_numpy(array) for array in built.external.values()]
            if handles:  # ORT reads these buffers in place: they stay referenced until the end
                options.add_external_initializers(list(built.external), handles)
            session = ort.InferenceSession(built.model.SerializeToString(), sess_options=options,
                                           providers=self.providers)
            try:
                for _ in range(self.warmup + self.repeats):
                    session.run(None, built.feeds)
            finally:
                path = session.end_profiling()
            profile = json.loads(Path(path).read_text(encoding="utf-8"))
        medians, extra = _kernel_times(profile, len(specs), self.warmup, self.statistic)
        self.stats["unattributed_seconds"] += extra
        return [0.0 if seconds is None else seconds for seconds in medians]

    # ---- graphs ------------------------------------------------------------------------
    def fusions(self, model: onnx.ModelProto) -> dict[str, str]:
        """Which nodes ONNX Runtime fuses into one kernel on this provider: node name ->
        the name of its group's first node, for groups of two or more (see :func:`fusion_groups`).
        Pruning keeps node names and op patterns, so the groups of the original model hold
        for every pruned variant."""
        return fusion_groups(model, self.providers)

    def node_latencies(self, graph: gs.Graph, shape_of: ShapeOf = static_shape, opset: int = 13,
                       fusions: Mapping[str, str] | None = None) -> dict[str, float]:
        """Seconds per node of ``graph`` (its inputs shaped by ``shape_of``); nodes that
        cannot be timed count 0 and are listed in :attr:`untimed` with the reason. With
        ``fusions`` (from :meth:`fusions`), a fused group costs what its most expensive
        member costs alone, credited to that member; the others count 0."""
        self.untimed = {}
        specs: list[OpSpec] = []
        names: list[str] = []
        result: dict[str, float] = {}
        for index, node in enumerate(graph.nodes):
            name = node.name or f"{node.op}_{index}"
            try:
                spec = OpSpec._from_node(node, shape_of, opset)
            except Untimable as exc:
                self.untimed[name] = str(exc)
                result[name] = 0.0
                continue
            specs.append(spec)
            names.append(name)
        for name, spec, seconds in zip(names, specs, self.latency(specs), strict=True):
            result[name] = float(seconds)
            if self.failed(spec):
                self.untimed[name] = "ONNX Runtime could not run it alone"
        if fusions:
            members: dict[str, list[str]] = defaultdict(list)
            for name, group in fusions.items():
                if name in result:
                    members[group].append(name)
            for names_in_group in members.values():
                costliest = max(names_in_group, key=lambda member: result[member])
                for member in names_in_group:
                    if member != costliest:
                        result[member] = 0.0
        return result

    def estimate(self, graph: gs.Graph, shape_of: ShapeOf = static_shape, opset: int = 13,
                 fusions: Mapping[str, str] | None = None) -> float:
        """Estimated seconds of one run of ``graph``: the sum of its nodes' latencies."""
        return float(sum(self.node_latencies(graph, shape_of, opset, fusions).values()))


def fusion_groups(model: onnx.ModelProto, providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict[str, str]:
    """Node name -> group name for the nodes ONNX Runtime fuses with a neighbour.

    ORT optimises a light copy of ``model`` (large constants made up in memory) at the
    extended level, the hardware-independent fusions (Conv+BatchNormalization, Conv+Relu,
    MatMul+Add, Gelu, LayerNormalization, SiLU, ...; the NCHWc layout is left out, it
    renames every tensor). A fused kernel writes the last member's output; so a node none
    of whose outputs survives was merged into what reads it: it joins its consumers' group.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    external: dict[str, np.ndarray] = {}
    values = _Values()
    for tensor in light.graph.initializer:
        dims = tuple(tensor.dims)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if dtype.kind in "biuf" and (tensor.data_location == onnx.TensorProto.EXTERNAL
                                     or int(np.prod(dims)) * dtype.itemsize >= EXTERNAL_BYTES):
            operand = OperandSpec(dims, dtype.name, True)
            external[tensor.name] = values.constant(operand)
            name = tensor.name
            tensor.Clear()
            _external(tensor, name, external[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 4
    handles = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in external.values()]
    if handles:
        options.add_external_initializers(list(external), handles)
    with scratch_folder("graphprune-fusions-") as scratch:
        options.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        ort.InferenceSession(light.SerializeToString(), sess_options=options, providers=list(providers))
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    surviving = {name for node in optimized.graph.node for name in node.output}
    surviving |= {value.name for value in optimized.graph.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node.name)
    parent = {node.name: node.name for node in model.graph.node if node.name}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in model.graph.node:
        outputs = [name for name in node.output if name]
        if not node.name or not outputs or any(name in surviving for name in outputs):
            continue
        for output in outputs:
            for consumer in consumers[output]:
                if consumer in parent:
                    parent[root(consumer)] = root(node.name)
    groups: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        if node.name:
            groups[root(node.name)].append(node.name)
    return {name: members[0] for members in groups.values() if len(members) > 1 for name in members}
