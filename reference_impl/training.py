"""Train, validate and evaluate the weld-defect classifier.

Chapter: "The production loop" (train) and "Retraining". Training is the first stage of the loop and it is run
again and again: the same function trains the first champion and every challenger, so a retrained model differs
only in its data, never in how it was prepared.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import FolderDataset, WeldImages
from .model import (  # preprocess_batch is re-exported: labs import it from here
    ModelSpec,
    PreprocessSpec,
    build_model,
    preprocess_batch,
    resolve_device,
    seed_everything,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    The defaults train the champion from scratch: on 2,000 baseline radiographs they reach about 99% on the golden
    set in well under a minute on 2 cores. Fewer steps leave a model that is still converging (6 epochs of 64 gave
    95-97%), and such a model moves a lot under any later fine-tune: every retrained challenger would then gamble
    with the evaluation gate. :func:`fine_tune_config` gives the challenger's settings.

    ``distill`` (fine-tuning only): weight of the loss that keeps the model's outputs on the *rehearsal* images
    close to those of the model it starts from ("learning without forgetting"); ``distill_temperature`` softens
    both distributions so the loss also preserves how sure the old model was, not only its top class.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    width: int = 16
    augment: bool = True
    distill: float = 0.0
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0; got {self}")
        if self.distill < 0 or self.distill_temperature <= 0:
            raise ValueError(f"distill must be >= 0 and distill_temperature > 0; got {self}")
        if not (
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and leave some data for training")


def fine_tune_config(**overrides: Any) -> TrainConfig:
    """The challenger's recipe (chapter: "Retraining"): fine-tune the champion gently, and keep what it knew.

    - a small learning rate (a tenth of training from scratch) over a few epochs: the champion's weights are
      already good, a large step would throw away what they encode;
    - distillation on the rehearsal images (``distill=3``): on the old line the challenger is asked to answer like
      the champion, so the new condition is learned without forgetting the old one. Without it, which golden
      images of a class the challenger loses is decided by the CPU's floating-point kernels (measured:
      ``python -m benchmarks robustness``).

    ``overrides`` change any field, e.g. ``fine_tune_config(seed=1, device="cpu")``.
    """
    return TrainConfig(**{"epochs": 4, "lr": 5e-4, "distill": 3.0, **overrides})


@dataclass
class TrainResult:
    """What a training run produces: the model plus everything a bundle must record about it."""

    model: Any
    model_spec: ModelSpec
    preprocess: PreprocessSpec
    classes: tuple[str, ...]
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    config: TrainConfig = field(default_factory=TrainConfig)


def split_indices(n: int, seed: int, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Shuffle once by seed and cut into train / val / test: the same seed always gives the same split."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def fit_preprocess_spec(images: np.ndarray | Sequence[np.ndarray], size: tuple[int, int] = (64, 64)) -> PreprocessSpec:
    """Normalisation statistics from the *training* images (never from validation or test data)."""
    stats = PreprocessSpec(size=size, mean=(0.0,), std=(1.0,))
    x = preprocess_batch(images, stats)
    return PreprocessSpec(size=size, mean=(round(float(x.mean()), 4),), std=(round(float(x.std()), 4),))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support, and the confusion matrix (rows = true class)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        predicted, actual = int(cm[:, i].sum()), int(cm[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        "accuracy": float((y_true == y_pred).mean()) if y_true.size else 0.0,
        "n": int(y_true.size),
        "per_class": per_class,
        "macro_f1": float(np.mean([m["f1"] for m in per_class.values()])) if per_class else 0.0,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Eval-mode logits in batches; autocast (mixed precision) only on CUDA, where it pays off."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                outs.append(model(xb).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(
    model: nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    spec: PreprocessSpec,
    classes: Sequence[str],
    device: str = "auto",
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled images, preprocessed with ``spec``."""
    dev = resolve_device(device)
    model.to(dev)
    logits = predict_logits(model, preprocess_batch(images, spec), dev)
    return classification_metrics(np.asarray(labels), logits.argmax(1).numpy(), classes)


def _flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """Which images of a batch to mirror. Horizontal flips are the only augmentation: a weld looks the same from
    either end, while other changes (blur, brightness) are exactly the drift we want monitoring, not training, to
    reveal."""
    import torch

    return torch.rand(n, generator=gen) < 0.5


def _selection_accuracy(pred: torch.Tensor, truth: torch.Tensor, groups: list[torch.Tensor] | None) -> float:
    """Validation accuracy that decides which epoch is kept: plain, or the mean over ``groups`` (boolean masks)."""
    if not len(truth):
        return float("nan")
    correct = (pred == truth).float()
    if not groups:
        return float(correct.mean())
    return float(sum(float(correct[g].mean()) for g in groups) / len(groups))


def _distillation(logits: torch.Tensor, target: torch.Tensor, temperature: float, batch: int) -> torch.Tensor:
    """KL divergence from the starting model's softened answers to the student's (Hinton et al. 2015), scaled by
    T^2 so its gradients weigh the same whatever the temperature, and averaged over the whole batch so a batch
    with few rehearsal images pulls proportionally less."""
    import torch.nn.functional as F

    t = temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.softmax(target.float() / t, 1), reduction="sum")
    return kl * t * t / batch


