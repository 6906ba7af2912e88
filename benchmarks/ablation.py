"""Each speed lever on and off, in one process on one machine, on real images.

    python benchmarks/ablation.py [--data PATH] [--n-images N] [--out docs/performance.md]

Levers: memory layout (channels_last), bf16 autocast for training and inference, torch.compile,
intra-op threads, DataLoader workers, the prepared image cache against decoding files, cached
features for the probes (and rotation-augmented probe features), batched rot90 TTA, inference
batch size. It also counts the FLOPs of a training step (``FlopCounterMode``) and measures this
CPU's matmul peak, so the achieved GFLOP/s can be read against the limit.

Throughputs are medians over timed repeats after warm-up; compare rows of one run only.
Results go to stdout (JSON) and to ``--out`` between the ``ablation:begin``/``ablation:end``
markers (prose around them is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import (
    DEFAULT_DATA,
    REPO,
    Spec,
    build_subset,
    check_data,
    image_files,
    qwk,
    rewrite_block,
    say,
)
from torch import nn

BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
Row = dict[str, Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--n-images", type=int, default=800, help="subset size (train + val)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    p.add_argument("--run-epochs", type=int, default=2, help="epochs of the full-run checks")
    p.add_argument("--large-n", type=int, default=2400, help="subset of the probe-large check")
    p.add_argument("--work", default=str(REPO / "runs" / "bench"))
    p.add_argument("--out", default=str(REPO / "docs" / "performance.md"))
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip (see SECTIONS)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Bench:
    """The shared material: prepared caches of the subset, the model, fixed batches."""

    def __init__(self, spec: Spec, args: argparse.Namespace) -> None:
        from medtune.data import load_imageset, prepare
        from medtune.models import TransferModel, create_backbone

        self.spec, self.args = spec, args
        self.work = Path(spec.work)
        self.train_set, self.val_set = load_imageset(spec.train_dir), load_imageset(spec.val_dir)
        cache_dir = self.work / "cache-ablation"  # where medtune.train (cache_dir) looks
        size = spec.image_size
        self.train_cache = prepare(self.train_set, size, {"crop": True}, cache_dir, progress=False)
        self.val_cache = prepare(self.val_set, size, {"crop": True}, cache_dir, progress=False)
        self.backbone = create_backbone("efficientnet_lite0")
        torch.manual_seed(0)
        self.base = TransferModel(self.backbone, len(spec.class_names), dropout=0.2)
        self.mean = torch.tensor(self.backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.backbone.std).view(1, 3, 1, 1)
        b = spec.batch_size
        rows = np.arange(b * 2) % len(self.train_cache)
        images = torch.from_numpy(np.array(self.train_cache.images[rows])).permute(0, 3, 1, 2)
        labels = torch.as_tensor(self.train_cache.labels[rows])
        self.batches = [(images[i : i + b].contiguous(), labels[i : i + b]) for i in (0, b)]

    def model(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def x(self, u8: torch.Tensor, channels_last: bool) -> torch.Tensor:
        from medtune.data.normalise import normalise_batch

        return normalise_batch(u8, self.mean, self.std, channels_last=channels_last)


# --------------------------------------------------------------------------- peak


def matmul_peak() -> list[Row]:
    """GFLOP/s of ``torch.mm`` on large square matrices (this CPU's practical limit)."""
    rows = []
    n = 4096
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        s = timed(lambda a=a, b=b: torch.mm(a, b), repeats=5)
        name = str(dtype).replace("torch.", "")
        rows.append(_row("peak", f"torch.mm {n}x{n} {name}", "GFLOP/s", 2 * n**3 / s / 1e9))
    return rows


def _row(section: str, setting: str, metric: str, value: float | None, **extra: Any) -> Row:
    return {"section": section, "setting": setting, "metric": metric, "value": value, **extra}


# --------------------------------------------------------------------------- training step


@functools.cache
def step_flops(bench: Bench) -> float:
    """FLOPs of one training step at the benchmark batch size: 3 x the counted forward FLOPs.

    The forward is counted with ``FlopCounterMode``; the backward is taken as twice the forward
    (gradients for inputs and for weights), because ``FlopCounterMode`` counts the backward of a
    grouped (depthwise) convolution as if it were dense: ~100x too much for a 3x3 depthwise conv,
    which would put a Lite0 training step at ~14x its real cost.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = bench.model().train()
    u8, _ = bench.batches[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(bench.x(u8, False))
    return 3.0 * float(counter.get_total_flops())


def interleaved(units: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each unit of work, timed round-robin so machine noise hits all alike."""
    for fn in units.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in units}
    for _ in range(rounds):
        for name, fn in units.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(
    bench: Bench,
    *,
    bf16: bool,
    channels_last: bool,
    compiled: bool = False,
    n_threads: int = 0,
    freeze: int = 0,
) -> Callable[[], None]:
    """One SGD step of the medtune model on a fixed batch, with the given levers (``freeze``:
    the first stages frozen as ``medtune train --freeze`` does, their BatchNorms in eval mode)."""
    from medtune.models.stages import param_stage_index
    from medtune.transfer.recipe import apply_freeze, keep_frozen_norms_in_eval

    model = bench.model().train()
    index = param_stage_index(model)
    frozen_norms = apply_freeze(model.backbone, index, freeze)
    keep_frozen_norms_in_eval(frozen_norms)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    state = {"i": 0}

    def step() -> None:
        u8, y = bench.batches[state["i"] % 2]
        state["i"] += 1
        with threads(n_threads or torch.get_num_threads()):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = forward(bench.x(u8, channels_last))
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


