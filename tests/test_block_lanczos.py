import pytest
import torch

from lightning_hessian.lanczos import BasisMemoryError, hutchinson_trace, lanczos
from lightning_hessian.trace import deflated_trace, hutch_plus_plus
from tests.cases import symmetric_with_spectrum


def spectra(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return {
        "clustered": torch.cat(
            [
                5 + 1e-3 * torch.rand(6, generator=gen, dtype=torch.float64),
                torch.rand(n - 6, generator=gen, dtype=torch.float64),
            ]
        ),
        "repeated": torch.cat(
            [torch.tensor([4.0] * 5 + [3.0] * 4).double(), 2 * torch.rand(n - 9, generator=gen, dtype=torch.float64)]
        ),
        "power_law": 10 * i**-1.2,
        "indefinite": torch.linspace(-6, 5, n, dtype=torch.float64) ** 3,
    }


@pytest.mark.parametrize("name", ["clustered", "repeated", "power_law", "indefinite"])
@pytest.mark.parametrize("block", [2, 4, 8])
def test_block_path_matches_eigvalsh(name, block):
    n, k = 200, 12
    matrix = symmetric_with_spectrum(spectra(n)[name], seed=block)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    result = lanczos(None, n, k, matmat=lambda x: matrix @ x, block_size=block, tol=1e-10, return_eigenvectors=True)
    assert result.converged and result.block_size == block
    assert ((result.eigenvalues - reference).abs() / reference.abs().max()).max() <= 1e-8
    x = result.eigenvectors
    torch.testing.assert_close(x.T @ x, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    residual = torch.linalg.vector_norm(matrix @ x - x * result.eigenvalues, dim=0)
    torch.testing.assert_close(residual, result.residual_norms, atol=1e-9, rtol=0)
    if name != "indefinite":
        return
    smallest = lanczos(None, n, 5, matmat=lambda x: matrix @ x, block_size=block, which="smallest", tol=1e-10)
    torch.testing.assert_close(
        smallest.eigenvalues, torch.linalg.eigvalsh(matrix)[:5], atol=1e-8 * float(reference.abs().max()), rtol=0
    )


@pytest.mark.parametrize("block", [1, 3])
def test_locking_in_a_tight_basis_keeps_eigenpairs_and_residuals_exact(block):
    n, k = 400, 40
    matrix = symmetric_with_spectrum(spectra(n)["power_law"], seed=5)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    result = lanczos(
        None, n, k, matmat=lambda x: matrix @ x, block_size=block, num_vectors=k + 12, tol=1e-10,
        max_matvecs=20000, return_eigenvectors=True,
    )  # fmt: skip
    assert result.converged and result.num_restarts > 5 and result.num_locked > 0
    assert ((result.eigenvalues - reference).abs() / reference[0]).max() <= 1e-10
    x = result.eigenvectors
    torch.testing.assert_close(x.T @ x, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    residual = torch.linalg.vector_norm(matrix @ x - x * result.eigenvalues, dim=0)
    assert residual.max() <= 1e-10 * float(reference[0]) * 1.01
    torch.testing.assert_close(residual, result.residual_norms, atol=1e-10 * float(reference[0]), rtol=0)


def test_locked_pairs_pushed_out_of_the_wanted_ones_are_unlocked():
    # smallest of a power law in a tight basis: pairs locked early are later outranked; left locked they filled the
    # basis (36 locked rows for k = 35, no convergence in 50,000 products)
    n, k = 250, 35
    i = torch.arange(1, n + 1, dtype=torch.float64)
    matrix = symmetric_with_spectrum(10 * i**-1.1, seed=132)
    result = lanczos(
        None, n, k, matmat=lambda x: matrix @ x, block_size=1, which="smallest", tol=1e-10, num_vectors=41,
        max_matvecs=50000, seed=132,
    )  # fmt: skip
    assert result.converged and result.num_locked <= k
    reference = torch.linalg.eigvalsh(matrix)[:k]
    assert float((result.eigenvalues - reference).abs().max()) <= 1e-8 * 10


def test_small_memory_budget_restarts_and_too_small_raises():
    n, k = 300, 10
    matrix = symmetric_with_spectrum(spectra(n)["power_law"], seed=3)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    budget = (k + 4 * 2 + 4 * 2) * n * 8  # k vectors + 2 blocks of 2 + the work blocks
    small = lanczos(
        None, n, k, matmat=lambda x: matrix @ x, block_size=2, max_basis_bytes=budget, tol=1e-9, max_matvecs=5000
    )
    assert small.converged and small.basis_bytes <= budget and small.num_restarts > 1
    torch.testing.assert_close(small.eigenvalues, reference, atol=1e-8 * float(reference[0]), rtol=0)
    with pytest.raises(BasisMemoryError, match="max_basis_bytes"):
        lanczos(None, n, k, matmat=lambda x: matrix @ x, max_basis_bytes=5 * n * 8)
    assert issubclass(BasisMemoryError, ValueError) and issubclass(BasisMemoryError, MemoryError)


def test_block_warm_start_from_perturbed_subspace():
    n, k = 400, 8
    matrix = symmetric_with_spectrum(spectra(n)["power_law"], seed=4)
    cold = lanczos(None, n, k, matmat=lambda x: matrix @ x, block_size=8, tol=1e-6, return_eigenvectors=True)
    gen = torch.Generator().manual_seed(0)
    start = cold.eigenvectors + 1e-3 * torch.randn(n, k, generator=gen, dtype=torch.float64) / n**0.5
    warm = lanczos(None, n, k, matmat=lambda x: matrix @ x, start=start, tol=1e-6)
    assert warm.converged and warm.num_matvecs <= cold.num_matvecs // 2
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, atol=1e-9, rtol=0)


def test_deflated_trace_exact_for_low_rank_and_stderr_consistent():
    n = 120
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n, 5, generator=gen, dtype=torch.float64))[0]
    low = basis @ torch.diag(torch.tensor([5.0, 3, 2, -1, 0.5]).double()) @ basis.T
    est = deflated_trace(lambda v: low @ v, n, basis, num_samples=4)
    assert est.value == pytest.approx(float(low.trace()), abs=1e-12) and est.stderr == pytest.approx(0, abs=1e-12)
    assert est.num_samples == 9
    matrix = symmetric_with_spectrum(10 * torch.arange(1, n + 1, dtype=torch.float64) ** -1.2, seed=2)
    top = lanczos(lambda v: matrix @ v, n, 8, return_eigenvectors=True).eigenvectors
    values = torch.tensor(
        [deflated_trace(lambda v: matrix @ v, n, top, num_samples=16, seed=s).value for s in range(200)]
    )
    errs = [deflated_trace(lambda v: matrix @ v, n, top, num_samples=16, seed=s).stderr for s in range(20)]
    exact = float(matrix.trace())
    assert abs(float(values.mean()) - exact) <= 4 * float(values.std()) / 200**0.5  # unbiased
    assert 0.5 <= float(torch.tensor(errs).mean()) / float(values.std()) <= 1.5  # stderr matches the spread
    plain = torch.tensor([hutchinson_trace(lambda v: matrix @ v, n, num_samples=24, seed=s).value for s in range(50)])
    assert float(values.std()) < 0.5 * float(plain.std())
    est = hutchinson_trace(lambda v: matrix @ v, n, num_samples=16, deflation=top)
    assert abs(est.value - exact) <= 5 * est.stderr + 1e-12
    pp = hutch_plus_plus(lambda v: matrix @ v, n, num_samples=24)
    assert pp.num_samples == 24 and abs(pp.value - exact) <= 5 * pp.stderr