def train_model(
    data: WeldImages | FolderDataset,
    config: TrainConfig | None = None,
    *,
    init_state: dict | None = None,
    preprocess: PreprocessSpec | None = None,
    rehearsal: Sequence[bool] | np.ndarray | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train from scratch (or from ``init_state``, for fine-tuning a challenger) and evaluate on the test split.

    The model with the best validation accuracy is kept (early-stopping style), so an unlucky last epoch does
    not become the shipped model.

    Fine-tuning (``init_state`` given): pass the starting model's ``preprocess`` spec, because its weights were
    trained on inputs normalised with exactly those statistics (re-fitting them on data with new-camera images
    in it would shift every old image the champion knew). ``rehearsal`` marks the images of the old data (one
    bool per image); with ``config.distill > 0`` their outputs are kept close to the starting model's.

    ``progress=True`` shows a progress bar (epochs, validation accuracy, time left): a widget in a notebook, a line
    on stderr in a terminal (``tqdm.auto`` picks). Training the labs' baseline takes about a minute on one core,
    and a silent cell that long looks hung.
    """
    import torch
    from torch import nn

    config = config or TrainConfig()
    start = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    labels = np.asarray(data.labels)
    splits = split_indices(len(labels), config.seed, config.val_fraction, config.test_fraction)

    def take(idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
        if isinstance(data.images, np.ndarray):
            return data.images[idx]
        return [data.images[i] for i in idx]

    size = tuple(data.images.shape[-2:]) if isinstance(data.images, np.ndarray) else (64, 64)
    spec = preprocess or fit_preprocess_spec(take(splits["train"]), size=size)  # type: ignore[arg-type]
    x = {name: preprocess_batch(take(idx), spec) for name, idx in splits.items()}
    y = {name: torch.from_numpy(labels[idx]) for name, idx in splits.items()}

    model_spec = ModelSpec(num_classes=len(data.classes), in_channels=spec.channels, width=config.width)
    model = build_model(model_spec)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    # Distillation targets: the starting model's logits on every rehearsal training image, computed once, for the
    # image as it is and mirrored (the only augmentation), so each step picks the target of what it trains on.
    mask = None if rehearsal is None else np.asarray(rehearsal, dtype=bool)
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"rehearsal needs one flag per image ({labels.size}); got shape {mask.shape}")
    keep: torch.Tensor | None = None
    targets: tuple[torch.Tensor, torch.Tensor] | None = None
    if config.distill > 0 and mask is not None:
        if init_state is None:
            raise ValueError("distillation keeps a model close to the one it starts from: pass init_state too")
        keep = torch.from_numpy(mask[splits["train"]])
        targets = (
            predict_logits(model, x["train"], device),
            predict_logits(model, x["train"].flip(-1), device),
        )
    # Which epoch to keep. From scratch: the best validation accuracy. Fine-tuning with rehearsal: the validation
    # split is mostly old images (2,000 rehearsal vs a few hundred new labels), so plain accuracy barely notices
    # whether the new condition was learnt; the mean of the old and the new images' accuracy weighs both jobs
    # equally. (`python -m benchmarks robustness` records each run's per-epoch validation history.)
    val_groups = None
    if mask is not None:
        old_val = torch.from_numpy(mask[splits["val"]])
        val_groups = [g for g in (old_val, ~old_val) if bool(g.any())]
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(y["train"]) / config.batch_size)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    best_state, best_val = None, -1.0
    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs, desc="training", unit="epoch", disable=not progress)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(y["train"]), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = x["train"][idx], y["train"][idx]
            flip = _flips(len(idx), gen) if config.augment else torch.zeros(len(idx), dtype=torch.bool)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            xb, yb = xb.to(device), yb.to(device)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                logits = model(xb)
                loss = loss_fn(logits, yb)
                if targets is not None and keep is not None and bool(keep[idx].any()):
                    old = keep[idx]
                    target = torch.where(flip[:, None], targets[1][idx], targets[0][idx])[old].to(device)
                    loss = loss + config.distill * _distillation(
                        logits[old], target, config.distill_temperature, len(idx)
                    )
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
        val_acc = _selection_accuracy(predict_logits(model, x["val"], device).argmax(1), y["val"], val_groups)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(y["train"]), "val_accuracy": val_acc})
        log.info("epoch %d: loss %.4f, val accuracy %.4f", epoch + 1, history[-1]["loss"], val_acc)
        bar.set_postfix(val_accuracy=f"{val_acc:.3f}")
        bar.update()
        if not val_acc <= best_val:  # also true for NaN (no validation split): keep the latest
            best_val = val_acc
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    bar.close()
    assert best_state is not None
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    test_metrics = classification_metrics(
        y["test"].numpy(), predict_logits(model, x["test"], torch.device("cpu")).argmax(1).numpy(), data.classes
    )
    test_metrics["val_accuracy"] = best_val
    return TrainResult(
        model=model,
        model_spec=model_spec,
        preprocess=spec,
        classes=tuple(data.classes),
        metrics=test_metrics,
        history=history,
        splits=splits,
        seconds=time.perf_counter() - start,
        config=config,
    )


def save_metrics(result: TrainResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json`` (with the training config and history) and ``confusion_matrix.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    payload = {"test": result.metrics, "history": result.history, "config": asdict(result.config),
               "train_seconds": round(result.seconds, 2)}  # fmt: skip
    metrics_path.write_text(json.dumps(payload, indent=2))
    plot_path = plot_confusion(result.metrics, out / "confusion_matrix.png")
    return {"metrics": metrics_path, "confusion_matrix": plot_path}


def plot_confusion(metrics: dict[str, Any], path: str | Path) -> Path:
    """A confusion-matrix heat map with counts: where does the model confuse which defect?"""
    from reference_impl import figures

    title = f"test accuracy {metrics['accuracy']:.3f} (n={metrics['n']})"
    return figures.save(figures.confusion_matrix(metrics["confusion_matrix"], metrics["classes"], title), path)