TRAIN_VARIANTS = {
    "fp32, contiguous (plain PyTorch)": {"bf16": False, "channels_last": False},
    "fp32, channels_last": {"bf16": False, "channels_last": True},
    "bf16 autocast, contiguous": {"bf16": True, "channels_last": False},
    "bf16 autocast + channels_last (medtune default)": {"bf16": True, "channels_last": True},
    "bf16 + channels_last, 1 thread": {"bf16": True, "channels_last": True, "n_threads": 1},
    **{
        f"bf16 + channels_last, first {n} stages frozen ({stages})": {
            "bf16": True,
            "channels_last": True,
            "freeze": n,
        }
        for n, stages in ((2, "stem, blocks.0"), (3, "to blocks.1"), (4, "to blocks.2"))
    },
}


def training_levers(bench: Bench) -> list[Row]:
    return _train_rows(bench, TRAIN_VARIANTS)


def compiled_training(bench: Bench) -> list[Row]:
    variants = {
        "bf16 autocast + channels_last (medtune default)": {"bf16": True, "channels_last": True},
        "bf16 + channels_last + torch.compile": {
            "bf16": True,
            "channels_last": True,
            "compiled": True,
        },
    }
    return _train_rows(bench, variants, tag=" [compile run]")


def _train_rows(bench: Bench, variants: dict[str, dict[str, Any]], tag: str = "") -> list[Row]:
    b = bench.spec.batch_size
    flops = step_flops(bench)
    rows = [
        _row(
            "train",
            f"FLOPs of one training step (3 x forward), batch {b}{tag}",
            "GFLOP",
            flops / 1e9,
        )
    ]
    steps, first = {}, {}
    for name, levers in variants.items():
        say(f"train step: {name}")
        steps[name] = train_step(bench, **levers)
        t = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - t
    seconds = interleaved(steps, bench.args.steps)
    for name, s in seconds.items():
        rows.append(
            _row(
                "train",
                name + tag,
                "images/s",
                b / s,
                gflops=flops / s / 1e9,
                first_step_s=first[name],
            )
        )
    return rows


# --------------------------------------------------------------------------- inference


def _u8_batches(cache, batch: int) -> list[torch.Tensor]:  # noqa: ANN001
    return [
        torch.from_numpy(np.array(cache.images[i : i + batch])).permute(0, 3, 1, 2)
        for i in range(0, len(cache), batch)
    ]


def predict_pass(
    bench: Bench, model: nn.Module, batches, *, bf16: bool, cl: bool, tta: str = "none"
) -> tuple[Callable[[], None], dict[str, np.ndarray]]:  # noqa: ANN001
    """One pass of medtune's ``predict_logits`` over ``batches``; its logits land in the dict."""
    from medtune.config import InputSpec
    from medtune.evaluation.inference import predict_logits

    out: dict[str, np.ndarray] = {}

    def run() -> None:
        out["z"] = predict_logits(
            model,
            batches,
            InputSpec(bench.backbone.image_size, bench.backbone.mean, bench.backbone.std),
            bf16=bf16,
            channels_last=cl,
            tta=tta,
        )

    return run, out


def infer_rate(bench: Bench, model: nn.Module, batches, *, bf16: bool, cl: bool, tta="none"):  # noqa: ANN001
    run, out = predict_pass(bench, model, batches, bf16=bf16, cl=cl, tta=tta)
    n = sum(len(b) for b in batches)
    return n / timed(run, repeats=3, warmup=1), out["z"]


