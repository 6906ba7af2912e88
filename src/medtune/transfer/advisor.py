"""The transfer-strategy advisor: pure decision logic over measured evidence.

Two questions pick one of four scenarios:

1. small & similar   -> ``linear-probe`` on the last stage (backbone frozen);
2. large & similar   -> ``finetune`` with the first stages frozen and a low backbone LR;
3. small & different -> ``layer-probe`` on the best EARLIER stage;
4. large & different -> ``finetune`` of everything from the pretrained weights, higher backbone LR.

Size (defaults are parameters of :func:`decide`): a set is *large* when it has at least
``min_total`` = 5000 images AND its median class has at least ``min_median_per_class`` = 1000.
Reasoning: ImageNet itself has ~1300 images per class, so ~1000 per class is the density at which
the pretrained layers were learned; Kaggle DR (~35k images, median grade ~2.4k) is the regime
where full fine-tuning is standard practice, while APTOS (3.7k), Messidor (1.2k) and IDRiD (0.5k)
fall below and are where frozen-feature probes are competitive and far less prone to
over-fitting. The median (not the minimum) is used so one rare grade (DR grade 4 is ~2% of
EyePACS) does not make a 35k-image set "small"; the minimum is still reported.

Similarity to ImageNet combines two measurements:

- label-free: the pretrained ImageNet classifier's mean prediction entropy (normalised by
  log 1000) on the target images, compared with the same figure on natural photographs (the lead
  measures it on scikit-image's sample photos; typical defaults are used otherwise). A gap of
  ``entropy_margin`` = 0.15 is ~1 nat for 1000 classes, i.e. the classifier hesitates between
  ~2.8x more classes than on natural photos. A mean top-1 probability gap, when given, is
  averaged in.
- label-based: whether an earlier stage's probe beats the last stage's by ``layer_margin``
  (0.02 in balanced accuracy / QWK, about the noise of a few-hundred-image validation set). When
  it does, the high-level ImageNet features are less useful than mid-level ones: "different".
  When the last stage wins by the margin: "similar". This evidence is measured on the target task
  itself, so it decides when it is conclusive; the entropy decides otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medtune.errors import MedtuneError

TYPICAL_NATURAL_ENTROPY = 0.25
"""Fallback normalised entropy of an ImageNet classifier on natural photos (used if unmeasured)."""
TYPICAL_NATURAL_MAX_PROB = 0.55
"""Fallback mean top-1 probability on natural photos (used if unmeasured)."""

STRATEGIES = {1: "linear-probe", 2: "finetune", 3: "layer-probe", 4: "finetune"}

StageScore = tuple[str, float | None, float | None]


@dataclass
class SimilarityEvidence:
    """Label-free similarity figures from the pretrained ImageNet classifier.

    ``entropy``: mean normalised prediction entropy on the target images (0..1);
    ``reference_entropy``: the same on natural photographs; ``max_prob`` /
    ``reference_max_prob``: mean top-1 probability on each (optional). NCE/LEEP are reported only.
    """

    entropy: float | None = None
    reference_entropy: float | None = None
    max_prob: float | None = None
    reference_max_prob: float | None = None
    nce: float | None = None
    leep: float | None = None


@dataclass
class Advice:
    """The advisor's decision; ``freeze`` counts leading stages (stem first) kept frozen."""

    scenario: int
    strategy: str
    stage: str | None
    freeze: int
    backbone_lr_mult: float
    reasons: dict[str, str]
    size: str = ""
    similar: bool = True
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- size


def assess_size(
    n_per_class: Mapping[Any, int], *, min_total: int = 5000, min_median_per_class: int = 1000
) -> tuple[bool, str]:
    """``(is_large, reason)`` from image counts per class (count images, not rotated copies)."""
    counts = np.array([int(v) for v in n_per_class.values()])
    if counts.size == 0 or counts.sum() == 0:
        raise MedtuneError("no labelled images were given to the advisor; check the data folder")
    total, median, smallest = int(counts.sum()), float(np.median(counts)), int(counts.min())
    large = total >= min_total and median >= min_median_per_class
    reason = (
        f"{total} images in {counts.size} classes (median {median:g}, smallest {smallest} per "
        f"class) is {'large' if large else 'small'}: large needs >= {min_total} images and a "
        f"median class of >= {min_median_per_class}."
    )
    return large, reason


# ------------------------------------------------------------------------------- similarity


def _ranking_key(score: StageScore) -> tuple[float, float]:
    _, lm, probe = score
    return (-np.inf if probe is None else probe, -np.inf if lm is None else lm)


def _use_probe(stage_scores: Sequence[StageScore]) -> bool:
    return all(s[2] is not None for s in stage_scores)


