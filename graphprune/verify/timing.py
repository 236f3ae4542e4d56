"""Latency of ONNX models under ONNX Runtime, measured fairly for comparison.

All models get the same random feeds (per input name, shape and dtype), sessions use full
graph optimization and sequential execution, and the timed runs are interleaved: each
iteration runs every model once, starting from a different model each time, so drifting
machine load (thermal throttling, other processes) hits all models alike.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import InvalidModelError, UsageError
from graphprune.io import runtime
from graphprune.io.feeds import Dim, InputSpec, make_feeds_from_specs, output_array, resolve_shapes
from graphprune.io.model_io import EXTERNAL_DATA_THRESHOLD, model_size_bytes, save_model
from graphprune.io.scratch import Folder as scratch_folder

__all__ = ["PROVIDERS", "PROVIDER_TOLERANCE", "TimingResult", "provider_agreement", "resolve_providers", "run_on_provider",
           "time_models"]

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
"""Provider names accepted by :func:`time_models` and the ONNX Runtime providers they use."""

PROVIDER_TOLERANCE = 1e-2
"""Largest relative difference accepted between a model's run on another provider and its
CPU run (GPU kernels reorder sums and may compute in TF32)."""

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,  # a tokenizer in the graph: random words
}


@dataclasses.dataclass(frozen=True)
class TimingResult:
    """Latency statistics of one model, in milliseconds per run."""

    name: str
    provider: str
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    batch: int
    """the batch size the model really ran with (a fixed batch axis wins over the request)"""
    threads: int | None = None
    """ONNX Runtime intra-op threads (None: ORT's default, one per core)"""
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """the shape of every input it was fed"""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the fields."""
        return dataclasses.asdict(self)


def resolve_providers(provider: str) -> list[str]:
    """The ONNX Runtime providers for ``provider`` ("cpu" or "cuda"), CPU last as a fallback
    for the ops a GPU provider does not take. Raises :class:`UsageError` (one line) when this
    onnxruntime lacks the provider (CUDA needs the ``onnxruntime-gpu`` wheel)."""
    key = provider.lower()
    if key not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[key][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise UsageError(
            f"provider '{key}' needs {wanted}, which this onnxruntime does not have "
            f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA"
        )
    return PROVIDERS[key]


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = runtime.session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # fatal only: errors come back as exceptions, not log lines
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _name(model: str | Path | onnx.ModelProto, index: int) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or f"model{index}"
    return os.fspath(model)


def _session(
    model: str | Path | onnx.ModelProto,
    name: str,
    providers: list[str],
    options: ort.SessionOptions,
    scratch: Path,
) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        if model_size_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            path = save_model(model, scratch / f"model{id(model)}.onnx", external_data=True)
            source: str | bytes = os.fspath(path)
        else:
            source = model.SerializeToString()
    else:
        path = Path(os.fspath(model))
        if not path.is_file():
            raise InvalidModelError(f"no such file: {path}")
        source = os.fspath(path)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:
        library = runtime.registered_for(exc)
        if library is None:
            raise InvalidModelError(f"ONNX Runtime cannot load '{name}': {runtime.describe(exc)}") from exc
        options.register_custom_ops_library(library)
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    if providers[0] not in session.get_providers():
        raise UsageError(
            f"ONNX Runtime did not enable {providers[0]} for '{name}' "
            "(check the CUDA and cuDNN libraries)"
        )
    return session


def _specs(session: ort.InferenceSession, name: str) -> list[InputSpec]:
    specs = []
    for value in session.get_inputs():
        dtype = _ORT_TYPES.get(value.type)
        if dtype is None:
            raise UsageError(f"cannot feed input '{value.name}' of '{name}' with type {value.type}")
        shape: list[Dim] = [dim if isinstance(dim, int | str) else None for dim in value.shape]
        specs.append(InputSpec(value.name, shape, np.dtype(dtype)))
    return specs


def _aligned(specs: list[list[InputSpec]], given: Mapping[str, Sequence[int]] | None,
             batch: int) -> Mapping[str, Sequence[int]] | None:
    """``given``, plus the fixed shape one model declares for an input that another leaves
    open (at the same rank): the models are timed on like inputs (a dynamo export fixed at
    64 tokens beside a TorchScript one that left them open ran against 8: "2.96x slower").
    Not where a batch other than 1 is asked for and the fixed shape's batch differs."""
    fixed: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        for x in spec:
            if x.shape and all(isinstance(d, int) and d > 0 for d in x.shape) and (batch == 1 or x.shape[0] == batch):
                fixed.setdefault(x.name, tuple(int(d) for d in x.shape))
    open_ones = {x.name for spec in specs for x in spec if x.name in fixed and x.shape
                 and len(x.shape) == len(fixed[x.name]) and not all(isinstance(d, int) for d in x.shape)}
    added = {name: fixed[name] for name in open_ones if name not in (given or {})}
    return {**added, **(given or {})} if added else given


def _actual_batch(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], requested: int) -> int:
    """The batch a model runs with: ``requested`` where an input has an open axis 0, else
    the fixed size of the first input's axis 0 (a fixed-batch model cannot run another)."""
    ranked = [spec for spec in specs if spec.shape]
    open_batch = [spec for spec in ranked if not isinstance((spec.shape or [0])[0], int)]
    if open_batch:  # (the batch fed: --input-shape, or the only one the model runs at, may differ)
        return int(shapes[open_batch[0].name][0]) if open_batch[0].name in shapes else requested
    return shapes[ranked[0].name][0] if ranked else 1


