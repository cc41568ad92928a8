"""Batched inner loops for plain MLPs: batched matmuls with a hand-written backward.

The fast path of backend "torch" (and the core that ``reptile_fast.compiled_step`` reuses) for
models that ``reptile_fast.mlp_spec.extract_mlp_spec`` accepts: chains of ``nn.Linear`` layers
and tanh / relu / sigmoid / identity activations.  All ``T`` tasks' parameters live in one flat
buffer (``StackedMLP``: per layer a ``[T, out, in]`` weight view and a ``[T, out]`` bias view),
and one inner step of every task is a handful of ``torch.baddbmm`` / ``torch.bmm`` calls plus
elementwise ops, with no autograd graph and no ``vmap`` dispatch:

    forward   z_l = h_l W_lᵀ + b_l  (baddbmm; addcmul when d_l = 1)      h_{l+1} = act_l(z_l)
    loss      MSE: mean over all B·d_L elements;  cross-entropy: mean over the B rows
    backward  g_L = dloss/dz_L  (the formulas of aten's mse_loss / nll_loss / log_softmax backward)
              dW_l = g_lᵀ h_l,  db_l = Σ_rows g_l,  g_{l-1} = act'(g_l W_l)   (bmm, aten *_backward)
    update    SGD fused into the backward matmuls: W ← W − lr·gᵀh as ``W.baddbmm_(gᵀ, h, alpha=-lr)``
              (no weight gradient is written; biases and weights with one input or one output
              feature as SGD's ``add_(grad, alpha=-lr)``: see ``_run_backward_sgd``); with Adam or ``grad_weights``
              the gradients go to a flat buffer and ``flat.add_(grad_flat, alpha=-lr)`` /
              ``optimizer.step`` apply them

The floating-point operations are the reference backend's (``F.linear``, ``aten::tanh_backward``,
``aten::mse_loss_backward``'s ``norm · (pred − y)``, ``_log_softmax_backward_data``, SGD's
``p + (−lr)·g`` as one fused multiply-add) except for three documented differences: the order of
the additions inside a matrix product (MKL picks different kernels for one ``[B, in]`` matrix and
a batch of them); the fused SGD update of a wide weight does not round ``gᵀh`` before the
multiply-add (≤ 1 ulp of lr·g); and, by default on CPU for plain SGD Reptile, tanh computed as
2·σ(2z) − 1 (``fast_tanh``: ``torch.tanh`` is a scalar loop on CPU and would cost more than all the
matrix products at large meta-batches; the two agree to ≤ 1.8e-7 (1.5 ulp(1)) absolute in fp32; with Adam,
FOMAML or ``grad_weights`` that absolute error showed in the results: see ``default_fast_tanh``).  Adapted parameters
agree with the reference backend within the project's rtol 1e-5 / atol 1e-6, and both sit
equally close to a float64 run (tests/test_backend_torch.py; over 160 inner steps
tests/test_review_qa23.py).

Large meta-batches: ``task_block`` runs the plain-SGD inner loops over blocks of tasks (even
sizes, ≥ 2 tasks) whose weights fit an L2 cache (``default_task_block``: 2 MiB of per-task state,
63 tasks of the sine MLP), copying φ into each block just before it runs (``init=``); the results
are bitwise those of all tasks at once.  At meta-batch 4096 the stacked weights (71 MB for the
sine MLP) otherwise stream through memory at every product: measured 0.60× the meta-batch-256
rate unblocked, 1.03× blocked (bench/results/large_meta_batch_cpu.json).

Shapes used throughout: ``T`` tasks, ``R`` plan rows (inner steps, plus one for FOMAML), ``S``
inner updates, ``B`` points per minibatch, ``dims = (d_0, …, d_L)`` the layer sizes.

Example (one meta-batch of SGD inner loops, as ``TorchBackend`` runs it)::

    spec = extract_mlp_spec(model)
    params = stack_mlp_params(spec, dict(model.named_parameters()), T)   # flat [T · n_params]
    xs, ys = gather_minibatches(tasks.x, tasks.y, indices)              # [R, T, B, d_0], ...
    out = mlp_inner_loop(spec, params, xs, ys, lr=0.02, loss="mse")
    out.params.named()   # name -> adapted [T, *shape];  out.losses: [T, S]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..mlp_math import ACTIVATIONS, FAST_LOSSES, output_grad
from ..mlp_spec import MLPSpec

__all__ = ["StackedMLP", "MLPInnerOutput", "gather_minibatches", "stack_mlp_params", "mlp_forward",
           "mlp_inner_loop", "default_fast_tanh", "default_task_block", "TASK_BLOCK_BYTES", "FAST_LOSSES",
           "fused_one_output_update"]



def gather_minibatches(x: torch.Tensor, y: torch.Tensor,
                       indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every plan row's minibatch, step-major so that each step's slice is contiguous.

    Args:
        x: ``[T, N, *in_shape]`` task inputs.
        y: ``[T, N, *out_shape]`` float targets or ``[T, N]`` long labels.
        indices: long ``[T, R, B]`` plan.

    Returns:
        ``xs [R, T, B, *in_shape]`` and ``ys [R, T, B, *out_shape]`` (``[R, T, B]`` for labels).
    """
    # Data is data: a task tensor that requires grad must not reach the hand-written backward's
    # out= ops (autograd refuses them); nothing differentiates through the tasks.
    x, y = x.detach(), y.detach()
    T = x.shape[0]
    rows = torch.arange(T, device=x.device).view(1, T, 1)
    # a contiguous plan first: the gathered tensors' layout follows the plan's strides, and the
    # batched products then summed in another order (a transposed plan's result differed by a
    # rounding step from the same values laid out plainly: QA46)
    plan = indices.contiguous().transpose(0, 1)  # [R, T, B]
    return x[rows, plan], y[rows, plan]