def best_earlier_stage(stage_scores: Sequence[StageScore], tie_tol: float = 0.005) -> StageScore:
    """Best stage before the last: highest probe score, LogME breaks ties within ``tie_tol``.

    Falls back to LogME alone when probe scores are missing; the last stage if there is only one.
    """
    earlier = list(stage_scores[:-1]) or list(stage_scores)
    if not _use_probe(earlier):
        return max(earlier, key=lambda s: -np.inf if s[1] is None else s[1])
    top = max(s[2] for s in earlier)  # type: ignore[type-var]
    tied = [s for s in earlier if s[2] >= top - tie_tol]  # type: ignore[operator]
    return max(tied, key=lambda s: _ranking_key(s)[::-1])  # LogME first, then probe score


def layer_vote(
    stage_scores: Sequence[StageScore], layer_margin: float = 0.02, logme_margin: float = 0.1
) -> tuple[bool | None, float, str]:
    """``(different?, delta, reason)``: delta = best earlier score minus last-stage score.

    True when an earlier stage wins by ``layer_margin``, False when the last wins by it, None
    (inconclusive) in between or with fewer than two stages. Falls back to LogME (per-sample
    nats, margin ``logme_margin``; a rough value, LogME gaps between stages are less calibrated)
    when any probe score is missing.
    """
    if len(stage_scores) < 2:
        return None, 0.0, "only one stage was scored, so layer depth gives no evidence"
    use_probe = _use_probe(stage_scores)
    idx, what, margin = (
        (2, "probe score", layer_margin) if use_probe else (1, "LogME", logme_margin)
    )
    if not use_probe and any(s[1] is None for s in stage_scores):
        return None, 0.0, "stages were scored neither by probe nor by LogME"
    best = best_earlier_stage(stage_scores)
    last = stage_scores[-1]
    delta = float(best[idx]) - float(last[idx])  # type: ignore[arg-type]
    vote = True if delta >= margin else (False if delta <= -margin else None)
    verdict = {True: "beats", False: "trails", None: "ties with"}[vote]
    reason = (
        f"earlier stage {best[0]} {verdict} the last stage {last[0]} by {what} "
        f"({delta:+.3f}, margin {margin:g})"
    )
    return vote, delta, reason


def entropy_vote(
    sim: SimilarityEvidence, entropy_margin: float = 0.15
) -> tuple[bool | None, float | None, str]:
    """``(different?, gap, reason)`` from the ImageNet classifier's uncertainty on the images."""
    gaps = []
    parts = []
    assumed = False
    for value in (sim.entropy, sim.reference_entropy, sim.max_prob, sim.reference_max_prob):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"similarity figures must be normalised to 0..1, got {value}")
    if sim.entropy is not None:
        ref = sim.reference_entropy
        assumed |= ref is None
        ref = TYPICAL_NATURAL_ENTROPY if ref is None else ref
        gaps.append(sim.entropy - ref)
        parts.append(f"normalised entropy {sim.entropy:.2f} vs {ref:.2f} on natural photos")
    if sim.max_prob is not None:
        ref = sim.reference_max_prob
        assumed |= ref is None
        ref = TYPICAL_NATURAL_MAX_PROB if ref is None else ref
        gaps.append(ref - sim.max_prob)
        parts.append(f"mean top-1 probability {sim.max_prob:.2f} vs {ref:.2f}")
    if not gaps:
        return None, None, "no ImageNet-classifier uncertainty was measured"
    gap = float(np.mean(gaps))
    vote = gap >= entropy_margin
    reason = (
        f"the ImageNet classifier is {'much less' if vote else 'about as'} certain here "
        f"({'; '.join(parts)}; gap {gap:+.2f}, margin {entropy_margin:g}"
        f"{', reference values assumed' if assumed else ''})"
    )
    return vote, gap, reason


def assess_similarity(
    sim: SimilarityEvidence,
    stage_scores: Sequence[StageScore],
    *,
    entropy_margin: float = 0.15,
    layer_margin: float = 0.02,
    logme_margin: float = 0.1,
) -> tuple[bool, str, dict[str, Any]]:
    """``(is_similar, reason, evidence)``: a conclusive layer vote decides, else the entropy."""
    lv, delta, l_reason = layer_vote(stage_scores, layer_margin, logme_margin)
    ev, gap, e_reason = entropy_vote(sim, entropy_margin)
    evidence = {
        "layer_vote_different": lv,
        "layer_delta": delta,
        "entropy_vote_different": ev,
        "entropy_gap": gap,
    }
    if lv is not None:
        different, source = lv, "the layer evidence decides"
    elif ev is not None:
        different, source = ev, "the layer evidence is inconclusive, so the entropy decides"
    else:
        different, source = delta > 0, "no conclusive evidence; sign of the layer difference used"
    label = "different from" if different else "similar to"
    reason = f"Images look {label} ImageNet: {e_reason}; {l_reason}; {source}."
    return not different, reason, evidence


# ----------------------------------------------------------------------------------- decide