FeedCache = dict[tuple[str, tuple[int, ...], str], np.ndarray]


def _feeds(
    specs: list[InputSpec], cache: FeedCache, *, seed: int, batch: int,
    input_shapes: Mapping[str, Sequence[int]] | None = None, values: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Feeds for one model; inputs with the same name, shape and dtype share one array.
    ``input_shapes``: sizes for some inputs (others guessed); ``values``: inputs filled with
    one value (a mode switch the graph tests)."""
    names = {spec.name for spec in specs}
    given = {name: shape for name, shape in (input_shapes or {}).items() if name in names}
    shapes = resolve_shapes(specs, batch=batch, input_shapes=given or None)
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        key = (spec.name, shape, spec.dtype.str)
        if key not in cache:
            concrete = InputSpec(spec.name, list(shape), spec.dtype)
            input_seed = seed + zlib.crc32(spec.name.encode())
            cache[key] = make_feeds_from_specs([concrete], seed=input_seed, values=values)[0][spec.name]
        feeds[spec.name] = cache[key]
    return feeds


def _runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> bool:
    try:
        session.run(None, feeds)
    except Exception:  # ONNX Runtime's errors have no common class
        return False
    return True


def _runnable_feeds(
    model: str | Path | onnx.ModelProto, session: ort.InferenceSession, name: str, specs: list[InputSpec],
    feeds: dict[str, np.ndarray], *, seed: int, input_shapes: Mapping[str, Sequence[int]] | None,
    values: Mapping[str, Any] | None,
) -> tuple[dict[str, tuple[int, ...]] | None, Mapping[str, Any] | None]:
    """The input sizes and values to time at: ``None`` (as guessed) where the first model runs
    on ``feeds``; else the values its graph tests its mode switches for (unless given), its
    integer inputs 0 and, where it still does not run, sizes it runs at
    (:func:`~graphprune.analysis.probe_sizes.choose_input_shapes`) — an OCR recogniser built
    for height 48, silero's 16 kHz branch. Raises :class:`InvalidModelError` when none runs."""
    from graphprune.analysis.probe_sizes import choose_input_shapes, required_sizes
    from graphprune.calibration.synthetic import first_tested_values
    from graphprune.io.ir import default_opset

    try:
        session.run(None, feeds)
        return None, values
    except Exception as exc:
        failure = exc
    if values is None:
        values = first_tested_values(model) or None
    if values:
        try:
            session.run(None, _feeds(specs, {}, seed=seed, batch=1, input_shapes=input_shapes, values=values))
            return dict(input_shapes or {}), values
        except Exception as exc:
            failure = exc
    integers = {spec.name: 0 for spec in specs if np.issubdtype(spec.dtype, np.integer) and spec.name not in (values or {})}
    if integers:  # ids that index an open count of rows (a GNN's atoms: 1 indexes past one atom)
        zeros = {**(values or {}), **integers}
        if _runs(session, _feeds(specs, {}, seed=seed, batch=1, input_shapes=input_shapes, values=zeros)):
            return dict(input_shapes or {}), zeros
    names = {spec.name for spec in specs}
    given = {k: v for k, v in (input_shapes or {}).items() if k in names} or None
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    chosen = choose_input_shapes(None, specs, given, seed=seed, values=values, session=session,
                                 required=required_sizes(proto, specs, default_opset(proto)))
    if chosen is None:
        raise InvalidModelError(
            f"ONNX Runtime failed to run '{name}': {failure} (give the input sizes it runs at with "
            "--input-shape NAME=d0,d1,...)") from failure
    return chosen, values


def time_models(
    models: Sequence[str | Path | onnx.ModelProto],
    *,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 50,
    batch: int = 1,
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, Any] | None = None,
    data: Mapping[str, np.ndarray] | None = None,
) -> list[TimingResult]:
    """Time each model with ONNX Runtime; one result per model, in the order given.

    ``progress(done, total)`` is called after each round (``total = warmup + runs``).
    ``input_shapes``: sizes of inputs the models leave open (others guessed: batch ``batch``,
    images 224, sequences 8); ``values``: inputs fed one value (a mode switch). Where the first
    model does not run at the guess, the values its graph tests for and sizes it runs at are
    chosen, and every model is timed at those; or, where ``data`` is given (a feed the caller
    knows runs: a calibration sample), on that feed.
    """
    if not models:
        raise UsageError("no models to time")
    if warmup < 0 or runs < 1 or batch < 1:
        raise UsageError(
            f"need warmup >= 0, runs >= 1 and batch >= 1 (got {warmup}, {runs}, {batch})"
        )
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    providers = resolve_providers(provider)
    options = _session_options(threads)

    with scratch_folder("graphprune-timing-") as temporary:
        scratch = Path(temporary)  # only ModelProtos over 2 GiB are written here
        names = [_name(model, index) for index, model in enumerate(models)]
        sessions = [
            _session(model, name, providers, options, scratch)
            for model, name in zip(models, names, strict=True)
        ]
        cache: FeedCache = {}
        specs = [_specs(session, name) for session, name in zip(sessions, names, strict=True)]
        input_shapes = _aligned(specs, input_shapes, batch)
        feeds = [_feeds(spec, cache, seed=seed, batch=batch, input_shapes=input_shapes, values=values)
                 for spec in specs]
        chosen = None
        if data is not None and all(x.name in data for spec in specs for x in spec):
            if not _runs(sessions[0], feeds[0]):  # an input whose values the model needs (a shape)
                feeds = [{x.name: np.asarray(data[x.name]) for x in spec} for spec in specs]
        else:
            chosen, values = _runnable_feeds(models[0], sessions[0], names[0], specs[0], feeds[0], seed=seed,
                                             input_shapes=input_shapes, values=values)
        if chosen is not None:  # at the batch asked for where the batch axis is open (and the model runs
            opened = {spec.name for spec in specs[0] if spec.shape and not isinstance(spec.shape[0], int)}
            found = {v[0] for k, v in chosen.items() if k in opened and len(v)}  # at batch 1: ICLabel runs at 4 only)
            keep = found != {1} and batch == 1
            chosen = {k: (batch, *v[1:]) if k in opened and len(v) and k not in (input_shapes or {}) and not keep
                      else tuple(v) for k, v in chosen.items()}
            cache = {}
            feeds = [_feeds(spec, cache, seed=seed, batch=batch, input_shapes=chosen, values=values)
                     for spec in specs]
        batches = [
            _actual_batch(spec, {key: value.shape for key, value in feed.items()}, batch)
            for spec, feed in zip(specs, feeds, strict=True)
        ]
        samples: list[list[float]] = [[] for _ in sessions]
        total = warmup + runs
        count = len(sessions)
        for step in range(total):
            for offset in range(count):
                index = (step + offset) % count
                start = time.perf_counter()
                try:
                    sessions[index].run(None, feeds[index])
                except Exception as exc:
                    raise InvalidModelError(
                        f"ONNX Runtime failed to run '{names[index]}': {exc}"
                    ) from exc
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    samples[index].append(elapsed * 1000.0)
            if progress is not None:
                progress(step + 1, total)

    results = []
    for name, times, ran, fed in zip(names, samples, batches, feeds, strict=True):
        values = np.asarray(times)
        results.append(
            TimingResult(
                name=name,
                provider=provider.lower(),
                median_ms=float(np.median(values)),
                p90_ms=float(np.percentile(values, 90)),
                mean_ms=float(values.mean()),
                runs=runs,
                batch=ran,
                threads=threads,
                input_shapes={k: [int(d) for d in np.shape(v)] for k, v in fed.items()},
            )
        )
    return results