def trained_model(bench: Bench) -> tuple[nn.Module, str]:
    """The benchmark's fine-tuned medtune model when ``run.py`` left one, else the fresh one."""
    from medtune.runs import RunFolder

    run = bench.work / "medtune-finetune"
    if (run / "model.json").is_file():
        return RunFolder(run).load_model()[0], "fine-tuned by run.py"
    return bench.model().eval(), "untrained head (run benchmarks/run.py first)"


INFER_VARIANTS = {  # name: (bf16 autocast, channels_last, batch size or None = benchmark's)
    "fp32, contiguous": (False, False, None),
    "fp32, channels_last": (False, True, None),
    "bf16 autocast, contiguous": (True, False, None),
    "bf16 autocast + channels_last (medtune default)": (True, True, None),
    "bf16 autocast + channels_last, batch 8": (True, True, 8),
    "bf16 autocast + channels_last, batch 128": (True, True, 128),
}


def inference_levers(bench: Bench) -> list[Row]:
    """medtune's ``predict_logits`` with each lever, then bf16 weights, all timed round-robin."""
    model, source = trained_model(bench)
    y = bench.val_cache.labels
    n = len(y)
    batches = _u8_batches(bench.val_cache, bench.spec.batch_size)
    passes: dict[str, tuple[Callable[[], None], dict[str, np.ndarray]]] = {}
    for name, (bf16, cl, size) in INFER_VARIANTS.items():
        data = batches if size is None else _u8_batches(bench.val_cache, size)
        passes[name] = predict_pass(bench, copy.deepcopy(model), data, bf16=bf16, cl=cl)
    passes.update(bf16_weight_passes(bench, model, batches))
    passes.update(onnx_passes(bench, batches))
    say(f"inference: {len(passes)} variants, round-robin")
    seconds = interleaved({k: fn for k, (fn, _) in passes.items()}, rounds=3)
    ref = passes["fp32, contiguous"][1]["z"].argmax(1)
    rows = []
    for name, (_, out) in passes.items():
        pred = out["z"].argmax(1)
        rows.append(
            _row(
                "infer",
                name,
                "images/s",
                n / seconds[name],
                val_qwk=qwk(y, pred),
                agree_fp32=float(np.mean(pred == ref)),
            )
        )
    rows[0]["model"] = source
    return rows + tta_levers(bench, model, batches)


def bf16_weight_passes(bench: Bench, model: nn.Module, batches) -> dict[str, tuple]:  # noqa: ANN001
    """Weights cast to bf16 once (no per-op autocast casts), eager and TorchScript-frozen."""
    shift = torch.tensor(bench.backbone.mean).view(1, 3, 1, 1) * 255
    scale = torch.tensor(bench.backbone.std).view(1, 3, 1, 1) * 255
    half = copy.deepcopy(model).eval().to(memory_format=torch.channels_last).bfloat16()

    def inputs(u8: torch.Tensor) -> torch.Tensor:
        x = u8.float().sub_(shift).div_(scale).bfloat16()
        return x.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(
            torch.jit.freeze(torch.jit.trace(copy.deepcopy(half), inputs(batches[0])))
        )
    passes = {}
    for name, net in (("bf16 weights + channels_last", half), ("... + TorchScript freeze", frozen)):
        out: dict[str, np.ndarray] = {}

        def run(net=net, out=out) -> None:  # noqa: ANN001
            with torch.inference_mode():
                out["z"] = torch.cat([net(inputs(b)).float() for b in batches]).numpy()

        passes[name] = (run, out)
    return passes


def onnx_passes(bench: Bench, batches) -> dict[str, tuple]:  # noqa: ANN001
    """The ``medtune export`` ONNX model under ONNX Runtime (fp32), as ``medtune predict --model``
    runs it; only when ``run.py`` left a fine-tuned run to export."""
    from medtune.deploy.onnx_predictor import OnnxPredictor
    from medtune.workflows.export import export

    run = bench.work / "medtune-finetune"
    if not (run / "model.json").is_file():
        return {}
    folder = bench.work / "ablation-onnx"
    shutil.rmtree(folder, ignore_errors=True)
    predictor = OnnxPredictor(export(run, "onnx", folder).model_path)
    images = [b.permute(0, 2, 3, 1).numpy() for b in batches]
    out: dict[str, np.ndarray] = {}

    def run_onnx() -> None:
        out["z"] = np.concatenate([predictor.logits(x) for x in images])

    return {"ONNX Runtime fp32 (medtune export)": (run_onnx, out)}


