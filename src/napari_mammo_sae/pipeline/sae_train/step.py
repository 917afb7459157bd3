"""One SAE training step's gradients: the ReLU + L1 step by hand (three paths), TopK by autograd.

The ReLU step (the paper's loss, summed over x's rows and divided by ``n_total``) has a hand-written
backward that equals autograd (tests check each path against it). Only the encoder pre-activation
``W_enc (x - b_dec) + b_enc`` is always a dense pass over every (token, latent) pair; the rest
follows the measured density of the batch:

- ``sparse`` (per-token sparsity; a trained dictionary): the active (token, latent) pairs are
  listed once, and decoding, the latent gradient, the decoder and encoder gradients are computed
  on those pairs only - decoding and both weight gradients as weighted row sums
  (``embedding_bag``: the decoder's columns per token, the tokens per latent) and the latent
  gradient as a sampled matmul (``torch.sparse.sampled_addmm``) - so their cost is
  ``nnz x d``, not ``B x m x d``. Chosen while the fraction of active pairs is at most
  ``pair_threshold``.
- ``gathered`` (few latents fire anywhere in the batch: a start with many dead latents): dense
  products on the columns of the latents active somewhere in the batch.
- ``dense`` (the early, dense phase): plain dense products.
"""

from __future__ import annotations

import warnings
from typing import Any

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
PATHS = ("dense", "gathered", "sparse")


# The sparse step's cost beyond the pre-activation, in units of one dense (B x d) @ (d x m) matmul,
# measured at the paper's size on the 2-core development CPU (benchmarks/bench_sae_train.py): a
# fixed part (listing the pairs, the decoder's transposed copy, the gradient's transpose) and a
# part per active-pair fraction. The dense step's extra cost is 4 such matmuls (4 x the active
# fraction when gathered).
SPARSE_FIXED_COST = 0.35
SPARSE_PAIR_COST = 113.0


def choose_path(
    active_fraction: float, pair_fraction: float, *, sparse_threshold: float, pair_threshold: float
) -> str:
    """Which ReLU step runs for a batch with these measured densities (see the module docstring).

    ``active_fraction``: latents active somewhere in the batch; ``pair_fraction``: active
    (token, latent) pairs of all B x m. Sparse when the pairs are few (at most ``pair_threshold``)
    and its estimated cost beats the column paths; otherwise gathered when at most
    ``sparse_threshold`` of the latents are active, else dense.
    """
    gathered = active_fraction <= sparse_threshold
    if pair_fraction <= pair_threshold:
        sparse_cost = SPARSE_FIXED_COST + SPARSE_PAIR_COST * pair_fraction
        if sparse_cost < (4.0 * active_fraction if gathered else 4.0):
            return "sparse"
    return "gathered" if gathered else "dense"


def relu_grads(
    sae: Any,
    x: Any,
    *,
    n_total: int,
    sparse_threshold: float = 0.4,
    pair_threshold: float = 0.0,
    path: str | None = None,
) -> dict[str, Any]:
    """Gradients of the paper's ReLU loss (summed over x's rows, divided by n_total), by hand.

    Sets ``sae.<param>.grad`` (decoder gradient already projected orthogonal to its columns) and
    returns the batch's statistics (sums over x's rows, for all-reduce) and the ``path`` taken.
    ``path`` forces one of :data:`PATHS`; otherwise :func:`choose_path` picks by density.
    """
    import torch

    if path is not None and path not in PATHS:
        raise ValueError(f"unknown ReLU step path {path!r}: use one of {', '.join(PATHS)}")
    with torch.no_grad():
        return _relu_grads(
            sae, x, n_total=n_total, sparse_threshold=sparse_threshold,
            pair_threshold=pair_threshold, path=path,
        )  # fmt: skip


