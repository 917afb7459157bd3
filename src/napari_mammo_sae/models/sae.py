"""The sparse autoencoder of Mammo-SAE (ReLU + L1, as the paper) and TopK / BatchTopK variants.

Math (one tied bias ``b_dec``, the paper's ``tied_bias``)::

    z     = act(W_enc (x - b_dec) + b_enc)          W_enc (m, d), b_enc (m,)
    x_hat = W_dec z + b_dec                         W_dec (d, m), columns at unit L2 norm

ReLU loss (the paper's code): ``mean over the d dims of (x - x_hat)^2 + l1 * sum_j |z_j|``, averaged
over the batch. TopK keeps the k largest pre-activations per token (Gao et al. 2024), BatchTopK the
``k * B`` largest over the batch; both add the AuxK loss (top ``k_aux`` dead latents reconstructing
the residual, normalised by the residual's variance, times ``auxk_coefficient``).

BatchTopK at inference (Bussmann et al. 2024): the batch-wide selection makes a token's latents
depend on its batch-mates, so training also estimates one global activation threshold ``theta``
(an exponential moving average, decay :data:`THRESHOLD_DECAY`, of the smallest activation the
batch selection kept) and outside training a latent is kept when ``relu(pre) > theta`` - the same
latents for an image whether it is encoded alone or with others. Which rule runs: ``encode(x,
batch_select=...)`` when given, otherwise batch selection in ``train()`` mode and the threshold in
``eval()`` mode (``load_weights`` returns modules in eval mode). ``theta`` is a buffer saved with
the weights (``model.safetensors`` key ``threshold``, and ``"threshold"`` in ``config.json``). A
BatchTopK SAE saved before thresholds were recorded has ``theta`` unknown (NaN): encoding it in
eval mode raises :class:`~napari_mammo_sae.errors.CheckpointError` (never a silent switch to the
batch-dependent rule); :meth:`SparseAutoencoder.calibrate_threshold` estimates ``theta`` from
training features, or ``batch_select=True`` asks for the batch rule knowingly.

Under DDP the trainer passes ``comm`` to :meth:`SparseAutoencoder.loss`: BatchTopK then selects
over the GLOBAL batch (each process all-gathers the others' top ``k * B`` activations, so the
``k * B`` kept are exactly those one process would keep) and the AuxK residual variance is the
global one, so W processes compute the same loss as one process on the whole batch.

The unit-norm decoder is kept as the paper's library does: :meth:`project_decoder_grad_` removes the
gradient component parallel to each column before the step and :meth:`normalise_decoder_` rescales
the columns after it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

KINDS = ("relu", "topk", "batchtopk")
THRESHOLD_DECAY = 0.99  # EMA decay of the BatchTopK inference threshold (per training step)
MAMMOSAE_KEYS = {
    "tied_bias": 2,
    "pre_encoder_bias._bias_reference": 2,
    "encoder._weight": 3,
    "encoder._bias": 2,
    "decoder._weight": 3,
    "post_decoder_bias._bias_reference": 2,
}


class SparseAutoencoder(nn.Module):
    """Tied-bias sparse autoencoder with a unit-norm decoder (see the module docstring)."""

    def __init__(
        self,
        d_in: int,
        d_latent: int,
        kind: str = "relu",
        k: int | None = None,
        l1_coefficient: float = 3e-5,
        *,
        k_aux: int | None = None,
        auxk_coefficient: float = 1 / 32,
        init: str = "default",
        generator: torch.Generator | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"unknown SAE kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind != "relu" and (k is None or not 0 < k <= d_latent):
            raise ConfigError(f"a {kind} SAE needs k between 1 and {d_latent} (got {k})")
        self.d_in, self.d_latent, self.kind = int(d_in), int(d_latent), kind
        self.k = None if k is None else int(k)
        self.l1_coefficient = float(l1_coefficient)
        self.k_aux = int(k_aux) if k_aux is not None else min(d_latent, max(1, d_in // 2))
        self.auxk_coefficient = float(auxk_coefficient)
        self.init_scheme = init
        self.W_enc = nn.Parameter(torch.empty(d_latent, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_latent))
        self.W_dec = nn.Parameter(torch.empty(d_in, d_latent))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters(init, generator=generator)
        if kind == "batchtopk":  # only BatchTopK: other kinds' state dicts stay as they were
            theta = float("nan") if threshold is None else float(threshold)
            self.register_buffer("threshold", torch.tensor(theta, dtype=torch.float32))

    # --- set-up ---------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(
        self, init: str = "default", generator: torch.Generator | None = None
    ) -> None:
        """Initialise: 'paper' = the paper's library, 'default' = encoder = decoder transpose.

        'paper': decoder N(0, 1) then column-normalised; encoder kaiming-uniform on the library's
        3-D (1, m, d) tensor, whose fan-in is m*d instead of d, so the encoder starts ~sqrt(m)x
        smaller than intended (a quirk kept for reproduction); encoder bias U(+-1/sqrt(m)); b = 0.
        'default': decoder N(0, 1) column-normalised, encoder = 0.1 x decoder^T (Gao et al. /
        SAELens style tied start), zero biases.
        """
        m, d = self.d_latent, self.d_in
        self.W_dec.normal_(0.0, 1.0, generator=generator)
        self.normalise_decoder_()
        self.b_dec.zero_()
        if init == "paper":
            bound = math.sqrt(6.0 / (m * d))  # kaiming_uniform_ gain sqrt(2), fan_in = m * d
            self.W_enc.uniform_(-bound, bound, generator=generator)
            bb = 1.0 / math.sqrt(m)
            self.b_enc.uniform_(-bb, bb, generator=generator)
        elif init == "default":
            self.W_enc.copy_(0.1 * self.W_dec.t())
            self.b_enc.zero_()
        else:
            raise ConfigError(f"unknown SAE init {init!r}: use 'paper' or 'default'")

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Rescale each decoder column W_dec[:, j] to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from W_dec.grad the component parallel to each decoder column."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        dot = (g * w).sum(0, keepdim=True)
        g.sub_(dot * (w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)))

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-serialisable dict (saved beside the weights)."""
        return {
            "model": "SparseAutoencoder",
            "d_in": self.d_in,
            "d_latent": self.d_latent,
            "kind": self.kind,
            "k": self.k,
            "l1_coefficient": self.l1_coefficient,
            "k_aux": self.k_aux,
            "auxk_coefficient": self.auxk_coefficient,
            **({"threshold": self.inference_threshold} if self.kind == "batchtopk" else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseAutoencoder:
        """Build an (untrained) SAE from :meth:`config`'s dict."""
        keys = ("d_in", "d_latent", "kind", "k", "l1_coefficient", "k_aux", "auxk_coefficient")
        kw = {k: config[k] for k in keys if k in config}
        if config.get("kind") == "batchtopk" and config.get("threshold") is not None:
            kw["threshold"] = float(config["threshold"])
        return cls(**kw)

    @property
    def inference_threshold(self) -> float | None:
        """BatchTopK's inference threshold theta (None: not estimated; other kinds: None)."""
        theta = getattr(self, "threshold", None)
        if theta is None or not math.isfinite(float(theta)):
            return None
        return float(theta)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):  # type: ignore[no-untyped-def]
        """A BatchTopK file saved before thresholds were recorded loads with theta unknown (NaN).

        theta then stays as the config gave it (NaN without one); encoding in eval mode says so.
        """
        key = prefix + "threshold"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *rest)
        if self.kind == "batchtopk" and not had and key in missing:
            missing.remove(key)

    @torch.no_grad()
    def calibrate_threshold(self, batches: Any) -> float:
        """Set theta to the mean over ``batches`` (each (B, d) tokens) of BatchTopK's smallest kept
        activation - the paper's estimate, for an SAE saved without one. Returns theta."""
        if self.kind != "batchtopk":
            raise ConfigError(
                f"only a BatchTopK SAE has an inference threshold (this is {self.kind})"
            )
        mins = []
        for x in batches:
            mins.append(float(self._batch_threshold(torch.relu(self.pre_activation(x)))))
        if not mins:
            raise ConfigError("calibrate_threshold needs at least one batch of tokens")
        self.threshold.fill_(sum(mins) / len(mins))
        return float(self.threshold)

    # --- forward --------------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x - b_dec) + b_enc, shape (..., m)."""
        return torch.nn.functional.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def activate(
        self, pre: torch.Tensor, *, batch_select: bool | None = None, comm: Any = None
    ) -> torch.Tensor:
        """The latent code from pre-activations (ReLU, TopK or BatchTopK).

        BatchTopK: ``batch_select`` True = keep the ``k * B`` largest of the batch (over all
        processes when ``comm`` is given), False = keep those above the saved threshold; None =
        batch selection in train mode, the threshold in eval mode (see the module docstring).
        """
        return self._activate(pre, batch_select=batch_select, comm=comm)[0]

    def _activate(
        self, pre: torch.Tensor, *, batch_select: bool | None = None, comm: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, the batch's smallest kept activation or None)."""
        z = torch.relu(pre)
        if self.kind == "relu":
            return z, None
        if self.kind == "topk":
            vals, idx = z.topk(self.k, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, vals), None
        if batch_select is None:
            batch_select = self.training
        if not batch_select:
            theta = self.inference_threshold
            if theta is None:
                raise CheckpointError(
                    "this BatchTopK SAE has no inference threshold (it was saved before thresholds "
                    "were recorded), so its latents would depend on which tokens are encoded "
                    "together: retrain it, or estimate one with "
                    "SparseAutoencoder.calibrate_threshold(batches) and save it again"
                )
            return z * (z > theta), None
        theta = self._batch_threshold(z, comm)
        return z * ((z >= theta) & (z > 0)), theta

    def _batch_threshold(self, z: torch.Tensor, comm: Any = None) -> torch.Tensor:
        """The ``k * B``-th largest activation of the batch (global under ``comm``), >= 0."""
        with torch.no_grad():
            flat = z.detach().reshape(-1)
            tokens = max(1, flat.numel() // self.d_latent)
            world = 1 if comm is None else int(comm.world)
            n = self.k * tokens * world
            local = flat.topk(min(n, flat.numel())).values
            if comm is not None:
                local = comm.all_gather_cat(local)
            return local.topk(min(n, local.numel())).values[-1].clamp_min(0.0)

    def encode(
        self, x: torch.Tensor, *, batch_select: bool | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latents z (..., m) of inputs x (..., d) (BatchTopK: see :meth:`activate`).

        ``out``: a (B, m) buffer of x's dtype and device to write a ReLU SAE's latents of 2-D ``x``
        into, in place and without gradients (the same numbers: ``linear`` is this ``addmm``), so
        that repeated encodes reuse one buffer instead of two fresh (B, m) arrays each; ignored for
        the other kinds, for other shapes and when gradients are recorded.
        """
        if (
            out is not None
            and self.kind == "relu"
            and x.dim() == 2
            and out.shape == (x.shape[0], self.d_latent)
            and out.dtype == x.dtype == self.W_enc.dtype
            and out.device == x.device
            and not torch.is_grad_enabled()
        ):
            torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t(), out=out)
            return out.relu_()
        return self.activate(self.pre_activation(x), batch_select=batch_select)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction W_dec z + b_dec of latents z (..., m)."""
        return torch.nn.functional.linear(z, self.W_dec, self.b_dec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, z)."""
        z = self.encode(x)
        return self.decode(z), z

    def loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, *, comm: Any = None
    ) -> dict[str, torch.Tensor]:
        """Training loss and its parts for a (B, d) batch: loss, mse, l1 / auxk, l0, fvu, z, x_hat.

        BatchTopK selects over the batch (the global one under ``comm``: an object with ``world``,
        ``all_gather_cat(t)`` and ``all_reduce_sum(t)``) and, in train mode, moves the inference
        threshold towards this batch's smallest kept activation.
        """
        pre = self.pre_activation(x)
        batch_select = True if self.kind == "batchtopk" else None
        z, theta = self._activate(pre, batch_select=batch_select, comm=comm)
        if theta is not None and self.training:
            with torch.no_grad():
                old = self.threshold
                new = theta.to(old.dtype)
                self.threshold.copy_(
                    torch.where(
                        torch.isnan(old), new, THRESHOLD_DECAY * old + (1 - THRESHOLD_DECAY) * new
                    )
                )
        x_hat = self.decode(z)
        err = x_hat - x
        mse = err.pow(2).mean()
        out = {"mse": mse, "z": z, "x_hat": x_hat}
        if self.kind == "relu":
            l1 = z.abs().sum(-1).mean()
            out["l1"] = l1
            out["loss"] = mse + self.l1_coefficient * l1
        else:
            auxk = torch.zeros((), dtype=x.dtype, device=x.device)
            if dead_mask is not None and bool(dead_mask.any()):
                n_dead = int(dead_mask.sum())
                k_aux = min(self.k_aux, n_dead)
                dead_pre = torch.relu(pre).masked_fill(~dead_mask, 0.0)
                vals, idx = dead_pre.topk(k_aux, dim=-1)
                z_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
                resid = (x - x_hat).detach()
                resid_hat = torch.nn.functional.linear(z_aux, self.W_dec)
                denom = _residual_variance(resid, comm).clamp_min(1e-12)
                auxk = (resid_hat - resid).pow(2).mean() / denom
            out["auxk"] = auxk
            out["loss"] = mse + self.auxk_coefficient * auxk
        with torch.no_grad():
            var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
            out["fvu"] = err.pow(2).sum() / var
            out["l0"] = (z > 0).sum(-1).float().mean()
        return out


def _residual_variance(resid: torch.Tensor, comm: Any = None) -> torch.Tensor:
    """Mean over tokens and dims of (resid - its per-dim mean)^2, over all processes under comm."""
    r = resid.double()
    parts = torch.cat([r.sum(0), r.pow(2).sum().reshape(1), r.new_tensor([float(r.shape[0])])])
    if comm is not None:
        parts = comm.all_reduce_sum(parts)
    d = r.shape[1]
    n = parts[-1]
    mean = parts[:d] / n
    var = (parts[d] - n * mean.pow(2).sum()) / (n * d)
    return var.to(resid.dtype)


# --- the released Mammo-SAE checkpoint -------------------------------------------------------------
def load_mammosae(path: str | Path, *, l1_coefficient: float = 3e-5) -> SparseAutoencoder:
    """The paper's ``sparse_autoencoder_final.pt`` (SPEC 4 layout) as a ReLU SparseAutoencoder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no SAE checkpoint at {path}: download sparse_autoencoder_final.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(
            f"{path.name} is not a readable torch checkpoint of plain tensors ({exc.__class__.__name__}): "
            "pass the Mammo-SAE sparse_autoencoder_final.pt"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path.name} does not hold a state dict: pass sparse_autoencoder_final.pt"
        )
    missing = [k for k in MAMMOSAE_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path.name} is not a Mammo-SAE checkpoint: missing {', '.join(missing)} "
            "(expected the sparse_autoencoder_final.pt layout)"
        )
    for key, ndim in MAMMOSAE_KEYS.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.shape[0] != 1:
            raise CheckpointError(
                f"{path.name}: {key} has shape {tuple(getattr(t, 'shape', ()))}, expected "
                f"{ndim} dims with a leading 1"
            )
    w_enc = state["encoder._weight"][0]
    m, d = w_enc.shape
    expect = {
        "tied_bias": (1, d),
        "pre_encoder_bias._bias_reference": (1, d),
        "encoder._bias": (1, m),
        "decoder._weight": (1, d, m),
        "post_decoder_bias._bias_reference": (1, d),
    }
    for key, shape in expect.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{path.name}: {key} has shape {tuple(state[key].shape)}, expected {shape} for an "
                f"SAE with {d} inputs and {m} latents"
            )
    sae = SparseAutoencoder(d, m, "relu", l1_coefficient=l1_coefficient)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc.float())
        sae.b_enc.copy_(state["encoder._bias"][0].float())
        sae.W_dec.copy_(state["decoder._weight"][0].float())
        sae.b_dec.copy_(state["tied_bias"][0].float())
    return sae.eval()
