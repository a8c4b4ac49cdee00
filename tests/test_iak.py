import torch

from iak_dist.model.strategies.base import DomainRows
from iak_dist.model.strategies.iak import GaussianKernel, IakAdapter, IakConfig, gaussian_kl


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4) * 0.5
    pmu, plogvar = torch.randn(3, 4), torch.randn(3, 4) * 0.5
    closed = gaussian_kl(mu, logvar, pmu, plogvar)
    n = 400_000
    z = mu + (0.5 * logvar).exp() * torch.randn(n, 3, 4, dtype=torch.float64)
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar).exp().double())
    p = torch.distributions.Normal(pmu.double(), (0.5 * plogvar).exp().double())
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(closed.double(), monte_carlo, atol=0.02, rtol=0.01)


def test_kl_is_zero_when_posterior_equals_prior():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(5))


def test_schedule_compression_then_matching():
    adapter = IakAdapter(2, [8, 4], IakConfig(width=2, compression_fraction=0.5, beta_compression=2.0,
                                              beta_matching=0.1))
    kernel = adapter.kernels["0"]
    adapter.on_step(0, 10)
    assert adapter.beta == 2.0 and not kernel.decoder.weight.requires_grad and kernel.encoder.weight.requires_grad
    adapter.on_step(5, 10)
    assert adapter.beta == 0.1 and kernel.decoder.weight.requires_grad


def test_inference_uses_the_mean_and_training_samples():
    torch.manual_seed(0)
    kernel = GaussianKernel(2, 6, IakConfig(width=3))
    torch.nn.init.normal_(kernel.decoder.weight)
    h, domain = torch.randn(4, 6), DomainRows.of(torch.tensor([0, 1, 1, 0]), 2)
    kernel.eval()
    a, _ = kernel(h, domain)
    b, _ = kernel(h, domain)
    assert torch.equal(a, b)
    kernel.train()
    c, _ = kernel(h, domain)
    assert not torch.allclose(a, c)


def test_a_run_resumed_in_compression_freezes_the_decoder():
    """A fresh process whose first step is past 0 but still in compression must apply the phase."""
    adapter = IakAdapter(2, [8, 4], IakConfig(width=2, compression_fraction=0.5, beta_compression=2.0,
                                              beta_matching=0.1))
    logs = adapter.on_step(3, 10)
    assert not adapter.kernels["0"].decoder.weight.requires_grad
    assert adapter.beta == 2.0 and logs["iak/matching"] == 0.0
