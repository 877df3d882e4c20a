"""Warm start: a new generation's model from its parent.

Every tensor of the parent except the output layer is copied, with its shape
checked. The output layer is replaced by a randomly initialised one sized for the
new class list. Optionally the output rows of classes that exist in both
generations are carried over, matched by class name (never by index).

Optionally the copied body is shrunk and perturbed (Ash & Adams 2020, "On
warm-starting neural network training"): each parameter becomes
`shrink * parent + perturb * fresh`, with `fresh` the new model's own random
initialisation. A warm-started network tends to stay near its parent's optimum
and generalise worse than a fresh one trained on all the data; shrinking
restores the effective learning rate of normalised layers and the noise lets it
leave that optimum, while most of what the parent learned is kept.

Or the copied body is shrunk by direction (DASH: Shin, Oh, Cho and Yun,
"Warm-Starting Neural Network Training in Stationary Settings without Loss of
Plasticity", NeurIPS 2024; their code: baekrok/DASH-Direction-Aware-SHrinking):
once, before training on the grown library, each filter is scaled by the cosine
between its weights and the negative gradient of the loss on the training
images, clamped to [lambda, 1], so weights that the new data pulls elsewhere
(memorised) shrink and those it agrees with stay (`dash`). `WARM_METHOD` picks
"copy" (the practitioner's), "shrink_perturb" or "dash"; `train` applies DASH once
the run's data is loaded (it needs the gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import classifier_keys, create_model, load_generation
from .workspace import Workspace, ZoolibError


def _mismatch(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    return f"{len(keys)} {what}: {shown}"


def transfer_body(parent: torch.nn.Module, child: torch.nn.Module) -> list[str]:
    """Copy every non-classifier tensor of `parent` into `child`.

    Returns:
        The state_dict keys copied.

    Raises:
        ZoolibError: the body keys or shapes differ (e.g. another architecture);
            the message names the offending keys.
    """
    p_state, c_state = parent.state_dict(), child.state_dict()
    p_body = {k: v for k, v in p_state.items() if k not in set(classifier_keys(parent))}
    c_body = {k for k in c_state if k not in set(classifier_keys(child))}
    problems = []
    if missing := sorted(c_body - set(p_body)):
        problems.append(_mismatch("keys missing from the parent", missing))
    if extra := sorted(set(p_body) - c_body):
        problems.append(_mismatch("parent keys the new model lacks", extra))
    shapes = [f"{k} {tuple(p_body[k].shape)}->{tuple(c_state[k].shape)}"
              for k in sorted(c_body & set(p_body)) if p_body[k].shape != c_state[k].shape]
    if shapes:
        problems.append(_mismatch("tensors with another shape", shapes))
    if problems:
        raise ZoolibError("cannot warm-start: the parent's body does not fit the new model; "
                          + "; ".join(problems))
    with torch.no_grad():
        for k in p_body:
            c_state[k].copy_(p_body[k])
    return sorted(p_body)


def shrink_perturb(child: torch.nn.Module, fresh: dict[str, torch.Tensor], keys: list[str],
                   shrink: float, perturb: float) -> int:
    """`shrink * copied + perturb * fresh` for the learnable tensors among `keys`.

    Buffers (batch-norm statistics, counters) are left as copied, and so are
    parameters that the run keeps fixed (`requires_grad` off: the airbench recipe's
    whitening layer and batch-norm scales), which could never train back.

    Returns:
        The number of tensors changed.
    """
    params = dict(child.named_parameters())
    changed = 0
    with torch.no_grad():
        for k in keys:
            if k in params and params[k].requires_grad:
                params[k].mul_(shrink).add_(fresh[k].to(params[k].dtype), alpha=perturb)
                changed += 1
    return changed


def carry_head_rows(parent: torch.nn.Module, parent_classes: list[str],
                    child: torch.nn.Module, child_classes: list[str]) -> list[str]:
    """Copy output-layer rows of classes present in both lists, matched by name.

    Returns:
        The class names whose rows were carried.
    """
    p_state, c_state = parent.state_dict(), child.state_dict()
    shared = [c for c in child_classes if c in parent_classes]
    with torch.no_grad():
        for key in classifier_keys(child):
            for cls in shared:
                c_state[key][child_classes.index(cls)] = p_state[key][parent_classes.index(cls)]
    return shared


def warm_start(ws: Workspace, parent_name: str, arch: str, classes: list[str],
               carry_rows: bool = False, shrink: float = 1.0, perturb: float = 0.0,
               fix=None) -> tuple[torch.nn.Module, dict]:
    """Build a model for `classes` from a saved parent generation.

    Args:
        ws: the workspace.
        parent_name: an existing generation name.
        arch: the architecture of the new model; must be the parent's.
        classes: the new ordered class list.
        carry_rows: also copy the output rows of shared classes (off by default:
            the practitioner's recipe re-initialises the whole output layer).
        shrink, perturb: shrink-and-perturb of the copied body (1.0 and 0.0: a
            plain copy).
        fix: called with the new model before the copy: turns off `requires_grad`
            of what the run keeps fixed (those are copied, never shrunk).

    Returns:
        The model and a record for model.json (parent, transferred, head_init).

    Raises:
        ZoolibError: missing parent, another architecture, or body mismatch.
    """
    parent, p_info = load_generation(ws, parent_name)
    if p_info["arch"] != arch:
        raise ZoolibError(f"cannot warm-start a {arch} from {parent_name}, which is a "
                          f"{p_info['arch']}: set ARCH={p_info['arch']!r} or INIT_FROM='scratch'")
    # the parent's constructor arguments: its body (and head layout) is what is kept
    child = create_model(arch, len(classes), **(p_info.get("model_args") or {}))
    if fix is not None:
        fix(child)
    perturbed = shrink != 1.0 or perturb != 0.0
    fresh = {k: v.clone() for k, v in child.state_dict().items()} if perturbed else {}
    copied = transfer_body(parent, child)
    if perturbed:
        shrink_perturb(child, fresh, copied, shrink, perturb)
    carried = carry_head_rows(parent, p_info["classes"], child, classes) if carry_rows else []
    record = {
        "parent": parent_name,
        "init": "warm",
        "head_init": "random" + (f", rows carried for {len(carried)} classes" if carried else ""),
        "transferred_tensors": len(copied),
        "transferred_params": int(sum(parent.state_dict()[k].numel() for k in copied)),
        "head_keys": classifier_keys(child),
        "carried_classes": carried,
        "shrink": float(shrink), "perturb": float(perturb),
        "model_args": dict(p_info.get("model_args") or {}),
        "classes_added": [c for c in classes if c not in p_info["classes"]],
        "classes_removed": [c for c in p_info["classes"] if c not in classes],
    }
    return child, record


def dash(model: nn.Module, batches, lam: float = 0.3) -> int:
    """DASH: shrink each filter of the body by its agreement with the new data's gradient.

    The gradient is of plain cross-entropy, in eval mode (batch-norm running
    statistics, as their code), averaged over `batches` with each image weighted
    the same (their code keeps an average with weight 0.3 on the newest chunk of a
    stream; a library has no arrival order, so the grown training set counts as
    one). Then, for each convolution, the cosine between weights and negative
    gradient over each kernel (one scale per output x input channel), for each
    linear layer per output row, for a bias over the whole vector; the weights are
    multiplied by the cosine clamped to [lam, 1]. The output layer (new, random)
    and batch norm are left as they are, and so are frozen tensors (the whitening
    layer).

    Args:
        model: the warm-started model (body copied, new head).
        batches: iterable of (images, labels) over the training images, unaugmented.
        lam: the smallest scale (their lambda: 0.3).

    Returns:
        The number of tensors scaled.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = [p for m in layers for p in (m.weight, m.bias)
              if p is not None and p.requires_grad and id(p) not in head]
    grads = _mean_gradient(model, params, batches)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.mul_(_dash_scale(p, -g, lam).to(p.dtype))
    return len(params)


def _mean_gradient(model: nn.Module, params: list[torch.Tensor], batches) -> list[torch.Tensor]:
    """The loss's gradient for `params`, averaged over the images of `batches`, in eval mode."""
    was_training, total = model.training, [torch.zeros_like(p) for p in params]
    model.eval()
    seen = 0
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():  # plain tensors: fastai's types refuse F.cross_entropy
                logits = model(x).as_subclass(torch.Tensor).float()
                F.cross_entropy(logits, y.as_subclass(torch.Tensor), reduction="sum").backward()
            for t, p in zip(total, params):
                t.add_(p.grad)
            seen += len(y)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not seen:
        raise ZoolibError("DASH needs training images to measure the gradient: none were given")
    return [t / seen for t in total]


def _dash_scale(w: torch.Tensor, direction: torch.Tensor, lam: float) -> torch.Tensor:
    """clamp(cos(w, direction), lam, 1), shaped to multiply `w` (see `dash`)."""
    if w.dim() == 4:  # (out, in, kh, kw): one cosine per kernel
        cos = F.cosine_similarity(direction.flatten(2), w.flatten(2), dim=-1)[..., None, None]
    elif w.dim() == 2:  # (out, in): one per output row
        cos = F.cosine_similarity(direction, w, dim=-1)[:, None]
    else:  # a bias: one for the layer
        cos = F.cosine_similarity(direction.flatten(), w.flatten(), dim=0)
    return cos.clamp(lam, 1.0)
