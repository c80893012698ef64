r"""Gradient matching on DLG's LeNet without autograd: hand-derived first- and second-order backprop.

Why
    For LeNet on one MNIST image every tensor is tiny (≈ 0.4 M multiply-adds per forward pass), so
    autograd's double backward (``create_graph=True``, then a backward through the backward) spends
    its time on ≈ 200 small operators (each convolution re-gathering its patches) and graph bookkeeping per
    evaluation, 4–6 ms on this project's shared 2-core CPU. DLG evaluates the objective 4–6 thousand
    times when it cannot converge (a defended gradient), so that overhead *is* the run time. Written
    out by hand, with each convolution a matrix product on its patch matrix (im2col), one evaluation
    is ≈ 60 operators, and each layer's patch matrix is built once and used three times (forward,
    weight gradient and its adjoint): ≈ 1.3–1.5× faster than autograd per evaluation (measured,
    LeNet on one MNIST image, one thread).

The network (:class:`dpbr.models.LeNet`)
    :math:`a_0 = u` (the normalised input; ``x = mean + std·u`` is normalised back to ``u`` by the
    model, so it is used directly), :math:`a_k = \sigma(W_k * a_{k-1} + b_k)` for the ``L``
    convolutions, :math:`o = W_{L+1}\,\mathrm{vec}(a_L) + b_{L+1}`, loss
    :math:`\ell = \frac1B \sum_i \mathrm{CE}(o_i, p_i)` with :math:`p_i = \mathrm{softmax}(l_i)` (DLG's
    soft label) or one-hot (fixed labels).

First order (the gradient the attacker matches)
    :math:`e = (\mathrm{softmax}(o) - p)/B`, :math:`g_{W_{L+1}} = e^\top F` (``F = vec(a_L)``),
    :math:`g_{b_{L+1}} = \sum_i e_i`; :math:`\delta_L = (e W_{L+1}) \odot s_L` with
    :math:`s_k = a_k(1 - a_k)`; per convolution :math:`g_{W_k} = \delta_k \star a_{k-1}` (weight
    gradient), :math:`g_{b_k} = \sum \delta_k`, :math:`\delta_{k-1} = t_{k-1} \odot s_{k-1}` with
    :math:`t_{k-1} = W_k^\top * \delta_k` (transposed convolution).

Second order (the gradient of the distance :math:`D(g)` with respect to ``u`` and ``l``)
    With :math:`V = \partial D/\partial g` (``2(g − g*)`` for the squared distance; the cosine
    distance's derivative otherwise), reverse-mode through the first-order computation. Because
    :math:`\langle V_k, \delta \star a\rangle = \langle \delta, V_k * a\rangle = \langle V_k^\top * \delta, a\rangle`:

    * upward, ``k = 1 … L``: :math:`\bar\delta_k = V_k * a_{k-1} + W_k * \bar t_{k-1} + v_{b_k}`
      (no second term for ``k = 1``), :math:`\bar t_k = \bar\delta_k \odot s_k`,
      :math:`\bar s_k = \bar\delta_k \odot t_k`;
    * output: :math:`\bar e_i = V_{L+1} F_i + v_{b_{L+1}} + \bar t_L W_{L+1}^\top`;
      :math:`\bar o_i = q_i \odot (\bar e_i - q_i^\top \bar e_i)/B` (``q = softmax(o)``); soft labels:
      :math:`\bar l_i = p_i \odot (\bar p_i - p_i^\top \bar p_i)` with :math:`\bar p = -\bar e / B`;
    * downward, ``k = L … 1``: :math:`\bar a_L = \mathrm{vec}^{-1}(e V_{L+1} + \bar o W_{L+1}) + \bar s_L \odot (1 - 2a_L)`,
      :math:`\bar r_k = \bar a_k \odot s_k` (adjoint of the pre-activation),
      :math:`\bar a_{k-1} = V_k^\top * \delta_k + W_k^\top * \bar r_k\ [+\ \bar s_{k-1} \odot (1 - 2 a_{k-1})]`;
      :math:`\partial D/\partial u = \bar a_0`.

Convolutions as matrix products
    With :math:`A = \mathrm{im2col}(a)` (``(C·k·k, P)``, one column per output position, built by
    one gather with a precomputed index; entries in the zero border read an appended zero), :math:`W * a = W_{mat} A`,
    :math:`\delta \star a = \delta A^\top` and :math:`W^\top * \delta = \mathrm{col2im}(W_{mat}^\top \delta)`
    (``col2im`` = the adjoint gather, an ``index_add``). The two products that share an output
    (``V_k * a + W_k * t̄``, ``V_kᵀ * δ + W_kᵀ * r̄``) are one matrix product each, with the
    matrices stacked.

Restarts and images
    Tensors carry leading dimensions ``(B, R)`` (images, restarts); the weights of the attacked model
    broadcast over both, the adjoints ``V`` are per restart, and weight gradients are summed over
    the ``B`` images of each restart only — ``R`` independent problems, as in
    :mod:`dpbr.inversion.objective`.

Agreement with autograd (``strategy="loop"``) is tested to 1e-10 in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNetMatching", "supports"]


def supports(model: nn.Module, loss_name: str | None, distance: str) -> bool:
    """Whether :class:`LeNetMatching` computes this objective: DLG's LeNet (sigmoid convolutions
    without groups or dilation, then one linear layer), cross-entropy, ``l2`` or ``cosine`` distance."""
    from dpbr.models import LeNet

    if not isinstance(model, LeNet) or loss_name != "cross-entropy" or distance not in ("l2", "cosine"):
        return False
    layers = list(model.body)
    if len(layers) % 2 or not layers:
        return False
    for conv, act in zip(layers[0::2], layers[1::2]):
        if not (isinstance(conv, nn.Conv2d) and isinstance(act, nn.Sigmoid) and conv.groups == 1
                and tuple(conv.dilation) == (1, 1) and conv.bias is not None and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str)):
            return False
    return isinstance(model.fc, nn.Linear) and model.fc.bias is not None


class _Im2col:
    """Patch gather of one convolution (kernel, stride, zero padding) for inputs ``(C, H, W)``.

    Padding is not materialised: patch entries that fall into the zero border index one extra
    "zero" slot appended after the ``C·H·W`` input values (so the adjoint, an ``index_add`` into
    ``C·H·W + 1`` slots, needs no cropping: the extra slot is dropped).
    """

    def __init__(self, conv: nn.Conv2d, in_shape: Sequence[int], device: torch.device) -> None:
        c, h, w = (int(v) for v in in_shape)
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        ph, pw = conv.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        ci = torch.arange(c, device=device).view(c, 1, 1, 1, 1)
        ii = (torch.arange(kh, device=device).view(1, kh, 1, 1, 1)
              + (torch.arange(ho, device=device) * sh).view(1, 1, 1, ho, 1) - ph)
        jj = (torch.arange(kw, device=device).view(1, 1, kw, 1, 1)
              + (torch.arange(wo, device=device) * sw).view(1, 1, 1, 1, wo) - pw)
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        index = torch.where(inside, ci * h * w + ii * w + jj, torch.full_like(ci * ii * jj, c * h * w))
        self.index = index.reshape(-1)                                    # (C·kh·kw·P,)
        self.in_shape = (c, h, w)
        self.size = c * h * w
        self.rows = c * kh * kw
        self.out_hw = (ho, wo)

    def cols(self, a: Tensor) -> Tensor:
        """``a (B, R, C, H, W)`` → patch matrices ``(B, R, C·kh·kw, P)``."""
        lead = a.shape[:2]
        n = lead[0] * lead[1]
        if n == 1:
            flat = torch.cat([a.reshape(-1), a.new_zeros(1)])
            picked = flat.index_select(0, self.index)
        else:
            flat = torch.cat([a.reshape(n, self.size), a.new_zeros(n, 1)], dim=1)
            picked = flat.index_select(1, self.index)
        return picked.reshape(*lead, self.rows, -1)

    def image(self, cols: Tensor) -> Tensor:
        """Adjoint of :meth:`cols`: ``(B, R, C·kh·kw, P)`` → ``(B, R, C, H, W)`` (overlaps summed)."""
        lead = cols.shape[:2]
        n = lead[0] * lead[1]
        if n == 1:
            buf = cols.new_zeros(self.size + 1).index_add_(0, self.index, cols.reshape(-1))
            return buf[: self.size].reshape(*lead, *self.in_shape)
        buf = cols.new_zeros(n, self.size + 1).index_add_(1, self.index, cols.reshape(n, -1))
        return buf[:, : self.size].reshape(*lead, *self.in_shape)


def _shared_times(w: Tensor, x: Tensor) -> Tensor:
    """``w (O, K) @ x (B, R, K, P)`` → ``(B, R, O, P)`` (one ``mm`` when ``B·R = 1``)."""
    if x.shape[0] * x.shape[1] == 1:
        return (w @ x.reshape(x.shape[2], x.shape[3])).reshape(1, 1, w.shape[0], x.shape[3])
    return torch.matmul(w, x)


def _per_restart_times(v: Tensor, x: Tensor) -> Tensor:
    """``v (R, O, K) @ x (B, R, K, P)`` → ``(B, R, O, P)``, restart ``r``'s matrix for every image."""
    B, R = x.shape[0], x.shape[1]
    if B * R == 1:
        return (v[0] @ x.reshape(x.shape[2], x.shape[3])).reshape(1, 1, v.shape[1], x.shape[3])
    if B == 1:
        return torch.bmm(v, x[0]).unsqueeze(0)
    return torch.matmul(v, x)