def compile_inference(bench: Bench) -> list[Row]:
    model, _ = trained_model(bench)
    return compiled_inference(bench, model, _u8_batches(bench.val_cache, bench.spec.batch_size))


def compiled_inference(bench: Bench, model: nn.Module, batches) -> list[Row]:  # noqa: ANN001
    import torch._inductor.config as inductor

    rows = []
    for freezing in (False, True):
        name = "bf16 + channels_last + torch.compile" + (" (freezing)" if freezing else "")
        say(f"inference: {name}")
        inductor.freezing = freezing
        m = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        compiled = torch.compile(m)
        t = time.perf_counter()
        infer_rate_first = infer_rate(bench, compiled, batches[:1], bf16=True, cl=True)
        del infer_rate_first
        compile_s = time.perf_counter() - t
        rate, _ = infer_rate(bench, compiled, batches, bf16=True, cl=True)
        rows.append(_row("infer", name, "images/s", rate, compile_s=compile_s))
    inductor.freezing = False
    return rows


def tta_levers(bench: Bench, model: nn.Module, batches) -> list[Row]:  # noqa: ANN001
    """rot90 TTA three ways, round-robin: medtune's ``predict_logits`` (views made at once, run
    one caller-sized batch at a time), all 4 views in ONE forward (a 4x batch), and a separate
    ``predict_logits`` pass per rotation."""
    from medtune.config import InputSpec
    from medtune.evaluation.inference import predict_logits, tta_views

    n = sum(len(b) for b in batches)
    spec = InputSpec(bench.backbone.image_size, bench.backbone.mean, bench.backbone.std)
    medtune, _ = predict_pass(bench, copy.deepcopy(model), batches, bf16=True, cl=True, tta="rot90")
    big = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    per_view = copy.deepcopy(model)

    def one_forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for u8 in batches:
                big(bench.x(tta_views(u8, "rot90"), True))

    def per_rotation() -> None:
        for k in range(4):
            views = [torch.rot90(b, k, dims=(2, 3)).contiguous() for b in batches]
            predict_logits(per_view, views, spec, bf16=True)

    say("TTA: three ways, round-robin")
    seconds = interleaved({"medtune": medtune, "one": one_forward, "per": per_rotation}, rounds=3)
    return [
        _row(
            "tta",
            "rot90 TTA, medtune predict_logits (views forwarded batch by batch)",
            "images/s",
            n / seconds["medtune"],
        ),
        _row(
            "tta",
            "rot90 TTA, all 4 views in one forward (4x batch)",
            "images/s",
            n / seconds["one"],
        ),
        _row(
            "tta", "rot90 TTA, one predict_logits pass per rotation", "images/s", n / seconds["per"]
        ),
    ]


# --------------------------------------------------------------------------- data loading


def loader_rate(loader, limit: int, step: Callable[[Any], None] | None = None) -> float:  # noqa: ANN001
    """Images/s pulled through ``loader`` (optionally running ``step`` on each batch)."""
    n, t = 0, time.perf_counter()
    for batch in loader:
        if step is not None:
            step(batch)
        n += len(batch[0])
        if n >= limit:
            break
    return n / (time.perf_counter() - t)


def data_levers(bench: Bench) -> list[Row]:
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from medtune.data import CachedImageDataset

    b, rows = bench.spec.batch_size, []
    limit = min(len(bench.train_cache), 8 * b)
    cached = CachedImageDataset(bench.train_cache, rot90=True, seed=0)
    tf = T.Compose([T.Resize(bench.spec.image_size), T.ToTensor()])
    files = ImageFolder(bench.spec.train_dir, transform=tf)
    decode = FundusDecode(bench)
    sources = [
        ("prepared cache (memmap + rot90)", cached),
        ("files: PIL decode + resize + to-tensor", files),
        ("files: decode + fundus crop (what the cache stores)", decode),
    ]
    for name, ds in sources:
        for workers in (0, 2):
            say(f"loader: {name}, {workers} workers")
            loader = DataLoader(ds, batch_size=b, shuffle=True, num_workers=workers)
            rate = loader_rate(loader, limit)
            rows.append(_row("data", f"{name}, num_workers={workers}", "images/s", rate))
    rows += loader_with_training(bench, cached)
    return rows