class StackedMLP:
    """``T`` tasks' copies of an MLP's parameters in one flat buffer.

    The buffer is laid out tensor by tensor (``W_0, b_0, W_1, b_1, …``), each block holding all
    ``T`` tasks' copies contiguously, so that every per-layer view is a contiguous batch for
    ``bmm`` and a whole optimizer step is one elementwise op on ``flat``.

    Attributes:
        flat: ``[T · n_params]``.
        weights: ``L`` views ``[T, d_{l+1}, d_l]``.
        biases: ``L`` views ``[T, d_{l+1}]``.
    """

    def __init__(self, spec: MLPSpec, flat: torch.Tensor, n_tasks: int):
        self.spec, self.flat, self.n_tasks = spec, flat, n_tasks
        self.weights: List[torch.Tensor] = []
        self.biases: List[torch.Tensor] = []
        off = 0
        for l in range(spec.n_layers):
            d_in, d_out = spec.dims[l], spec.dims[l + 1]
            self.weights.append(flat[off:off + n_tasks * d_out * d_in].view(n_tasks, d_out, d_in))
            off += n_tasks * d_out * d_in
            self.biases.append(flat[off:off + n_tasks * d_out].view(n_tasks, d_out))
            off += n_tasks * d_out

    @classmethod
    def empty(cls, spec: MLPSpec, n_tasks: int, *, dtype=None, device=None) -> "StackedMLP":
        return cls(spec, torch.empty(n_tasks * spec.n_params, dtype=dtype, device=device), n_tasks)

    def block(self, start: int, stop: int) -> "StackedMLP":
        """Tasks ``start … stop − 1`` as views into this one (for running the inner loop over
        blocks of tasks).  A block has no ``flat`` buffer (its tensors are not one contiguous
        range), so only the fused-SGD inner loop runs on it."""
        if not 0 <= start < stop <= self.n_tasks:
            raise ValueError(f"task block [{start}, {stop}) is outside [0, {self.n_tasks})")
        out = StackedMLP.__new__(StackedMLP)
        out.spec, out.flat, out.n_tasks = self.spec, None, stop - start
        out.weights = [w[start:stop] for w in self.weights]
        out.biases = [b[start:stop] for b in self.biases]
        return out

    def zeros_like(self) -> "StackedMLP":
        return StackedMLP(self.spec, torch.zeros_like(self.flat), self.n_tasks)

    def named(self) -> Dict[str, torch.Tensor]:
        """name -> view, with the model's parameter names (weights first, then biases)."""
        return dict(zip(self.spec.weight_names + self.spec.bias_names, self.weights + self.biases))


