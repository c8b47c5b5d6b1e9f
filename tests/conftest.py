import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lowp_tolerance(kernel: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """Assert that `kernel` (low precision) is within 2x the error that plain PyTorch at the same
    precision (`plain`) makes against a float64 reference (`exact`), plus a floor of one ulp-ish."""
    exact = exact.double()
    plain_err = (plain.double() - exact).abs().max().item()
    kernel_err = (kernel.double() - exact).abs().max().item()
    floor = 1e-2 * max(exact.abs().max().item(), 1e-3) * torch.finfo(kernel.dtype).eps
    assert kernel_err <= 2 * plain_err + floor, f"error {kernel_err:.3g} > 2 x plain PyTorch's {plain_err:.3g}"


def assert_grads_close(got, plain, exact, dtype: torch.dtype) -> None:
    """Kernel gradients `got` against float64 `exact` ones: tight in float32, and within 2x the
    error of plain PyTorch (`plain`, computed at `dtype`) in low precision."""
    for a, p, e in zip(got, plain, exact):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-5)
        else:
            lowp_tolerance(a, p, e)