def _sum_over_images(x: Tensor, y: Tensor) -> Tensor:
    """``Σ_b x[b, r] @ y[b, r]ᵀ`` for ``x (B, R, M, P)``, ``y (B, R, N, P)`` → ``(R, M, N)`` (weight gradients)."""
    B, R, M, P = x.shape
    N = y.shape[2]
    if B * R == 1:
        return (x.reshape(M, P) @ y.reshape(N, P).T).unsqueeze(0)
    if B == 1:
        return torch.bmm(x[0], y[0].transpose(1, 2))
    return x.permute(1, 2, 0, 3).reshape(R, M, B * P) @ y.permute(1, 0, 3, 2).reshape(R, B * P, N)


class LeNetMatching:
    r"""Value and gradient of the gradient-matching distance on DLG's LeNet (module docstring).

    Parameters
    ----------
    model:
        A :class:`dpbr.models.LeNet` (:func:`supports` must hold); its parameters are read, never changed.
    target:
        The shared gradient, one tensor per parameter (``model.parameters()`` order).
    image_shape:
        ``(C, H, W)`` of one input image.
    labels:
        Fixed labels ``(B,)``, or ``None`` for DLG's soft labels.
    num_classes:
        ``K``.
    distance:
        ``"l2"`` (:math:`\sum (g - g^*)^2`) or ``"cosine"`` (:math:`1 - \cos(g, g^*)`).
    """

    def __init__(self, model: nn.Module, target: Sequence[Tensor], *, image_shape: Sequence[int],
                 labels: Tensor | None, num_classes: int, distance: str) -> None:
        convs = list(model.body)[0::2]
        ref = convs[0].weight
        self.patches: list[_Im2col] = []
        shape = tuple(int(v) for v in image_shape)
        for conv in convs:
            im = _Im2col(conv, shape, ref.device)
            self.patches.append(im)
            shape = (conv.out_channels, *im.out_hw)
        self.out_shapes = [p.in_shape for p in self.patches[1:]] + [shape]
        self.weights = [c.weight.detach().reshape(c.out_channels, -1) for c in convs]      # (O, C·k·k)
        self.biases = [c.bias.detach().reshape(-1, 1) for c in convs]                     # (O, 1)
        self.fc_weight = model.fc.weight.detach()
        self.fc_bias = model.fc.bias.detach()
        self.sizes = [p.numel() for p in model.parameters()]
        self.target = torch.cat([t.detach().reshape(-1) for t in target])
        self.target_norm = torch.linalg.vector_norm(self.target)
        self.labels = None if labels is None else labels.detach()
        self.num_classes = int(num_classes)
        self.distance = distance

    def _distance_and_adjoint(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``D (R,)`` and ``∂D/∂g (R, d)`` for per-restart flat gradients ``g (R, d)``."""
        t = self.target
        if self.distance == "l2":
            diff = g - t
            return diff.pow(2).sum(1), 2.0 * diff
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        dot = (g * t).sum(1, keepdim=True)
        denom = norm * self.target_norm
        value = 1.0 - dot / denom
        adjoint = -t / denom + dot * g / (norm.pow(2) * denom)
        return value.squeeze(1), adjoint

    def value_and_grad(self, u: Tensor, lab: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Distances ``(R,)`` and their gradients with respect to ``u (R, B, C, H, W)`` and the soft-label
        logits ``lab (R, B, K)`` (``None`` with fixed labels)."""
        R, B = u.shape[0], u.shape[1]
        L = len(self.patches)
        W, im = self.weights, self.patches
        # ---- forward (tensors (B, R, ...); conv outputs as (B, R, O, P)) --------------------- #
        a = [u.transpose(0, 1)]
        A: list[Tensor] = []
        for k in range(L):
            A.append(im[k].cols(a[k]))
            a.append(torch.sigmoid(_shared_times(W[k], A[k]) + self.biases[k]).reshape(B, R, *self.out_shapes[k]))
        s = [None] + [ak.reshape(B, R, ak.shape[2], -1) * (1.0 - ak.reshape(B, R, ak.shape[2], -1)) for ak in a[1:]]
        feats = a[L].reshape(B, R, -1)                                   # (B, R, F)
        out = feats @ self.fc_weight.T + self.fc_bias                    # (B, R, K)
        q = torch.softmax(out, dim=-1)
        if lab is None:
            p = F.one_hot(self.labels, self.num_classes).to(q.dtype).unsqueeze(1)   # (B, 1, K)
        else:
            p = torch.softmax(lab.transpose(0, 1), dim=-1)                          # (B, R, K)
        e = (q - p) / B
        # ---- first order: the gradient the attacker matches -------------------------------- #
        g_fc_w = _sum_over_images(e.unsqueeze(-1), feats.unsqueeze(-1))  # (R, K, F)
        g_fc_b = e.sum(0)
        t: list[Tensor | None] = [None] * (L + 1)                        # t[k] = Wᵀ * δ_{k+1}, (B, R, C, P)
        t[L] = (e @ self.fc_weight).reshape(s[L].shape)
        delta: list[Tensor | None] = [None] * (L + 1)
        flat: list[Tensor] = []
        for k in range(L, 0, -1):
            delta[k] = t[k] * s[k]                                       # (B, R, O, P)
            g_w = _sum_over_images(delta[k], A[k - 1])
            flat = [g_w.reshape(R, -1), delta[k].sum((0, 3))] + flat
            if k > 1:
                t[k - 1] = im[k - 1].image(_shared_times(W[k - 1].T, delta[k])).reshape(s[k - 1].shape)
        g = torch.cat(flat + [g_fc_w.reshape(R, -1), g_fc_b], dim=1)      # (R, d), parameter order
        value, adj = self._distance_and_adjoint(g)
        # ---- adjoints V of the matched gradients ------------------------------------------- #
        parts = torch.split(adj, self.sizes, dim=1)
        V = [parts[2 * k].reshape(R, *W[k].shape) for k in range(L)]    # (R, O, C·k·k)
        vb = [parts[2 * k + 1].reshape(R, -1, 1) for k in range(L)]     # (R, O, 1)
        V_fc = parts[2 * L].reshape(R, *self.fc_weight.shape)            # (R, K, F)
        vb_fc = parts[2 * L + 1]                                          # (R, K)
        # ---- upward: adjoints of δ_k, t_k, s_k --------------------------------------------- #
        s_bar: list[Tensor | None] = [None] * (L + 1)
        t_bar = None
        for k in range(1, L + 1):
            if k == 1:
                d_bar = _per_restart_times(V[0], A[0]) + vb[0]
            else:
                VW = torch.cat([V[k - 1], W[k - 1].expand(R, -1, -1)], dim=2)
                AT = torch.cat([A[k - 1], im[k - 1].cols(t_bar.reshape(a[k - 1].shape))], dim=2)
                d_bar = _per_restart_times(VW, AT) + vb[k - 1]
            t_bar = d_bar * s[k]
            s_bar[k] = d_bar * t[k]
        # ---- output layer ------------------------------------------------------------------ #
        e_bar = _per_restart_times(V_fc, feats.unsqueeze(-1)).squeeze(-1) + vb_fc \
            + t_bar.reshape(B, R, -1) @ self.fc_weight.T
        q_bar = e_bar / B
        o_bar = q * (q_bar - (q * q_bar).sum(-1, keepdim=True))
        lab_grad = None
        if lab is not None:
            p_bar = -q_bar
            lab_grad = (p * (p_bar - (p * p_bar).sum(-1, keepdim=True))).transpose(0, 1)
        a_bar = (_per_restart_times(V_fc.transpose(1, 2), e.unsqueeze(-1)).squeeze(-1)
                 + o_bar @ self.fc_weight).reshape(s[L].shape)
        # ---- downward: adjoints of the activations ----------------------------------------- #
        for k in range(L, 0, -1):
            a_bar = a_bar + s_bar[k] * (1.0 - 2.0 * a[k].reshape(s[k].shape))
            r_bar = a_bar * s[k]
            VW = torch.cat([V[k - 1], W[k - 1].expand(R, -1, -1)], dim=1).transpose(1, 2)   # (R, C·k·k, 2O)
            a_bar = im[k - 1].image(_per_restart_times(VW, torch.cat([delta[k], r_bar], dim=2)))
            if k > 1:
                a_bar = a_bar.reshape(s[k - 1].shape)
        return value, a_bar.transpose(0, 1), lab_grad
