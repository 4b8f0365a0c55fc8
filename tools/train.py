#!/usr/bin/env python3
"""Train QuickNet (arXiv 1701.02291) in PyTorch and export it for qnrt.

PyTorch is a dependency of this tool only; qnrt never imports it.

The PyTorch model is built from models.quicknet.layer_plan (the one layer
table), and `state_to_neutral` maps its state onto the neutral weight names of
models.quicknet.weight_shapes, which `models.quicknet.build` turns into the IR
graph that the .qnb and ONNX exporters write.

    python tools/train.py --dataset digits --epochs 30 --out-npz models/quicknet_digits.npz
    python tools/train.py --dataset cifar10 --data-dir cifar-10-batches-py --epochs 70 \\
        --out-npz quicknet_cifar10.npz --out-qnb quicknet_cifar10.qnb
    # export (or re-export) saved weights without training: evaluates, then writes
    python tools/train.py --dataset digits --epochs 0 --init-npz models/quicknet_digits.npz \\
        --out-qnb models/quicknet_digits.qnb --out-onnx quicknet_digits.onnx
    # Deep Compression stage 1: magnitude pruning with masked fine-tuning
    # (80 % of the 1x1 weights: 99.44 % held-out on digits, 6 epochs)
    python tools/train.py --dataset digits --epochs 0 --init-npz models/quicknet_digits.npz \\
        --prune 0.8 --prune-epochs 6 --out-npz quicknet_digits_pruned.npz

Recipe: Adam (lr 1e-3, cosine decay per step), cross-entropy, dropout 0.5,
batch 64, BN eps 1e-3 and momentum 0.01 (Keras' 0.99), seeded torch / numpy /
random, 2 threads; the epoch with the best held-out accuracy is kept.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import random
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# `python tools/train.py` puts tools/ first on sys.path, where sibling scripts
# (a script named like a stdlib module) would shadow standard-library modules that torch
# imports. Drop it (tools/datasets.py is loaded by path below) and make the
# source tree's models/ and qnrt/ importable.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from qnrt.models.quicknet import BN_EPSILON, layer_plan, weight_shapes  # noqa: E402


def _load_datasets():
    # tools/ is not a package; load tools/datasets.py by path under a private
    # name so it can never collide with a `datasets` distribution.
    name = "qnrt_tools_datasets"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "datasets.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


datasets = _load_datasets()
METADATA = datasets.METADATA
digits_split = datasets.digits_split

BN_MOMENTUM = 0.01  # Keras BatchNormalization(momentum=0.99) in torch's convention


# ----------------------------------------------------------------------------- model
def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPSILON, momentum=BN_MOMENTUM)


class _Stem(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = _bn(cout)
        self.prelu = nn.PReLU(cout)

    def forward(self, x):
        return self.prelu(self.bn(self.conv(x)))


class _Sep(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.dw_bn = _bn(cin)
        self.dw_prelu = nn.PReLU(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_bn = _bn(cout)
        self.pw_prelu = nn.PReLU(cout)

    def forward(self, x):
        x = self.dw_prelu(self.dw_bn(self.dw(x)))
        return self.pw_prelu(self.pw_bn(self.pw(x)))


class _Head(nn.Module):
    def __init__(self, cin, classes, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(cin, classes, 1, bias=True)

    def forward(self, x):
        return self.conv(self.dropout(x)).mean(dim=(2, 3))  # global average pool -> logits


class QuickNet(nn.Module):
    """QuickNet as models.quicknet.layer_plan describes it; forward returns logits."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        self.width, self.num_classes, self.in_channels = float(width), num_classes, in_channels
        layers = nn.ModuleDict()
        for kind, name, cin, cout in layer_plan(width, num_classes, in_channels):
            if kind == "conv":
                layers[name] = _Stem(cin, cout)
            elif kind == "sep":
                layers[name] = _Sep(cin, cout)
            elif kind == "pool":
                layers[name] = nn.MaxPool2d(2, 2)
            elif kind == "head":
                layers[name] = _Head(cin, cout, dropout)
            else:
                raise ValueError(f"layer_plan has an unknown layer kind '{kind}'")
        self.layers = layers

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def neutral_keys(model: QuickNet) -> dict[str, str]:
    """neutral weight name -> key in model.state_dict()."""
    keys = {}
    for key in model.state_dict():
        prefix, layer, sub, param = key.split(".")
        if param == "num_batches_tracked":
            continue
        module = getattr(model.layers[layer], sub)
        if isinstance(module, nn.BatchNorm2d):
            param = _BN_NAMES[param]
        elif isinstance(module, nn.PReLU):
            param = "slope"
        keys[f"{layer}.{sub}.{param}"] = key
    expected = weight_shapes(model.width, model.num_classes, model.in_channels)
    if set(keys) != set(expected):
        raise RuntimeError("torch model and models.quicknet.weight_shapes disagree: "
                           f"{sorted(set(keys) ^ set(expected))[:5]}")
    return keys


