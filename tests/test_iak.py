import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from iak_dist.config import load_config
from iak_dist.data.batch import arrow_to_batch
from iak_dist.distributed.sharding import local_module
from iak_dist.errors import UserError
from iak_dist.model.strategies.base import DomainRows
from iak_dist.model.strategies.iak import GaussianKernel, IakAdapter, IakConfig, domain_beta_scale, gaussian_kl
from iak_dist.phases.finetune import build_finetune


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
                                              beta_matching=0.1, insertion="every_layer"))
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
                                              beta_matching=0.1, insertion="every_layer"))
    logs = adapter.on_step(3, 10)
    assert not adapter.kernels["0"].decoder.weight.requires_grad
    assert adapter.beta == 2.0 and logs["iak/matching"] == 0.0


def test_insertion_points_per_value():
    widths = [12, 8, 4]
    keys = {value: sorted(IakAdapter(2, widths, IakConfig(insertion=value)).kernels)
            for value in ["output", "every_layer", "input", "input+output", "input+every_layer"]}
    assert keys == {"output": ["1"], "every_layer": ["0", "1"], "input": ["input"],
                    "input+output": ["1", "input"], "input+every_layer": ["0", "1", "input"]}
    input_kernel = IakAdapter(2, widths, IakConfig(insertion="input", width=3)).kernels["input"]
    assert input_kernel.decoder.weight.shape == (2, 3, 12)


def test_logvar_init_sets_the_starting_sigma():
    """With a zero encoder map, q = N(0, e^logvar_init): KL to the N(0, I) prior is its closed form."""
    k, logvar = 3, -3.0
    kernel = GaussianKernel(2, 6, IakConfig(width=k, init_std=0.0, logvar_init=logvar))
    kernel.train()
    _, kl = kernel(torch.randn(5, 6), DomainRows.of(torch.tensor([0, 1, 1, 0, -1]), 2))
    want = 0.5 * k * (-logvar + math.exp(logvar) - 1.0)
    torch.testing.assert_close(kl, torch.tensor([want] * 4 + [0.0]))


def test_mlp_encoder_has_a_hidden_layer_and_is_nonlinear():
    torch.manual_seed(0)
    k, width, hidden, domains = 2, 6, 5, 3
    kernel = GaussianKernel(domains, width, IakConfig(width=k, encoder="mlp", encoder_hidden=hidden, init_std=0.5))
    params = sum(p.numel() for n, p in kernel.named_parameters() if n.startswith("encoder"))
    assert params == domains * (width * hidden + hidden + hidden * 2 * k + 2 * k)
    torch.nn.init.normal_(kernel.decoder.weight)
    kernel.eval()
    rows, h = DomainRows.of(torch.zeros(4, dtype=torch.long), domains), torch.randn(4, width)
    # a linear encoder with zero bias is odd, delta(-h) = -delta(h); the ReLU layer is not
    delta = [kernel(x, rows)[0] - x for x in (h, -h)]
    assert not torch.allclose(delta[1], -delta[0], atol=1e-4)
    linear = GaussianKernel(domains, width, IakConfig(width=k, encoder="linear", init_std=0.5))
    torch.nn.init.normal_(linear.decoder.weight)
    linear.eval()
    delta = [linear(x, rows)[0] - x for x in (h, -h)]
    torch.testing.assert_close(delta[1], -delta[0])


def test_shared_mlp_encoder_pays_its_hidden_layer_once():
    k, width, hidden = 2, 6, 5
    count = {domains: sum(p.numel() for n, p in GaussianKernel(
        domains, width, IakConfig(width=k, encoder="mlp_shared", encoder_hidden=hidden)).named_parameters()
        if n.startswith("encoder")) for domains in (1, 3)}
    assert count == {d: width * hidden + hidden + d * (hidden * 2 * k + 2 * k) for d in (1, 3)}