@pytest.mark.parametrize(("which", "block"), [("largest", 1), ("largest", 4), ("smallest", 3)])
def test_return_basis_gives_ritz_pairs_of_the_whole_projection(which, block):
    n, k = 120, 6
    eig = torch.linspace(-2.0, 5.0, n, dtype=torch.float64) ** 3
    a = symmetric_with_spectrum(eig, seed=3)
    matmat = (lambda x: a @ x) if block > 1 else None
    res = lanczos(
        lambda v: a @ v, n, k, which=which, tol=1e-10, matmat=matmat, block_size=block, return_basis=True, seed=1
    )
    assert res.converged
    x, theta = res.basis_vectors, res.basis_values
    p = theta.numel()
    assert x.shape == (n, p) and p > k
    torch.testing.assert_close(x.T @ x, torch.eye(p, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(x.T @ a @ x, torch.diag(theta), atol=1e-9 * float(eig.abs().max()), rtol=0)
    # the extreme ones are the converged eigenvalues, in the solver's order
    ref = torch.linalg.eigvalsh(a)
    ref = ref.flip(0)[:k] if which == "largest" else ref[:k]
    order = theta.argsort(descending=which == "largest")
    torch.testing.assert_close(theta[order][:k], ref, rtol=1e-8, atol=1e-8)
    # a deflated trace with every basis Ritz pair is exact on the deflated part and costs only the samples
    est = deflated_trace(lambda v: a @ v, n, x, num_samples=8, ritz_values=theta, seed=2)
    assert est.num_samples == 8
    plain = hutchinson_trace(lambda v: a @ v, n, num_samples=8, seed=2)
    truth = float(eig.sum())
    assert abs(est.value - truth) < abs(plain.value - truth)
    assert lanczos(lambda v: a @ v, n, k, tol=1e-10).basis_vectors is None


def test_float32_basis_vectors_are_normalised_with_float64_accumulation():
    # LAPACK's float32 QR normalises a 1e6-vector only to ~1e-5 (sqrt(n) eps); restarts then spread that error
    from lightning_hessian.block_lanczos import _BlockKrylov

    n = 1_000_000
    krylov = _BlockKrylov(None, n, rows=4, block=1, head=1, dtype=torch.float32, device="cpu", seed=0)
    w = torch.randn(n, 1, generator=torch.Generator().manual_seed(0)) * 3
    q, coupling = krylov._orthonormal(w.clone(), 1, scale=None)
    assert abs(float((q.double() ** 2).sum()) - 1) <= 1e-7
    torch.testing.assert_close((q * coupling.float()).double(), w.double(), rtol=1e-6, atol=1e-6)
    for block in (2, 3):  # blocks: QR, then the same float64 renormalisation
        wb = torch.randn(n, block, generator=torch.Generator().manual_seed(block))
        qb, cb = krylov._orthonormal(wb.clone(), block, scale=None)
        gram = qb.double().T @ qb.double()
        assert float((gram - torch.eye(block, dtype=torch.float64)).abs().max()) <= 1e-6
        torch.testing.assert_close(qb.double() @ cb, wb.double(), rtol=0, atol=1e-4)


def test_small_basis_stops_at_the_product_it_converges_at():
    # a basis of <= 64 rows is checked after every block, so one product fewer does not converge
    n, k = 300, 6
    matrix = symmetric_with_spectrum(spectra(n)["power_law"], seed=4)
    run = lanczos(lambda v: matrix @ v, n, k, tol=1e-8, check_missed=False)
    assert run.converged and run.num_restarts == 0
    short = lanczos(lambda v: matrix @ v, n, k, tol=1e-8, check_missed=False, max_matvecs=run.num_matvecs - 1)
    assert not short.converged
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    assert ((run.eigenvalues - reference).abs() / reference[0]).max() <= 1e-12


def test_skipping_the_missed_eigenvalue_check_saves_its_products():
    n, k = 150, 3
    eig = torch.cat([torch.tensor([6.0, 6.0]), torch.linspace(0.0, 4.0, n - 2)]).double()
    matrix = symmetric_with_spectrum(eig, seed=2)
    checked = lanczos(lambda v: matrix @ v, n, k, tol=1e-10)
    unchecked = lanczos(lambda v: matrix @ v, n, k, tol=1e-10, check_missed=False)
    expected = torch.tensor([6.0, 6.0, 4.0]).double()
    torch.testing.assert_close(checked.eigenvalues, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(unchecked.eigenvalues, expected, rtol=0, atol=1e-9)  # rounding found the copy here
    assert checked.num_matvecs - unchecked.num_matvecs >= 8


def test_check_with_room_keeps_the_whole_basis_for_return_basis():
    # with room the check only appends to the run's Krylov space: return_basis gets both (more deflation for a trace)
    n, k = 400, 8
    matrix = symmetric_with_spectrum(spectra(n)["power_law"], seed=6)
    roomy = lanczos(lambda v: matrix @ v, n, k, tol=1e-8, num_vectors=k + 60, return_basis=True, seed=3)
    plain = lanczos(lambda v: matrix @ v, n, k, tol=1e-8, num_vectors=k + 60, check_missed=False, seed=3)
    assert roomy.converged and plain.converged
    p = roomy.basis_values.numel()
    assert p == roomy.num_matvecs > plain.num_matvecs  # every product is a basis direction
    x, theta = roomy.basis_vectors, roomy.basis_values
    torch.testing.assert_close(x.T @ x, torch.eye(p, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(x.T @ matrix @ x, torch.diag(theta), atol=1e-10, rtol=0)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    torch.testing.assert_close(roomy.eigenvalues, reference, rtol=0, atol=1e-8 * float(reference[0]))
    torch.testing.assert_close(roomy.eigenvalues, plain.eigenvalues, rtol=0, atol=1e-8 * float(reference[0]))


@pytest.mark.parametrize(("size", "locking", "keep"), [(30, 3, 20), (30, 0, 20), (30, 4, 30), (120, 6, 97), (9, 2, 8)])
def test_reflected_restart_is_identity_plus_low_rank_with_the_locked_ritz_vectors_first(size, locking, keep):
    from lightning_hessian.block_lanczos import _reflected_restart, _Rows

    ritz = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size)))[
        0
    ]
    q, u, w = _reflected_restart(ritz, locking, keep)
    eye = torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(q[:, :locking].abs(), ritz[:, :locking].abs(), atol=1e-13, rtol=0)  # up to sign
    kept = ritz[:, locking:keep]
    torch.testing.assert_close(kept @ (kept.T @ q[:, locking:keep]), q[:, locking:keep], atol=1e-13, rtol=0)
    assert u.shape[1] == locking + size - keep  # the rank of the update: one reflector per locked or dropped column
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(eye + u @ w.T, q.T, atol=1e-13, rtol=0)
    # applied in place to a basis stored in two segments, it gives the first `keep` rows of Qᵀ V
    n = 500
    basis = torch.linalg.qr(torch.randn(n, size, dtype=torch.float64))[0].T.contiguous()
    rows = _Rows(size + 2, n, size // 3, torch.float64, None)
    rows.put(0, basis)
    rows.add_low_rank(0, size, u[:keep], w)
    torch.testing.assert_close(rows.get(0, keep), (q.T @ basis)[:keep], atol=1e-13, rtol=0)


@pytest.mark.parametrize(
    ("spectrum", "k", "rows", "block", "which"),
    [("power_law", 60, 75, 1, "largest"), ("indefinite", 30, 40, 1, "smallest"), ("clustered", 40, 56, 4, "largest")],
)
def test_reflected_restarts_give_the_same_run_as_rotations(monkeypatch, spectrum, k, rows, block, which):
    import lightning_hessian.block_lanczos as module

    n = 400
    matrix = symmetric_with_spectrum(spectra(n)[spectrum], seed=k)
    calls = []
    reflect = module._reflected_restart
    monkeypatch.setattr(module, "_reflected_restart", lambda *args: calls.append(args) or reflect(*args))
    monkeypatch.setattr(module, "_REFLECT_GAIN", 0.0)  # reflect at every restart that may
    runs = {}
    for reflected in (False, True):
        monkeypatch.setattr(module, "_REFLECTED", reflected)
        runs[reflected] = lanczos(
            None, n, k, matmat=lambda x: matrix @ x, block_size=block, num_vectors=rows, tol=1e-10, which=which,
            max_matvecs=20000, return_eigenvectors=True,
        )  # fmt: skip
    assert len(calls) >= 3  # the reflected path ran (only with _REFLECTED)
    old, new = runs[False], runs[True]
    assert new.converged and new.num_matvecs == old.num_matvecs and new.num_restarts == old.num_restarts
    eigenvalues = torch.linalg.eigvalsh(matrix)
    reference = eigenvalues.flip(0)[:k] if which == "largest" else eigenvalues[:k]
    scale = float(eigenvalues.abs().max())
    torch.testing.assert_close(new.eigenvalues, reference, atol=1e-9 * scale, rtol=0)
    x = new.eigenvectors
    torch.testing.assert_close(x.T @ x, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    residual = torch.linalg.vector_norm(matrix @ x - x * new.eigenvalues, dim=0)
    torch.testing.assert_close(residual, new.residual_norms, atol=1e-10 * scale, rtol=0)


def test_missed_eigenvalue_check_goes_on_through_a_restart_in_a_small_basis():
    # a triple eigenvalue seen by a block of 2 in a 13-row basis: the check's span (8 products) does not fit after the
    # 4 found vectors and the pending block; it used to stop at the full basis after 4 products and return 4, 4, 3, 3
    n, k = 54, 4
    gen = torch.Generator().manual_seed(69)
    spectrum = torch.cat([torch.tensor([4.0] * 3 + [3.0] * 3), 2 * torch.rand(n - 6, generator=gen)]).double()
    matrix = symmetric_with_spectrum(spectrum, seed=69)
    result = lanczos(
        None, n, k, matmat=lambda x: matrix @ x, block_size=2, num_vectors=11, tol=1e-10, seed=69,
        return_eigenvectors=True,
    )  # fmt: skip
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([4.0, 4.0, 4.0, 3.0]).double(), atol=1e-9, rtol=0)
    x = result.eigenvectors
    residual = torch.linalg.vector_norm(matrix @ x - x * result.eigenvalues, dim=0)
    torch.testing.assert_close(residual, result.residual_norms, atol=1e-9, rtol=0)
