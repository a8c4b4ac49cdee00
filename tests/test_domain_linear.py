"""DomainLinear: K stacked maps, each row through its own domain's map, on both of its paths."""

import pytest
import torch

from iak_dist.model.strategies.base import DomainLinear, DomainRows, domain_linear


def per_row_reference(lin: DomainLinear, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    rows = [x[b] @ lin.weight[d] + lin.bias[d] if d >= 0 else torch.zeros(lin.weight.shape[2])
            for b, d in enumerate(domain.tolist())]
    return torch.stack(rows)


@pytest.mark.parametrize("num_domains,d_in,d_out,path", [
    (3, 8, 4, "every_output"),  # one GEMM over all K outputs (K * out <= gemm_limit)
    (7, 4, 144, "spread"),      # one GEMM over the inputs spread into K blocks (K * in <= gemm_limit)
    (40, 16, 8, "grouped"),     # grouped GEMM, aligned shapes
    (40, 6, 7, "grouped"),      # grouped GEMM, rows narrower than 16 bytes: padded
    (300, 5, 1, "grouped"),     # grouped GEMM, a head-like single output
])
@pytest.mark.parametrize("grouped", [False, True], ids=["rows-mixed", "rows-grouped"])
def test_each_row_uses_its_own_domain_map_forward_and_backward(num_domains, d_in, d_out, path, grouped):
    """Rows in any order (gathered into groups and back), or grouped by domain as training batches come
    (read in place): the same per-row maps."""
    torch.manual_seed(0)
    lin = DomainLinear(num_domains, d_in, d_out, init_std=0.5)
    torch.nn.init.normal_(lin.bias)
    assert lin.path == path
    x = torch.randn(64, d_in)
    domain = torch.randint(-1, min(num_domains, 9), (64,))  # some domains absent, some rows unknown
    if grouped:
        domain = domain.sort().values  # -1 first: unknown rows group with domain 0
    assert (DomainRows.of(domain, num_domains).order is None) == grouped
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = lin(x1, DomainRows.of(domain, num_domains))
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    got = (x1.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    ref = per_row_reference(lin, x2, domain)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref)
    for mine, theirs in zip(got, (x2.grad, lin.weight.grad, lin.bias.grad), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert torch.equal(out[domain < 0], torch.zeros_like(out[domain < 0]))

    # with a residual: added to every row (the spread path accumulates into it inside its GEMM)
    residual = torch.randn(64, d_out)
    added = domain_linear(x, lin.weight, lin.bias, DomainRows.of(domain, num_domains), lin.path, residual=residual)
    torch.testing.assert_close(added, residual + ref)
    assert torch.equal(added[domain < 0], residual[domain < 0])


def test_grouped_path_takes_a_weight_at_an_odd_offset_of_a_flat_buffer():
    """DeepSpeed ZeRO-1/2 turn parameters into views of one flat buffer, at any offset."""
    torch.manual_seed(0)
    lin = DomainLinear(40, 8, 8, init_std=0.5)
    flat = torch.zeros(1 + lin.weight.numel())
    flat[1:].copy_(lin.weight.detach().flatten())
    lin.weight.data = flat[1:].view_as(lin.weight)
    assert lin.weight.data_ptr() % 16 != 0
    x, domain = torch.randn(32, 8), torch.randint(0, 40, (32,))
    torch.testing.assert_close(lin(x, DomainRows.of(domain, 40)), per_row_reference(lin, x, domain))


def test_grouped_rows_are_read_in_place_even_from_a_column_slice_with_unaligned_rows():
    """A grouped batch's input is not copied by a gather: a column slice of the prefix (row stride 14
    floats, 56 bytes) must still reach `F.grouped_mm`, which wants 16-byte row strides."""
    torch.manual_seed(0)
    lin = DomainLinear(40, 8, 8, init_std=0.5)
    x = torch.randn(32, 14)[:, :8]
    domain = torch.randint(0, 40, (32,)).sort().values
    assert DomainRows.of(domain, 40).order is None
    torch.testing.assert_close(lin(x, DomainRows.of(domain, 40)), per_row_reference(lin, x, domain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (F.grouped_mm's CUDA kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_on_cuda_matches_the_reference(dtype):
    """fp32 takes PyTorch's looped fallback on CUDA, bf16 the CUTLASS grouped kernel (SM90+)."""
    torch.manual_seed(0)
    lin = DomainLinear(64, 32, 48, init_std=0.5)
    x, domain = torch.randn(512, 32), torch.randint(-1, 64, (512,))
    want = per_row_reference(lin, x, domain)
    gpu = DomainLinear(64, 32, 48, init_std=0.5).to("cuda", dtype)
    gpu.load_state_dict(lin.state_dict())
    got = gpu(x.to("cuda", dtype), DomainRows.of(domain.cuda(), 64))
    tol = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got.float().cpu(), want.detach(), **tol)
    got.float().sum().backward()
    assert gpu.weight.grad is not None and torch.isfinite(gpu.weight.grad.float()).all()


def test_domain_rows_need_no_host_sync():
    """The per-forward grouping has fixed shapes (K offsets): it runs on meta tensors, which refuse any
    op whose output size depends on the data (`bincount`, `nonzero`): on CUDA each is a host sync."""
    domain = torch.tensor([2, -1, 0, 2, 2, 0])
    rows = DomainRows.of(domain, 4)
    assert rows.offsets.tolist() == [3, 3, 6, 6]  # -1 counts with domain 0 (masked out by `known`)
    assert rows.offsets.dtype == torch.int32 and rows.index[rows.order].tolist() == [0, 0, 0, 2, 2, 2]
    on_meta = DomainRows.of(domain.to("meta"), 4)
    assert on_meta.offsets.shape == (4,) and on_meta.order.shape == (6,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_domain_rows_and_domain_loss_do_not_sync_on_cuda():
    from iak_dist.data.sampler import domain_normalised_mean

    domain = torch.randint(-1, 8, (1024,), device="cuda")
    loss = torch.rand(1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        DomainRows.of(domain, 8)
        domain_normalised_mean(loss, domain, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
