"""Zhang et al. (2021), embedding principle: a critical point of a narrow net, split into wider nets, stays critical.

A [3, 4, 3, 2] tanh net with biases (39 parameters) is put at an exact critical point of the MSE on 30 samples with
non-zero loss (targets chosen so that the residual is orthogonal to the range of the Jacobian). Splitting hidden
neurons with :func:`lightning_hessian.split_neuron` must (1) leave the output unchanged for every input, (2) keep the
gradient at zero (a scalar ratio alpha; a vector alpha keeps the output but breaks criticality: the negative control),
(3) add an exact Hessian null direction along the critical line, and (4) never decrease the counts of negative, zero
and positive Hessian eigenvalues (irreversibility of the inertia, Zhang et al. 2022). Printed: output difference,
gradient norm, ||H t|| and the inertia for each embedding (dense float64).

Run: ``python examples/embedding_principle.py`` (a few seconds).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_hessian import split_neuron

DT = torch.float64


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflat(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].view(p.shape)
        i += p.numel()
    return out


def risk(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda theta: 0.5 * ((functional_call(model, unflat(model, theta), (x,)) - y) ** 2).sum(dim=1).mean()


def critical_targets(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    theta = flat(model)
    outputs = lambda t: functional_call(model, unflat(model, t), (x,)).reshape(-1)  # noqa: E731
    jac = jacrev(outputs)(theta)
    u, _, _ = torch.linalg.svd(jac)
    residual = u[:, jac.shape[1] :] @ torch.randn(
        u.shape[0] - jac.shape[1], generator=torch.Generator().manual_seed(0), dtype=DT
    )
    return (outputs(theta) - residual).detach().view(x.shape[0], -1)


def inertia(h: torch.Tensor) -> tuple[int, int, int]:
    e = torch.linalg.eigvalsh(h)
    tol = 1e-9 * float(e.abs().max())
    return int((e < -tol).sum()), int((e.abs() <= tol).sum()), int((e > tol).sum())


def main() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    x_new = torch.randn(100, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = critical_targets(model, x)
    theta = flat(model)
    loss = risk(model, x, y)
    grad0 = torch.func.grad(loss)(theta).norm()
    print(
        f"narrow net: P = {theta.numel()}, loss {float(loss(theta)):.4f}, |grad| {float(grad0):.1e}, "
        f"inertia (neg, zero, pos) = {inertia(hessian(loss)(theta))}"
    )
    print(f"\n{'embedding':36s} {'P':>3s} {'max |f_wide - f|':>17s} {'|grad|':>8s} {'|H t|':>8s}  inertia")
    cases = [
        ("split layer 0, neuron 1, alpha 0.3", 0, 1, 0.3),
        ("split layer 1, neuron 0, alpha -0.5", 1, 0, -0.5),
        ("split layer 0, neuron 2, alpha 2.0", 0, 2, 2.0),
        ("vector alpha (negative control)", 0, 1, torch.tensor([0.2, 0.7, -0.4], dtype=DT)),
    ]
    for name, layer, neuron, alpha in cases:
        wide = split_neuron(model, layer, neuron, alpha)
        w_theta = flat(wide)
        w_loss = risk(wide, x, y)
        with torch.no_grad():
            out_diff = float((wide(x_new) - model(x_new)).abs().max())
        grad = float(torch.func.grad(w_loss)(w_theta).norm())
        h = hessian(w_loss)(w_theta)
        # critical-line direction: +a_s on the split neuron's outgoing column, -a_s on the new one (scalar alpha only)
        t_norm = float("nan")
        if not isinstance(alpha, torch.Tensor):
            t = torch.zeros_like(w_theta)
            params = unflat(wide, t)
            names = [n for n, _ in wide.named_parameters()]
            nxt = names[2 * (layer + 1)]  # weight of the next Linear
            a_s = dict(model.named_parameters())[nxt].detach()[:, neuron]
            params[nxt][:, neuron] = a_s
            params[nxt][:, -1] = -a_s
            t = t / t.norm()
            t_norm = float((h @ t).norm())
        print(f"{name:36s} {w_theta.numel():3d} {out_diff:17.1e} {grad:8.1e} {t_norm:8.1e}  {inertia(h)}")


if __name__ == "__main__":
    main()
