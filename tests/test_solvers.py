import numpy as np
import pytest
import torch
from scipy.linalg import expm

from dwf_ray.flow.solvers import integrate

A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)   # a damped rotation
X0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64)
EXACT = (X0.numpy() @ expm(A.numpy()).T)


def f(t, x):
    return x @ A.T


@pytest.mark.parametrize("method,steps,tol", [("euler", 1000, 5e-3), ("midpoint", 100, 1e-3),
                                              ("rk4", 100, 1e-8), ("dopri5", 0, 1e-5)])
def test_solvers_integrate_a_linear_ode(method, steps, tol):
    out = integrate(f, X0, method, steps).numpy()
    assert np.abs(out - EXACT).max() < tol


def test_fixed_step_orders_of_accuracy():
    """Halving the step divides the error by about 2 (euler), 4 (midpoint) and 16 (rk4)."""
    for method, order in [("euler", 1), ("midpoint", 2), ("rk4", 4)]:
        e1 = np.abs(integrate(f, X0, method, 20).numpy() - EXACT).max()
        e2 = np.abs(integrate(f, X0, method, 40).numpy() - EXACT).max()
        assert 2 ** order * 0.7 < e1 / e2 < 2 ** order * 1.4, (method, e1 / e2)


def test_unknown_solver_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        integrate(f, X0, "heun", 10)