def run_on_provider(
    model: str | Path | onnx.ModelProto,
    feeds_list: Sequence[dict[str, np.ndarray]],
    *,
    provider: str = "cpu",
    threads: int | None = None,
) -> list[list[np.ndarray]]:
    """Outputs of ``model`` on each feed dict, run on ``provider`` (one session for all)."""
    providers = resolve_providers(provider)
    with scratch_folder("graphprune-run-") as temporary:
        name = _name(model, 0)
        session = _session(model, name, providers, _session_options(threads), Path(temporary))
        try:
            return [[output_array(v) for v in session.run(None, feeds)] for feeds in feeds_list]
        except Exception as exc:
            raise InvalidModelError(f"ONNX Runtime failed to run '{name}' on {provider}: {exc}") from exc


def provider_agreement(
    model: str | Path | onnx.ModelProto,
    feeds_list: Sequence[dict[str, np.ndarray]],
    *,
    provider: str,
) -> dict[str, Any]:
    """Run ``model`` on ``provider`` and on the CPU with the same feeds: the largest
    absolute and relative differences between the two (the CPU run is the one graphprune's
    verification checked; this says the model computes the same on the other provider)."""
    from graphprune.verify.validate import differences

    other = run_on_provider(model, feeds_list, provider=provider)
    cpu = run_on_provider(model, feeds_list, provider="cpu")
    max_abs = max_rel = 0.0
    for reference, outputs in zip(cpu, other, strict=True):
        a, r = differences(reference, outputs)
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    return {"provider": provider.lower(), "compared_with": "the same model on the CPU",
            "samples": len(feeds_list), "max_abs_diff": max_abs, "max_rel_diff": max_rel}