def state_to_neutral(model: QuickNet) -> dict[str, np.ndarray]:
    """The model's weights under models.quicknet.weight_shapes' names and shapes
    (BN: scale=weight, bias, mean=running_mean, var=running_var; PReLU slope (C,))."""
    state = model.state_dict()
    expected = weight_shapes(model.width, model.num_classes, model.in_channels)
    keys = neutral_keys(model)
    out = {}
    for name in expected:  # weight_shapes' order
        a = state[keys[name]].detach().cpu().numpy().astype(np.float32)
        out[name] = np.ascontiguousarray(a.reshape(expected[name]))
    return out


def widen_head(weights: dict[str, np.ndarray], num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights of a model with fewer classes, given a head for `num_classes`: the
    old classes keep their rows, the new ones start small and random (so a
    10-class digits model can be fine-tuned into one that also says "not a digit")."""
    w, b = weights["head.conv.weight"], weights["head.conv.bias"]
    old = w.shape[0]
    if old == num_classes:
        return weights
    if old > num_classes:
        raise ValueError(f"the weights have {old} classes, more than the {num_classes} wanted")
    rng = np.random.default_rng(seed)
    out = dict(weights)
    extra = rng.normal(0.0, float(w.std()), (num_classes - old,) + w.shape[1:]).astype(np.float32)
    out["head.conv.weight"] = np.concatenate([w, extra])
    out["head.conv.bias"] = np.concatenate([b, np.full(num_classes - old, float(b.mean()), np.float32)])
    return out


def load_neutral(model: QuickNet, weights: dict[str, np.ndarray]) -> None:
    """Copy neutral weights (e.g. from an .npz) into the model, checking names and shapes."""
    expected = weight_shapes(model.width, model.num_classes, model.in_channels)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"weights do not fit QuickNet width {model.width:g} with "
                         f"{model.num_classes} classes: missing {missing[:3]}, unexpected {extra[:3]}")
    state = model.state_dict()
    for name, key in neutral_keys(model).items():
        a = np.asarray(weights[name])
        if tuple(a.shape) != tuple(expected[name]):
            raise ValueError(f"weight '{name}' has shape {tuple(a.shape)}, QuickNet width "
                             f"{model.width:g} needs {tuple(expected[name])} (wrong --width?)")
        with torch.no_grad():
            state[key].copy_(torch.from_numpy(a.astype(np.float32)).reshape(state[key].shape))


def save_npz(weights: dict[str, np.ndarray], path: str) -> None:
    """Write neutral weights as .npz atomically (temp file in the same folder, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- pruning
def conv_weights(model: QuickNet, which: str = "all") -> dict[str, torch.nn.Parameter]:
    """Convolution weights by parameter name: "all" (stem, depthwise, pointwise,
    head) or "1x1" (pointwise and head: about 99 % of QuickNet's weights)."""
    out = {}
    for n, p in model.named_parameters():
        module = model.get_submodule(n.rsplit(".", 1)[0])
        if n.endswith(".weight") and isinstance(module, nn.Conv2d):
            if which == "all" or module.kernel_size == (1, 1):
                out[n] = p
    return out


def magnitude_masks(model: QuickNet, sparsity: float, which: str = "all") -> dict[str, torch.Tensor]:
    """Per layer: a 0/1 mask that zeroes the sparsity * n smallest-magnitude weights."""
    masks = {}
    for name, p in conv_weights(model, which).items():
        flat = p.detach().abs().flatten()
        k = min(flat.numel() - 1, int(round(sparsity * flat.numel())))
        if k > 0:
            threshold = torch.kthvalue(flat, k).values
            masks[name] = (p.detach().abs() > threshold).to(p.dtype)
        else:
            masks[name] = torch.ones_like(p)
    return masks


def apply_masks(model: QuickNet, masks: dict[str, torch.Tensor] | None) -> None:
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def conv_sparsity(model: QuickNet, which: str = "all") -> float:
    """Fraction of zeros among the convolution weights."""
    ws = list(conv_weights(model, which).values())
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def cubic_sparsity(target: float, progress: float) -> float:
    """Gradual pruning schedule (Zhu & Gupta, 2017): 0 at progress 0, target at 1."""
    return target * (1.0 - (1.0 - min(1.0, max(0.0, progress))) ** 3)


@torch.no_grad()
def recalibrate_bn(model: QuickNet, images, batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running mean/variance on `images` (PIL, no
    augmentation) as an exact average. Pruning shifts the activation statistics
    far faster than a 0.01 momentum follows."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, len(images), batch_size):
        model(torch.from_numpy(datasets.to_array(images[i:i + batch_size])))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


# ----------------------------------------------------------------------------- training
class Progress:
    """A one-line progress bar on stderr, updated with \\r."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.t0 = time.time()

    def update(self, done: int, loss: float, acc: float) -> None:
        n = 24
        fill = int(n * done / max(1, self.total))
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (n - fill)}] {done}/{self.total} "
                          f"loss {loss:.4f} acc {100 * acc:5.1f}% {time.time() - self.t0:5.1f}s")
        self.stream.flush()

    def finish(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(100) + "\n")
        self.stream.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: QuickNet, x: np.ndarray, y: np.ndarray, batch: int = 250) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        yb = torch.from_numpy(y[i:i + batch])
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / max(1, len(x)), loss / max(1, len(x))


def run_epochs(model, phase, epochs, data, args, rng, lr, masks_at=None, before_eval=None,
               on_epoch=None):
    """Train `epochs` epochs with Adam and a per-step cosine decay from `lr`.

    masks_at(step, total) -> masks or None: called before every step; the masks are applied after every
    optimizer step. before_eval() runs before each held-out evaluation;
    on_epoch(epoch, accuracy, loss) gets each epoch's held-out result.
    """
    train_images, train_labels, test_x, test_y = data
    n = len(train_images)
    steps_per_epoch = max(1, math.ceil(n / args.batch_size))
    total = steps_per_epoch * epochs
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step = 0
    masks = None
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(n)
        bar = Progress(f"{phase} {epoch}/{epochs}", steps_per_epoch)
        seen = correct = 0
        loss_sum = 0.0
        t0 = time.time()
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            if masks_at:
                new = masks_at(step, total)
                if new is not masks:
                    masks = new
                    apply_masks(model, masks)
            images = [datasets.augment(args.dataset, train_images[i], rng) for i in idx]
            xb = torch.from_numpy(datasets.to_array(images))
            yb = torch.as_tensor([train_labels[i] for i in idx], dtype=torch.long)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            apply_masks(model, masks)
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            bar.update(b + 1, loss_sum / seen, correct / seen)
        if before_eval:
            before_eval()
        acc, heldout_loss = evaluate(model, test_x, test_y)
        extra = f" | conv sparsity {100 * conv_sparsity(model):.1f}%" if masks else ""
        bar.finish(f"{phase} {epoch}/{epochs}: loss {loss_sum / max(1, seen):.4f} "
                   f"train acc {100 * correct / max(1, seen):.2f}% | held-out acc {100 * acc:.2f}% "
                   f"loss {heldout_loss:.4f}{extra} | {time.time() - t0:.1f}s")
        if on_epoch:
            on_epoch(epoch, acc, heldout_loss)


def heldout_description(dataset: str, n: int) -> str:
    if dataset == "digits":
        return (f"sklearn load_digits, stratified {int(100 * datasets.DIGITS_TEST_FRACTION)} % "
                f"held out, random_state {datasets.DIGITS_SPLIT_SEED} ({n} images)")
    return f"CIFAR-10 test_batch ({n} images)"


def export(neutral: dict[str, np.ndarray], *, width: float, labels: list[str], dataset: str,
           accuracy: float, heldout: str, out_qnb: str | None = None, out_onnx: str | None = None,
           extra_metadata: dict | None = None):
    """Build the IR graph from neutral weights, attach metadata, write .qnb / .onnx.

    The writers are imported here, lazily, so training works without them."""
    from qnrt.models.quicknet import build

    graph = build(neutral, width=width, num_classes=len(labels), labels=list(labels),
                  input_size=None)  # fully convolutional: any H, W
    graph.metadata.update(copy.deepcopy(datasets.metadata_for(dataset)))
    graph.metadata.update({
        "model.dataset": dataset,
        "model.trained": True,
        "model.accuracy": float(accuracy),  # fraction of the held-out images, 0..1
        "model.heldout": heldout,
    })
    graph.metadata.update(extra_metadata or {})
    written = []
    if out_onnx:  # ONNX keeps batch norm and PReLU as their own nodes
        from qnrt.exporters.onnx_export import save_onnx
        _atomic(lambda p: save_onnx(graph, p), out_onnx)
        written.append(out_onnx)
    if out_qnb:  # .qnb gets them folded, so the device maps the weights it runs
        from qnrt.exporters.convert import finalize
        from qnrt.format import save
        finalize(graph)
        _atomic(lambda p: save(graph, p), out_qnb)
        written.append(out_qnb)
    return graph, written


def _atomic(write, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=Formatter)
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits",
                   help="scikit-learn's bundled digits, or CIFAR-10 from --data-dir")
    p.add_argument("--data-dir", help="CIFAR-10 python-batch directory (cifar-10-batches-py)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (0: evaluate/export only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed per step")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and random")
    p.add_argument("--limit", type=int, help="use only the first N training images (tests)")
    p.add_argument("--init-npz", help="start from these neutral weights (.npz)")
    p.add_argument("--prune", type=float, metavar="SPARSITY",
                   help="magnitude-prune each conv layer to this fraction of zeros (0..1), gradually, "
                        "with masked fine-tuning after training (Deep Compression stage 1)")
    p.add_argument("--prune-epochs", type=int, default=6,
                   help="fine-tune epochs for --prune: the first 2/3 ramp the sparsity up")
    p.add_argument("--prune-all", action="store_true",
                   help="prune the 3x3 stem and depthwise convs too (default: only the 1x1 "
                        "pointwise and head convs, about 99 %% of the weights)")
    p.add_argument("--prune-lr", type=float, help="learning rate for the pruning fine-tune (default lr/2)")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="which epoch's weights to keep: the best on the held-out images, or the "
                        "last (the held-out digits are only a part of what is trained on)")
    p.add_argument("--out-npz", help="write the best neutral weights here (.npz)")
    p.add_argument("--out-qnb", help="write the trained model as .qnb (qnrt.format)")
    p.add_argument("--out-onnx", help="write the trained model as ONNX (exporters.onnx_export)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    if args.prune is not None and not 0.0 <= args.prune < 1.0:
        p.error("--prune takes a sparsity in [0, 1)")
    if args.width <= 0:
        p.error("--width must be positive")
    if args.epochs < 0 or args.batch_size < 1:
        p.error("--epochs must be >= 0 and --batch-size >= 1")
    if args.prune is not None and args.prune_epochs < 1:
        p.error("--prune-epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()

    train_images, train_labels, test_images, test_labels, labels = datasets.load(args.dataset, args.data_dir)
    if args.limit is not None:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    test_x = datasets.to_array(test_images)
    test_y = np.asarray(test_labels, dtype=np.int64)
    data = (train_images, train_labels, test_x, test_y)
    print(f"{args.dataset}: {len(train_images)} training images, {len(test_y)} held out, "
          f"{len(labels)} classes; width {args.width:g}", file=sys.stderr)

    model = QuickNet(args.width, num_classes=len(labels))
    if args.init_npz:
        load_neutral(model, widen_head(load_npz(args.init_npz), len(labels), args.seed))
        print(f"initial weights from {args.init_npz}", file=sys.stderr)
    n_params = sum(int(np.prod(s)) for s in weight_shapes(args.width, len(labels)).values())
    print(f"{n_params:,} parameters (BN statistics included)", file=sys.stderr)

    best = {"acc": -1.0, "loss": math.inf, "state": None, "epoch": None}

    def consider(tag, acc, loss):
        if args.keep == "last" or acc > best["acc"] or (acc == best["acc"] and loss < best["loss"]):
            best.update(acc=acc, loss=loss, state=copy.deepcopy(model.state_dict()), epoch=tag)
            if args.out_npz:
                save_npz(state_to_neutral(model), args.out_npz)
            return True
        return False

    if args.epochs > 0:
        run_epochs(model, "epoch", args.epochs, data, args, rng, args.lr,
                   on_epoch=lambda e, acc, loss: consider(f"epoch {e}", acc, loss))
    else:
        acc, loss = evaluate(model, test_x, test_y)
        print(f"held-out acc {100 * acc:.2f}% loss {loss:.4f}", file=sys.stderr)
        consider("initial", acc, loss)

    extra_meta = {}
    if args.prune is not None:
        # Deep Compression stage 1: start from the best model, raise the per-layer
        # magnitude sparsity gradually over the first 2/3 of the fine-tune steps
        # (masks recomputed every step), then fine-tune with the masks held fixed
        # (at the latest for the last step). Only epochs that end at the target
        # sparsity can be kept.
        model.load_state_dict(best["state"])
        best.update(acc=-1.0, loss=math.inf, state=None, epoch=None)
        # BN statistics are re-estimated on one fixed rendering of the training
        # items, so they describe what training draws.
        calib_rng = np.random.default_rng(args.seed + 1)
        calibration = [datasets.augment(args.dataset, im, calib_rng) for im in train_images]
        which = "all" if args.prune_all else "1x1"
        fixed = {}

        def masks_at(step, total):
            ramp = math.ceil(2 * total / 3)
            if step >= min(ramp, total - 1):
                if "masks" not in fixed:
                    fixed["masks"] = magnitude_masks(model, args.prune, which)
                return fixed["masks"]
            return magnitude_masks(model, cubic_sparsity(args.prune, step / ramp), which)

        run_epochs(model, "prune", args.prune_epochs, data, args, rng,
                   args.prune_lr or args.lr / 2.0, masks_at=masks_at,
                   before_eval=lambda: recalibrate_bn(model, calibration, args.batch_size),
                   on_epoch=lambda e, acc, loss: "masks" in fixed and consider(f"prune epoch {e}", acc, loss))
        if best["state"] is None:
            raise RuntimeError("pruning never reached the target sparsity")

    model.load_state_dict(best["state"])
    neutral = state_to_neutral(model)
    if args.out_npz:
        save_npz(neutral, args.out_npz)
    if args.prune is not None:
        extra_meta["model.sparsity"] = conv_sparsity(model)  # zeros among all conv weights
    elapsed = time.time() - t_start
    summary = (f"kept: held-out accuracy {100 * best['acc']:.2f}% ({best['epoch']}) "
               f"on {len(test_y)} images; {elapsed:.0f}s")
    if "model.sparsity" in extra_meta:
        summary += f"; conv sparsity {100 * extra_meta['model.sparsity']:.1f}%"
    print(summary)
    if args.out_npz:
        print(f"wrote {args.out_npz}")

    if args.out_qnb or args.out_onnx:
        try:
            _, written = export(neutral, width=args.width, labels=labels, dataset=args.dataset,
                                accuracy=best["acc"], heldout=heldout_description(args.dataset, len(test_y)),
                                out_qnb=args.out_qnb, out_onnx=args.out_onnx, extra_metadata=extra_meta)
        except ImportError as exc:
            print(f"train.py: cannot export yet ({exc}); the weights are saved"
                  + (f" in {args.out_npz}; re-export with --epochs 0 --init-npz {args.out_npz}"
                     if args.out_npz else ""), file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