def _relu_grads(
    sae: Any, x: Any, *, n_total: int, sparse_threshold: float, pair_threshold: float,
    path: str | None,
) -> dict[str, Any]:  # fmt: skip
    import torch

    W_enc, b_enc, b_dec = sae.W_enc, sae.b_enc, sae.b_dec
    B = x.shape[0]
    xc = x - b_dec
    pre = torch.addmm(b_enc, xc, W_enc.t())  # (B, m): the one dense pass over all latents
    mask = pre > 0
    n_pairs = int(mask.sum())
    fired = mask.any(0)
    a = int(fired.sum())
    if path is None:
        path = choose_path(
            a / sae.d_latent, n_pairs / max(1, B * sae.d_latent),
            sparse_threshold=sparse_threshold, pair_threshold=pair_threshold,
        )  # fmt: skip
    if path == "sparse":
        stats = _sparse_step(sae, x, xc, pre, mask, n_total=n_total)
    else:
        stats = _column_step(
            sae, x, xc, pre, mask, fired, n_total=n_total, gather=path == "gathered"
        )
    stats.update(fired=fired, active_fraction=a / sae.d_latent, path=path)
    return stats


def _project(g: Any, w: Any) -> None:
    """Remove in place from g (d, a) the component parallel to each column of w (d, a)."""
    g.sub_((g * w).sum(0, keepdim=True) * (w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)))


def _column_step(
    sae: Any, x: Any, xc: Any, pre: Any, mask: Any, fired: Any, *, n_total: int, gather: bool
) -> dict[str, Any]:
    """Dense products, over every latent or (``gather``) over those active somewhere in the batch."""
    import torch

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    d = x.shape[1]
    lam = sae.l1_coefficient
    z = pre.clamp_min_(0.0)
    if gather:
        active = fired.nonzero().squeeze(1)
        z = z.index_select(1, active)
        mask = mask.index_select(1, active)
        Wd = W_dec.index_select(1, active)  # (d, a)
        We = W_enc.index_select(0, active)  # (a, d)
    else:
        Wd, We = W_dec, W_enc
    x_hat = torch.addmm(b_dec, z, Wd.t())
    err = x_hat.sub_(x)  # (B, d)
    sq_sum = float(err.pow(2).sum())
    l1_sum = float(z.sum())
    l0_sum = float(mask.sum())
    dxh = err.mul_(2.0 / (n_total * d))
    gz = dxh @ Wd  # (B, a)
    gz.add_(lam / n_total).mul_(mask)
    g_dec = dxh.t() @ z  # (d, a)
    _project(g_dec, Wd)
    g_enc = gz.t() @ xc  # (a, d)
    g_benc = gz.sum(0)
    g_bdec = dxh.sum(0) - g_benc @ We
    if not gather:
        W_dec.grad, W_enc.grad, b_enc.grad = g_dec, g_enc, g_benc
    else:
        W_dec.grad = torch.zeros_like(W_dec).index_copy_(1, active, g_dec)
        W_enc.grad = torch.zeros_like(W_enc).index_copy_(0, active, g_enc)
        b_enc.grad = torch.zeros_like(b_enc).index_copy_(0, active, g_benc)
    b_dec.grad = g_bdec
    return {"sq_sum": sq_sum, "l1_sum": l1_sum, "l0_sum": l0_sum}


def _offsets(counts: Any) -> Any:
    """Exclusive prefix sums of counts (bag starts for embedding_bag)."""
    import torch

    off = torch.zeros_like(counts)
    off[1:] = counts.cumsum(0)[:-1]
    return off