def stack_mlp_params(spec: MLPSpec, params: Mapping[str, torch.Tensor], n_tasks: int) -> StackedMLP:
    """Per-task copies of an MLP's parameters, ready for ``mlp_inner_loop`` to update in place.

    Args:
        spec: the model's ``MLPSpec``.
        params: name -> tensor, ``[out, in]`` / ``[out]`` (e.g. ``dict(model.named_parameters())``),
            or already stacked ``[T, out, in]`` / ``[T, out]``.
        n_tasks: ``T``.

    Returns:
        A ``StackedMLP`` in fresh memory, detached from ``params``.
    """
    first = params[spec.weight_names[0]]
    out = StackedMLP.empty(spec, n_tasks, dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for dst, name in zip(out.weights + out.biases, spec.weight_names + spec.bias_names):
            dst.copy_(params[name].detach().expand(dst.shape))
    return out


@dataclass
class MLPInnerOutput:
    """What ``mlp_inner_loop`` returns.

    Attributes:
        params: the adapted parameters (the ``StackedMLP`` given, updated in place).
        losses: ``[T, S]`` minibatch loss of each inner step, before that step's update.
        meta_grads: the FOMAML gradient at the adapted weights on the last plan row, or
            Σ_s w_s g_s for ``grad_weights``, in the same layout; None when neither was asked for.
    """

    params: StackedMLP
    losses: torch.Tensor
    meta_grads: Optional[StackedMLP] = None


def _tanh_via_sigmoid_(z2: torch.Tensor) -> torch.Tensor:
    """tanh(z) = 2·σ(2z) − 1, in place on ``z2 = 2z``; within 1.8e-7 (absolute, 1.5 ulp(1)) of ``torch.tanh``
    in fp32.

    ``torch.tanh`` runs a scalar loop on CPU (about 9× slower than the vectorised sigmoid), and at
    large meta-batches it costs more than the matrix products.  Doubling is exact in floating
    point, so the matmul producing ``z`` produces ``2z`` instead (alpha = beta = 2) for free.
    """
    return z2.sigmoid_().mul_(2.0).sub_(1.0)


def _activation_(name: str, z: torch.Tensor, fast_tanh: bool) -> torch.Tensor:
    """``act(z)`` in place on ``z`` (a fresh matmul output; ``2z`` for tanh when ``fast_tanh``)."""
    if name == "tanh" and fast_tanh:
        return _tanh_via_sigmoid_(z)
    return ACTIVATIONS[name].forward_(z)


def _activation_backward(name: str, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dloss/dz from dloss/dact and the activation's output, as autograd computes it."""
    return ACTIVATIONS[name].backward(grad, out)


def default_fast_tanh(device, plain_sgd: bool = True) -> bool:
    """Whether tanh goes through the sigmoid by default: on CPU only (GPUs keep ``torch.tanh``),
    and only for a plain SGD Reptile inner loop (``plain_sgd``: no Adam, FOMAML or ``grad_weights``).

    2σ(2z) − 1 is within ~ulp(1) of tanh in *absolute* terms, not relative ones: for small
    activations it keeps fewer bits than ``torch.tanh``.  In a plain SGD inner loop that error
    enters as lr·δg, far below the rounding of the parameters themselves, and the adapted
    parameters sit as close to a float64 run as the reference backend's in every dtype.  Where
    the gradients reach the result without that rounding — Adam's per-element g/√v, FOMAML's
    meta-gradient, Σ w_s g_s — they sat 10-30% farther from float64 than the reference's on most
    seeds (float32 and bfloat16; bench/results/numerics_grid_cpu.json), so those use ``torch.tanh``.
    """
    return torch.device(device).type == "cpu" and plain_sgd


def _forward_layers(spec: MLPSpec, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                    fast_tanh: bool) -> list:
    """Per layer ``(Wᵀ [T, in, out], b [T, 1, out], activation, scale)``: views made once per
    inner loop (they follow in-place updates of the weights)."""
    return [(W.transpose(1, 2), b.unsqueeze(1), act, 2.0 if fast_tanh and act == "tanh" else 1.0)
            for W, b, act in zip(weights, biases, spec.activations)]


def _run_forward(layers: list, x: torch.Tensor, fast_tanh: bool):
    """Forward through ``_forward_layers``: the output and every layer's input (``[x, h_1, …]``)."""
    hs = [x]
    h = x
    for Wt, b, act, scale in layers:
        # scale · F.linear(h, W, b); scale 2 (exact) feeds _tanh_via_sigmoid_ its 2z.
        if Wt.shape[1] == 1:
            # One input feature: an outer product; bmm with K = 1 is several times slower.
            z = torch.addcmul(b, h, Wt)
            if scale != 1.0:
                z.mul_(scale)
        else:
            z = torch.baddbmm(b, h, Wt, beta=scale, alpha=scale)
        h = _activation_(act, z, fast_tanh)
        hs.append(h)
    return h, hs[:-1]


def mlp_forward(spec: MLPSpec, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                x: torch.Tensor, *, fast_tanh: Optional[bool] = None, keep: bool = False):
    """Batched forward pass of ``T`` MLPs.

    Args:
        spec: the layer layout.
        weights, biases: ``[T, d_{l+1}, d_l]`` / ``[T, d_{l+1}]`` per layer (any strides).
        x: ``[T, B, d_0]``.
        fast_tanh: tanh through the sigmoid (``default_fast_tanh`` when None).
        keep: also return the activations the backward pass needs.

    Returns:
        The output ``[T, B, d_L]``; with ``keep``, ``(output, hs)`` where ``hs[l]`` is the input
        of layer ``l`` (``hs[0] = x``).
    """
    if fast_tanh is None:
        fast_tanh = default_fast_tanh(x.device)
    out, hs = _run_forward(_forward_layers(spec, weights, biases, fast_tanh), x, fast_tanh)
    return (out, hs) if keep else out


def _output_grad(loss: str, out: torch.Tensor, y: torch.Tensor, save: Optional[torch.Tensor]) -> torch.Tensor:
    """dloss/dout ``[T, B, d_L]`` for one minibatch, as autograd computes it.

    ``out``: ``[T, B, d_L]``; ``y``: ``[T, B, d_L]`` float targets (MSE) or ``[T, B]`` labels.
    ``save`` (``[T, B, d_L]``) receives what the step's loss is computed from afterwards:
    ``out − y`` for MSE, the log-probabilities for cross-entropy.
    """
    if save is None:
        return output_grad(loss, out, y)
    if loss == "mse":
        diff = torch.sub(out, y, out=save)
        # aten::mse_loss_backward: (2 / numel) · (input − target) · grad_output(=1)
        return diff * (2.0 / (out.shape[1] * out.shape[2]))
    logp = torch.log_softmax(out, -1, out=save)
    # nll_loss_backward writes −1/total_weight at the target; then log_softmax's backward.
    grad_logp = torch.zeros_like(logp).scatter_(-1, y.unsqueeze(-1), -1.0 / out.shape[1])
    return torch._log_softmax_backward_data(grad_logp, logp, -1, out.dtype)


def _losses_from(loss: str, saved: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Per-step losses ``[T, S]`` from what ``_output_grad`` saved: ``saved [S, T, B, d_L]``."""
    if loss == "mse":
        return saved.square().mean(dim=(2, 3)).t()
    picked = saved.gather(-1, ys.unsqueeze(-1))  # [S, T, B, 1] log-probabilities of the labels
    return picked.sum(dim=(2, 3)).neg_().div_(saved.shape[2]).t()


def _backward_layers(spec: MLPSpec, params: StackedMLP, grads: StackedMLP) -> list:
    """Per layer, from the last: ``(l, W, dW out-view, db out, weight-grad-transposed)``, views
    made once per inner loop."""
    layers = []
    for l in range(spec.n_layers - 1, -1, -1):
        gW = grads.weights[l]
        # One input feature: compute (hᵀ g)ᵀ, as bmm with N = 1 is far slower than with M = 1.
        transposed = spec.dims[l] == 1
        out = gW.view(gW.shape[0], 1, gW.shape[1]) if transposed else gW
        layers.append((l, params.weights[l], out, grads.biases[l], transposed))
    return layers


def _run_backward(layers: list, acts: Sequence[str], hs, out: torch.Tensor, g: torch.Tensor) -> None:
    """All layers' gradients into the out-views of ``_backward_layers`` from dloss/dout ``g``."""
    if acts[-1] != "identity":
        g = _activation_backward(acts[-1], g, out)
    for l, W, gW, gb, transposed in layers:
        h = hs[l]
        if transposed:
            torch.bmm(h.transpose(1, 2), g, out=gW)
        else:
            torch.bmm(g.transpose(1, 2), h, out=gW)
        torch.sum(g, 1, out=gb)
        if l > 0:
            # dloss/dh = g W; with one output feature an outer product (exactly a K = 1 product).
            gh = g * W if W.shape[1] == 1 else torch.bmm(g, W)
            g = _activation_backward(acts[l - 1], gh, h)


def _sgd_layers(spec: MLPSpec, params: StackedMLP) -> list:
    """Per layer, from the last: ``(l, W, W update-view, transposed, b as [T, 1, out])`` for
    ``_run_backward_sgd``."""
    T = params.n_tasks
    layers = []
    for l in range(spec.n_layers - 1, -1, -1):
        W, b = params.weights[l], params.biases[l]
        transposed = spec.dims[l] == 1  # see _backward_layers
        layers.append((l, W, W.view(T, 1, W.shape[1]) if transposed else W, transposed,
                       b.view(T, 1, b.shape[1])))
    return layers


#: True only inside ``fused_one_output_update()``: a one-output-feature layer's SGD step fused into
#: its product like a wide layer's (the form before session 17)
_FUSED_ONE_OUTPUT_UPDATE = False


@contextlib.contextmanager
def fused_one_output_update():
    """Within this context, the plain-SGD step of a layer with one output feature is fused into its
    one-row weight-gradient product (``W.baddbmm_(gᵀ, h, alpha=-lr)``) as before session 17, which
    rounds ``-lr·(gᵀh)`` before the add: for ``bench.numerics_per_layer --fused-output-update``'s
    comparison only (``_run_backward_sgd`` explains why it is not the default)."""
    global _FUSED_ONE_OUTPUT_UPDATE
    before, _FUSED_ONE_OUTPUT_UPDATE = _FUSED_ONE_OUTPUT_UPDATE, True
    try:
        yield
    finally:
        _FUSED_ONE_OUTPUT_UPDATE = before


def _run_backward_sgd(layers: list, acts: Sequence[str], hs, out: torch.Tensor, g: torch.Tensor,
                      lr: float) -> None:
    """Backward pass fused with the SGD step: ``W ← W − lr·(gᵀh)`` inside the matmul
    (``baddbmm_``, alpha = −lr) for a weight with more than one input and more than one output
    feature, and, as ``torch.optim.SGD``'s ``add_(grad, alpha=-lr)``, ``b ← b − lr·Σ_rows g`` and the
    update of a weight with one input feature (a ``[1, B] @ [B, out]`` product) or one output
    feature (``gᵀh``: a ``[1, B] @ [B, in]`` product).

    Each layer's update comes after the gradient it passes down was computed from its
    pre-update weights.  No weight gradient of a wide layer is written: at large meta-batches
    this halves the memory traffic of a step.  (Compared with ``torch.optim.SGD``'s ``add_`` the
    product's sum is not rounded before the update: a difference of ≤ 1 ulp of lr·grad.)  The
    one-row products are not fused: MKL's ``baddbmm_`` with ``alpha`` on a ``[T, 1, B] @ [T, B,
    out]`` product was up to ~3 ulps of the *parameter* from the exact update (measured 2.2e-7
    for values in [-1, 1], against 6.5e-8 for ``add_``), so after 160 inner steps (the seed's
    evaluation) the sine MLP's biases sat 2-3x farther from a float64 run than the reference's.
    The output layer of one feature (the sine MLP's 64 -> 1) had stayed fused: on an AMD EPYC (torch
    2.14.1) its adapted weights sat 2.5x farther from float64 than the reference's, and FOMAML's
    meta-gradients of the hidden layers, computed through them, 1.2-1.5x (QA31's 1.28x); unfused,
    every layer's ratio is 0.87-1.02 over 32 seeds (bench/results/numerics_per_layer_cpu_amd_epyc*.json,
    bench/results/numerics_grid_cpu_amd_epyc*.json).
    """
    if acts[-1] != "identity":
        g = _activation_backward(acts[-1], g, out)
    neg_lr = -lr
    for l, W, W_upd, transposed, b in layers:
        h = hs[l]
        g_next = None
        if l > 0:
            gh = g * W if W.shape[1] == 1 else torch.bmm(g, W)
            g_next = _activation_backward(acts[l - 1], gh, h)
        if transposed:
            W_upd.add_(torch.bmm(h.transpose(1, 2), g), alpha=neg_lr)
        elif W_upd.shape[1] == 1 and not _FUSED_ONE_OUTPUT_UPDATE:  # one output feature: gᵀh is one row too
            W_upd.add_(torch.bmm(g.transpose(1, 2), h), alpha=neg_lr)
        else:
            W_upd.baddbmm_(g.transpose(1, 2), h, alpha=neg_lr)
        b.add_(torch.sum(g, 1, keepdim=True), alpha=neg_lr)
        g = g_next


#: bytes of per-task state (weights + one step's activations) that one block of tasks may hold:
#: about an L2 cache (measured best on the 2-core EPYC: 64 tasks of the sine MLP, 2 MB).  At meta-batch 4096 the sine MLP's stacked weights (71 MB) stream through
#: memory at every matrix product; in blocks they stay in cache for all the block's inner steps.
TASK_BLOCK_BYTES = 2 << 20


def default_task_block(spec: MLPSpec, batch: int, element_size: int = 4) -> int:
    """Tasks per block for ``mlp_inner_loop(task_block=...)``: as many as fit ``TASK_BLOCK_BYTES``
    (weights and one inner step's activations and gradients), at least 16 (with 4-byte elements:
    63 for the sine MLP 1-64-64-1 at minibatch 10)."""
    per_task = element_size * (spec.n_params + 3 * batch * sum(spec.dims))
    return max(16, TASK_BLOCK_BYTES // per_task)


def mlp_inner_loop(spec: MLPSpec, params: StackedMLP, xs: torch.Tensor, ys: torch.Tensor, *,
                   lr: float, loss: str = "mse", fomaml: bool = False,
                   grad_weights: Optional[Sequence[float]] = None, fast_tanh: Optional[bool] = None,
                   optimizer=None, task_block: Optional[int] = None,
                   init: Optional[Mapping[str, torch.Tensor]] = None) -> MLPInnerOutput:
    """Run ``T`` tasks' inner loops at once, updating ``params`` in place.

    Step ``s`` trains every task on its minibatch ``xs[s]``: forward, the loss's gradient, the
    backward pass layer by layer, and the update.  Plain SGD fuses the update into the backward
    matmuls (``W.baddbmm_(gᵀ, h, alpha=-lr)``, see ``_run_backward_sgd``); with ``optimizer`` or
    ``grad_weights`` the gradients are written to a flat buffer and applied as
    ``optimizer.step([params.flat], [grads.flat])``.

    Args:
        spec: the MLP's layout (``extract_mlp_spec(model)``); its last activation applies to
            the output before the loss, as in the model.
        params: ``T`` tasks' starting parameters (``stack_mlp_params``); updated in place.
        xs: ``[R, T, B, d_0]`` minibatch inputs, step-major (``gather_minibatches``).
        ys: ``[R, T, B, d_L]`` float targets (MSE) or ``[R, T, B]`` long labels (cross-entropy).
        lr: the SGD learning rate (unused when ``optimizer`` is given).
        loss: "mse" or "cross_entropy" (the mean over the minibatch, as ``F.mse_loss`` /
            ``F.cross_entropy``).
        fomaml: the last plan row is not trained on: return the gradient there, at the adapted
            weights, as the meta-gradient (``S = R - 1`` updates).
        grad_weights: ``(w_1, …, w_S)``: also return Σ_s w_s g_s over the inner gradients
            (accumulated as the reference does, ``acc += w_s * g_s``; SGD then runs unfused,
            ``flat.add_(grads, alpha=-lr)`` exactly as ``torch.optim.SGD``).
        fast_tanh: tanh as 2σ(2z) − 1 (``default_fast_tanh`` when None: on CPU, plain SGD
            Reptile only).
        optimizer: an object with ``step(params: list, grads: list)`` updating ``[T·n]`` flat
            tensors in place (e.g. ``torch_func.StackedAdam``); None for SGD.
        task_block: run the inner loops in blocks of at most ``task_block`` tasks (even sizes, at
            least 2 tasks each; plain SGD without FOMAML): every task's arithmetic is independent
            of the others', so the result is the same, and each block's weights stay in cache
            through all its steps.  None or ``>= T``: all at once.
        init: name -> φ (``[out, in]`` / ``[out]``, as ``stack_mlp_params`` takes): copied into
            every task's parameters first — with task blocks, block by block just before the block
            runs, so its copy is written straight into cache (``params`` may then be
            ``StackedMLP.empty``).  None: ``params`` already holds the starting parameters.

    Returns:
        ``MLPInnerOutput``: the adapted ``params``, losses ``[T, S]`` and, when asked for, the
        meta-gradients.
    """
    if loss not in FAST_LOSSES:
        raise ValueError(f"the batched MLP path supports losses {FAST_LOSSES}, got {loss!r}")
    if fast_tanh is None:
        fast_tanh = default_fast_tanh(xs.device, plain_sgd=optimizer is None and grad_weights is None and not fomaml)
    steps = xs.shape[0] - 1 if fomaml else xs.shape[0]
    if steps < 1:
        raise ValueError(f"the plan has {xs.shape[0]} rows: no inner step to take")
    if grad_weights is not None and len(grad_weights) != steps:
        raise ValueError(f"grad_weights has {len(grad_weights)} entries for {steps} inner steps")
    T = xs.shape[1]
    fused = optimizer is None and grad_weights is None
    if task_block is not None:
        if isinstance(task_block, bool) or not isinstance(task_block, int) or task_block < 1:
            raise ValueError(f"task_block must be a positive int or None, got {task_block!r}")
        # Blocks of even size, never of one task: a batch of one matrix takes another BLAS path
        # (mm, not batched gemm) whose sums round differently; with >= 2 the results are bitwise
        # those of the whole batch (tests/test_task_blocks.py).
        n_blocks = min(-(-T // task_block), T // 2)
        if fused and not fomaml and n_blocks > 1:
            losses, t0 = [], 0
            for i in range(n_blocks):
                t1 = t0 + T // n_blocks + (1 if i < T % n_blocks else 0)
                losses.append(mlp_inner_loop(spec, params.block(t0, t1), xs[:, t0:t1], ys[:, t0:t1], lr=lr,
                                             loss=loss, fast_tanh=fast_tanh, init=init).losses)
                t0 = t1
            return MLPInnerOutput(params, torch.cat(losses))
    if init is not None:
        with torch.no_grad():
            for dst, name in zip(params.weights + params.biases, spec.weight_names + spec.bias_names):
                dst.copy_(init[name].detach().expand(dst.shape))
    if params.flat is None and not fused:
        raise ValueError("a block of tasks (StackedMLP.block) runs only the fused SGD inner loop")
    grads = bwd = None
    if fused:
        sgd_layers = _sgd_layers(spec, params)
    if not fused or fomaml:
        grads = StackedMLP.empty(spec, T, dtype=params.weights[0].dtype, device=params.weights[0].device)
        bwd = _backward_layers(spec, params, grads)
    acc = params.zeros_like() if grad_weights is not None else None
    fwd = _forward_layers(spec, params.weights, params.biases, fast_tanh)
    acts = spec.activations
    # What each step's loss is computed from at the end, in one op: [S, T, B, d_L].
    saved = xs.new_empty((steps, T, xs.shape[2], spec.dims[-1]))
    for s in range(steps):
        out, hs = _run_forward(fwd, xs[s], fast_tanh)
        g = _output_grad(loss, out, ys[s], saved[s])
        if fused:
            _run_backward_sgd(sgd_layers, acts, hs, out, g, lr)
            continue
        _run_backward(bwd, acts, hs, out, g)
        if acc is not None:
            acc.flat += grad_weights[s] * grads.flat
        if optimizer is None:
            params.flat.add_(grads.flat, alpha=-lr)
        else:
            optimizer.step([params.flat], [grads.flat])
    losses = _losses_from(loss, saved, ys[:steps])
    if fomaml:
        out, hs = _run_forward(fwd, xs[steps], fast_tanh)
        _run_backward(bwd, acts, hs, out, _output_grad(loss, out, ys[steps], None))
        acc = grads
    return MLPInnerOutput(params, losses, acc)