def decide(
    n_per_class: Mapping[Any, int],
    similarity: SimilarityEvidence,
    stage_scores: Sequence[StageScore],
    n_stages: int,
    *,
    min_total: int = 5000,
    min_median_per_class: int = 1000,
    entropy_margin: float = 0.15,
    layer_margin: float = 0.02,
    logme_margin: float = 0.1,
    freeze_similar: int = 2,
    lr_mult_similar: float = 0.1,
    lr_mult_different: float = 0.5,
) -> Advice:
    """Pick the transfer scenario.

    ``stage_scores``: ``(stage, logme, probe_score)`` per stage in forward order, the LAST entry
    being the backbone's last stage (either score may be None). ``n_stages``: stages in the
    backbone (stem included), used for freezing counts.
    """
    if not stage_scores:
        raise ValueError("stage_scores must hold at least the last stage")
    large, size_reason = assess_size(
        n_per_class, min_total=min_total, min_median_per_class=min_median_per_class
    )
    similar, sim_reason, evidence = assess_similarity(
        similarity,
        stage_scores,
        entropy_margin=entropy_margin,
        layer_margin=layer_margin,
        logme_margin=logme_margin,
    )
    scenario = {(False, True): 1, (True, True): 2, (False, False): 3, (True, False): 4}[
        (large, similar)
    ]
    stage, freeze, lr, stage_reason, freeze_reason, lr_reason = _details(
        scenario, stage_scores, n_stages, freeze_similar, lr_mult_similar, lr_mult_different
    )
    size_word = "large" if large else "small"
    sim_word = "similar" if similar else "different"
    reasons = {
        "size": size_reason,
        "similarity": sim_reason,
        "scenario": f"A {size_word} data set of {sim_word} images is scenario {scenario} "
        f"({STRATEGIES[scenario]}).",
        "stage": stage_reason,
        "freeze": freeze_reason,
        "lr": lr_reason,
    }
    return Advice(
        scenario=scenario,
        strategy=STRATEGIES[scenario],
        stage=stage,
        freeze=freeze,
        backbone_lr_mult=lr,
        reasons=reasons,
        size=size_word,
        similar=similar,
        evidence=evidence,
    )


def _details(
    scenario: int,
    stage_scores: Sequence[StageScore],
    n_stages: int,
    freeze_similar: int,
    lr_similar: float,
    lr_different: float,
) -> tuple[str | None, int, float, str, str, str]:
    """Stage, freeze count, backbone LR multiplier and their one-sentence reasons."""
    probe_freeze = (
        "The whole backbone stays frozen; only the linear head is trained on cached features."
    )
    probe_lr = "The backbone is not trained (LR multiplier 0)."
    if scenario == 1:
        stage = stage_scores[-1][0]
        return (
            stage,
            n_stages,
            0.0,
            f"Probe the last stage {stage}: its high-level ImageNet features suit similar images.",
            probe_freeze,
            probe_lr,
        )
    if scenario == 3:
        best = best_earlier_stage(stage_scores)
        return (
            best[0],
            n_stages,
            0.0,
            f"Probe earlier stage {best[0]} (probe score {_fmt(best[2])}, LogME "
            f"{_fmt(best[1])}): mid-level features transfer better to unlike images.",
            probe_freeze,
            probe_lr,
        )
    if scenario == 2:
        k = max(0, min(freeze_similar, n_stages - 1))
        return (
            None,
            k,
            lr_similar,
            "Fine-tune the whole network; no single stage is chosen.",
            f"Freeze the first {k} stage(s): generic low-level filters need no change for "
            "similar images.",
            f"Backbone LR x{lr_similar:g}: small steps keep the useful pretrained features.",
        )
    return (
        None,
        0,
        lr_different,
        "Fine-tune the whole network; no single stage is chosen.",
        "Freeze nothing: every stage may need to adapt to unlike images.",
        f"Backbone LR x{lr_different:g}: pretrained weights are only a starting point here, "
        "so they may move further.",
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------ table


def format_table(
    results: Mapping[str, Sequence[tuple[str, int, float | None, float | None]]],
    advice: Mapping[str, Advice] | None = None,
) -> str:
    """Plain-text table: one block per backbone, one row per stage.

    ``results``: ``{backbone: [(stage, channels, logme, probe_score), ...]}`` in forward order.
    The best probe score per backbone is marked ``*``; the advised stage (if any) ``<``.
    """
    header = f"{'backbone':<20} {'stage':<16} {'channels':>8} {'LogME':>9} {'probe':>7}  "
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for backbone, rows in results.items():
        probes = [r[3] for r in rows if r[3] is not None]
        best = max(probes) if probes else None
        chosen = advice[backbone].stage if advice and backbone in advice else None
        for i, (stage, channels, lm, probe) in enumerate(rows):
            mark = ("*" if best is not None and probe == best else " ") + (
                "<" if stage == chosen else ""
            )
            name = backbone if i == 0 else ""
            lines.append(
                f"{name:<20} {stage:<16} {channels:>8d} {_cell(lm, 9, 3)} "
                f"{_cell(probe, 7, 3)} {mark}".rstrip()
            )
    lines.append("* best probe score per backbone; < advised stage")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