class FundusDecode(torch.utils.data.Dataset):
    """What an epoch would cost without the prepared cache: decode + fundus crop per item."""

    def __init__(self, bench: Bench) -> None:
        self.set, self.size = bench.train_set, bench.spec.image_size

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from medtune.data.fundus import FundusOptions, preprocess

        arr = preprocess(self.set.load(i, max_side=2 * self.size), self.size, FundusOptions())
        return torch.from_numpy(arr).permute(2, 0, 1), int(self.set.labels[i])


def loader_with_training(bench: Bench, dataset) -> list[Row]:  # noqa: ANN001
    """A medtune training step fed by the cache loader with 0 or 2 workers."""
    from torch.utils.data import DataLoader

    rows = []
    for workers in (0, 2):
        say(f"training fed by the cache loader, {workers} workers")
        model = bench.model().train().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(batch, model=model, opt=opt) -> None:  # noqa: ANN001
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(bench.x(batch[0], True))
            loss = F.cross_entropy(logits.float(), batch[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        loader = DataLoader(
            dataset,
            batch_size=bench.spec.batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=True,
        )
        loader_rate(loader, bench.spec.batch_size, step)  # warm-up (and worker start)
        rate = loader_rate(loader, bench.spec.batch_size * bench.args.steps, step)
        rows.append(
            _row(
                "data",
                f"cache loader + bf16 training step, num_workers={workers}",
                "images/s",
                rate,
            )
        )
    return rows


# --------------------------------------------------------------------------- full runs


def _run(
    bench: Bench, name: str, spec: Spec | None = None, **overrides: Any
) -> tuple[float, float, Path]:
    """``medtune.train`` on the subset; (seconds, argmax val QWK, run folder)."""
    from medtune.workflows.train import train

    spec = spec or bench.spec
    out = bench.work / f"ablation-{name}"
    shutil.rmtree(out, ignore_errors=True)
    settings = {
        "data": spec.train_dir,
        "val_data": spec.val_dir,
        "test_fraction": 0.0,
        "out": str(out),
        "cache_dir": str(bench.work / "cache-ablation"),
        "batch_size": bench.spec.batch_size,
        "image_size": bench.spec.image_size,
        "progress": False,
        **overrides,
    }
    t = time.perf_counter()
    train(**settings)
    seconds = time.perf_counter() - t
    with np.load(out / "val_logits.npz") as npz:
        return seconds, qwk(npz["labels"], npz["logits_none"].argmax(1)), out


def probe_levers(bench: Bench) -> list[Row]:
    """Cached features (cold vs warm) and rotation-augmented probe features."""
    rows = []
    for rotations in (True, False):
        for cache in (bench.train_cache, bench.val_cache):
            shutil.rmtree(Path(cache.dir) / "features", ignore_errors=True)
        tag = "4 rotations" if rotations else "rotation 0 only"
        for state in ("features computed", "features cached"):
            say(f"linear probe: {tag}, {state}")
            s, k, _ = _run(bench, "probe", strategy="linear-probe", probe_rotations=rotations)
            rows.append(
                _row(
                    "probe", f"linear probe, train features {tag}, {state}", "seconds", s, val_qwk=k
                )
            )
    return rows


def probe_quality(bench: Bench) -> list[Row]:
    """Rotation-augmented probe features or not, on a larger subset (QWK is what matters here;
    the second run reuses the rotation-0 features of the first, so its time is not comparable)."""
    spec = copy.deepcopy(bench.spec)
    build_subset(spec, bench.args.large_n, 0.25)
    rows = []
    for rotations in (True, False):
        tag = "4 rotations" if rotations else "rotation 0 only"
        say(f"linear probe on {spec.n_train} + {spec.n_val} images: {tag}")
        s, k, _ = _run(
            bench, "probe-large", spec, strategy="linear-probe", probe_rotations=rotations
        )
        rows.append(
            _row(
                "probe-large",
                f"{spec.n_train} + {spec.n_val} images, train features {tag}",
                "val QWK",
                k,
                seconds=s,
            )
        )
    return rows


def _finetune_rows(bench: Bench, section: str, variants: dict[str, dict[str, Any]]) -> list[Row]:
    """One whole ``medtune.train`` fine-tuning run per variant (overrides of the defaults)."""
    rows = []
    for name, overrides in variants.items():
        say(f"fine-tuning run: {name}")
        s, k, _ = _run(
            bench,
            section,
            strategy="finetune",
            epochs=bench.args.run_epochs,
            early_stopping=None,
            **overrides,
        )
        label = f"fine-tune {bench.args.run_epochs} epochs, {name}"
        rows.append(_row(section, label, "seconds", s, val_qwk=k))
    return rows


PRECISIONS = {  # name: (precision, channels_last)
    "fp32 (precision 32-true), contiguous": ("32-true", False),
    "fp32 (precision 32-true) + channels_last": ("32-true", True),
    "bf16-mixed, contiguous": ("bf16-mixed", False),
    "bf16-mixed + channels_last (medtune default)": ("bf16-mixed", True),
}


def precision_levers(bench: Bench) -> list[Row]:
    """Whole fine-tuning runs: bf16-mixed vs fp32, channels_last on/off (same prepared cache)."""
    variants = {
        name: {"precision": precision, "channels_last": cl}
        for name, (precision, cl) in PRECISIONS.items()
    }
    return _finetune_rows(bench, "run", variants)


RECIPES = {  # name: medtune.train overrides (the rest at medtune's defaults)
    "SGD-Nesterov lr 0.01, nothing frozen (medtune's earlier default)": {
        "optimizer": "sgd",
        "lr": 1e-2,
        "freeze": 0,
    },
    "AdamW lr 2e-3, nothing frozen": {"optimizer": "adamw", "lr": 2e-3, "freeze": 0},
    "AdamW lr 2e-3, first 4 stages frozen": {"optimizer": "adamw", "lr": 2e-3, "freeze": 4},
}


def recipe_levers(bench: Bench) -> list[Row]:
    """Whole fine-tuning runs with the optimiser and the frozen stages changed: time and QWK."""
    return _finetune_rows(bench, "recipe", RECIPES)


SECTIONS: dict[str, Callable[[Bench], list[Row]]] = {
    "train": training_levers,
    "infer": inference_levers,
    "data": data_levers,
    "probe": probe_levers,
    "probe-large": probe_quality,
    "run": precision_levers,
    "recipe": recipe_levers,
    "compile-infer": compile_inference,
    "compile-train": compiled_training,
}


# --------------------------------------------------------------------------- report


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def order(rows: list[Row]) -> list[Row]:
    """Rows in the order of the sections (the peak first)."""
    rank = {name: i for i, name in enumerate(["peak", *SECTIONS])}
    return sorted(rows, key=lambda r: rank.get(r.get("group", ""), 99))


def markdown(rows: list[Row], when: str, machine: str) -> str:
    lines = [BEGIN, f"Measured {when} on {machine}.", ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        part = [r for r in rows if r["section"] == section]
        extra = sorted(
            {k for r in part for k in r} - {"section", "setting", "metric", "value", "group"}
        )
        head = ["setting", "metric", "value", *extra]
        lines += [f"**{section}**", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in part:
            cells = [r["setting"], r["metric"], _cell(r["value"])]
            cells += [_cell(r.get(k, "")) for k in extra]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    rewrite_block(
        path, BEGIN, END, block, "# Performance\n\nGenerated by `python benchmarks/ablation.py`."
    )


def main(argv: list[str] | None = None) -> int:
    from run import machine

    args = parse_args(argv)
    problem = check_data(Path(args.data))
    if problem:
        print(
            f"benchmarks/ablation.py needs the APTOS images: {problem}; pass --data PATH",
            file=sys.stderr,
        )
        return 2
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    spec = Spec(
        data=str(Path(args.data).resolve()),
        work=str(Path(args.work).resolve()),
        n_train=0,
        n_val=0,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )
    Path(spec.work).mkdir(parents=True, exist_ok=True)
    build_subset(spec, args.n_images, 0.25)
    say(f"ablation on {spec.n_train} + {spec.n_val} images, {len(image_files(spec.val_dir))} val")
    bench = Bench(spec, args)
    saved = Path(spec.work) / "ablation-rows.json"
    rows = [dict(r, group="peak") for r in matmul_peak()]
    old = json.loads(saved.read_text()) if saved.is_file() else []
    kept = [r for r in old if r.get("group") != "peak"]  # a later run with --skip keeps these
    for name, section in SECTIONS.items():
        if name not in args.skip:
            kept = [r for r in kept if r.get("group") != name]
            rows += [dict(r, group=name) for r in section(bench)]
            saved.write_text(json.dumps(rows + kept, indent=1))
            write_block(Path(args.out), markdown(order(rows + kept), when, machine()))
            say(f"{name} done")
    rows = order(rows + kept)
    print(json.dumps({"when": when, "machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