def _sparse_step(sae: Any, x: Any, xc: Any, pre: Any, mask: Any, *, n_total: int) -> dict[str, Any]:
    """Decoding and every gradient on the active (token, latent) pairs only (cost ~ nnz x d)."""
    import torch
    from torch.nn.functional import embedding_bag

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    B, d = x.shape
    m = sae.d_latent
    lam = sae.l1_coefficient
    pairs = mask.nonzero()  # (nnz, 2), token-major
    rows, cols = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    vals = pre[mask]  # z at the pairs, same order
    tok_counts = torch.bincount(rows, minlength=B)
    WdT = W_dec.t().contiguous()  # (m, d): decoder columns as rows
    # decoding: x_hat[t] = sum over t's active j of z[t, j] W_dec[:, j]
    x_hat = embedding_bag(cols, WdT, _offsets(tok_counts), mode="sum", per_sample_weights=vals)
    err = x_hat.add_(b_dec).sub_(x)
    sq_sum = float(err.pow(2).sum())
    l1_sum = float(vals.sum())
    dxh = err.mul_(2.0 / (n_total * d))
    # the latent gradient at the pairs: dxh[t] . W_dec[:, j] + lam / n_total
    crow = torch.zeros(B + 1, dtype=rows.dtype)
    crow[1:] = tok_counts.cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the op is tested here
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, vals, (B, m))
        gz = torch.sparse.sampled_addmm(pattern, dxh, WdT.t(), beta=0.0).values()
    gz.add_(lam / n_total)
    # latent-major order: the tokens of each latent, for the two weight gradients
    order = torch.sort(cols.int(), stable=True).indices  # int32 keys: a radix sort, ~15x faster
    by_lat = rows.index_select(0, order)
    lat_counts = torch.bincount(cols, minlength=m)
    lat_off = _offsets(lat_counts)
    g_decT = embedding_bag(
        by_lat, dxh, lat_off, mode="sum", per_sample_weights=vals.index_select(0, order)
    )  # (m, d): row j = sum_t z[t, j] dxh[t]
    # projection (as _project): g_j -= (g_j . w_j) w_j / |w_j|, one fused pass
    dots = torch.bmm(g_decT.unsqueeze(1), WdT.unsqueeze(2)).reshape(m, 1)
    g_decT.addcmul_(WdT, dots / WdT.norm(dim=1, keepdim=True).clamp_min(1e-12), value=-1.0)
    g_enc = embedding_bag(
        by_lat, xc, lat_off, mode="sum", per_sample_weights=gz.index_select(0, order)
    )  # (m, d): row j = sum_t gz[t, j] xc[t]
    g_benc = torch.zeros(m, dtype=gz.dtype, device=gz.device).index_add_(0, cols, gz)
    W_dec.grad = g_decT.t().contiguous()
    W_enc.grad = g_enc
    b_enc.grad = g_benc
    b_dec.grad = dxh.sum(0) - g_benc @ W_enc
    return {"sq_sum": sq_sum, "l1_sum": l1_sum, "l0_sum": float(rows.numel())}


def autograd_grads(
    sae: Any, x: Any, *, n_total: int, dead_mask: Any = None, comm: Any = None
) -> dict[str, Any]:
    """Gradients by autograd (TopK/BatchTopK, and the reference for the ReLU paths).

    ``comm`` (DDP): BatchTopK selects over the global batch and AuxK normalises by the global
    residual variance (see models/sae.py), so the summed gradients equal one process's.
    """
    for p in sae.parameters():
        p.grad = None
    out = sae.loss(x, dead_mask=dead_mask, comm=comm)
    (out["loss"] * (x.shape[0] / n_total)).backward()
    sae.project_decoder_grad_()
    z = out["z"].detach()
    err = (out["x_hat"] - x).detach()
    return {
        "sq_sum": float(err.pow(2).sum()),
        "l1_sum": float(z.abs().sum()),
        "l0_sum": float((z > 0).sum()),
        "auxk": float(out["auxk"].detach()) * x.shape[0] / n_total if "auxk" in out else 0.0,
        "fired": (z > 0).any(0),
        "active_fraction": float((z > 0).any(0).float().mean()),
    }


def make_optimizer(sae: Any, config: Any) -> Any:
    """Adam as in the paper (fused where this torch supports it)."""
    import torch

    kw = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=0.0)
    try:
        return torch.optim.Adam(list(sae.parameters()), fused=True, **kw)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch / unsupported device
        return torch.optim.Adam(list(sae.parameters()), **kw)