def test_domain_beta_scale_closed_form():
    scale = domain_beta_scale(np.array([400, 100, 25, 0]), 0.5)
    torch.testing.assert_close(scale, torch.tensor([1.0, 2.0, 4.0, 1.0]))
    assert torch.equal(domain_beta_scale(np.array([400, 100]), 0.0), torch.ones(2))


def test_kl_is_weighted_per_row_by_its_domains_beta():
    torch.manual_seed(0)
    adapter = IakAdapter(2, [6, 4], IakConfig(width=3, insertion="output", beta_compression=0.5,
                                              compression_fraction=0.5, beta_size_gamma=1.0, init_std=0.3))
    adapter.set_domain_sizes(np.array([100, 25]))
    adapter.on_step(0, 10)
    kernel = adapter.kernels["0"]
    adapter.eval()
    y, domain = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, -1])
    rows = DomainRows.of(domain, 2)
    _, kl = kernel(y, rows)
    _, aux = adapter.adapt_activation(0, y, rows)
    want = 0.5 * (kl[0] + 4 * kl[1] + 4 * kl[2] + kl[3]) / 4
    torch.testing.assert_close(aux, want)
    assert "beta_scale" not in adapter.state_dict()  # inference does not need it


def test_compression_with_the_decoder_sends_task_gradient_to_the_encoder():
    """Frozen zero decoder: the task loss reaches no encoder weight (compression only fits the prior).
    decoder_in_compression: the decoder trains at once, and after one step the task reaches the encoder."""
    torch.manual_seed(0)
    h, rows = torch.randn(16, 4), DomainRows.of(torch.tensor([0, 1] * 8), 2)
    target = torch.randn(16, 4)
    for decoder_trains in (False, True):
        adapter = IakAdapter(2, [6, 4], IakConfig(width=3, insertion="output", compression_fraction=0.5,
                                                  decoder_in_compression=decoder_trains))
        adapter.on_step(0, 10)
        assert adapter.phase == "compression" and adapter.beta == 1.0
        trainable = [p for p in adapter.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        encoder = adapter.kernels["0"].encoder.weight
        for _ in range(2):
            optimizer.zero_grad()
            out, _ = adapter.adapt_activation(0, h, rows)
            ((out - target) ** 2).mean().backward()
            task_grad = encoder.grad.abs().sum() if encoder.grad is not None else torch.tensor(0.0)
            optimizer.step()
        assert (task_grad > 0) == decoder_trains


def test_bad_logvar_init_names_its_key():
    with pytest.raises(UserError, match="finetune.iak.logvar_init"):
        load_config(None, ["finetune.iak.logvar_init=9"])


def test_input_kernel_change_passes_through_the_first_tower_layer(small_cfg, synth_dir, backbone_dir, ctx):
    """The first tower layer's output is its output on interaction output + W_d mu + c_d (the decoder folded
    through the frozen layer computes exactly that function), and the scores move with it."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(small_cfg.finetune)
    cfg.settings["iak"] = dataclasses.replace(cfg.settings["iak"], insertion="input", init_std=0.1)
    run = build_finetune(synth_dir, backbone_dir, "iak", cfg, ctx)
    batch = arrow_to_batch(run.table.slice(0, 64), run.schema)
    model = run.model.eval()
    backbone = local_module(model).backbone
    assert len(backbone.tower) >= 2
    seen = {}
    hooks = [backbone.interaction.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o)),
             backbone.tower[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("second_in", i[0]))]
    kernel = run.adapter.kernels["input"]
    with torch.no_grad():
        before = model(batch).p_ctr
        torch.nn.init.normal_(kernel.decoder.weight)
        torch.nn.init.normal_(kernel.decoder.bias)
        after = model(batch).p_ctr
    for hook in hooks:
        hook.remove()
    rows = DomainRows.of(batch.domain, len(run.schema.domains))
    with torch.no_grad():
        adapted, _ = kernel(seen["x"], rows)  # x + W_d mu + c_d, unfolded
        want = torch.relu(backbone.tower[0](adapted))
    assert not torch.equal(adapted, seen["x"])
    torch.testing.assert_close(seen["second_in"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
